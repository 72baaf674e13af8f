"""A training killed after its last checkpoint, before its stage was marked done, is not run again."""

import torch

from fairseq_mtssl.config import config_dir
from fairseq_mtssl.jobs.main_job import max_update_of, saved_updates


def test_max_update_comes_from_the_override_else_the_config():
    yaml = config_dir("hubert/pretrain") / "hubert_tiny_cpu.yaml"
    assert max_update_of(yaml, ["common.seed=1", "optimization.max_update=7"]) == 7
    assert max_update_of(yaml, ["optimization.max_update=7", "optimization.max_update=1"]) == 1  # the last wins
    assert max_update_of(yaml, []) == 300


def test_saved_updates_read_the_last_checkpoint(tmp_path):
    """fairseq resumed at ``max_update`` still runs one more update (a 1-update baseline became 2), so the
    main job compares the last checkpoint's updates with the target before starting a training."""
    assert saved_updates(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    torch.save(
        {"optimizer_history": [{"num_updates": 0}, {"num_updates": 1}]}, tmp_path / "checkpoints/checkpoint_last.pt"
    )
    assert saved_updates(tmp_path) == 1
