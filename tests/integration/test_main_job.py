"""The main job end to end at toy size: kill -9 in the middle of a training, rerun, report."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here trains with fairseq-hydra-train

BIN = Path(sys.executable).parent


def _main_job(out: Path, **popen):
    cmd = [
        str(BIN / "mtssl-main-job"),
        "--out",
        str(out),
        "--hours",
        "0.03",
        "--models",
        "hubert_untrained",
        "hubert",
        "score",
        "--updates",
        "60",
        "--score-updates",
        "10",
        "--pr-updates",
        "10",
        "--save-interval",
        "20",
        "--jobs",
        "2",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _checkpoint_updates(log: Path):
    """Update counts of every checkpoint fairseq reported saving (interval and end-of-epoch ones)."""
    return (
        [int(u) for u in re.findall(r"Saved checkpoint \S+ \(epoch \d+ @ (\d+) updates", log.read_text())]
        if log.exists()
        else []
    )


def test_main_job_resumes_after_kill_9_and_writes_the_report(tmp_path):
    out = tmp_path / "run"
    log = out / "models" / "hubert" / "hydra_train.log"
    first = _main_job(out)
    deadline = time.time() + 900
    while time.time() < deadline and not _checkpoint_updates(log) and first.poll() is None:
        time.sleep(0.5)
    saved = _checkpoint_updates(log)
    assert saved, f"no checkpoint before the deadline:\n{first.stdout.read() if first.poll() is not None else ''}"
    os.kill(first.pid, signal.SIGKILL)  # the runner only; its commands die with it
    first.wait()
    assert not (out / "done" / "train_hubert.json").exists()
    assert (out / "done" / "corpus.json").exists()
    interrupted_at = max(_checkpoint_updates(log))
    assert interrupted_at < 60

    second = _main_job(out)
    stdout, _ = second.communicate(timeout=1800)
    assert second.returncode == 0, stdout[-4000:]
    # finished stages are skipped, the training resumes from its last checkpoint (not from update 0)
    assert re.search(r"skipped +corpus", stdout) and re.search(r"skipped +labels_mfcc", stdout)
    resumed = log.read_text().split("Loaded checkpoint checkpoints/checkpoint_last.pt")
    assert len(resumed) == 2, "the second run did not load checkpoint_last.pt"
    first_update_after = int(re.search(r"num_updates=(\d+)", resumed[1]).group(1))
    assert f"@ {interrupted_at} updates)" in resumed[1][:200]  # the last checkpoint the killed run saved
    assert interrupted_at < first_update_after <= interrupted_at + 10

    report = (out / "report.md").read_text()
    for label in ("MFCC (no training)", "HuBERT untrained", "HuBERT iteration 1", "HuBERT + SCORE"):
        assert f"| {label} |" in report
    results = json.loads((out / "report.json").read_text())
    assert results["hubert"]["eval"]["superb_pr"]["per"] >= 0 and len(results["hubert"]["eval"]["abx"]) == 3
    assert results["score"]["final_loss"] is not None and results["score"]["eval"]["superb_pr"]["per"] >= 0
    # the untrained baseline: one update at learning rate 0, evaluated like the others (the probe included)
    assert results["hubert_untrained"]["updates"] == 1
    assert 0 <= results["hubert_untrained"]["eval"]["phone_probe"]["test_acc"] <= 1
    for png in ("loss", "abx"):
        assert (out / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    commands = (out / "commands.sh").read_text()
    assert (
        "# train_score\n" in commands and "model.upstream_path=" in commands and "mtssl-evaluate-upstream" in commands
    )
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["peak_pss_mb_this_run"] < 4096
