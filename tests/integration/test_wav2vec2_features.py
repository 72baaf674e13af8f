"""fairseq's wav2vec 2.0 on the embedded corpus (tiny config), and labels from its layer features."""

import re

import pytest
from conftest import PACKAGE_DIR, REPO, assert_padded_layer_features_match, run_cli

pytestmark = pytest.mark.slow  # every test here trains with fairseq-hydra-train


def test_wav2vec2_tiny_trains_and_its_layers_give_labels(manifest_dir, tmp_path):
    run = tmp_path / "w2v2"
    proc = run_cli(
        "fairseq-hydra-train",
        "--config-dir",
        REPO / "fairseq_mtssl/config/wav2vec2/pretraining",
        "--config-name",
        "wav2vec2_tiny_cpu",
        f"common.user_dir={PACKAGE_DIR}",
        f"task.data={manifest_dir}",
        "optimization.max_update=60",
        "common.log_interval=10",
        "checkpoint.save_interval_updates=60",
        f"hydra.run.dir={run}",
    )
    losses = [float(x) for x in re.findall(r"\[train_inner\].* loss=([\d.]+),", proc.stdout)]
    assert len(losses) >= 5 and losses[-1] < losses[0], losses
    ckpt = run / "checkpoints" / "checkpoint_last.pt"
    assert_padded_layer_features_match(ckpt, manifest_dir, layer=1, dim=128)
    run_cli(
        "mtssl-dump-features",
        manifest_dir / "train.tsv",
        tmp_path / "feats",
        "--feature",
        "model",
        "--checkpoint",
        ckpt,
        "--layer",
        "1",
    )
    run_cli("mtssl-learn-kmeans", tmp_path / "feats", "train", "1", tmp_path / "km.npy", "--n-clusters", "8")
    run_cli(
        "mtssl-apply-kmeans",
        tmp_path / "km.npy",
        tmp_path / "km",
        "--split",
        "train",
        "--feat-dir",
        tmp_path / "feats",
    )
    run_cli("mtssl-check-labels", manifest_dir / "train.tsv", tmp_path / "km" / "train.km", "--label-rate", "50")
