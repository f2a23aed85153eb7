"""`lt-distill bench msda`: the compiled MSDeformAttn op against the PyTorch reference.

Times forward and forward+backward (gradients for value, sampling locations and attention
weights) at a DINO encoder self-attention shape: every feature position is a query (Lq = S) with its
reference point on its own pixel centre and learned-looking offsets of a few pixels. On a CUDA
device it also times the CUDA op and compares the bytes it must move at least (each input read
once, each output written once) with the device's DRAM bandwidth.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from ..cuda_ops import ms_deform_attn_reference, prepare_ops
from ..cuda_ops.build import OpsBuildError
from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MsdaShape:
    """An encoder layer's attention: ``image_size`` px input, levels at strides 8, 16, 32, 64."""

    batch: int = 2
    hidden: int = 64
    heads: int = 8
    points: int = 4
    image_size: tuple[int, int] = (256, 256)  # (H, W) of the input image
    levels: int = 4

    def __post_init__(self) -> None:
        if self.hidden % self.heads != 0:
            raise ConfigError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        h, w = self.image_size
        return [(-(-h // 2 ** (3 + i)), -(-w // 2 ** (3 + i))) for i in range(self.levels)]

    @property
    def spatial(self) -> int:
        return sum(h * w for h, w in self.level_shapes)

    def describe(self) -> str:
        levels = ", ".join(f"{h}x{w}" for h, w in self.level_shapes)
        return (f"batch {self.batch}, hidden {self.hidden} = {self.heads} heads x {self.hidden // self.heads} ch, "
                f"{self.points} points, {self.image_size[0]}x{self.image_size[1]} px -> levels {levels}, "
                f"S = Lq = {self.spatial}")


TINY_DINO = MsdaShape()
DINO_R50 = MsdaShape(hidden=256, image_size=(800, 1333))  # the DESIGN §6 floor shape (S = Lq = 22223)


def make_inputs(shape: MsdaShape, dtype: torch.dtype, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)."""
    gen = torch.Generator().manual_seed(seed)
    n, m, d, p = shape.batch, shape.heads, shape.hidden // shape.heads, shape.points
    sizes = torch.tensor(shape.level_shapes, dtype=torch.int64)
    starts = torch.cat([sizes.new_zeros(1), sizes.prod(1).cumsum(0)[:-1]])
    # Reference points: the pixel centres of every level (the encoder's queries).
    centres = []
    for h, w in shape.level_shapes:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        centres.append(torch.stack([xs.flatten(), ys.flatten()], -1))
    ref = torch.cat(centres)  # (S, 2)
    wh = sizes.flip(-1).to(torch.float32)  # (L, 2) as (W, H)
    offsets = torch.randn(n, shape.spatial, m, shape.levels, p, 2, generator=gen) * 2.0  # pixels
    loc = ref[None, :, None, None, None, :] + offsets / wh[None, None, None, :, None, :]
    attn = torch.randn(n, shape.spatial, m, shape.levels * p, generator=gen).softmax(-1)
    attn = attn.view(n, shape.spatial, m, shape.levels, p)
    value = torch.randn(n, shape.spatial, m, d, generator=gen)
    return (value.to(device, dtype), sizes.to(device), starts.to(device), loc.to(device), attn.to(device))


def _time_interleaved(fns: dict[str, Callable[[], Any]], device: str, repeats: int,
                      warmup: int) -> dict[str, dict[str, float]]:
    """Median wall-clock and process-CPU seconds per call of each function. The functions take turns
    in every round, so load from other processes hits all of them alike."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: {"wall": statistics.median(wall[name]), "cpu": statistics.median(cpu[name])} for name in fns}


def _passes(name: str, op: Callable, inputs: tuple[torch.Tensor, ...]) -> dict[str, Callable[[], Any]]:
    """``{name} forward`` (no autograd) and ``{name} forward_backward`` (gradients of value,
    sampling locations and attention weights) closures."""
    value, sizes, starts, loc, attn = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=value.device,
                           dtype=value.dtype)

    def forward():
        with torch.no_grad():
            op(value, sizes, starts, loc, attn)

    def forward_backward():
        out = op(leaves[0], sizes, starts, leaves[1], leaves[2])
        torch.autograd.grad(out, leaves, grad_out)

    return {f"{name} forward": forward, f"{name} forward_backward": forward_backward}


def _min_bytes(inputs: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """Bytes the forward and the backward must move at least: every input read once, every output
    written once (the backward reads grad_output and the forward inputs, writes three gradients)."""
    value, _, _, loc, attn = inputs
    v, lo, a = (t.numel() * t.element_size() for t in (value, loc, attn))
    out = loc.shape[0] * loc.shape[1] * value.shape[2] * value.shape[3] * value.element_size()
    return v + lo + a + out, out + v + lo + a + v + lo + a


def _dram_bandwidth() -> float:
    """Achievable device-memory bandwidth in bytes/s, measured with a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    seconds = _time_interleaved({"copy": lambda: dst.copy_(src)}, "cuda", repeats=10, warmup=3)["copy"]["wall"]
    return 2 * src.numel() * src.element_size() / seconds


def run_msda_benchmark(shape: MsdaShape = TINY_DINO, repeats: int = 20, threads: int | None = None,
                       cuda_shape: MsdaShape = DINO_R50, console: Console | None = None) -> dict[str, Any]:
    """Time the CPU op and the reference (and, where a GPU exists, the CUDA op); print a table.

    Returns:
        dict with ``ops`` (what was built), ``threads``, ``cpu`` (median wall-clock and process-CPU
        milliseconds of the op and the reference, and the reference / op ratios for both clocks) and
        ``cuda`` (timings, minimum bytes, achieved bandwidth; None without a GPU).
    """
    console = console or Console()
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(shape, repeats, cuda_shape, console)
    finally:
        torch.set_num_threads(previous_threads)


def _run(shape: MsdaShape, repeats: int, cuda_shape: MsdaShape, console: Console) -> dict[str, Any]:
    status = prepare_ops()
    results: dict[str, Any] = {"ops": status.describe(), "threads": torch.get_num_threads()}
    if not status.cpu:
        raise OpsBuildError(f"the compiled CPU op is not available: {status.reason}")

    inputs = make_inputs(shape, torch.float32, "cpu")
    times = _time_interleaved({**_passes("op", torch.ops.lt_distill.ms_deform_attn, inputs),
                               **_passes("reference", ms_deform_attn_reference, inputs)}, "cpu", repeats, warmup=3)
    cpu: dict[str, Any] = {"shape": shape.describe(), "dtype": "float32"}
    for clock in ("wall", "cpu"):
        cpu[f"{clock}_ms"] = {name: t[clock] * 1e3 for name, t in times.items()}
        cpu[f"{clock}_speedup"] = {
            p: times[f"reference {p}"][clock] / times[f"op {p}"][clock] for p in ("forward", "forward_backward")
        }
    results["cpu"] = cpu
    table = Table(title=f"MSDeformAttn on CPU ({results['threads']} threads), float32, median of {repeats}: "
                        f"{shape.describe()}")
    for column in ("", "op (ms)", "reference (ms)", "reference / op", "CPU time: reference / op"):
        table.add_column(column, justify="right")
    for p, label in (("forward", "forward"), ("forward_backward", "forward + backward")):
        table.add_row(label, f"{cpu['wall_ms'][f'op {p}']:.2f}", f"{cpu['wall_ms'][f'reference {p}']:.2f}",
                      f"{cpu['wall_speedup'][p]:.1f}x", f"{cpu['cpu_speedup'][p]:.1f}x")
    console.print(table)

    results["cuda"] = None
    if torch.cuda.is_available():
        results["cuda"] = _run_cuda(cuda_shape, status.cuda, repeats, console)
    else:
        console.print("CUDA: no GPU here, CUDA timings not run")
    return results


def _run_cuda(shape: MsdaShape, have_op: bool, repeats: int, console: Console) -> dict[str, Any]:
    bandwidth = _dram_bandwidth()
    out: dict[str, Any] = {"shape": shape.describe(), "device": torch.cuda.get_device_name(),
                           "copy_bandwidth_GBps": bandwidth / 1e9, "dtypes": {}}
    table = Table(title=f"MSDeformAttn on {out['device']}, median of {repeats}: {shape.describe()}")
    for column in ("dtype", "pass", "op (µs)", "reference (µs)", "reference / op", "floor (µs)", "floor / op"):
        table.add_column(column, justify="right")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        inputs = make_inputs(shape, dtype, "cuda")
        fwd_bytes, bwd_bytes = _min_bytes(inputs)
        fns = _passes("reference", ms_deform_attn_reference, inputs)
        if have_op:
            # The op takes locations and weights in float32 (what ms_deform_attn casts them to).
            op_inputs = (*inputs[:3], inputs[3].float(), inputs[4].float())
            fns.update(_passes("op", torch.ops.lt_distill.ms_deform_attn, op_inputs))
        times = {k: v["wall"] for k, v in _time_interleaved(fns, "cuda", repeats, warmup=3).items()}
        ref_fwd, ref_fb = times["reference forward"], times["reference forward_backward"]
        entry: dict[str, Any] = {"reference_us": {"forward": ref_fwd * 1e6, "forward_backward": ref_fb * 1e6},
                                 "min_bytes": {"forward": fwd_bytes, "backward": bwd_bytes}}
        if have_op:
            op_fwd, op_fb = times["op forward"], times["op forward_backward"]
            op_bwd = op_fb - op_fwd
            floor_fwd, floor_bwd = fwd_bytes / bandwidth, bwd_bytes / bandwidth
            entry.update({
                "op_us": {"forward": op_fwd * 1e6, "forward_backward": op_fb * 1e6, "backward": op_bwd * 1e6},
                "floor_us": {"forward": floor_fwd * 1e6, "backward": floor_bwd * 1e6},
                "achieved_GBps": {"forward": fwd_bytes / op_fwd / 1e9, "backward": bwd_bytes / op_bwd / 1e9},
                "speedup": {"forward": ref_fwd / op_fwd, "forward_backward": ref_fb / op_fb},
            })
            table.add_row(name, "forward", f"{op_fwd * 1e6:.0f}", f"{ref_fwd * 1e6:.0f}", f"{ref_fwd / op_fwd:.1f}x",
                          f"{floor_fwd * 1e6:.0f}", f"{100 * floor_fwd / op_fwd:.0f}%")
            table.add_row(name, "backward", f"{op_bwd * 1e6:.0f}", "", "", f"{floor_bwd * 1e6:.0f}",
                          f"{100 * floor_bwd / op_bwd:.0f}%")
            table.add_row(name, "fwd + bwd", f"{op_fb * 1e6:.0f}", f"{ref_fb * 1e6:.0f}", f"{ref_fb / op_fb:.1f}x",
                          "", "")
        else:
            table.add_row(name, "forward", "", f"{ref_fwd * 1e6:.0f}", "", "", "")
            table.add_row(name, "fwd + bwd", "", f"{ref_fb * 1e6:.0f}", "", "", "")
        out["dtypes"][name] = entry
    if not have_op:
        console.print("CUDA op not available: reference timings only")
    console.print(table)
    console.print(f"floor = minimum bytes (inputs read once, outputs written once) / device copy bandwidth "
                  f"({bandwidth / 1e9:.0f} GB/s); backward = forward+backward - forward")
    return out
