#!/usr/bin/env bash
# Side by side: every long-tail method trained and evaluated on the demo's synthetic long-tailed data (the
# same data and label store: both come from fixed seeds), then the report picture (AP / APr / APc / APf bars
# per method, WORKDIR/compare/compare.png + compare.json).
#   scripts/compare_methods.sh [WORKDIR] [extra lt-distill demo options, e.g. --small --threads 2]
# METHODS (comma-separated) defaults to every registered method; ITERS to the demo's default.
# PARALLEL=1 runs one demo process per method at once (WORKDIR/<method>/), e.g. on a machine with as many
# cores as methods; otherwise one demo trains them in turn (WORKDIR/run_<method>/).
set -euo pipefail
WORKDIR=${1:-lt-distill-compare}
shift || true
METHODS=${METHODS:-$("$(command -v python || command -v python3)" -c "from lt_distill.pipeline.methods import METHODS; print(','.join(METHODS))")}
ARGS=()
if [[ -n "${ITERS:-}" ]]; then ARGS+=(--iterations "$ITERS"); fi
IFS=',' read -ra NAMES <<< "$METHODS"
RUNS=()
if [[ "${PARALLEL:-0}" == 1 ]]; then
  mkdir -p "$WORKDIR"
  pids=()
  for name in "${NAMES[@]}"; do
    lt-distill demo --workdir "$WORKDIR/$name" --method "$name" "${ARGS[@]}" "$@" > "$WORKDIR/$name.log" 2>&1 &
    pids+=($!)
    RUNS+=("$WORKDIR/$name/run")
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
else
  lt-distill demo --workdir "$WORKDIR" --methods "$METHODS" "${ARGS[@]}" "$@"
  for name in "${NAMES[@]}"; do RUNS+=("$WORKDIR/run_$name"); done
  if (( ${#RUNS[@]} == 1 )); then RUNS=("$WORKDIR/run"); fi
fi
lt-distill report "${RUNS[@]}" --out "$WORKDIR/compare"
echo "side by side: $WORKDIR/compare/compare.png, $WORKDIR/compare/compare.json"
