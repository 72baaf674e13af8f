"""The study profile at smoke size (a few updates, one seed): every stage runs and every claim gets a verdict."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fairseq_mtssl.jobs.verdicts import CONTRADICTED, INCONCLUSIVE, REPRODUCED

pytestmark = pytest.mark.slow  # trains every study condition for a few updates

BIN = Path(sys.executable).parent


def test_study_profile_at_smoke_size(tmp_path):
    out = tmp_path / "study"
    cmd = [
        str(BIN / "mtssl-main-job"),
        *("--profile", "study", "--out", out, "--hours", "0.03", "--seeds", "1"),
        *("--updates", "10", "--curve-points", "2", "--vgs-updates", "7", "--vgs-batch-size", "8"),
        *("--score-updates", "3", "--content-updates", "3", "--save-interval", "50", "--jobs", "2"),
    ]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = json.loads((out / "study.json").read_text())
    assert len(study["claims"]) == 9 and study["seeds"] == [1]  # MT4SSL 1, VGS 2, SPIN 2, LASER 2, SCORE 2
    for claim in study["claims"]:
        assert claim["verdict"] in (REPRODUCED, CONTRADICTED, INCONCLUSIVE)
        assert claim["verdict"].upper() in proc.stdout and claim["claim"] in proc.stdout
        for c in claim["comparisons"]:
            assert len(c["a_values"]) >= 1 and len(c["b_values"]) >= 1
    # the learning curves have their two checkpoints (5 and 10 updates), each probed
    curves = study["mt4ssl_curves"]
    assert sorted(curves) == [f"mt4ssl_{v}_seed1" for v in ("both", "offline_only", "online_only")]
    assert all([p["updates"] for p in c] == [5, 10] and 0 <= c[-1]["test_acc"] <= 1 for c in curves.values())
    # the sequential run was measured before and after the switch; both VGS runs retrieved
    seq = study["vgs"]["w2v2_then_vgs_seed1"]
    assert 0 <= seq["abx_across_before_switch"] <= 100 and "s2i_r10" in seq["retrieval"]
    assert study["score"]["start"].startswith("mt4ssl_") and study["score"]["summary"]["seeds"] == 1
    # SCORE, LASER and SPIN from the study's HuBERT, each evaluated like the start
    assert study["content"]["summary"]["models"] == ["start", "score", "laser", "spin"]
    md = (out / "study.md").read_text()
    assert "## Verdicts" in md and "MT4SSL learning curves" in md and "--profile study" in md
    assert "SCORE, LASER and SPIN from the main job's HuBERT" in md
