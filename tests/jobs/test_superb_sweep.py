"""mtssl-superb: the lr grid, selection on dev, resumable runs, atomic outputs, bad input, and one real sweep."""

import json
import math
import sys

import pytest
import torch
from conftest import BIN, run_cli

from fairseq_mtssl.errors import MtsslError
from fairseq_mtssl.jobs import superb_sweep as sw

# -- the grid ---------------------------------------------------------------------------------------


def test_default_grids_are_one_point_a_decade_with_both_endpoints():
    assert sw.lr_grid(sw.TASKS["pr"].lr_min, sw.TASKS["pr"].lr_max) == [1e-4, 1e-3, 1e-2, 1e-1]
    assert sw.lr_grid(sw.TASKS["asr"].lr_min, sw.TASKS["asr"].lr_max) == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]


def test_grid_is_log_spaced_and_keeps_its_endpoints():
    grid = sw.lr_grid(1e-4, 1e-1, points=7)
    assert len(grid) == 7 and grid[0] == 1e-4 and grid[-1] == 1e-1 and grid == sorted(grid)
    steps = [math.log10(b / a) for a, b in zip(grid, grid[1:])]
    assert all(s == pytest.approx(0.5, abs=2e-3) for s in steps)  # half a decade, up to the 3-digit rounding
    assert sw.lr_grid(2e-3, 2e-3) == [2e-3]
    assert [sw.lr_name(lr) for lr in grid[:2]] == ["1e-04", "3.16e-04"]
    for lo, hi, n in [(0, 1e-2, None), (1e-2, 1e-3, None), (1e-4, 1e-2, 1)]:
        with pytest.raises(MtsslError, match="lr grid"):
            sw.lr_grid(lo, hi, n)


# -- selection --------------------------------------------------------------------------------------


def test_selection_takes_the_lowest_dev_metric():
    assert sw.select_lr({1e-1: 71.0, 1e-2: 64.5, 1e-3: 66.0, 1e-4: 90.0}, default_lr=1e-2) == 1e-2
    assert sw.select_lr({1e-1: 60.0, 1e-2: 64.5}, default_lr=1e-2) == 1e-1  # the default gets no favour
    # a run without a dev value (diverged before validating) loses
    assert sw.select_lr({1e-1: None, 1e-2: float("nan"), 1e-3: 99.0}, default_lr=1e-2) == 1e-3


def test_a_tie_goes_to_the_lr_nearest_the_configs_own_then_to_the_smaller():
    assert sw.select_lr({1e-1: 50.0, 1e-2: 50.0, 1e-3: 50.0, 1e-4: 70.0}, default_lr=1e-2) == 1e-2
    assert sw.select_lr({1e-1: 50.0, 1e-3: 50.0, 1e-2: 55.0}, default_lr=1e-2) == 1e-3  # equally far: smaller
    assert sw.select_lr({1e-1: 50.0, 1e-4: 50.0}, default_lr=1e-2) == 1e-1  # nearer on the log scale
    assert sw.select_lr({1e-1: 50.0, 1e-4: 50.0}) == 1e-4
    with pytest.raises(MtsslError, match="no run of the sweep has a dev metric"):
        sw.select_lr({1e-1: None, 1e-2: float("inf")})


def test_dev_curve_reads_simple_and_json_fairseq_logs(tmp_path):
    simple = tmp_path / "simple.log"
    simple.write_text(
        "[2026-12-03 10:15:48,391][valid][INFO] - epoch 001 | valid on 'valid' subset | loss 7.144 | "
        "layer_w0 0.402 | uer 80.848 | wer 100 | num_updates 30\n"
        "[2026-12-03 10:16:48,391][valid][INFO] - epoch 002 | valid on 'valid' subset | loss 6.1 | "
        "uer 75.5 | wer 100 | num_updates 60 | best_uer 75.5\n"
    )
    assert sw.dev_curve(simple, "valid", "uer") == [(30, 80.848), (60, 75.5)]
    js = tmp_path / "json.log"
    js.write_text(
        '[2026-12-03 10:15:48,391][dev_clean][INFO] - {"epoch": 1, "dev_clean_loss": "0.5", "dev_clean_uer": '
        '"12.25", "dev_clean_wer": "30", "dev_clean_num_updates": "1000", "dev_clean_best_uer": "12.25"}\n'
    )
    assert sw.dev_curve(js, "dev_clean", "uer") == [(1000, 12.25)]
    assert sw.dev_curve(tmp_path / "none.log", "valid", "uer") == []


# -- the sweep, with a stand-in for fairseq-hydra-train ---------------------------------------------

# Writes what fairseq's best-checkpoint tracking leaves (checkpoint_best.pt: the dev metric as val_loss, the
# update, the layer weights) and a valid line; counts its calls; "diverge" fails as fairseq does on nan.
FAKE_TRAIN = r"""
import sys, pathlib, torch
run, dev, count = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
with open(count, "a") as f:
    f.write(run.name + "\n")
if dev == "diverge":
    print("FloatingPointError: gradients are Nan/Inf")
    sys.exit(1)
if dev == "crash":
    sys.exit(3)
(run / "checkpoints").mkdir(parents=True, exist_ok=True)
state = {"extra_state": {"val_loss": float(dev), "best": float(dev)}, "optimizer_history": [{"num_updates": 7}],
         "model": {"featurizer.weights": torch.tensor([0.0, 1.0, 2.0])}}
torch.save(state, run / "checkpoints" / "checkpoint_best.pt")
print(f"[valid][INFO] - epoch 001 | valid on 'valid' subset | loss 1.0 | uer {dev} | num_updates 7")
"""
FAKE_EVAL = r"""
import json, sys
json.dump({"per": 42.5, "layer_weights": [0.09, 0.24, 0.67], "split": sys.argv[2]}, open(sys.argv[3], "w"))
"""


@pytest.fixture
def fake_sweep(tmp_path, monkeypatch):
    """A sweep over a stand-in upstream and manifest folder whose commands are FAKE_TRAIN / FAKE_EVAL."""
    data = tmp_path / "data" / "manifests"
    data.mkdir(parents=True)
    for name in ["dict.phn.txt"] + [f"{s}.{e}" for s in ("train", "valid", "test") for e in ("tsv", "phn")]:
        (data / name).write_text("")
    upstream = tmp_path / "upstream.pt"
    upstream.write_bytes(b"not read: normalize is given below")
    monkeypatch.setattr(sw, "upstream_normalize", lambda path: True)
    count = tmp_path / "trained.txt"

    def make(devs, **kw):
        sweep = sw.SuperbSweep(upstream, "pr", tmp_path / "data", tmp_path / "out", lrs=list(devs), heartbeat=999, **kw)
        sweep.train_command = lambda lr, gpu=None: [
            sys.executable,
            "-c",
            FAKE_TRAIN,
            sweep.run_dir(lr),
            devs[lr],
            count,
        ]
        sweep.test_command = lambda lr: [sys.executable, "-c", FAKE_EVAL, "x", sweep.test_split, sweep.test_json(lr)]
        return sweep

    def trained():
        return count.read_text().split() if count.exists() else []

    return make, trained, tmp_path / "out"


def test_sweep_selects_on_dev_tests_only_the_chosen_run_and_writes_json_and_row(fake_sweep):
    make, trained, out = fake_sweep
    result = make({1e-3: "61.5", 1e-2: "60.25", 1e-1: "diverge"}).run()
    assert sorted(trained()) == ["lr_1e-01", "lr_1e-02", "lr_1e-03"]
    assert result["chosen_lr"] == 1e-2 and result["dev_per"] == 60.25 and result["test_per"] == 42.5
    assert result["lr_grid"] == [1e-3, 1e-2, 1e-1] and result["best_update"] == 7
    assert result["layer_weights"] == pytest.approx(torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0).tolist(), abs=1e-4)
    assert [r["diverged"] for r in result["runs"]] == [False, False, True] and result["runs"][2]["dev"] is None
    assert [list(p) for p in result["runs"][0]["dev_curve"]] == [[7, 61.5]]
    # only the selected run went to test
    assert [p.name for p in out.glob("test_lr_*.json")] == ["test_lr_1e-02.json"]
    assert json.loads((out / "superb_pr.json").read_text())["chosen_lr"] == 1e-2
    row = (out / "superb_pr.md").read_text().splitlines()
    assert row[0].startswith("| task | upstream | lr grid | chosen lr | dev PER (%) | test PER (%)")
    assert row[2] == "| PR | upstream | 1e-03, 1e-02, 1e-01 | 1e-02 | 60.25 | 42.50 | 0.09 / 0.24 / 0.67 |"
    commands = (out / "commands.sh").read_text()
    assert commands.count("# train_lr_") == 3 and commands.count("# test_lr_1e-02") == 1


def test_a_finished_run_is_not_trained_again_and_a_larger_grid_trains_only_the_new_lr(fake_sweep):
    make, trained, out = fake_sweep
    make({1e-3: "61.5", 1e-2: "60.25"}).run()
    assert sorted(trained()) == ["lr_1e-02", "lr_1e-03"]
    again = make({1e-3: "61.5", 1e-2: "60.25"}).run()
    assert sorted(trained()) == ["lr_1e-02", "lr_1e-03"] and again["chosen_lr"] == 1e-2
    bigger = make({1e-3: "61.5", 1e-2: "60.25", 1e-1: "55.0"}).run()
    assert sorted(trained()) == ["lr_1e-01", "lr_1e-02", "lr_1e-03"]
    assert bigger["chosen_lr"] == 1e-1 and (out / "test_lr_1e-01.json").exists()


def test_an_interrupted_run_runs_again_and_a_crash_that_is_no_divergence_stops_the_sweep(fake_sweep):
    make, trained, out = fake_sweep
    with pytest.raises(MtsslError, match=r"train_lr_1e-02.*exited with 3"):
        make({1e-2: "crash"}, jobs=1).run()
    assert not (out / "done" / "train_lr_1e-02.json").exists() and not (out / "superb_pr.json").exists()
    make({1e-2: "50"}, jobs=1).run()
    assert trained() == ["lr_1e-02", "lr_1e-02"]


def test_changed_settings_in_the_same_out_are_refused(fake_sweep):
    make, _, _ = fake_sweep
    make({1e-2: "50"}).run()
    with pytest.raises(MtsslError, match="made with updates=300, not 20; use another --out"):
        make({1e-2: "50"}, updates=20).run()


def test_outputs_are_written_atomically(tmp_path):
    result = {
        "task": "pr",
        "metric": "per",
        "upstream_name": "hubert",
        "lr_grid": [1e-2],
        "chosen_lr": 1e-2,
        "dev_per": 1.0,
        "test_per": 2.0,
        "layer_weights": [1.0],
    }
    js, md = sw.write_outputs(tmp_path, result)
    before = js.read_text(), md.read_text()
    with pytest.raises(TypeError):
        sw.write_outputs(tmp_path, {**result, "runs": [object()]})  # json.dump fails half-way
    assert (js.read_text(), md.read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["superb_pr.json", "superb_pr.md"]


# -- the command line -------------------------------------------------------------------------------


def _cli_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        sw.main([str(a) for a in argv])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mtssl-superb: error: ")
    return err


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mtssl-superb"])
    up = tmp_path / "up.pt"
    up.write_bytes(b"x")
    common = ("--data", tmp_path, "--out", tmp_path / "out")
    assert "unknown task 'sid'" in _cli_error(capsys, up, "--task", "sid", *common)
    assert "missing.pt: upstream checkpoint not found" in _cli_error(
        capsys, tmp_path / "missing.pt", "--task", "pr", *common
    )
    assert "--config asr_base trains on .ltr" in _cli_error(capsys, up, "--task", "pr", "--config", "asr_base", *common)
    assert "--config nope: no nope.yaml" in _cli_error(capsys, up, "--task", "pr", "--config", "nope", *common)
    assert "up.pt: not a loadable checkpoint" in _cli_error(capsys, up, "--task", "pr", "--dry-run", *common)


def test_dry_run_and_paper_config_print_the_plan_and_run_nothing(fake_sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mtssl-superb"])
    up = tmp_path / "upstream.pt"
    sw.main([str(up), "--task", "pr", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o1"), "--dry-run"])
    plan = capsys.readouterr().out
    assert plan.count("fairseq-hydra-train") == 4 and "'optimization.lr=[0.1]'" in plan
    assert "checkpoint.best_checkpoint_metric=uer checkpoint.maximize_best_checkpoint_metric=false" in plan
    assert "mtssl-superb-eval" in plan and "--split test " in plan and "nothing run (--dry-run)" in plan
    sw.main(
        [
            str(up),
            "--task",
            "asr",
            "--config",
            "asr_base",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "o2"),
        ]
    )
    plan = capsys.readouterr().out
    assert (
        "train (LibriSpeech train-clean-100), dev_clean (LibriSpeech dev-clean), test_clean (LibriSpeech test-clean)"
        in plan
    )
    assert "lr grid 1e-06 1e-05 1e-04 1e-03 1e-02" in plan and "optimization.max_update=200000" in plan
    assert "checkpoint.best_checkpoint_metric=wer" in plan and "--split test_clean" in plan
    assert "missing in" in plan and "dev_clean.tsv" in plan and "add --run" in plan
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    sw.main(
        [
            str(up),
            "--task",
            "pr",
            "--config",
            "pr_base",
            "--gpus",
            "0",
            "1",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "o3"),
        ]
    )
    plan = capsys.readouterr().out
    assert (
        "env CUDA_VISIBLE_DEVICES=0 fairseq-hydra-train" in plan
        and "env CUDA_VISIBLE_DEVICES=1 fairseq-hydra-train" in plan
    )
    assert "distributed_training.distributed_world_size=1" in plan and "2 at a time" in plan


# -- a real sweep -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("features", ["from_audio", "from_a_feature_cache"])
def test_sweep_end_to_end_two_lrs(tiny_hubert_checkpoint, manifest_dir, tmp_path, features):
    out = tmp_path / "sweep"
    argv = ["mtssl-superb", tiny_hubert_checkpoint, "--task", "pr", "--data", manifest_dir, "--out", out]
    argv += ["--lrs", "1e-3", "1e-1", "--updates", "8", "--jobs", "2"]
    cache = tmp_path / "features"
    if features == "from_a_feature_cache":
        argv += ["--feature-cache", cache]
    first = run_cli(*argv)
    assert "chosen lr" in first.stdout and "dev PER" in first.stdout and "test PER" in first.stdout
    result = json.loads((out / "superb_pr.json").read_text())
    runs = {r["lr"]: r for r in result["runs"]}
    assert set(runs) == {1e-3, 1e-1} and all(r["best_update"] for r in runs.values())
    assert result["chosen_lr"] == min(runs, key=lambda lr: (runs[lr]["dev"], lr))
    assert result["dev_per"] == runs[result["chosen_lr"]]["dev"] and 0 <= result["test_per"]
    assert result["test"]["split"] == "test" and result["test"]["checkpoint"].endswith("checkpoint_best.pt")
    assert len(result["layer_weights"]) == 3 and abs(sum(result["layer_weights"]) - 1) < 1e-3
    assert result["layer_weights"] == pytest.approx(result["test"]["layer_weights"], abs=1e-3)
    assert all(r["dev_curve"] and r["dev_curve"][-1][0] == 8 for r in runs.values())
    assert (out / "superb_pr.md").read_text().count("\n") == 3
    commands = (out / "commands.sh").read_text()
    if features == "from_a_feature_cache":  # extracted once, before the runs; every run and the test read it
        assert commands.count("mtssl-cache-features") == 1 and commands.count(f"task.features={cache}") == 2
        assert commands.index("mtssl-cache-features") < commands.index("fairseq-hydra-train")
        assert sorted(p.name for p in cache.iterdir()) == ["test", "train", "valid"]
    else:
        assert "task.features" not in commands and not cache.exists()
    again = run_cli(*argv)
    stages = 3 + (features == "from_a_feature_cache")
    assert again.stdout.count("skipped") == stages and "chosen lr" in again.stdout
    assert (BIN / "mtssl-superb").exists()
