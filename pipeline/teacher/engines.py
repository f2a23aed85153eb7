"""Engines that run the teacher's image function: eager, torch.compile, TensorRT.

An engine wraps one ``nn.Module`` taking a float (N, 3, S, S) batch. Compiled engines run a few fixed
batch shapes, the *buckets* (powers of two up to ``batch_size``, at most seven of them: see
:func:`batch_buckets`): :class:`Engine` splits a call into ``batch_size`` rows and pads each piece to
the smallest bucket that holds it, so a call costs at most twice its work (a step with 8 tiles runs 8
rows, not 256) and nothing compiles more than once per bucket. :func:`build_engine` checks every compiled engine against
eager on a calibration batch and falls back to eager, with one warning line, when it is unavailable,
fails to build, or disagrees beyond the tolerance of its precision.

TensorRT engines (torch-tensorrt, dynamo path) are cached on disk, keyed by the caller's key (model,
weights hash, ...) plus batch shape, precision, torch / torch-tensorrt / TensorRT versions and GPU name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger("lt_distill")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Parity tolerance of a compiled engine vs eager, on the metric the caller gives (the teacher uses
# cosine similarities with the class text embeddings: logits / logit_scale).
PARITY_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2}


def autocast(device: torch.device, precision: str):
    """Autocast context for fp16/bf16 on CUDA; fp32 (and the CPU) run without it."""
    if precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=DTYPES[precision])


def tensorrt_unavailable_reason(device: torch.device) -> str | None:
    """Why the TensorRT engine cannot run here, or None when it can."""
    if device.type != "cuda":
        return "TensorRT needs a CUDA device"
    if importlib.util.find_spec("torch_tensorrt") is None:
        return "torch-tensorrt is not installed (pip install 'lt-distill[tensorrt]')"
    return None


def resolve_engine(requested: str, device: torch.device) -> str:
    """``auto`` -> tensorrt when usable, else compile on CUDA, else eager (torch.compile's start-up cost
    does not pay off on the CPU for most jobs); other names are returned unchanged."""
    if requested != "auto":
        return requested
    if tensorrt_unavailable_reason(device) is None:
        return "tensorrt"
    return "compile" if device.type == "cuda" else "eager"


MAX_BUCKETS = 7


def batch_buckets(batch_size: int) -> tuple[int, ...]:
    """The batch shapes a compiled engine of at most ``batch_size`` rows runs: powers of two from
    ``batch_size / 64`` (at least 1) up, and ``batch_size`` itself (e.g. 256 -> 4, 8, ..., 256; 8 -> 1, 2,
    4, 8). Seven at most, so torch.compile stays under its recompile limit (8) and TensorRT builds at
    most seven engines."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    top = 1 << (batch_size.bit_length() - 1)  # largest power of two <= batch_size
    sizes = [top >> i for i in range(MAX_BUCKETS) if top >> i >= 1][::-1]
    if top != batch_size:
        sizes.append(batch_size)
    return tuple(sizes[-MAX_BUCKETS:])


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding ``n`` rows (``n`` <= the largest bucket)."""
    for size in buckets:
        if size >= n:
            return size
    raise ValueError(f"{n} rows exceed the largest bucket {buckets[-1]}")


class Engine:
    """Callable (N, 3, S, S) float -> module output. ``batch_size`` None: any N in one call (eager);
    else calls of at most ``batch_size`` rows, each padded to its bucket (:func:`batch_buckets`).

    ``fn`` runs a padded batch; ``for_bucket`` (optional) gives the function for one bucket size when
    each shape is its own artefact (TensorRT engines), built on first use. ``rows_run`` counts the rows
    sent to the module, padding included (the benches report it)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor] | None, name: str, batch_size: int | None,
                 info: dict[str, Any] | None = None,
                 for_bucket: Callable[[int], Callable[[torch.Tensor], torch.Tensor]] | None = None) -> None:
        self.fn = fn
        self.name = name
        self.batch_size = batch_size
        self.buckets = batch_buckets(batch_size) if batch_size is not None else None
        self.info = dict(info or {})
        if self.buckets is not None:
            self.info["buckets"] = list(self.buckets)
        self._for_bucket = for_bucket
        self._bucket_fns: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.rows_run = 0

    def _fn(self, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
        if self._for_bucket is None:
            return self.fn
        if rows not in self._bucket_fns:
            self._bucket_fns[rows] = self._for_bucket(rows)
        return self._bucket_fns[rows]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_size is None:
            self.rows_run += x.shape[0]
            return self.fn(x)
        n, b = x.shape[0], self.batch_size
        outs = []
        for start in range(0, n, b):
            chunk = x[start:start + b]
            rows = bucket_for(chunk.shape[0], self.buckets)
            self.rows_run += rows
            if chunk.shape[0] < rows:  # pad to the bucket: a shape compiled before, no recompilation
                pad = chunk.new_zeros((rows - chunk.shape[0], *chunk.shape[1:]))
                outs.append(self._fn(rows)(torch.cat([chunk, pad]))[: chunk.shape[0]])
            else:
                outs.append(self._fn(rows)(chunk))
        return torch.cat(outs) if len(outs) != 1 else outs[0]


def eager_engine(module: torch.nn.Module, device: torch.device, precision: str) -> Engine:
    def run(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return module(x).float()
    return Engine(run, "eager", None)


def _compile_engine(module: torch.nn.Module, device: torch.device, precision: str, batch_size: int) -> Engine:
    compiled = torch.compile(module, dynamic=False)

    def run(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return compiled(x).float()
    return Engine(run, "compile", batch_size)


def engine_cache_key(key: dict[str, Any], example: torch.Tensor, precision: str, device: torch.device) -> str:
    """Hash of everything a serialised TensorRT engine depends on."""
    import tensorrt
    import torch_tensorrt

    parts = dict(key)
    parts.update({
        "shape": list(example.shape), "precision": precision, "torch": torch.__version__,
        "torch_tensorrt": torch_tensorrt.__version__, "tensorrt": tensorrt.__version__,
        "gpu": torch.cuda.get_device_name(device),
    })
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _tensorrt_module(module: torch.nn.Module, example: torch.Tensor, precision: str, device: torch.device,
                     cache_dir: Path, key: dict[str, Any], info: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The TensorRT module for ``example``'s shape, loaded from the cache or built and cached; records
    ``cache`` (hit / built) and ``cache_file`` per batch size in ``info``."""
    import torch_tensorrt

    path = cache_dir / f"{engine_cache_key(key, example, precision, device)}.ep"
    entry = {"cache_file": str(path)}
    if path.is_file():
        trt_module = torch.export.load(str(path)).module()
        entry["cache"] = "hit"
    else:
        precisions = {torch.float32} if precision == "fp32" else {torch.float32, DTYPES[precision]}
        trt_module = torch_tensorrt.compile(module, ir="dynamo", inputs=[example], enabled_precisions=precisions)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch_tensorrt.save(trt_module, str(tmp), inputs=[example])
        tmp.replace(path)  # atomic: concurrent ranks never read a half-written engine
        entry["cache"] = "built"
    info.setdefault("per_batch", {})[example.shape[0]] = entry
    info.update(entry)  # the latest one, at the top level as before

    def run(x: torch.Tensor) -> torch.Tensor:
        return trt_module(x.float()).float()
    return run


def _tensorrt_engine(module: torch.nn.Module, example: torch.Tensor, precision: str, device: torch.device,
                     cache_dir: Path, key: dict[str, Any]) -> Engine:
    """One static-shape TensorRT engine per bucket: the calibration batch's (the largest) now, the
    others when a call first needs them (each cached on disk, so later runs only load them)."""
    info: dict[str, Any] = {}
    largest = _tensorrt_module(module, example, precision, device, cache_dir, key, info)  # fails early

    def for_bucket(rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
        if rows == example.shape[0]:
            return largest
        return _tensorrt_module(module, example[:rows].contiguous(), precision, device, cache_dir, key, info)
    return Engine(None, "tensorrt", example.shape[0], info, for_bucket=for_bucket)


@dataclasses.dataclass
class ParityCheck:
    """How a compiled engine is checked against eager: ``metric(out) -> tensor`` compared elementwise."""

    metric: Callable[[torch.Tensor], torch.Tensor]
    tolerance: float


def build_engine(module: torch.nn.Module, requested: str, example: torch.Tensor, *, device: torch.device,
                 precision: str, parity: ParityCheck, cache_dir: Path | None = None,
                 cache_key: dict[str, Any] | None = None) -> Engine:
    """The engine ``requested`` (eager/compile/tensorrt/auto) for ``module`` at the batch shape of
    ``example`` (the calibration batch), or eager with one warning line when it cannot be used."""
    name = resolve_engine(requested, device)
    eager = eager_engine(module, device, precision)
    if name == "eager":
        return eager
    if name == "tensorrt":
        reason = tensorrt_unavailable_reason(device)
        if reason is not None:
            logger.warning("engine tensorrt unavailable (%s); using eager", reason)
            return eager
    try:
        if name == "compile":
            engine = _compile_engine(module, device, precision, example.shape[0])
        elif name == "tensorrt":
            engine = _tensorrt_engine(module, example, precision, device,
                                      cache_dir or default_engine_cache(), cache_key or {})
        else:
            raise ValueError(f"unknown engine {name!r}")
        with torch.no_grad():
            want = parity.metric(eager(example))
            got = parity.metric(engine(example))
    except (RuntimeError, ImportError, OSError) as exc:  # compiler / TensorRT build failures
        logger.warning("engine %s failed to build (%s); using eager", name, str(exc).splitlines()[0][:200])
        return eager
    err = float((got - want).abs().max())
    engine.info.update({"parity_max_abs_err": err, "parity_tolerance": parity.tolerance})
    if not err <= parity.tolerance:
        logger.warning("engine %s refused: differs from eager by %.3g on the calibration batch (tolerance %.3g); "
                       "using eager", name, err, parity.tolerance)
        return eager
    return engine


def default_engine_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "lt-distill" / "engines"
