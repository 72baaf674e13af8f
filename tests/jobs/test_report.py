"""Training-log parsing and the main job's report, on hand-made logs and results."""

import json
from pathlib import Path

from fairseq_mtssl.jobs.report import write_report
from fairseq_mtssl.jobs.training_log import read_curve, read_curves, trained_updates

PNG = b"\x89PNG\r\n\x1a\n"


def _log(path: Path, points, start_line: str = "") -> Path:
    lines = [start_line] if start_line else []
    for u, loss in points:
        lines.append(
            f"[2026-11-24 07:07:49,821][train_inner][INFO] - epoch 001:     3 / 9 loss={loss}, ssl_loss=4.2, ppl=1e-05, "
            f"num_updates={u}, lr=1.75439e-05, gnorm=1.675"
        )
    lines.append(
        "[2026-11-24 07:08:00,000][valid][INFO] - epoch 001 | valid on 'valid' subset | loss 5.708 | ppl 52.26 | "
        f"num_updates {points[-1][0]}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_curves_are_read_from_simple_and_valid_lines_and_stages_are_joined(tmp_path):
    a = _log(tmp_path / "a.log", [(10, 7.5), (20, 6.25)])
    assert read_curve(a) == [{"num_updates": 10, "loss": 7.5}, {"num_updates": 20, "loss": 6.25}]
    assert read_curve(a, kind="valid") == [{"num_updates": 20, "loss": 5.708}]
    assert read_curve(a, keys=("lr",))[0]["lr"] == 1.75439e-05
    b = _log(tmp_path / "b.log", [(10, 3.0), (30, 2.0)])  # stage 2 restarted its count (optimiser reset)
    joined = read_curves([a, b])
    assert [(r["num_updates"], r["stage"]) for r in joined] == [(10, 0), (20, 0), (30, 1), (50, 1)]
    c = _log(tmp_path / "c.log", [(30, 3.0)])  # a log that continues the count is not shifted
    assert [r["num_updates"] for r in read_curves([a, c])] == [10, 20, 30]


def test_a_stage_ending_between_logged_intervals_is_counted_to_its_last_update(tmp_path):
    end_of_epoch = (
        "[2026-11-24 12:05:22,665][train][INFO] - epoch 001 | loss 4.255 | ssl_loss 6.139 | num_updates {} | lr 0"
    )
    a = _log(tmp_path / "a.log", [(10, 7.5), (80, 6.0)])
    a.write_text(a.read_text() + end_of_epoch.format(86) + "\n")  # stage 1 stopped at 86 (logged every 10)
    b = _log(tmp_path / "b.log", [(10, 3.0), (210, 2.0)])
    b.write_text(b.read_text() + end_of_epoch.format(214) + "\n")
    assert [r["num_updates"] for r in read_curves([a, b])] == [10, 80, 96, 296]
    assert trained_updates([a, b]) == 300 and trained_updates([a]) == 86
    assert trained_updates([_log(tmp_path / "c.log", [(10, 1.0), (20, 1.0)])]) == 20  # no end-of-epoch line yet


def _results(tmp_path: Path, model: str, abx, per=None, retrieval=None) -> Path:
    res = {
        "abx": [{"layer": i, "within": w, "across": x} for i, (w, x) in enumerate(abx)],
        "qbe": {"mtwv": 0.0123, "map": 0.456, "layer": 1},
    }
    if per is not None:
        res["superb_pr"] = {"per": per}
    if retrieval is not None:
        res["retrieval"] = {**retrieval, "images": 26}
    path = tmp_path / "eval" / model / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return path


def test_report_tables_pick_the_best_layer_and_plots_are_pngs(tmp_path):
    ret = {f"{d}_r{k}": v for d in ("s2i", "i2s") for k, v in zip((1, 5, 10), (11.5, 40.0, 70.25))}
    results = {
        "train_hubert": {"logs": [str(_log(tmp_path / "h.log", [(10, 12.0), (300, 5.5)]))], "seconds": 100.0},
        "eval_hubert": {
            "results": str(_results(tmp_path, "hubert", [(20.0, 30.0), (10.0, 25.0), (12.0, 20.0)], per=78.5))
        },
        "train_vgs_plus": {
            "logs": [str(_log(tmp_path / "v1.log", [(10, 4.0)])), str(_log(tmp_path / "v2.log", [(10, 3.0)]))]
        },
        "eval_vgs_plus": {"results": str(_results(tmp_path, "vgs_plus", [(40.0, 45.0)], per=90.0, retrieval=ret))},
        "eval_mfcc": {"results": str(_results(tmp_path, "mfcc", [(0.0, 7.5)]))},
    }
    report = write_report(tmp_path, results, ["mfcc", "hubert", "vgs_plus"]).read_text()
    summary_part = report.split("## Summary")[1].split("## ABX per layer")[0]
    rows = {line.split("|")[1].strip(): line for line in summary_part.splitlines() if line.startswith("| ")}
    # best layer = lowest within + across: layer 2 (12 + 20) beats layer 1 (10 + 25)
    assert (
        "| 300 | 12.000 -> 5.500 | 12.00 / 20.00 (L2) | - | 78.50 | 0.456 (1) | - | - |" in rows["HuBERT iteration 1"]
    )
    assert "| 20 | 4.000 -> 3.000 | 40.00 / 45.00 (L0) | - | 90.00 |" in rows["VGS+ (simultaneous)"]
    assert rows["VGS+ (simultaneous)"].endswith("| 11.5 / 40.0 / 70.2 | 11.5 / 40.0 / 70.2 |")
    assert "| MFCC (no training) | - | - | 0.00 / 7.50 (L0) | - |" in rows["MFCC (no training)"]
    assert "| HuBERT iteration 1 | 20.00 / 30.00 | 10.00 / 25.00 | 12.00 / 20.00 |" in report  # ABX per layer
    for name in ("loss", "abx", "retrieval"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:8] == PNG
        assert f"](plots/{name}.png)" in report
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["hubert"]["final_loss"] == 5.5 and summary["mfcc"]["final_loss"] is None
