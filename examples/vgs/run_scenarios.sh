#!/usr/bin/env bash
# Train the VGS+SSL scenarios for the same budget on the main job's corpus, then retrieval and ABX.
#   bash examples/vgs/run_scenarios.sh runs/main runs/vgs_scenarios 600 [hydra overrides for every stage ...]
# compare_heads.sh runs it for the FaST-VGS+ heads and for the light heads with the same budget and seed.
set -euo pipefail
MAIN=${1:-runs/main}; OUT=${2:-runs/vgs_scenarios}; UPDATES=${3:-600}
shift $(( $# < 3 ? $# : 3 ))
BIN=$(dirname "$0")/../../.venv/bin
M=$MAIN/data/manifests
mkdir -p "$OUT"
for s in train valid test; do
  [ -f "$M/$s.idx" ] || "$BIN/mtssl-image-features" --images "$M/$s.images" --root "$MAIN/data/corpus" --out "$M/$s"
done
[ -f "$OUT/test.item" ] || "$BIN/mtssl-abx-items" --alignments "$MAIN/data/corpus/alignments/test.phones.ctm" --manifest "$M/test.tsv" --out "$OUT/test.item"
for sc in ${SCENARIOS:-W2V2 VGS VGS+ W2V2,VGS VGS,W2V2}; do
  name=$(echo "$sc" | tr ',+' '_p' | tr 'A-Z' 'a-z')
  "$BIN/mtssl-vgs-train" --scenario "$sc" --data "$M" --out "$OUT/$name" --updates "$UPDATES" "$@"
  ck=$("$BIN/python" -c "import json,sys; print(json.load(open(sys.argv[1]))['final'])" "$OUT/$name/summary.json")
  [ -f "$OUT/$name/retrieval.json" ] || "$BIN/mtssl-vgs-retrieval" "$ck" --split test --json "$OUT/$name/retrieval.json"
  [ -f "$OUT/$name/abx.json" ] || "$BIN/mtssl-abx" "$ck" --manifest "$M/test.tsv" --items "$OUT/test.item" --json "$OUT/$name/abx.json"
done
