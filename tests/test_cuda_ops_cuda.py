"""The CUDA kernels against the reference (needs a GPU: skipped elsewhere).

Tolerances as in test_cuda_ops.py; CUDA atomics make the grad_value sums order-dependent, so the
float64 gradients are compared at 1e-10 rather than bit for bit.
"""

import os

import pytest
import torch

from lt_distill.cuda_ops import functions, ms_deform_attn, ms_deform_attn_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module", autouse=True)
def compiled_ops():
    os.environ.setdefault("MAX_JOBS", "2")
    status = functions.prepare_ops()
    assert status.cuda, f"the CUDA kernels must build on a GPU machine: {status.reason}"


def make_inputs(n, heads, channels, queries, points=4, shapes=((13, 17), (7, 9), (4, 5), (2, 3)),
                dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.tensor(shapes, dtype=torch.int64)
    starts = torch.cat([sizes.new_zeros(1), sizes.prod(1).cumsum(0)[:-1]])
    spatial = int(sizes.prod(1).sum())
    value = torch.randn(n, spatial, heads, channels, generator=gen, dtype=dtype)
    loc = torch.rand(n, queries, heads, len(shapes), points, 2, generator=gen, dtype=dtype) * 1.2 - 0.1
    attn = torch.rand(n, queries, heads, len(shapes), points, generator=gen, dtype=dtype)
    return [t.cuda() for t in (value, sizes, starts, loc, attn)]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("channels", [1, 5, 8, 32, 33, 64])
def test_cuda_forward_and_gradients_float64(channels):
    value, sizes, starts, loc, attn = make_inputs(n=3, heads=2, channels=channels, queries=37)
    grad_out = torch.randn(3, 37, 2 * channels, dtype=torch.float64, device="cuda")
    results = []
    for fn in (ms_deform_attn, ms_deform_attn_reference):
        leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
        out = fn(leaves[0], sizes, starts, leaves[1], leaves[2])
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    for got, want in zip(*results):
        assert (got - want).abs().max().item() <= 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_cuda_low_precision_against_float32(dtype, tol):
    value, sizes, starts, loc, attn = make_inputs(n=2, heads=8, channels=32, queries=50, dtype=torch.float32)
    value = value.to(dtype)
    out = ms_deform_attn(value, sizes, starts, loc, attn)
    expected = ms_deform_attn(value.float(), sizes, starts, loc, attn)
    assert out.dtype == dtype and rel_err(out, expected) <= tol


def test_cuda_matches_cpu_kernels():
    inputs = make_inputs(n=2, heads=4, channels=16, queries=29, dtype=torch.float32)
    torch.testing.assert_close(ms_deform_attn(*inputs).cpu(), ms_deform_attn(*[t.cpu() for t in inputs]),
                               rtol=1e-5, atol=1e-5)


def test_cuda_graph_capture_replays_the_op():
    value, sizes, starts, loc, attn = make_inputs(n=2, heads=4, channels=32, queries=64, dtype=torch.float32)
    expected = ms_deform_attn(value, sizes, starts, loc, attn)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ms_deform_attn(value, sizes, starts, loc, attn)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ms_deform_attn(value, sizes, starts, loc, attn)
    value.mul_(2)
    graph.replay()
    torch.testing.assert_close(captured, 2 * expected)


def test_cuda_torch_compile_fullgraph():
    torch._dynamo.reset()
    value, sizes, starts, loc, attn = make_inputs(n=2, heads=4, channels=32, queries=40, dtype=torch.float32)

    def attend(v, lo, a):
        return ms_deform_attn(v, sizes, starts, lo, a.softmax(-1)).relu()

    compiled = torch.compile(attend, fullgraph=True)
    torch.testing.assert_close(compiled(value, loc, attn), attend(value, loc, attn), rtol=1e-5, atol=1e-5)
