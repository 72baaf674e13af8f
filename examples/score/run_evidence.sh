#!/usr/bin/env bash
# Evidence for issue 20: does SCORE make representations robust to speed/pitch perturbation without losing
# what they had? For a starting model and after SCORE (3 seeds): the soft-DTW divergence clean vs perturbed,
# the phone probe and ABX on perturbed and on clean held-out-speaker test audio.
# Long at full size (3 SCORE trainings + 8 probes + 8 ABX runs): run it on a quiet machine.
#
#   examples/score/run_evidence.sh START.pt [OUT] [extra mtssl-score-evidence arguments]
#   e.g. examples/score/run_evidence.sh runs/main/models/mt4ssl_both/checkpoints/checkpoint_last.pt runs/evidence/score_mt4ssl
#        examples/score/run_evidence.sh runs/main/models/hubert/checkpoints/checkpoint_last.pt runs/evidence/score_hubert
# Start from the strongest small model the main job trains (see its report), not only its HuBERT.
set -euo pipefail
START=${1:?usage: run_evidence.sh START.pt [OUT] [args...]}
OUT=${2:-runs/evidence/score_$(basename "$(dirname "$(dirname "$START")")")}
shift $(( $# >= 2 ? 2 : 1 ))
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MKL_NUM_THREADS=${MKL_NUM_THREADS:-2}
exec "$PY" -m fairseq_mtssl.jobs.score_evidence "$START" --data "${DATA:-runs/main/data}" --out "$OUT" \
  --seeds 1 2 3 --updates "${UPDATES:-300}" "$@"
