"""Teacher weights named by an open_clip pretrained tag (``--pretrained openai``), resolved by open_clip.

open_clip finds the file in its own cache (the Hugging Face hub cache, or ``~/.cache/clip`` for URL
entries) and downloads it when it can; ``HF_HUB_OFFLINE=1`` keeps it to the cache. Building the model
through open_clip with the tag, not with the file, also applies what the tag implies (QuickGELU for the
OpenAI weights, the tag's mean / std). Provenance records the tag and the file's SHA-256.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .model import TeacherError, file_sha256


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def resolve_pretrained(model_name: str, tag: str, cache_dir: str | None = None) -> Path:
    """The local file of open_clip's ``model_name`` / ``tag`` weights (downloaded by open_clip if it may).
    Raises one-line :class:`TeacherError` for an unknown tag or a file that is neither cached nor
    downloadable."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise TeacherError(f"open_clip has no pretrained tag {tag!r} for {model_name!r}"
                           + (f" (its tags: {', '.join(tags)})" if tags else " (it has no pretrained tags)"))
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    # huggingface_hub logs a retry warning per failed attempt; the error below says it in one line
    quiet = logging.getLogger("huggingface_hub")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    except (OSError, ValueError, RuntimeError) as exc:
        where = "HF_HUB_OFFLINE is set" if offline else "and it could not be downloaded"
        raise TeacherError(f"open_clip weights {model_name}/{tag} are not in the local cache ({where}: "
                           f"{_first_line(exc)}); download them once with network access, or pass --weights FILE"
                           ) from exc
    finally:
        quiet.setLevel(level)
    if not path or not Path(path).is_file():
        raise TeacherError(f"open_clip weights {model_name}/{tag} could not be resolved to a file (got {path!r})")
    return Path(path)


def load_pretrained(model_name: str, tag: str, cache_dir: str | None = None) -> tuple[torch.nn.Module, str, Path]:
    """(model in eval mode on the CPU, weights SHA-256, weights file) for an open_clip pretrained tag."""
    import open_clip

    path = resolve_pretrained(model_name, tag, cache_dir)
    try:
        # open_clip only warns when a tag was trained with QuickGELU (OpenAI's) and the architecture config
        # says GELU; the activations would be wrong, so the tag's setting is applied
        quick_gelu = bool(open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu", False))
        model = open_clip.create_model(model_name, pretrained=tag, device="cpu", cache_dir=cache_dir,
                                       force_quick_gelu=quick_gelu, require_pretrained=True, weights_only=True)
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise TeacherError(f"cannot load open_clip weights {model_name}/{tag} from {path}: {_first_line(exc)}") from exc
    return model.eval(), file_sha256(path), path
