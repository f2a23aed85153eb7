"""``ms_deform_attn``: the compiled ``lt_distill::ms_deform_attn`` operator when it is available,
else the PyTorch reference.

The operator is defined in C++ (``csrc/ms_deform_attn_cpu.cpp``); this module (named there by
``set_python_module``) gives it a fake implementation, so ``torch.compile`` can trace it, and its
autograd formula. It takes the sampling locations and attention weights in the accumulation dtype
(float32, or float64 for float64 values); :func:`ms_deform_attn` casts them, so mixed dtypes under
autocast work and their gradients come back in the caller's dtypes.

The kernels are built on first use (see :mod:`.build`). If that is impossible the reference is used
and one warning line says why and how to fix it. ``LT_DISTILL_MSDA=reference`` selects the
reference without building anything; ``LT_DISTILL_MSDA=cpu`` builds only the CPU kernels.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from . import build as _build
from .reference import ms_deform_attn_reference

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OpsStatus:
    """Which implementation serves which device."""

    cpu: bool  # compiled CPU kernels in use
    cuda: bool  # compiled CUDA kernels in use
    build: _build.BuildInfo | None
    reason: str | None  # why something falls back to the reference

    def describe(self) -> str:
        used = self.build.describe() if self.build is not None else "the PyTorch reference only"
        return used + (f"; reference fallback: {self.reason}" if self.reason else "")


_STATUS: OpsStatus | None = None


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_python_side() -> None:
    """Fake kernels and the autograd formula of the C++-defined operator (once per process)."""

    @torch.library.register_fake("lt_distill::ms_deform_attn")
    def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        n, _, m, d = value.shape
        return value.new_empty((n, sampling_locations.shape[1], m * d))

    @torch.library.register_fake("lt_distill::ms_deform_attn_backward")
    def _backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return (
            torch.empty_like(value, memory_format=torch.contiguous_format),
            torch.empty_like(sampling_locations, memory_format=torch.contiguous_format),
            torch.empty_like(attention_weights, memory_format=torch.contiguous_format),
        )

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = torch.ops.lt_distill.ms_deform_attn_backward(
            grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return grad_value, None, None, grad_locations, grad_weights

    torch.library.register_autograd("lt_distill::ms_deform_attn", backward, setup_context=setup_context)


def prepare_ops(verbose: bool = False) -> OpsStatus:
    """Build or load the kernels once per process and decide what serves CPU and CUDA tensors.

    CUDA kernels are built when a GPU is visible; CPU kernels always. Falls back to the reference,
    with one warning line, when a build is impossible.
    """
    global _STATUS
    if _STATUS is not None:
        return _STATUS
    mode = os.environ.get("LT_DISTILL_MSDA", "auto")
    if mode not in ("auto", "cpu", "reference"):
        raise _build.OpsBuildError(f"LT_DISTILL_MSDA must be auto, cpu or reference, got {mode!r}")
    if mode == "reference":
        _STATUS = OpsStatus(cpu=False, cuda=False, build=None, reason=None)
        return _STATUS
    reason = None
    want_cuda = mode == "auto" and torch.cuda.is_available()
    if want_cuda:
        reason = _build.cuda_toolkit_problem()
    info = None
    if want_cuda and reason is None:
        try:
            info = _build.build(with_cuda=True, verbose=verbose)
        except _build.OpsBuildError as exc:
            reason = str(exc)  # still try the CPU kernels below
    if info is None:
        try:
            info = _build.build(with_cuda=False, verbose=verbose)
        except _build.OpsBuildError as exc:
            reason = f"{reason}; {exc}" if reason else str(exc)
    if info is not None and info.with_cuda:
        capability = torch.cuda.get_device_capability()
        if not _build.arch_covers_device(info.arch_list, capability):
            reason = (
                f"the build has no kernel image for this GPU (sm_{capability[0]}{capability[1]}; built for "
                f"{', '.join(info.arch_list)}); set TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]} "
                "(or unset it) and run `lt-distill build-ops`"
            )
    if info is not None:
        _register_python_side()
    _STATUS = OpsStatus(
        cpu=info is not None,
        cuda=info is not None and info.with_cuda and reason is None,
        build=info,
        reason=reason,
    )
    if reason is not None:
        scope = "CUDA tensors" if _STATUS.cpu else "all tensors"
        logger.warning("MSDeformAttn uses the slow PyTorch reference for %s: %s", scope, reason)
    return _STATUS


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention (same arguments and result as :func:`ms_deform_attn_reference`).

    Args:
        value: ``(N, S, M, D)`` float16/bfloat16/float32/float64.
        spatial_shapes: ``(L, 2)`` int64 ``(H, W)`` per level.
        level_start_index: ``(L,)`` int64 offset of each level in ``S``.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)``; any float dtype.
        attention_weights: ``(N, Lq, M, L, P)``; any float dtype.

    Returns:
        ``(N, Lq, M * D)`` in the dtype of ``value``. Sampling and accumulation are done in float32
        (float64 for float64 values).
    """
    status = _STATUS if torch.compiler.is_compiling() else prepare_ops()
    use_op = status is not None and (status.cuda if value.is_cuda else status.cpu and value.device.type == "cpu")
    if not use_op:
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    acc = _accumulate_dtype(value.dtype)
    return torch.ops.lt_distill.ms_deform_attn(
        value, spatial_shapes, level_start_index, sampling_locations.to(acc), attention_weights.to(acc)
    )
