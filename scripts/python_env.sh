#!/usr/bin/env bash
# Chooses the Python that scripts/demo.sh and scripts/test.sh install into, so that the README's two
# commands work on a stock Debian/Ubuntu machine (python3 only, PEP 668 "externally managed" system
# Python) as well as inside a virtual environment or conda environment.
#
# Sourced:   . scripts/python_env.sh && lt_python_env  -> sets LT_PYTHON (the interpreter to use)
# Executed:  bash scripts/python_env.sh [--dry-run]    -> prints the decision (and, without --dry-run,
#                                                         creates .venv when one is needed)
#
# Rules: inside an active virtual environment or conda environment, its Python is used as it is.
# Otherwise a virtual environment `.venv` at the repository root is created (once, reused later) with the
# first Python >= 3.11 found as `python3`, then `python`, and everything is installed into it: pip never
# touches a system interpreter. Failures are one `error: ...` line and exit code 2.

LT_MIN_PYTHON="3.11"

lt_fail() {
    echo "error: $*" >&2
    return 2
}

# Prints the first interpreter on PATH (python3, then python) that is >= LT_MIN_PYTHON.
lt_find_python() {
    local candidate path found=""
    for candidate in python3 python; do
        path=$(command -v "$candidate" 2>/dev/null) || continue
        if "$path" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$path"
            return 0
        fi
        found="$found $path ($("$path" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo "unusable"))"
    done
    if [ -n "$found" ]; then
        lt_fail "lt-distill needs Python >= $LT_MIN_PYTHON; found only:$found. Install python$LT_MIN_PYTHON (Debian/Ubuntu: apt install python3)."
    else
        lt_fail "no python3 or python on PATH; lt-distill needs Python >= $LT_MIN_PYTHON (Debian/Ubuntu: apt install python3 python3-venv)."
    fi
}

# 0 when PY (an interpreter path) is the Python of an active virtual environment or conda environment.
lt_in_environment() {
    local py="$1"
    "$py" - <<'EOF' 2>/dev/null
import os, sys
venv = sys.prefix != sys.base_prefix
conda = bool(os.environ.get("CONDA_PREFIX")) and os.path.realpath(sys.prefix) == os.path.realpath(os.environ["CONDA_PREFIX"])
sys.exit(0 if (venv or conda) else 1)
EOF
}

# 0 when PY carries PEP 668's EXTERNALLY-MANAGED marker (pip refuses to install into it).
lt_externally_managed() {
    "$1" -c 'import os, sys, sysconfig; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)' 2>/dev/null
}

# Sets LT_PYTHON. $1 = repository root; $2 = "dry-run" to decide without creating anything.
lt_python_env() {
    local root="${1:-.}" mode="${2:-}" py venv="${1:-.}/.venv"
    py=$(lt_find_python) || return 2
    if lt_in_environment "$py"; then
        LT_PYTHON="$py"
        echo "lt-distill: using the active environment's Python: $py" >&2
        return 0
    fi
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
        LT_PYTHON="$venv/bin/python"
        echo "lt-distill: reusing the virtual environment $venv" >&2
        return 0
    fi
    local why="not inside a virtual environment"
    if lt_externally_managed "$py"; then
        why="$py is externally managed (PEP 668)"
    fi
    if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
        lt_fail "$why, and its venv module (with ensurepip) is missing to create $venv: install Debian/Ubuntu's python3-venv package (apt install python3-venv), or activate a virtual environment first."
        return 2
    fi
    LT_PYTHON="$venv/bin/python"
    if [ "$mode" = "dry-run" ]; then
        echo "lt-distill: $why; would create the virtual environment $venv with $py" >&2
        return 0
    fi
    echo "lt-distill: $why; creating the virtual environment $venv with $py (activate it later with: source .venv/bin/activate)" >&2
    "$py" -m venv "$venv" || lt_fail "could not create $venv with $py"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -u
    here="${BASH_SOURCE[0]%/*}"
    [ "$here" = "${BASH_SOURCE[0]}" ] && here="."
    root=$(cd "$here/.." && pwd)  # builtins only: the tests run this with a PATH holding nothing but python3
    mode=""
    [ "${1:-}" = "--dry-run" ] && mode="dry-run"
    lt_python_env "$root" "$mode" || exit 2
    echo "$LT_PYTHON"
fi
