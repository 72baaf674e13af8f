#!/usr/bin/env bash
# LibriSpeech -> fairseq manifests with word, letter (and, with a lexicon, phone) transcripts.
#   bash manifests/librispeech.sh /data/LibriSpeech manifests/ls [LEXICON]
set -euo pipefail
LS=${1:?LibriSpeech root}; OUT=${2:?output dir}; LEX=${3:-}
BIN=$(dirname "$0")/../.venv/bin
for pair in train-clean-100:train dev-clean:dev_clean dev-other:dev_other test-clean:test_clean test-other:test_other; do
  src=${pair%%:*}; name=${pair##*:}
  [ -d "$LS/$src" ] || continue
  "$BIN/mtssl-manifest-librispeech" "$LS/$src" --dest "$OUT" --split "$name" ${LEX:+--lexicon "$LEX"}
done
