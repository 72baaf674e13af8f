"""mtssl-vgs-train's sequential scenario: each stage's schedule, weights handed over and frozen, retrieval, a rerun."""

import json

import pytest
import torch
from conftest import run_cli


def _logged_lr(log: str) -> dict:
    """``{num_updates: lr}`` of fairseq's per-update training log lines (log_format simple)."""
    import re

    out = {}
    for line in log.splitlines():
        if "[train_inner][INFO]" in line:
            n, lr = re.search(r"num_updates=(\d+)", line), re.search(r"lr=([0-9.e+-]+)", line)
            out[int(n.group(1))] = float(lr.group(1))
    return out


@pytest.mark.slow
def test_sequential_scenario_hands_over_weights_and_freezes(vgs_data, tmp_path):
    out = tmp_path / "w2v2_vgs"
    run_cli(
        "mtssl-vgs-train",
        "--scenario",
        "W2V2,VGS",
        "--data",
        vgs_data,
        "--out",
        out,
        "--updates",
        "14",
        "--freeze-shared",
        "2",
        "checkpoint.save_interval_updates=5",
        "common.log_interval=1",
        "lr_scheduler.warmup_fraction=0.5",
        timeout=900,
    )
    # each stage its own schedule: stage A 4 updates (warm-up 2), stage B 10 updates (warm-up 5), both peaking at lr
    for stage, n, warm in (("stage1_w2v2", 4, 2), ("stage2_vgs", 10, 5)):
        logged = _logged_lr((out / "logs" / f"{stage}.log").read_text())
        assert sorted(logged) == list(range(1, n + 1)), (stage, logged)
        for k, lr in logged.items():  # the lr the scheduler sets after update k: warm-up, then linear to 0
            want = 1e-3 * (k / warm if k <= warm else (n - k) / (n - warm))
            assert lr == pytest.approx(want, rel=1e-3, abs=1e-9), (stage, k, lr, want)
    report = json.loads((out / "handover.json").read_text())
    a = torch.load(out / "stage1_w2v2/checkpoints/checkpoint_last.pt")["model"]
    b = torch.load(out / "stage2_vgs/checkpoints/checkpoint_last.pt")["model"]
    # layer 3 serves only the SSL loss: stage B leaves it exactly as stage A trained it (so A's weights were loaded)
    layer3 = [k for k in a if k.startswith("w2v.encoder.layers.2.")]
    assert layer3 and all(torch.equal(a[k], b[k]) for k in layer3)
    # frozen: the front end and the shared layers 1-2; trained: the VGS heads
    frozen = [k for k in a if k.startswith(("w2v.feature_extractor", "w2v.encoder.layers.0.", "w2v.encoder.layers.1."))]
    assert all(torch.equal(a[k], b[k]) for k in frozen)
    assert not all(torch.equal(a[k], b[k]) for k in a if k.startswith("image_"))
    assert report["VGS image head"]["status"].startswith("new to training") and report["VGS image head"]["changed_in_b"]
    assert report["SSL-only layers 3-3"]["status"] == "kept but unused in B"
    assert report["shared layers 1-2"]["frozen_in_b"] and not report["shared layers 1-2"]["changed_in_b"]
    run_cli(
        "mtssl-vgs-retrieval",
        out / "stage2_vgs/checkpoints/checkpoint_last.pt",
        "--split",
        "test",
        "--json",
        tmp_path / "r.json",
    )
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["captions"] == 10 and all(0 <= r[f"{d}_r{k}"] <= 100 for d in ("s2i", "i2s") for k in (1, 5, 10))
    # a rerun finds both stages done
    again = run_cli(
        "mtssl-vgs-train",
        "--scenario",
        "W2V2,VGS",
        "--data",
        vgs_data,
        "--out",
        out,
        "--updates",
        "14",
        "--freeze-shared",
        "2",
    )
    assert again.stdout.count("done before") == 2
