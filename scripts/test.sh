#!/usr/bin/env bash
# The README's test command: installs lt-distill with its test extras (into the active virtual/conda
# environment, or into .venv at the repository root, created on first use), lints, runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/python_env.sh
lt_python_env "$PWD" || exit 2
"$LT_PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test]"
# The suite starts `lt-distill`, torchrun and python subprocesses: put the environment's bin first.
export PATH="$(dirname "$LT_PYTHON"):$PATH"
"$LT_PYTHON" -m ruff check .
"$LT_PYTHON" -m pytest "$@"
