"""Plugin registration and safe checkpoint loading under torch >= 2.6 (weights_only=True)."""

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import PACKAGE_DIR, REPO


def _py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_user_dir_registers_the_task():
    code = f"""
import argparse
from fairseq import utils
from fairseq.tasks import TASK_REGISTRY
assert "hubert_pretraining_checked" not in TASK_REGISTRY
utils.import_user_module(argparse.Namespace(user_dir={str(PACKAGE_DIR)!r}))
assert "hubert_pretraining_checked" in TASK_REGISTRY, sorted(TASK_REGISTRY)
utils.import_user_module(argparse.Namespace(user_dir={str(PACKAGE_DIR)!r}))  # a second load is harmless
print("ok")
"""
    proc = _py(code)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_plain_import_registers_the_task():
    from fairseq.tasks import TASK_REGISTRY

    import fairseq_mtssl  # noqa: F401

    assert TASK_REGISTRY["hubert_pretraining_checked"].__module__ == "fairseq_mtssl.tasks.hubert_pretraining_checked"


@pytest.fixture
def official_style_checkpoint(tmp_path):
    """What released wav2vec 2.0 / HuBERT checkpoints pickle: Namespace args, Dictionary task state."""
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(5):
        d.add_symbol(str(i))
    ckpt = {
        "args": argparse.Namespace(arch="hubert", lr=[0.0005], label_rate=np.float64(50.0), normalize=False),
        "model": {"w": torch.randn(3, 3)},
        "task_state": {"dictionaries": [d]},
        "extra_state": {"train_iterator": {"epoch": 1}},
    }
    path = tmp_path / "official.pt"
    torch.save(ckpt, path)
    return path


def test_official_style_checkpoint_needs_the_allowlist(official_style_checkpoint):
    without = _py(f"import torch; torch.load({str(official_style_checkpoint)!r})")
    assert without.returncode != 0 and "Weights only load failed" in without.stderr
    with_plugin = _py(
        f"import fairseq_mtssl, torch; s = torch.load({str(official_style_checkpoint)!r}); print(s['args'].arch, len(s['task_state']['dictionaries'][0]))"
    )
    assert with_plugin.returncode == 0, with_plugin.stderr[-2000:]
    assert with_plugin.stdout.split() == ["hubert", "9"]  # 4 special symbols + 5


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_checkpoint_that_pickles_a_callable_is_still_refused(tmp_path):
    import fairseq_mtssl  # noqa: F401  (allowlist active)
    from fairseq_mtssl.checkpoint_safety import CheckpointLoadError, load_checkpoint_safely

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "args": _Exploit(marker)}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path)
    with pytest.raises(CheckpointLoadError, match=r"evil.pt: not a loadable checkpoint.*system"):
        load_checkpoint_safely(path)
    assert not marker.exists()


def test_corrupt_checkpoint_error_names_the_file(tmp_path):
    from fairseq_mtssl.checkpoint_safety import CheckpointLoadError, load_checkpoint_safely

    path = tmp_path / "broken.pt"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointLoadError, match="broken.pt: not a loadable checkpoint"):
        load_checkpoint_safely(path)
