"""scripts/python_env.sh, the interpreter/venv choice behind the README's two commands, run as on a stock
Debian/Ubuntu machine: a PATH holding only `python3` (no `python`), inside and outside a virtual
environment, with PEP 668's EXTERNALLY-MANAGED marker, without the venv module, and with too old a Python.
The full install is not run here (CI runs it: `.ci/run` is `bash scripts/test.sh`)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash") or "/bin/bash"


def _base_python() -> str:
    """The interpreter behind this one, outside any virtual environment."""
    exe = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(exe if exe.exists() else Path(sys.base_prefix) / "bin" / "python3")


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A checkout holding just the script, so a created .venv lands in tmp_path."""
    (tmp_path / "repo" / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "python_env.sh", tmp_path / "repo" / "scripts")
    return tmp_path / "repo"


def _fake_bin(tmp_path: Path, target: str) -> Path:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "python3").symlink_to(target)
    return fake


def _sitecustomize(tmp_path: Path, body: str) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(body)
    return site


def _run(repo: Path, path: str, *args: str, **extra: str) -> subprocess.CompletedProcess:
    env = {"PATH": path, "HOME": str(repo), **extra}  # as under `env -i PATH=...`: no VIRTUAL_ENV, no CONDA_PREFIX
    return subprocess.run([BASH, str(repo / "scripts" / "python_env.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_outside_a_venv_creates_dot_venv_with_python3_then_reuses_it(repo, tmp_path):
    fake = _fake_bin(tmp_path, _base_python())
    proc = _run(repo, str(fake))
    assert proc.returncode == 0, proc.stderr
    venv_python = repo / ".venv" / "bin" / "python"
    assert proc.stdout.strip() == str(venv_python)
    assert "creating the virtual environment" in proc.stderr and "source .venv/bin/activate" in proc.stderr
    # The created interpreter is a real virtual environment with pip (what the scripts install with).
    check = subprocess.run([str(venv_python), "-c", "import sys, pip; print(sys.prefix != sys.base_prefix)"],
                           capture_output=True, text=True)
    assert check.stdout.strip() == "True", check.stderr
    again = _run(repo, str(fake))
    assert again.returncode == 0 and again.stdout.strip() == str(venv_python)
    assert "reusing the virtual environment" in again.stderr


def test_inside_an_active_venv_uses_it(repo, tmp_path):
    venv = tmp_path / "active"
    subprocess.run([_base_python(), "-m", "venv", "--without-pip", str(venv)], check=True)
    proc = _run(repo, str(venv / "bin"), VIRTUAL_ENV=str(venv))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(venv / "bin" / "python3")
    assert "active environment" in proc.stderr
    assert not (repo / ".venv").exists()


def test_externally_managed_python_is_never_installed_into(repo, tmp_path):
    stdlib = tmp_path / "stdlib"
    stdlib.mkdir()
    (stdlib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\nError=use apt\n")
    # Debian's marker sits in the stdlib folder; point sysconfig's stdlib there for this interpreter only.
    site = _sitecustomize(tmp_path, "import os, sysconfig\n_get = sysconfig.get_path\n"
                          "sysconfig.get_path = lambda name, *a, **k: os.environ['FAKE_STDLIB'] "
                          "if name == 'stdlib' else _get(name, *a, **k)\n")
    fake = _fake_bin(tmp_path, _base_python())
    proc = _run(repo, str(fake), "--dry-run", PYTHONPATH=str(site), FAKE_STDLIB=str(stdlib))
    assert proc.returncode == 0, proc.stderr
    assert "externally managed (PEP 668)" in proc.stderr and "would create the virtual environment" in proc.stderr
    assert proc.stdout.strip() == str(repo / ".venv" / "bin" / "python")
    # Without the stand-in marker the answer depends on the real interpreter (Debian's own is externally managed).
    real_marker = (Path(sysconfig.get_path("stdlib")) / "EXTERNALLY-MANAGED").exists()
    without_marker = _run(repo, str(fake), "--dry-run")
    assert without_marker.returncode == 0, without_marker.stderr
    assert ("externally managed (PEP 668)" if real_marker else "not inside a virtual environment") in without_marker.stderr


def test_missing_venv_module_names_the_debian_package(repo, tmp_path):
    site = _sitecustomize(tmp_path, "import sys\nsys.modules['ensurepip'] = None  # as without python3-venv\n")
    fake = _fake_bin(tmp_path, _base_python())
    proc = _run(repo, str(fake), PYTHONPATH=str(site))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "python3-venv" in lines[0]
    assert not (repo / ".venv").exists()


def test_no_python_or_too_old_a_python_is_one_clear_line(repo, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _run(repo, str(empty))
    assert proc.returncode == 2 and proc.stderr.startswith("error: no python3 or python on PATH")
    old = tmp_path / "old"
    old.mkdir()
    (old / "python3").write_text("#!/bin/sh\ncase \"$2\" in *platform*) echo 3.9.2;; *) exit 1;; esac\n")
    (old / "python3").chmod(0o755)
    proc = _run(repo, str(old))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: lt-distill needs Python >= 3.11") and "3.9.2" in proc.stderr


@pytest.mark.parametrize("script", ["demo.sh", "test.sh"])
def test_both_commands_install_through_the_chosen_python(script):
    text = (REPO / "scripts" / script).read_text()
    assert ". scripts/python_env.sh" in text and "lt_python_env" in text
    assert '"$LT_PYTHON" -m pip install' in text and "python -m" not in text.replace('"$LT_PYTHON" -m', "")


def test_ci_runs_exactly_the_readme_test_command():
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in (REPO / "README.md").read_text()
    assert os.access(REPO / "scripts" / "python_env.sh", os.R_OK)
