#!/usr/bin/env bash
# Create (or reuse) ./.venv with torch 2.13 from the local CPU wheel, ve-fairseq without its
# torchaudio dependency, and this package in editable mode. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.mtssl-bootstrap"
want="$(cat requirements.txt setup.cfg | sha1sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() {
  # this machine's pip config names local indexes that may be absent; drop those warnings only
  "$VENV/bin/python" -m pip --disable-pip-version-check install -q "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}
# torch first and pinned, so nothing below can pull a CUDA build.
pip_install torch==2.13.0
pip_install --no-deps ve-fairseq==0.12.3
pip_install -r requirements.txt torch==2.13.0
pip_install --no-deps s3prl==0.4.18  # only for the hubert_local interoperability test; it declares torchaudio
# test-only: dtw-python is the DTW of s3prl's quesst14_dtw expert, the reference of tests/evaluation/test_quesst.py
# (s3prl pins 1.3.0, whose wheel was built for numpy 1); it needs only numpy>=2 and scipy, already here
pip_install --no-deps dtw-python==1.9.0
# libri-light's ABX, the reference of tests/evaluation/test_abx_reference.py and benchmarks/bench_abx.py; it declares
# torchaudio (never imported: fairseq_mtssl/evaluation/libri_light_abx.py), and its wheel's Cython DTW was
# built for numpy 1, so it is rebuilt from the wheel's own dtw.pyx (the tests skip if that fails)
pip_install --no-deps zerospeech-libriabx==1.0.5
"$VENV/bin/python" scripts/build_libriabx_dtw.py >/dev/null || echo "libri-light's DTW not built: its ABX comparisons will skip" >&2
pip_install --no-deps --no-build-isolation -e .
"$VENV/bin/python" - <<'PY'
import sys
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
import fairseq_mtssl  # registers the plugin
print(f"fairseq-mtssl venv ready: torch {torch.__version__}, python {sys.version.split()[0]}")
PY
echo "$want" > "$stamp"
