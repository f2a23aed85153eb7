#!/usr/bin/env bash
# The README's test command: installs lt-distill with its test extras, lints, runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
python -m ruff check .
python -m pytest "$@"
