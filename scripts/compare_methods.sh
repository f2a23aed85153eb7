#!/usr/bin/env bash
# Side by side: every long-tail method trained and evaluated on the demo's synthetic long-tailed data and
# one label store, then the report picture (AP / APr / APc / APf bars per method).
#   scripts/compare_methods.sh [WORKDIR] [extra lt-distill demo options, e.g. --small --threads 2]
# METHODS (comma-separated) defaults to every registered method; ITERS to the demo's default.
set -euo pipefail
WORKDIR=${1:-lt-distill-compare}
shift || true
METHODS=${METHODS:-$(python -c "from lt_distill.pipeline.methods import METHODS; print(','.join(METHODS))")}
ARGS=(--workdir "$WORKDIR" --methods "$METHODS")
if [[ -n "${ITERS:-}" ]]; then ARGS+=(--iterations "$ITERS"); fi
lt-distill demo "${ARGS[@]}" "$@"
RUNS=()
IFS=',' read -ra NAMES <<< "$METHODS"
for name in "${NAMES[@]}"; do RUNS+=("$WORKDIR/run_$name"); done
if (( ${#RUNS[@]} == 1 )); then RUNS=("$WORKDIR/run"); fi
lt-distill report "${RUNS[@]}" --out "$WORKDIR/compare"
echo "side by side: $WORKDIR/compare/compare.png, $WORKDIR/compare/compare.json"
