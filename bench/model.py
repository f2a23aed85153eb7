"""`lt-distill bench model`: forward+backward time per image of a detector preset, and the share
of it spent inside multi-scale deformable attention.

One training step = model forward with denoising queries, criterion (Hungarian matching, all
losses), backward; no optimizer step. Targets are random boxes with soft labels; text embeddings
are random ``(C, 512)`` (their values do not change the cost). The deformable-attention op
(``lt_distill.cuda_ops.ms_deform_attn``, whatever implementation serves the device) is timed in
place during the same steps by wrapping it in an autograd function that clocks its forward and
its backward, so the share is a ratio measured within one run. The rest of each MSDeformAttn
layer (value / offset / weight projections) is ordinary Linear work and counted outside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Iterator

import torch
from rich.console import Console
from rich.table import Table

from ..cuda_ops import modules as msda_modules
from ..cuda_ops import prepare_ops
from ..errors import LtDistillError
from ..pipeline.model import build_model, model_config


@dataclasses.dataclass
class _Clock:
    forward: float = 0.0
    backward: float = 0.0
    calls: int = 0


@contextlib.contextmanager
def timed_msda(clock: _Clock) -> Iterator[None]:
    """Within the block, every MSDeformAttn layer's op call adds its forward and backward seconds to ``clock``."""
    op = msda_modules.ms_deform_attn

    class Timed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, spatial_shapes, level_start_index, locations, weights):
            start = time.perf_counter()
            with torch.enable_grad():
                inputs = [t.detach().requires_grad_(t.requires_grad) for t in (value, locations, weights)]
                out = op(inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2])
            clock.forward += time.perf_counter() - start
            clock.calls += 1
            ctx.inputs, ctx.out = inputs, out
            return out.detach()

        @staticmethod
        def backward(ctx, grad):
            start = time.perf_counter()
            wanted = [t for t in ctx.inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(ctx.out, wanted, grad) if wanted else ())
            value, locations, weights = (next(grads) if t.requires_grad else None for t in ctx.inputs)
            clock.backward += time.perf_counter() - start
            return value, None, None, locations, weights

    msda_modules.ms_deform_attn = Timed.apply
    try:
        yield
    finally:
        msda_modules.ms_deform_attn = op


def _targets(batch: int, boxes: int, num_classes: int, g: torch.Generator) -> list[dict]:
    targets = []
    for i in range(batch):
        centres = torch.rand(boxes, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(boxes, 2, generator=g) * 0.3 + 0.05
        targets.append({
            "boxes": torch.cat([centres, sizes], 1),
            "labels": torch.randint(0, num_classes, (boxes,), generator=g),
            "soft_labels": torch.softmax(torch.randn(boxes, num_classes, generator=g) * 3, -1),
            "soft_mask": torch.ones(boxes, dtype=torch.bool),
            "image_id": i,
        })
    return targets


def run_model_bench(
    preset: str = "tiny",
    batch: int = 2,
    image_size: int = 256,
    num_classes: int = 1203,
    boxes_per_image: int = 5,
    steps: int = 5,
    warmup: int = 2,
    seed: int = 0,
) -> dict:
    """Median forward / backward / op times over ``steps`` training steps on the CPU (after ``warmup``)."""
    if steps < 1 or warmup < 0 or batch < 1 or num_classes < 1 or boxes_per_image < 1:
        raise LtDistillError("bench model: steps, batch, classes and boxes must be >= 1 and warmup >= 0")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cfg = model_config(preset)
    model, criterion, _ = build_model(cfg, torch.randn(num_classes, 512, generator=g), torch.ones(num_classes))
    model.train()
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    mask = torch.zeros(batch, image_size, image_size, dtype=torch.bool)
    targets = _targets(batch, boxes_per_image, num_classes, g)
    status = prepare_ops()

    records = []
    for step in range(warmup + steps):
        clock = _Clock()
        model.zero_grad(set_to_none=True)
        with timed_msda(clock):
            t0 = time.perf_counter()
            outputs = model(images, mask, targets)
            loss = criterion.weighted_total(criterion(outputs, targets))
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
        if step >= warmup:
            records.append((t1 - t0, t2 - t1, clock.forward, clock.backward))
    forward, backward, op_fwd, op_bwd = (statistics.median(r[i] for r in records) for i in range(4))

    t = cfg.transformer
    levels = [(-(-image_size // s), -(-image_size // s)) for s in (8, 16, 32, 64)[: t.num_feature_levels]]
    tokens = sum(h * w for h, w in levels)
    dn = outputs["dn_outputs"]["pred_boxes"].shape[1] if "dn_outputs" in outputs else 0
    return {
        "preset": preset,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "msda_implementation": "compiled CPU op" if status.cpu else "PyTorch reference",
        "shapes": {
            "batch": batch,
            "image": [image_size, image_size],
            "backbone": cfg.backbone.name,
            "hidden": t.hidden_dim,
            "heads": t.nheads,
            "points": t.enc_n_points,
            "levels": levels,
            "encoder_tokens": tokens,
            "encoder_layers": t.enc_layers,
            "decoder_layers": t.dec_layers,
            "queries": t.num_queries,
            "dn_queries": dn,
            "classes": num_classes,
            "boxes_per_image": boxes_per_image,
            "msda_calls_per_step": clock.calls,
        },
        "steps": steps,
        "forward_ms_per_image": 1e3 * forward / batch,
        "backward_ms_per_image": 1e3 * backward / batch,
        "step_ms_per_image": 1e3 * (forward + backward) / batch,
        "msda_forward_ms_per_image": 1e3 * op_fwd / batch,
        "msda_backward_ms_per_image": 1e3 * op_bwd / batch,
        "msda_share": (op_fwd + op_bwd) / (forward + backward),
    }


def print_model_bench(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    s = result["shapes"]
    levels = ", ".join(f"{h}x{w}" for h, w in s["levels"])
    console.print(
        f"preset {result['preset']} ({s['backbone']}, hidden {s['hidden']}, {s['heads']} heads x {s['points']} points, "
        f"{s['encoder_layers']}+{s['decoder_layers']} layers), batch {s['batch']} x {s['image'][0]}x{s['image'][1]} px "
        f"-> levels {levels} (S = {s['encoder_tokens']}), {s['queries']} queries + {s['dn_queries']} dn, "
        f"{s['classes']} classes, {s['boxes_per_image']} boxes/image; {s['msda_calls_per_step']} MSDA calls/step; "
        f"CPU, {result['threads']} threads; op: {result['msda_implementation']}"
    )
    table = Table(title=f"bench model: forward+backward per image (median of {result['steps']} steps)")
    table.add_column("part")
    table.add_column("ms / image", justify="right")
    table.add_column("share", justify="right")
    total = result["step_ms_per_image"]
    for label, key in [
        ("forward (model + criterion)", "forward_ms_per_image"),
        ("backward", "backward_ms_per_image"),
        ("  MSDeformAttn op, forward", "msda_forward_ms_per_image"),
        ("  MSDeformAttn op, backward", "msda_backward_ms_per_image"),
    ]:
        table.add_row(label, f"{result[key]:.1f}", f"{result[key] / total:.1%}")
    table.add_row("total step", f"{total:.1f}", "100%")
    table.add_row("MSDeformAttn op, fwd+bwd", "", f"{result['msda_share']:.1%}")
    console.print(table)
