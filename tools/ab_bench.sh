#!/usr/bin/env bash
# Interleaved before/after medians of the native backend: A = a checkout of the commit before a change
# (BEFORE_TREE), B = this checkout, alternating A B A B ... so that drift in the machine's load hits
# both alike. Each side builds its extension into its own cache. Then: python tools/ab_table.py OUTDIR
# usage (from the repository root): BEFORE_TREE=/path/to/old/checkout tools/ab_bench.sh ROUNDS OUTDIR
# BENCH_ARGS adds bench arguments to both sides (e.g. BENCH_ARGS="--ops class_centralization_loss").
set -euo pipefail
rounds=${1:-3}; out=$(realpath -m "${2:-ab}"); mkdir -p "$out"
for r in $(seq 1 "$rounds"); do
  for side in A B; do
    if [ $side = A ]; then tree=${BEFORE_TREE:?a checkout of the commit before the change}; cache=${BEFORE_CACHE:-/tmp/edfkern-ab-before}; else tree=$(pwd); cache=${AFTER_CACHE:-/tmp/edfkern-ab-after}; fi
    (cd "$tree" && PYTHONPATH="$tree" TORCH_EXTENSIONS_DIR="$cache" python -m edfkern.bench --providers native \
       --no-memory --modes fwd,full --scale 0.25 ${BENCH_ARGS:-} --json "$out/$side-$r.json" > "$out/$side-$r.txt" 2>&1)
    echo "round $r $side done"
  done
done
