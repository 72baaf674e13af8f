"""mtssl-content-compare: SCORE, LASER and SPIN from one start, one table; its log reading and table (quick),
and one smoke run (slow: three trainings of 3 updates and four evaluations)."""

import json
import math
import re

import pytest


@pytest.fixture(scope="module")
def data_dir(manifest_dir, corpus_dir, tmp_path_factory):
    """The main job's data layout (manifests/, corpus/alignments/) over the session's corpus."""
    d = tmp_path_factory.mktemp("data")
    (d / "manifests").symlink_to(manifest_dir)
    (d / "corpus").symlink_to(corpus_dir)
    return d


def test_seconds_per_update_skip_the_first_interval(tmp_path):
    """fairseq's ups meter starts at the end of update 1: its first value is no step time; the median of
    1 / ups over the rest is."""
    from fairseq_mtssl.jobs.content_compare import seconds_per_update

    log = tmp_path / "hydra_train.log"
    lines = [
        "[2026-12-02 10:00:00,000][train_inner][INFO] - epoch 001:      1 / 11 loss=1.2, ups=4000.5, wpb=1, bsz=2, "
        "num_updates=1, lr=1e-05, gnorm=1.1, train_wall=1, wall=9",
        "[2026-12-02 10:00:01,000][train_inner][INFO] - epoch 001:      2 / 11 loss=1.1, ups=0.5, wpb=1, bsz=2, "
        "num_updates=2, lr=2e-05, gnorm=1.0, train_wall=2, wall=11",
        "[2026-12-02 10:00:02,000][train_inner][INFO] - epoch 001:      3 / 11 loss=1.0, ups=0.25, wpb=1, bsz=2, "
        "num_updates=3, lr=3e-05, gnorm=1.0, train_wall=4, wall=15",
        "[2026-12-02 10:00:03,000][train_inner][INFO] - epoch 001:      4 / 11 loss=0.9, ups=1, wpb=1, bsz=2, "
        "num_updates=4, lr=4e-05, gnorm=1.0, train_wall=1, wall=16",
    ]
    log.write_text("\n".join(lines) + "\n")
    assert seconds_per_update(log) == 2.0  # median of 2, 4 and 1 s
    log.write_text(lines[0] + "\n")
    assert seconds_per_update(log) is None


def test_best_layer_and_the_table():
    """ABX: the layer with the lowest clean across error; the table: one row per method and the start,
    mean +- std over seeds, '-' where a value does not apply (the start's training time)."""
    from fairseq_mtssl.jobs.content_compare import best_across, summarise, summary_markdown

    rows = [{"layer": 0, "across": 30.0}, {"layer": 1, "across": 20.0}, {"layer": 2, "across": 20.0}]
    assert best_across(rows)["layer"] == 1
    base = {"probe_clean": 0.5, "probe_perturbed": 0.4, "probe_gap": -0.1, "abx_across_clean": 20.0,
            "abx_across_perturbed": 25.0, "abx_across_gap": 5.0, "abx_layer": 2, "speaker_acc": 0.75,
            "speaker_chance": 0.25, "speaker_frame_acc": 0.3, "speaker_frame_chance": 0.2}  # fmt: skip
    results = {"start": "s.pt", "layer": 2, "updates": 3, "seeds": [1, 2],
               "configs": {"score": "score_tiny_cpu", "laser": "laser_tiny_cpu", "spin": "spin_tiny_cpu"},
               "models": {"start": {"method": "start", **base}}}  # fmt: skip
    for m in ("score", "laser", "spin"):
        for seed, acc in ((1, 0.5), (2, 0.7)):
            results["models"][f"{m}_seed{seed}"] = {
                "method": m, "seed": seed, **base, "speaker_acc": acc, "sec_per_update": 0.1 * seed, "peak_pss_mb": 500.0,
            }  # fmt: skip
    summary = summarise(results)
    assert summary["models"] == ["start", "score", "laser", "spin"]
    spk = summary["metrics"]["laser"]["speaker_acc"]
    assert spk["mean"] == pytest.approx(0.6) and spk["std"] == pytest.approx(0.1414, abs=1e-4)
    assert summary["metrics"]["start"]["sec_per_update"]["mean"] is None
    table = summary_markdown(summary)
    assert "| SPIN | 0.5000 +- 0.0000 | 0.4000 +- 0.0000 | -0.1000 +- 0.0000 | 20.00 +- 0.00 |" in table
    assert "| 0.6000 +- 0.1414 | 0.3000 +- 0.0000 | 0.150 +- 0.071 | 500 +- 0 |" in table
    assert "| start | 0.5000 | 0.4000 | -0.1000 | 20.00 | 25.00 | 5.00 | 2.0 | 0.7500 | 0.3000 | - | - |" in table
    assert "speaker probe chance 0.2500 (utterances), 0.2000 (frames)" in table


@pytest.mark.slow
def test_content_compare_smoke(data_dir, tiny_hubert_checkpoint, tmp_path):
    """Smoke size (1 seed, 3 updates per method, no ABX context): the table has the start and the three
    methods with finite values; each method trained 3 updates through a recorded fairseq-hydra-train of its
    tiny config, with its time per update and peak memory taken."""
    from fairseq_mtssl.jobs.content_compare import COLUMNS, main

    out = tmp_path / "compare"
    main([str(tiny_hubert_checkpoint), "--data", str(data_dir), "--out", str(out), "--seeds", "1",
          "--updates", "3", "--abx-context", "none", "--threads", "1"])  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"start", "score_seed1", "laser_seed1", "spin_seed1"}
    assert results["configs"] == {"score": "score_tiny_cpu", "laser": "laser_tiny_cpu", "spin": "spin_tiny_cpu"}
    for name, r in results["models"].items():
        keys = [k for k, _, _ in COLUMNS] if name != "start" else [k for k, _, _ in COLUMNS[:-2]]
        for k in keys:
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (name, k, r[k])
        assert 0 < r["probe_clean"] <= 1 and 0 <= r["speaker_acc"] <= 1 and 0 <= r["abx_across_clean"] <= 100
        assert r["probe_gap"] == pytest.approx(r["probe_perturbed"] - r["probe_clean"])
        if name != "start":
            assert r["updates"] == 3 and r["sec_per_update"] > 0 and r["peak_pss_mb"] > 100
    table = (out / "summary.md").read_text()
    for label in ("start", "SCORE", "LASER", "SPIN"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert len(cells) == len(COLUMNS)
        for cell in cells if label != "start" else cells[:-2]:
            assert math.isfinite(float(cell.split(" +- ")[0])), (label, cell)
    commands = (out / "commands.sh").read_text()
    for config in ("score_tiny_cpu", "laser_tiny_cpu", "spin_tiny_cpu"):
        assert re.search(rf"fairseq-hydra-train .*--config-name {config} .*optimization.max_update=3", commands)
    # one evaluation command per model: both audio conditions and the speaker probe from one load
    assert (
        commands.count("mtssl-evaluate-upstream ") == 4 and "--perturbed " in commands and "--speaker-probe" in commands
    )
