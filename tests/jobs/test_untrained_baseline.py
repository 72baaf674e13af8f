"""The main job's untrained baselines are the model at its seed's initial weights, as fairseq builds it."""

import numpy as np
import pytest
import torch
from conftest import PACKAGE_DIR, REPO, run_cli

from fairseq_mtssl.jobs.main_job import UNTRAINED_OVERRIDES

pytestmark = pytest.mark.slow  # fairseq-hydra-train


def _train(run, manifest_dir, mfcc_labels, *overrides):
    run_cli(
        "fairseq-hydra-train",
        *("--config-dir", REPO / "fairseq_mtssl/config/hubert/pretrain", "--config-name", "hubert_tiny_cpu"),
        f"common.user_dir={PACKAGE_DIR}",
        f"task.data={manifest_dir}",
        f"task.label_dir={mfcc_labels}",
        'task.labels=["km"]',
        "model.label_rate=100",
        "common.seed=7",
        f"hydra.run.dir={run}",
        *overrides,
    )
    return run / "checkpoints" / "checkpoint_last.pt"


def test_untrained_checkpoint_holds_the_seeded_initial_weights(manifest_dir, mfcc_labels, tmp_path):
    from fairseq import tasks, utils
    from omegaconf import OmegaConf

    import fairseq_mtssl  # noqa: F401  (registers the plugin's task)
    from fairseq_mtssl.checkpoint_safety import load_checkpoint_safely

    untrained = load_checkpoint_safely(_train(tmp_path / "untrained", manifest_dir, mfcc_labels, *UNTRAINED_OVERRIDES))
    assert untrained["optimizer_history"][-1]["num_updates"] == 1

    # what fairseq_cli.train does before training: seed, set up the task, build the model
    np.random.seed(7)
    utils.set_torch_seed(7)
    cfg = OmegaConf.create(untrained["cfg"])  # fairseq saves its config as a plain container
    fresh = tasks.setup_task(cfg.task).build_model(cfg.model).state_dict()
    assert fresh.keys() == untrained["model"].keys()
    for k, v in fresh.items():
        assert torch.equal(v, untrained["model"][k]), k

    # a few updates at the config's learning rate do move them (the first warm-up update is at lr 0 here)
    trained = load_checkpoint_safely(
        _train(tmp_path / "three_updates", manifest_dir, mfcc_labels, "optimization.max_update=3")
    )["model"]
    assert not all(torch.equal(fresh[k], trained[k]) for k in fresh)
