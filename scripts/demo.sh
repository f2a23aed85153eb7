#!/usr/bin/env bash
# The README's example command: installs lt-distill (into the active virtual/conda environment, or into
# .venv at the repository root, created on first use) and runs the built-in end-to-end example.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/python_env.sh
lt_python_env "$PWD" || exit 2
"$LT_PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[demo]"
"$LT_PYTHON" -m lt_distill.cli demo "$@"
