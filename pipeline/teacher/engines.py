"""Engines that run the teacher's image function: eager, torch.compile, TensorRT.

An engine wraps one ``nn.Module`` taking a float (N, 3, S, S) batch. Compiled engines have one fixed
batch shape (``batch_size`` rows); :class:`Engine` splits a call into such batches and pads the last
one, so nothing recompiles on a partial batch. :func:`build_engine` checks every compiled engine against
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


class Engine:
    """Callable (N, 3, S, S) float -> module output, in batches of ``batch_size`` (None: any N)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str, batch_size: int | None,
                 info: dict[str, Any] | None = None) -> None:
        self.fn = fn
        self.name = name
        self.batch_size = batch_size
        self.info = dict(info or {})

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_size is None:
            return self.fn(x)
        n, b = x.shape[0], self.batch_size
        outs = []
        for start in range(0, n, b):
            chunk = x[start:start + b]
            if chunk.shape[0] < b:  # pad the last partial batch: same shape, no recompilation
                pad = chunk.new_zeros((b - chunk.shape[0], *chunk.shape[1:]))
                outs.append(self.fn(torch.cat([chunk, pad]))[: chunk.shape[0]])
            else:
                outs.append(self.fn(chunk))
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


def _tensorrt_engine(module: torch.nn.Module, example: torch.Tensor, precision: str, device: torch.device,
                     cache_dir: Path, key: dict[str, Any]) -> Engine:
    import torch_tensorrt

    path = cache_dir / f"{engine_cache_key(key, example, precision, device)}.ep"
    info = {"cache_file": str(path)}
    if path.is_file():
        trt_module = torch.export.load(str(path)).module()
        info["cache"] = "hit"
    else:
        precisions = {torch.float32} if precision == "fp32" else {torch.float32, DTYPES[precision]}
        trt_module = torch_tensorrt.compile(module, ir="dynamo", inputs=[example], enabled_precisions=precisions)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch_tensorrt.save(trt_module, str(tmp), inputs=[example])
        tmp.replace(path)  # atomic: concurrent ranks never read a half-written engine
        info["cache"] = "built"

    def run(x: torch.Tensor) -> torch.Tensor:
        return trt_module(x.float()).float()
    return Engine(run, "tensorrt", example.shape[0], info)


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
