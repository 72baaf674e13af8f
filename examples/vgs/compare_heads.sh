#!/usr/bin/env bash
# The scenario evidence for both VGS heads, same budget and seed (issue 16): the FaST-VGS+ heads with the
# authors' loss (margin InfoNCE, margin 1, both directions summed, on dot products) against the light heads
# with cosine InfoNCE (vgs_ssl_tiny_cpu's defaults), every other setting equal.
#   bash examples/vgs/compare_heads.sh runs/main runs/vgs_heads 300 1 [more hydra overrides ...]
# The two chains run side by side, one thread each (two small trainings on 2 cores); the table goes to
# OUT/table.md.
set -euo pipefail
MAIN=${1:-runs/main}; OUT=${2:-runs/vgs_heads}; UPDATES=${3:-300}; SEED=${4:-1}
shift $(( $# < 4 ? $# : 4 ))
HERE=$(dirname "$0")
PAPER=(model.vgs_arch=fast_vgs_plus criterion.vgs_loss=margin_infonce criterion.similarity=dot)
LIGHT=(model.vgs_arch=light criterion.vgs_loss=infonce criterion.similarity=cosine)
mkdir -p "$OUT"
OMP_NUM_THREADS=1 bash "$HERE/run_scenarios.sh" "$MAIN" "$OUT/paper_seed$SEED" "$UPDATES" common.seed="$SEED" "${PAPER[@]}" "$@" \
  > "$OUT/paper_seed$SEED.log" 2>&1 &
paper=$!
OMP_NUM_THREADS=1 bash "$HERE/run_scenarios.sh" "$MAIN" "$OUT/light_seed$SEED" "$UPDATES" common.seed="$SEED" "${LIGHT[@]}" "$@" \
  > "$OUT/light_seed$SEED.log" 2>&1 || { wait $paper; exit 1; }
wait $paper
"$HERE/../../.venv/bin/python" "$HERE/scenario_table.py" "$OUT"/paper_seed* "$OUT"/light_seed* > "$OUT/table.md"
cat "$OUT/table.md"
