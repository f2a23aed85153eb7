"""The compiled MSDeformAttn op (CPU kernels here; CUDA kernels where a GPU exists) against the reference.

Tolerances: float64 forward and gradients within 1e-10 of the grid_sample reference; float32
within 1e-5 relative (largest error over largest value); float16 / bfloat16 outputs within half an
ulp-ish of the float32 result on the same rounded inputs (1e-3 / 8e-3 relative), and the float32
gradients of locations and weights from half inputs within 1e-5 (they are accumulated in float32).
"""

import os

import pytest
import torch

from lt_distill.cuda_ops import MSDeformAttn, functions, ms_deform_attn, ms_deform_attn_reference, modules


@pytest.fixture(scope="session", autouse=True)
def compiled_ops():
    """Build (or load the cached) kernels once per session; the tests need the compiled CPU op."""
    os.environ.setdefault("MAX_JOBS", "2")
    status = functions.prepare_ops()
    assert status.cpu, f"the CPU kernels must build here: {status.reason}"
    return status


def make_inputs(n=2, heads=3, channels=5, shapes=((6, 7), (3, 4), (1, 2)), queries=11, points=3,
                dtype=torch.float64, seed=0, margin=0.1):
    """Random inputs; locations cover [-margin, 1 + margin] so some points fall off the borders."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.tensor(shapes, dtype=torch.int64)
    starts = torch.cat([sizes.new_zeros(1), sizes.prod(1).cumsum(0)[:-1]])
    spatial = int(sizes.prod(1).sum())
    value = torch.randn(n, spatial, heads, channels, generator=gen, dtype=dtype)
    loc = torch.rand(n, queries, heads, len(shapes), points, 2, generator=gen, dtype=dtype) * (1 + 2 * margin) - margin
    attn = torch.rand(n, queries, heads, len(shapes), points, generator=gen, dtype=dtype)
    return value, sizes, starts, loc, attn


def off_lattice(loc, sizes, gap=1e-3):
    """Moves locations whose pixel coordinate is within ``gap`` of an integer (where bilinear
    interpolation has kinks) by 2 * gap pixels, so finite differences see a smooth function."""
    wh = sizes.flip(-1).to(loc.dtype)[None, None, None, :, None, :]  # (W, H) per level
    pixel = loc * wh - 0.5
    near = (pixel - pixel.round()).abs() < gap
    return torch.where(near, (pixel + 2 * gap + 0.5) / wh, loc)


def op(*args):
    return torch.ops.lt_distill.ms_deform_attn(*args)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


CASES = {  # name: make_inputs kwargs; covers odd N, odd and > 32 head dims, the specialised D = 8 / 32
    "odd": dict(n=3, heads=3, channels=5, queries=7),
    "d1": dict(n=1, heads=2, channels=1, queries=5),
    "d8": dict(n=2, heads=4, channels=8, queries=9),
    "d32": dict(n=1, heads=2, channels=32, queries=6, points=4),
    "d33": dict(n=2, heads=1, channels=33, queries=5, points=2),
    "d40": dict(n=5, heads=2, channels=40, queries=3, points=1),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_float64_matches_reference(case):
    inputs = make_inputs(**CASES[case])
    expected = ms_deform_attn_reference(*inputs)
    out = op(*inputs)
    assert out.shape == expected.shape and out.dtype == torch.float64
    assert (out - expected).abs().max().item() <= 1e-10


@pytest.mark.parametrize("case", CASES)
def test_forward_float32_matches_reference(case):
    inputs = make_inputs(**CASES[case], dtype=torch.float32)
    assert rel_err(op(*inputs), ms_deform_attn_reference(*inputs)) <= 1e-5


@pytest.mark.parametrize("case", ["odd", "d8", "d33"])
def test_gradients_float64_match_reference(case):
    value, sizes, starts, loc, attn = make_inputs(**CASES[case], seed=1)
    loc = off_lattice(loc, sizes)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], dtype=torch.float64)
    grads = []
    for fn in (ms_deform_attn, ms_deform_attn_reference):
        leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
        out = fn(leaves[0], sizes, starts, leaves[1], leaves[2])
        grads.append(torch.autograd.grad(out, leaves, grad_out))
    for got, want in zip(*grads):
        assert (got - want).abs().max().item() <= 1e-10


@pytest.mark.parametrize("channels", [1, 3, 8, 33])
def test_gradcheck_float64_off_lattice(channels):
    value, sizes, starts, loc, attn = make_inputs(n=2, heads=2 if channels < 32 else 1, channels=channels,
                                                  shapes=((3, 4), (1, 2)), queries=3, points=2, seed=channels)
    loc = off_lattice(loc, sizes)
    leaves = tuple(t.requires_grad_(True) for t in (value, loc, attn))
    assert torch.autograd.gradcheck(lambda v, lo, a: op(v, sizes, starts, lo, a), leaves, eps=1e-6, atol=1e-7)


def test_opcheck_schema_fake_and_autograd_registration():
    value, sizes, starts, loc, attn = make_inputs(n=2, heads=2, channels=3, queries=4, points=2)
    loc = off_lattice(loc, sizes)
    args = (value.requires_grad_(True), sizes, starts, loc.requires_grad_(True), attn.requires_grad_(True))
    torch.library.opcheck(torch.ops.lt_distill.ms_deform_attn.default, args)


def _single_level(height=4, width=5, channels=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    value = torch.randn(1, height * width, 1, channels, generator=gen, dtype=torch.float64)
    return value, torch.tensor([[height, width]]), torch.tensor([0])


def _sample(value, sizes, starts, xy):
    """Output of single points (x, y), each on its own query, attention weight 1."""
    loc = torch.tensor(xy, dtype=torch.float64).view(1, -1, 1, 1, 1, 2)
    attn = torch.ones(1, loc.shape[1], 1, 1, 1, dtype=torch.float64)
    return op(value, sizes, starts, loc, attn)[0], ms_deform_attn_reference(value, sizes, starts, loc, attn)[0]


def test_pixel_centres_read_exact_pixels():
    """Convention: normalised x = (j + 0.5) / W is the centre of column j (pixel = x * W - 0.5)."""
    value, sizes, starts = _single_level()
    height, width = 4, 5
    grid = value[0, :, 0].view(height, width, -1)
    centres = [((j + 0.5) / width, (i + 0.5) / height) for i in range(height) for j in range(width)]
    out, ref = _sample(value, sizes, starts, centres)
    torch.testing.assert_close(out, grid.reshape(height * width, -1), rtol=0, atol=1e-15)
    torch.testing.assert_close(ref, out, rtol=0, atol=1e-12)


def test_borders_fade_to_zero_over_one_pixel():
    """Pixels outside the level are zero: the image edge (x = 0 or 1) reads half the border pixel,
    a corner a quarter, and a point a full pixel or more outside reads exactly zero."""
    value, sizes, starts = _single_level()
    height, width = 4, 5
    grid = value[0, :, 0].view(height, width, -1)
    row = (1 + 0.5) / height
    points = [
        (0.0, row),  # left edge: pixel x = -0.5
        (1.0, row),  # right edge: pixel x = W - 0.5
        (0.0, 0.0),  # top-left corner
        (-0.5 / width, row),  # pixel x = -1: outside
        (1 + 0.5 / width, row),  # pixel x = W: outside
        (0.5, 1.5),  # far below
        (-3.0, -3.0),
    ]
    out, ref = _sample(value, sizes, starts, points)
    expected = torch.stack([0.5 * grid[1, 0], 0.5 * grid[1, width - 1], 0.25 * grid[0, 0]]
                           + [torch.zeros_like(grid[0, 0])] * 4)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(ref, out, rtol=0, atol=1e-12)


def test_gradients_in_the_border_band_and_outside():
    """Inside the half-pixel band gradients match the reference; a point entirely outside gives
    zero gradient to everything."""
    value, sizes, starts = _single_level(seed=3)
    width = 5
    xy = torch.tensor([[-0.3 / width, 0.37], [1 + 0.2 / width, 0.61], [-1.7 / width, 0.5]], dtype=torch.float64)
    loc = xy.view(1, 3, 1, 1, 1, 2)
    attn = torch.rand(1, 3, 1, 1, 1, dtype=torch.float64) + 0.5
    grads = []
    for fn in (op, ms_deform_attn_reference):
        leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
        fn(leaves[0], sizes, starts, leaves[1], leaves[2]).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    g_value, g_loc, g_attn = grads[0]
    assert g_loc[0, 2].abs().max() == 0 and g_attn[0, 2].abs().max() == 0
    assert g_loc[0, :2].abs().min() > 0


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_half_precision_against_float32(dtype, tol):
    value, sizes, starts, loc, attn = make_inputs(n=2, heads=4, channels=8, queries=16, points=4, dtype=torch.float32)
    loc = off_lattice(loc, sizes)
    value_half = value.to(dtype)
    grad_half = torch.randn(2, 16, 32).to(dtype)
    results = {}
    for name, v, g in (("half", value_half, grad_half), ("float", value_half.float(), grad_half.float())):
        leaves = [t.clone().requires_grad_(True) for t in (v, loc, attn)]
        out = ms_deform_attn(leaves[0], sizes, starts, leaves[1], leaves[2])
        out.backward(g)
        results[name] = (out, *[t.grad for t in leaves])
    (out_h, gv_h, gl_h, ga_h), (out_f, gv_f, gl_f, ga_f) = results["half"], results["float"]
    assert out_h.dtype == gv_h.dtype == dtype and gl_h.dtype == ga_h.dtype == torch.float32
    assert rel_err(out_h, out_f) <= tol  # one rounding of a float32 result
    assert rel_err(gv_h, gv_f) <= tol
    # Location and weight gradients never pass through half precision.
    assert rel_err(gl_h, gl_f) <= 1e-5 and rel_err(ga_h, ga_f) <= 1e-5


def test_non_contiguous_inputs():
    value, sizes, starts, loc, attn = make_inputs(n=3, heads=2, channels=6, queries=5)
    expected = op(value, sizes, starts, loc, attn)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)  # (N, S, M, D) with D strided
    loc_nc = loc.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    attn_nc = torch.stack([attn, attn], dim=-1)[..., 0]
    sizes_nc = torch.stack([sizes[:, 0], sizes[:, 1]], dim=1).t().contiguous().t()
    assert not any(t.is_contiguous() for t in (value_nc, loc_nc, attn_nc, sizes_nc))
    torch.testing.assert_close(op(value_nc, sizes_nc, starts, loc_nc, attn_nc), expected, rtol=0, atol=0)
    grads = torch.autograd.grad(ms_deform_attn(value_nc.requires_grad_(True), sizes, starts, loc, attn).sum(),
                                value_nc)
    torch.testing.assert_close(grads[0], torch.autograd.grad(
        ms_deform_attn(value.requires_grad_(True), sizes, starts, loc, attn).sum(), value)[0], rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 3, 7])
def test_batch_sizes_not_divisible_by_anything(n):
    inputs = make_inputs(n=n, heads=3, channels=5, queries=13)
    assert (op(*inputs) - ms_deform_attn_reference(*inputs)).abs().max() <= 1e-10


def test_empty_query_set():
    value, sizes, starts, loc, attn = make_inputs(queries=0)
    assert op(value, sizes, starts, loc, attn).shape == (2, 0, 15)


def test_bad_arguments_are_rejected_with_a_message():
    value, sizes, starts, loc, attn = make_inputs()
    with pytest.raises(RuntimeError, match="attention_weights must be"):
        op(value, sizes, starts, loc, attn[..., :1])
    with pytest.raises(RuntimeError, match="must be float32 for"):
        op(value.half(), sizes, starts, loc.half(), attn.half())
    with pytest.raises(RuntimeError, match="does not fit in S"):
        op(value, sizes, starts + 50, loc, attn)
    with pytest.raises(RuntimeError, match="levels overlap"):
        op(value, sizes, torch.zeros_like(starts), loc, attn)


def _module_inputs(ref_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([[8, 6], [4, 3]])
    starts = torch.tensor([0, 48])
    query = torch.randn(2, 7, 32, generator=gen)
    feats = torch.randn(2, 60, 32, generator=gen)
    refs = torch.rand(2, 7, 2, ref_dim, generator=gen)
    if ref_dim == 4:
        refs[..., 2:] = refs[..., 2:] * 0.5 + 0.1
    mask = torch.zeros(2, 60, dtype=torch.bool)
    mask[1, 40:48] = True
    return query, refs, feats, sizes, starts, mask


def test_module_initialisation_matches_deformable_detr():
    layer = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    bias = layer.sampling_offsets.bias.view(4, 2, 3, 2)
    # Head h looks along angle 2*pi*h/4, scaled so the larger component is 1; point i at distance i+1.
    torch.testing.assert_close(bias[1, 0, :, :], torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[:, 0], bias[:, 1])
    assert layer.sampling_offsets.weight.abs().max() == 0 and layer.attention_weights.weight.abs().max() == 0
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=4)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_with_op_equals_module_with_reference(ref_dim, monkeypatch):
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3).double()
    torch.nn.init.normal_(layer.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(layer.attention_weights.weight, std=0.1)
    query, refs, feats, sizes, starts, mask = (t.double() if t.is_floating_point() else t
                                                for t in _module_inputs(ref_dim))
    results = []
    for fn in (ms_deform_attn, ms_deform_attn_reference):
        monkeypatch.setattr(modules, "ms_deform_attn", fn)
        q, f = query.clone().requires_grad_(True), feats.clone().requires_grad_(True)
        layer.zero_grad()
        out = layer(q, refs, f, sizes, starts, mask)
        out.square().sum().backward()
        results.append((out, q.grad, f.grad, layer.sampling_offsets.weight.grad.clone()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_module_under_cpu_autocast_bfloat16():
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    query, refs, feats, sizes, starts, mask = _module_inputs(2)
    expected = layer(query, refs, feats, sizes, starts, mask)
    feats = feats.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(query, refs, feats, sizes, starts, mask)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()
    assert rel_err(out, expected) <= 0.05


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(backend):
    """The op traces without graph breaks (fake kernel) and its autograd formula is used by
    AOTAutograd; inductor may fuse the surrounding float32 arithmetic differently."""
    torch._dynamo.reset()
    value, sizes, starts, loc, attn = make_inputs(n=2, heads=2, channels=4, queries=6, dtype=torch.float32)

    def attend(v, lo, a):
        return ms_deform_attn(v * 2, sizes, starts, lo.clamp(-0.1, 1.1), a.softmax(-1)).square()

    compiled = torch.compile(attend, fullgraph=True, backend=backend)
    results = []
    for fn in (attend, compiled):
        leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
        out = fn(*leaves)
        out.sum().backward()
        results.append((out, *[t.grad for t in leaves]))
    tol = 1e-6 if backend == "aot_eager" else 1e-4
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_reference_mode_needs_no_build(monkeypatch):
    """With LT_DISTILL_MSDA=reference nothing is built and the reference serves every device."""
    monkeypatch.setattr(functions, "_STATUS", None)
    monkeypatch.setenv("LT_DISTILL_MSDA", "reference")
    status = functions.prepare_ops()
    assert not status.cpu and not status.cuda and status.reason is None
    inputs = make_inputs()
    torch.testing.assert_close(ms_deform_attn(*inputs), ms_deform_attn_reference(*inputs), rtol=0, atol=0)
