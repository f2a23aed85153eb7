"""Two gloo processes (torch.distributed, as under torchrun), each with two DataLoader workers, see
disjoint detection images and disjoint classification samples that together cover the data once."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from lt_distill.pipeline.data import synthetic as S

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from lt_distill.pipeline.data import (build_classification_dataset, build_classification_loader,
                                          build_detection_dataset, build_detection_loader, data_config,
                                          open_label_store)

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cfg = data_config("tiny", json.loads(sys.argv[1]))
    reader = open_label_store(cfg)
    det = build_detection_loader(cfg, build_detection_dataset(cfg, reader))
    det.batch_sampler.sampler.set_epoch(3)
    image_ids = [t["image_id"] for batch in det for t in batch["targets"]]
    cls = build_classification_loader(cfg, build_classification_dataset(cfg, reader, repeat=False))
    rows = [r for batch in cls for t in batch["targets"] for r in t["rows"].tolist()]
    gathered = [None, None]
    dist.all_gather_object(gathered, {"image_ids": image_ids, "rows": rows})
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_with_two_workers_see_disjoint_data(tmp_path):
    pattern, keys, _ = S.write_shards(tmp_path / "shards", 3, 7, seed=5, size_range=(32, 48))
    jpath, images = S.write_detection_set(tmp_path / "det", 10, seed=6, size_range=(40, 64))
    S.write_label_store(tmp_path / "store", keys, num_classes=10)
    cfg = {"det_annotations": str(jpath), "det_images": str(images), "cls_shards": pattern,
           "label_store": str(tmp_path / "store"), "batch_size": 1, "num_workers": 2,
           "cls_unlabelled": "keep"}  # every sample counts here, also those whose class maps to no category
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "seen.json"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), json.dumps(cfg), str(out)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    seen = json.loads(out.read_text())

    ids = [set(s["image_ids"]) for s in seen]
    assert len(seen[0]["image_ids"]) == len(seen[1]["image_ids"]) == 5
    assert not ids[0] & ids[1] and ids[0] | ids[1] == set(range(1, 11))

    rows = [[tuple(r) for r in s["rows"]] for s in seen]
    assert rows[0] and rows[1] and not set(rows[0]) & set(rows[1])
    every = sorted(rows[0] + rows[1])
    assert every == sorted((s, p) for s in range(3) for p in range(7))  # each sample exactly once
