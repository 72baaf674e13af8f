#!/usr/bin/env bash
# SpokenCOCO (Karpathy split json files) -> manifests with per-utterance image indices.
#   bash manifests/spokencoco.sh /data/SpokenCOCO /data/mscoco manifests/coco
set -euo pipefail
SC=${1:?SpokenCOCO root}; IMG=${2:?image root}; OUT=${3:?output dir}
BIN=$(dirname "$0")/../.venv/bin
"$BIN/mtssl-manifest-spokencoco" "$SC/SpokenCOCO_train_unrolled_karpathy.json" --audio-root "$SC" --image-root "$IMG" --dest "$OUT" --split train
"$BIN/mtssl-manifest-spokencoco" "$SC/SpokenCOCO_val_unrolled_karpathy.json" --audio-root "$SC" --image-root "$IMG" --dest "$OUT" --split valid
