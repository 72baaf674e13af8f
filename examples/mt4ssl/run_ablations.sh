#!/usr/bin/env bash
# MT4SSL ablations on the embedded corpus: both targets, offline only, online only, same updates.
#   bash examples/mt4ssl/run_ablations.sh runs/main runs/mt4ssl_ablations [UPDATES]
# Needs the main job's data (corpus, manifests, MFCC km50 labels). Then probes every model with a
# frame-level linear phone classifier (train split -> valid and held-out-speaker test splits).
set -euo pipefail
MAIN=${1:?main-job run dir}; OUT=${2:?output dir}; UPDATES=${3:-600}
REPO=$(cd "$(dirname "$0")/../.." && pwd); BIN=$REPO/.venv/bin
M=$MAIN/data/manifests; L=$MAIN/data/labels/mfcc_km50
declare -A VARIANT=([both]="" [offline_only]="model.online_weight=0" [online_only]="model.offline_weights=[0]")
for name in both offline_only online_only; do
  [ -f "$OUT/$name/checkpoints/checkpoint_last.pt" ] && grep -q "done training" "$OUT/$name/hydra_train.log" 2>/dev/null && continue
  "$BIN/fairseq-hydra-train" --config-dir "$REPO/fairseq_mtssl/config/mt4ssl/pretrain" --config-name mt4ssl_tiny_cpu \
    common.user_dir="$REPO/fairseq_mtssl" task.data="$M" task.label_dir="$L" 'task.labels=["km"]' task.label_rate=100 \
    optimization.max_update="$UPDATES" hydra.run.dir="$OUT/$name" ${VARIANT[$name]} > "$OUT.$name.log" 2>&1
done
for name in both offline_only online_only; do
  for layer in 1 2; do
    "$BIN/mtssl-phone-probe" "$OUT/$name/checkpoints/checkpoint_last.pt" --layer $layer --manifests "$M" \
      --alignments "$MAIN/data/corpus/alignments" --json "$OUT/probe_${name}_l$layer.json"
  done
done
