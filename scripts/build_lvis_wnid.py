"""Build ``assets/lvis_v1_synset_wnid.txt``: the WordNet 3.0 id of every LVIS v1 synset.

An LVIS category names its WordNet sense the NLTK way (``aerosol.n.02``: lemma, part of speech, sense
number). Its WordNet id, the label ImageNet uses, is ``"n"`` + the 8-digit byte offset of that sense
in WordNet 3.0's ``data.noun``. The sense number is the 1-based position of the offset in the lemma's
line of ``index.noun`` (the order NLTK uses), so the mapping needs only the index file.

Run once, offline; the result ships with lt-distill so that nothing at run time needs WordNet::

    apt-get install wordnet-base            # Debian/Ubuntu: WordNet 3.0 in /usr/share/wordnet
    python scripts/build_lvis_wnid.py [--wordnet-dir /usr/share/wordnet]

WordNet 3.0 is (c) 2006 Princeton University, under the WordNet 3.0 licence (a permissive BSD-style
licence that allows redistribution of derived data with its copyright notice; see assets/README.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def read_noun_index(wordnet_dir: Path) -> dict[str, list[str]]:
    """lemma -> the offsets of its noun senses, in sense-number order (WordNet ``index.noun``)."""
    index: dict[str, list[str]] = {}
    with open(wordnet_dir / "index.noun", encoding="utf-8") as f:
        for line in f:
            if line.startswith(" "):  # licence header lines start with two spaces
                continue
            fields = line.split()
            lemma, synset_cnt, p_cnt = fields[0], int(fields[2]), int(fields[3])
            offsets = fields[4 + p_cnt + 2:]
            if len(offsets) != synset_cnt:
                raise ValueError(f"malformed index.noun line for {lemma!r}")
            index[lemma] = offsets
    return index


def synset_to_wnid(synset: str, index: dict[str, list[str]]) -> str | None:
    lemma, pos, sense = synset.rsplit(".", 2)
    if pos != "n":
        return None
    offsets = index.get(lemma.lower())
    if offsets is None or not 1 <= int(sense) <= len(offsets):
        return None
    return "n" + offsets[int(sense) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--categories", type=Path, default=ASSETS / "lvis_v1_train_cat_info.json")
    parser.add_argument("--out", type=Path, default=ASSETS / "lvis_v1_synset_wnid.txt")
    args = parser.parse_args()

    index = read_noun_index(args.wordnet_dir)
    categories = sorted(json.loads(args.categories.read_text()), key=lambda c: c["id"])
    rows, missing = [], []
    for cat in categories:
        wnid = synset_to_wnid(cat["synset"], index)
        if wnid is None:
            missing.append(cat["synset"])
        else:
            rows.append(f"{cat['synset']}\t{wnid}")
    header = [
        "# LVIS v1 synset -> WordNet 3.0 noun id (n + 8-digit data.noun offset); built by scripts/build_lvis_wnid.py",
        "# from Princeton WordNet 3.0 (Debian wordnet-base). WordNet 3.0 Copyright 2006 by Princeton University.",
        f"# {len(rows)} of {len(categories)} synsets; not in WordNet 3.0: {', '.join(missing) or 'none'}",
    ]
    args.out.write_text("\n".join(header + rows) + "\n")
    print(f"wrote {args.out}: {len(rows)} synsets mapped, missing: {missing}")


if __name__ == "__main__":
    main()
