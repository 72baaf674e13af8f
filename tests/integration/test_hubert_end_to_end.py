"""Embedded corpus -> manifests -> MFCC labels -> fairseq-hydra-train (HuBERT) -> iteration-2 labels."""

import re
import shutil

import pytest
from conftest import PACKAGE_DIR, REPO, assert_padded_layer_features_match, run_cli

pytestmark = pytest.mark.slow  # every test here trains with fairseq-hydra-train

CONFIG_DIR = REPO / "fairseq_mtssl/config/hubert/pretrain"


def _train(run_dir, manifest_dir, label_dir, updates, *extra):
    return run_cli(
        "fairseq-hydra-train",
        "--config-dir",
        CONFIG_DIR,
        "--config-name",
        "hubert_tiny_cpu",
        f"common.user_dir={PACKAGE_DIR}",
        f"task.data={manifest_dir}",
        f"task.label_dir={label_dir}",
        'task.labels=["km"]',
        "model.label_rate=100",
        f"optimization.max_update={updates}",
        "checkpoint.save_interval_updates=50",
        "common.log_interval=5",
        f"hydra.run.dir={run_dir}",
        *extra,
        check=False,
    )


def _losses(log: str):
    return [
        (int(u), float(loss)) for loss, u in re.findall(r"\[train_inner\].* loss=([\d.]+),.*num_updates=(\d+)", log)
    ]


def test_hubert_trains_resumes_and_gives_iteration_2_labels(manifest_dir, mfcc_labels, tmp_path):
    run = tmp_path / "hubert"
    first = _train(run, manifest_dir, mfcc_labels, 100)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    losses = _losses(first.stdout)
    assert losses[-1][0] == 100
    # the masked-prediction loss (bits; no feature penalty in hubert_tiny_cpu) falls: 4.79 -> 4.21 measured
    assert losses[-1][1] < losses[0][1] - 0.3, losses

    # Resume: fairseq reads checkpoint_last.pt with torch's weights-only loader (allowlisted classes).
    second = _train(run, manifest_dir, mfcc_labels, 120)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Loaded checkpoint checkpoints/checkpoint_last.pt (epoch" in second.stdout
    assert _losses(second.stdout)[0][0] > 100

    ckpt = run / "checkpoints" / "checkpoint_last.pt"
    assert_padded_layer_features_match(ckpt, manifest_dir, layer=2, dim=128)
    work = tmp_path / "iter2"
    model_args = ["--feature", "model", "--checkpoint", ckpt, "--layer", "2"]
    run_cli("mtssl-dump-features", manifest_dir / "train.tsv", work / "feats", *model_args)
    run_cli("mtssl-learn-kmeans", work / "feats", "train", "1", work / "km.npy", "--n-clusters", "10")
    run_cli("mtssl-apply-kmeans", work / "km.npy", work / "km", "--manifest", manifest_dir / "train.tsv", *model_args)
    run_cli("mtssl-apply-kmeans", work / "km.npy", work / "km_dumped", "--split", "train", "--feat-dir", work / "feats")
    assert (work / "km" / "train.km").read_text() == (work / "km_dumped" / "train.km").read_text()
    out = run_cli("mtssl-check-labels", manifest_dir / "train.tsv", work / "km" / "train.km", "--label-rate", "50")
    assert "OK" in out.stdout
    assert len(set((work / "km" / "train.km").read_text().split())) > 3


def test_checked_task_refuses_labels_that_do_not_fit_the_audio(manifest_dir, mfcc_labels, tmp_path):
    bad = tmp_path / "bad_labels"
    shutil.copytree(mfcc_labels, bad)
    lines = (bad / "train.km").read_text().splitlines()
    lines[2] = " ".join(lines[2].split()[:-40])
    (bad / "train.km").write_text("\n".join(lines) + "\n")
    proc = _train(tmp_path / "run", manifest_dir, bad, 5)
    assert proc.returncode != 0
    assert re.search(r"LabelMismatchError: .*train.km:3: \d+ labels at 100 Hz", proc.stdout + proc.stderr)
