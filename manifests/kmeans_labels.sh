#!/usr/bin/env bash
# HuBERT k-means labels for every split of a manifest dir.
#   bash manifests/kmeans_labels.sh MANIFESTS OUT mfcc                      # iteration 1, 100 Hz
#   bash manifests/kmeans_labels.sh MANIFESTS OUT model CKPT LAYER         # iteration 2, 50 Hz
# Env: K (clusters, 50), NSHARD (feature dump shards, 1; run ranks on other machines with --rank),
#      PERCENT (fraction of frames for k-means, -1 = all).
set -euo pipefail
M=${1:?manifest dir}; OUT=${2:?label dir}; FEAT=${3:?mfcc or model}; CKPT=${4:-}; LAYER=${5:-}
K=${K:-50}; NSHARD=${NSHARD:-1}; PERCENT=${PERCENT:--1}
BIN=$(dirname "$0")/../.venv/bin
ARGS=(--feature "$FEAT"); [ "$FEAT" = model ] && ARGS+=(--checkpoint "$CKPT" --layer "$LAYER")
for ((r = 0; r < NSHARD; r++)); do
  "$BIN/mtssl-dump-features" "$M/train.tsv" "$OUT/features" --rank $r --nshard "$NSHARD" "${ARGS[@]}"
done
"$BIN/mtssl-learn-kmeans" "$OUT/features" train "$NSHARD" "$OUT/kmeans.npy" --n-clusters "$K" --percent "$PERCENT"
for tsv in "$M"/*.tsv; do
  "$BIN/mtssl-apply-kmeans" "$OUT/kmeans.npy" "$OUT" --manifest "$tsv" "${ARGS[@]}"
done
