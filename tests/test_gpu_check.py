"""The CPU-side parts of the GPU check (scripts/gpu_check.sh + scripts/gpu_check.py): argument handling,
the JSON it writes, time boxes, failure tolerance and step skipping without CUDA; and (slow) the
device-neutral steps' real command lines run on the CPU, so the GPU minutes are spent measuring."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEP_KEYS = {"name", "status", "seconds", "timeout_s", "returncode", "command", "reason", "error_tail", "figures"}
TOP_KEYS = {"schema", "started_utc", "finished_utc", "total_s", "budget_s", "device", "cuda_available", "args",
            "steps", "summary", "figures"}


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("lt_distill_gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def run_script(*args, timeout=300):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("args,message", [
    ([], "--out"),
    (["--out", "x", "--steps", "env,warp_drive"], "unknown step(s) warp_drive"),
    (["--out", "x", "--skip", "nope"], "unknown step(s) nope"),
    (["--out", "x", "--budget", "0"], "--budget must be positive"),
    (["--out", "x", "--wheels", "/nonexistent/wheels"], "is not a folder"),
    (["--out", "x", "--frobnicate"], "unrecognized arguments"),
])
def test_bad_arguments_exit_2_with_the_reason(args, message, tmp_path):
    proc = run_script(*[str(tmp_path / a) if a == "x" else a for a in args])
    assert proc.returncode == 2
    assert message in proc.stderr


def py(code):
    return lambda ctx: [sys.executable, "-c", code]


def test_a_failing_or_hanging_step_is_recorded_and_the_rest_still_run(gc, tmp_path):
    steps = [
        gc.Step("fails", 30, 1, False, py("print('boom'); raise SystemExit(3)")),
        gc.Step("hangs", 1, 1, False, py("import time; print('started', flush=True); time.sleep(60)")),
        gc.Step("works", 30, 1, False, py("print('FIG 7')"),
                figures=lambda ctx, out: {"value": int(out.split()[-1])}),
        gc.Step("no_input", 30, 1, False, lambda ctx: "no --wheels given"),
        gc.Step("needs_gpu", 30, 1, True, py("raise SystemExit(1)")),
    ]
    ctx = gc.Context(out=tmp_path, work=tmp_path, device="cpu", wheels=None, site=tmp_path, arch="9.0",
                     train_iters=1, quick=True)
    path = tmp_path / "gpu_check.json"
    result = gc.run_check(steps, ctx, 60, path, lambda text: None, cuda=False, args={"k": 1})
    assert json.loads(path.read_text()) == result
    assert set(result) == TOP_KEYS and result["schema"] == "lt-distill-gpu-check/1"
    by = {s["name"]: s for s in result["steps"]}
    assert [s["name"] for s in result["steps"]] == ["fails", "hangs", "works", "no_input", "needs_gpu"]
    assert all(set(s) == STEP_KEYS for s in result["steps"])
    assert by["fails"]["status"] == "failed" and by["fails"]["returncode"] == 3 and "boom" in by["fails"]["error_tail"]
    assert by["hangs"]["status"] == "timeout" and 1 <= by["hangs"]["seconds"] < 30
    assert by["works"]["status"] == "ok" and by["works"]["figures"] == {"value": 7}
    assert result["figures"] == {"works": {"value": 7}}
    assert by["no_input"]["status"] == "skipped" and by["no_input"]["reason"] == "no --wheels given"
    assert by["needs_gpu"]["status"] == "skipped" and "needs CUDA" in by["needs_gpu"]["reason"]
    assert result["summary"] == {"failed": 1, "timeout": 1, "ok": 1, "skipped": 2}


def test_the_budget_shrinks_time_boxes_and_skips_what_no_longer_fits(gc, tmp_path):
    steps = [gc.Step("first", 100, 1, False, py("import time; time.sleep(1.5)")),
             gc.Step("second", 100, 5, False, py("pass"))]
    ctx = gc.Context(out=tmp_path, work=tmp_path, device="cpu", wheels=None, site=tmp_path, arch="9.0",
                     train_iters=1, quick=True)
    result = gc.run_check(steps, ctx, 4.0, tmp_path / "g.json", lambda text: None, cuda=False, args={})
    first, second = result["steps"]
    assert first["status"] == "ok" and first["timeout_s"] == 4.0
    assert second["status"] == "skipped" and second["reason"].startswith("out of time")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skipping of CUDA steps on a machine without CUDA")
def test_without_cuda_the_cuda_steps_are_skipped_and_the_json_is_written(tmp_path):
    out = tmp_path / "out"
    proc = run_script("--out", str(out), "--steps", "install_wheels,build_ops,cuda_tests,nccl,tensorrt_parity")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "gpu_check.json").read_text())
    assert set(result) == TOP_KEYS and result["device"] == "cpu" and result["cuda_available"] is False
    status = {s["name"]: (s["status"], s["reason"]) for s in result["steps"]}
    assert status["install_wheels"] == ("skipped", "no --wheels given")
    for name in ("build_ops", "cuda_tests", "nccl", "tensorrt_parity"):
        assert status[name] == ("skipped", "needs CUDA (no CUDA device here)")
    assert result["summary"] == {"skipped": 5}
    assert (out / "gpu_check.log").is_file()


def test_wheels_are_installed_into_the_site_folder(tmp_path):
    """A wheel in --wheels lands in --site (pip --target, no index): built here from a tiny package."""
    src = tmp_path / "src"
    (src / "ltd_probe").mkdir(parents=True)
    (src / "ltd_probe" / "__init__.py").write_text("VALUE = 41 + 1\n")
    (src / "pyproject.toml").write_text('[project]\nname = "ltd-probe"\nversion = "0.1"\n'
                                        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n')
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(src)], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"cannot build a test wheel here: {built.stderr[-300:]}")
    out, site = tmp_path / "out", tmp_path / "site"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(out), "--wheels",
                           str(wheels), "--site", str(site), "--steps", "install_wheels", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    step = json.loads((out / "gpu_check.json").read_text())["steps"][0]
    assert step["status"] == "ok", step["error_tail"]
    assert step["figures"] == {"wheels": ["ltd_probe-0.1-py3-none-any.whl"]}
    assert (site / "ltd_probe" / "__init__.py").read_text() == "VALUE = 41 + 1\n"


@pytest.mark.slow
def test_device_neutral_steps_run_on_the_cpu(tmp_path):
    """The real command lines of training (torchrun, generated data + store) and `bench labels`, with
    small sizes on the CPU: what the GPU run does, minus the GPU."""
    out = tmp_path / "out"
    proc = run_script("--out", str(out), "--device", "cpu", "--budget", "1200", "--train-iters", "2", "--box-scale", "10",
                      "--work", str(tmp_path / "work"), "--steps", "prepare_train,train_amp,bench_labels",
                      timeout=1300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "gpu_check.json").read_text())
    by = {s["name"]: s for s in result["steps"]}
    assert all(s["status"] == "ok" for s in by.values()), {k: (s["status"], s["error_tail"]) for k, s in by.items()}
    train = by["train_amp"]["figures"]
    assert train["config"] == {"device": "cpu", "amp": "off", "ddp_backend": "gloo", "max_iters": 2}
    assert train["records"] >= 1 and train["losses_finite"] and train["final_model"]
    labels = by["bench_labels"]["figures"]
    assert labels["teacher"]["device"] == "cpu" and labels["cached_ms_per_step"] > 0
