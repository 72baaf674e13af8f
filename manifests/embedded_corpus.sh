#!/usr/bin/env bash
# The embedded corpus -> manifests -> MFCC k-means labels (HuBERT iteration 1).
#   bash manifests/embedded_corpus.sh data [HOURS] [CLUSTERS]
set -euo pipefail
OUT=${1:?output dir}; HOURS=${2:-0.5}; K=${3:-50}
BIN=$(dirname "$0")/../.venv/bin
"$BIN/mtssl-synth-corpus" --out "$OUT/corpus" --hours "$HOURS"
"$BIN/mtssl-manifest-corpus" "$OUT/corpus" --dest "$OUT/manifests"
bash "$(dirname "$0")/kmeans_labels.sh" "$OUT/manifests" "$OUT/labels/mfcc_km$K" mfcc
