"""Building the MSDeformAttn kernels: toolkit diagnostics, architecture handling, the one-line
fallback warning, `lt-distill build-ops`, `lt-distill bench msda`, and (slow) an nvcc build for
sm_80 and sm_90 that must link."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lt_distill.cli import main
from lt_distill.cuda_ops import build, functions


@pytest.fixture(scope="module", autouse=True)
def compiled_ops():
    os.environ.setdefault("MAX_JOBS", "2")
    status = functions.prepare_ops()
    assert status.cpu, f"the CPU kernels must build here: {status.reason}"


def test_missing_toolkit_says_set_cuda_home(monkeypatch):
    monkeypatch.setattr(build, "find_cuda_home", lambda: None)
    monkeypatch.setattr(torch.version, "cuda", "13.2")
    problem = build.cuda_toolkit_problem()
    assert "CUDA_HOME is unset" in problem and "export CUDA_HOME=" in problem and "13.x" in problem


def test_toolkit_major_mismatch_is_named(monkeypatch):
    monkeypatch.setattr(build, "find_cuda_home", lambda: Path("/opt/cuda-12.4"))
    monkeypatch.setattr(build, "nvcc_version", lambda home: "12.4")
    monkeypatch.setattr(torch.version, "cuda", "13.2")
    problem = build.cuda_toolkit_problem()
    assert "nvcc 12.4" in problem and "CUDA 13.2" in problem and "major versions must agree" in problem


def test_cpu_only_torch_is_named(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "no CUDA support" in build.cuda_toolkit_problem()


def test_a_wrapper_script_prefix_is_not_a_toolkit(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\nexec /somewhere/else/nvcc \"$@\"\n")
    assert not build._is_toolkit(tmp_path)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert build.find_cuda_home() != tmp_path


def test_arch_list_parsing_and_flags(monkeypatch):
    assert build.resolve_arch_list("8.0;9.0+PTX") == ("8.0", "9.0+PTX")
    assert build.resolve_arch_list("8.0 8.6") == ("8.0", "8.6")
    assert build.gencode_flags(("8.0", "9.0+PTX")) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    with pytest.raises(build.OpsBuildError, match="invalid CUDA architecture"):
        build.resolve_arch_list("sm_80")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(build.OpsBuildError, match="TORCH_CUDA_ARCH_LIST"):
        build.resolve_arch_list()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    assert build.resolve_arch_list() == ("7.5",)


@pytest.mark.parametrize("archs,capability,covered", [
    (("8.0",), (8, 0), True),
    (("8.0",), (8, 6), True),  # same major, older minor: binary compatible
    (("8.6",), (8, 0), False),
    (("8.0",), (9, 0), False),
    (("8.0+PTX",), (9, 0), True),  # PTX is JIT-compiled for newer GPUs
    (("9.0a",), (9, 0), True),
    (("9.0a",), (10, 0), False),
    (("8.0", "9.0"), (12, 0), False),
])
def test_kernel_image_coverage(archs, capability, covered):
    assert build.arch_covers_device(archs, capability) is covered


def test_build_directory_is_keyed_by_torch_toolkit_and_archs(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    cpu = build.build_directory(False, (), None)
    cuda = build.build_directory(True, ("8.0", "9.0+PTX"), "13.0")
    assert cpu.parent == cuda.parent == tmp_path / "lt_distill_msda"
    assert torch.__version__.replace("+", "_") in cpu.name and cpu.name.endswith("-cpu")
    assert "nvcc13.0" in cuda.name and cuda.name.endswith("80_90ptx")


def test_failed_build_falls_back_with_one_warning_line(tmp_path):
    """No compiler: the op still works (reference) and stderr holds exactly one line saying why."""
    script = (
        "import torch\n"
        "from lt_distill.cuda_ops import ms_deform_attn, ms_deform_attn_reference, prepare_ops\n"
        "v = torch.randn(1, 5, 1, 2); s = torch.tensor([[1, 5]]); i = torch.tensor([0])\n"
        "loc = torch.rand(1, 3, 1, 1, 2, 2); a = torch.rand(1, 3, 1, 1, 2)\n"
        "assert torch.equal(ms_deform_attn(v, s, i, loc, a), ms_deform_attn_reference(v, s, i, loc, a))\n"
        "assert ms_deform_attn(v, s, i, loc, a) is not None and not prepare_ops().cpu\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "MSDeformAttn uses the slow PyTorch reference for all tensors" in lines[0]
    assert "no C++ compiler found" in lines[0]


def test_build_ops_command_reports_the_build(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["build-ops", "--cpu-only"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "built CPU kernels" in out and "library:" in out


def test_bench_msda_command_writes_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as exc:
        main(["bench", "msda", "--image-size", "64", "--hidden", "32", "--repeats", "2",
              "--json", str(tmp_path / "msda.json")])
    assert exc.value.code == 0
    assert torch.get_num_threads() == threads  # the benchmark restores the thread count
    result = json.loads((tmp_path / "msda.json").read_text())
    cpu = result["cpu"]
    assert "levels 8x8, 4x4, 2x2, 1x1" in cpu["shape"] and "S = Lq = 85" in cpu["shape"]
    assert set(cpu["wall_ms"]) == {"op forward", "op forward_backward", "reference forward",
                                   "reference forward_backward"}
    assert all(v > 0 for v in cpu["wall_speedup"].values())
    assert result["cuda"] is None or "dtypes" in result["cuda"]
    assert "reference / op" in capsys.readouterr().out


def test_bench_msda_rejects_indivisible_width(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "msda", "--hidden", "30", "--heads", "8"])
    assert exc.value.code == 2
    assert "divisible" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(build.find_cuda_home() is None, reason="no CUDA toolkit (set CUDA_HOME)")
def test_nvcc_builds_and_links_for_sm80_and_sm90(tmp_path):
    """Compiles the CUDA kernels with nvcc for sm_80 and sm_90 in a fresh cache and loads the
    library (every symbol must resolve). No GPU is needed; the kernels do not run here."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "MAX_JOBS": "2",
           "CUDA_HOME": str(build.find_cuda_home())}
    proc = subprocess.run([sys.executable, "-m", "lt_distill.cli", "build-ops", "--cuda", "--arch", "8.0;9.0"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = " ".join(proc.stdout.split())
    assert "CPU + CUDA kernels for sm_80, sm_90" in out
    assert "GPU code in the library: sm_80, sm_90" in out
    libraries = list(tmp_path.rglob("lt_distill_msda_cuda*.so"))
    assert len(libraries) == 1 and build.embedded_kernel_images(libraries[0]) == ["sm_80", "sm_90"]
