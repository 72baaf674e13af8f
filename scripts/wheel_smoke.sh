#!/usr/bin/env bash
# Build a wheel of the package, install it into a fresh venv with no source tree on the path, and run a
# smoke-size main job from it: the configs must come from the installed package, not from a checkout.
# The fresh venv borrows torch, fairseq's dependencies etc. from ./.venv (a .pth line), installs
# ve-fairseq itself (for its fairseq-hydra-train) and the wheel with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${WORK:-$(mktemp -d)}
rm -rf "$WORK/dist" "$WORK/venv" "$WORK/run"
.venv/bin/python -m pip --disable-pip-version-check wheel -q --no-deps --no-build-isolation -w "$WORK/dist" . \
  2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
WHEEL=$(ls "$WORK"/dist/fairseq_mtssl-*.whl)
python3 -c "import sys, zipfile; names = zipfile.ZipFile(sys.argv[1]).namelist(); \
sys.exit(0 if 'fairseq_mtssl/config/hubert/pretrain/hubert_tiny_cpu.yaml' in names else 1)" "$WHEEL" \
  || { echo "wheel_smoke: $WHEEL has no configs" >&2; exit 1; }
python3 -m venv "$WORK/venv"
SITE=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$SITE/_borrowed_from_repo_venv.pth"
pip_install() { "$WORK/venv/bin/python" -m pip --disable-pip-version-check install -q --no-deps "$@" \
  2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
pip_install ve-fairseq==0.12.3
pip_install "$WHEEL"
cd "$WORK"  # no checkout on the path
where=$("$WORK/venv/bin/python" -c "import fairseq_mtssl, fairseq_mtssl.config as c; print(fairseq_mtssl.__file__, c.config_dir('hubert/pretrain'))")
case "$where" in "$REPO"*) echo "wheel_smoke: imported from the checkout: $where" >&2; exit 1;; esac
echo "wheel_smoke: package and configs from $where"
"$WORK/venv/bin/mtssl-main-job" --out "$WORK/run" --hours 0.03 --models hubert --updates 10 --pr-updates 0 \
  --save-interval 10 --clusters 10 > "$WORK/main_job.log" 2>&1 || { tail -40 "$WORK/main_job.log" >&2; exit 1; }
test -s "$WORK/run/report.md" || { echo "wheel_smoke: no report.md" >&2; exit 1; }
grep -q "$WORK/venv/lib" "$WORK/run/commands.sh" || grep -q "site-packages/fairseq_mtssl" "$WORK/run/commands.sh" \
  || { echo "wheel_smoke: commands did not use the installed package" >&2; exit 1; }
echo "wheel_smoke: main job from the wheel wrote $WORK/run/report.md"
