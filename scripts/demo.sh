#!/usr/bin/env bash
# The README's example command: installs lt-distill and runs the built-in end-to-end example.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[demo]"
lt-distill demo "$@"
