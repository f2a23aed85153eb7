"""How many worker processes this machine can take (DataLoader workers, shard writers)."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and torchrun narrow), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_workers(cap: int = 4) -> int:
    """DataLoader workers by default: one CPU left to the main process, at most ``cap``
    (``--workers 4`` on a 2-core machine over-subscribes it and PyTorch warns on every run)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(cap, available_cpus() // max(local_world, 1) - 1))
