"""benchmarks/gpu_check.py without a GPU: it skips cleanly; its training commands and log reading, checked on
the CPU (the checks themselves need a CUDA GPU)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_prints_one_line_and_exits_0(gpu_check, tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--skip-train"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [gpu_check.SKIP_MESSAGE]
    assert not out.exists()  # nothing built, nothing written


def test_training_commands_carry_the_fp16_cuda_c10d_overrides(gpu_check, tmp_path):
    data = {"manifests": tmp_path / "manifests", "labels": tmp_path / "km"}
    upstream = tmp_path / "hubert.pt"
    assert set(gpu_check.METHODS) == {"hubert", "mt4ssl", "vgs", "score", "superb_pr"}
    for method, (folder, name, needs_upstream) in gpu_check.METHODS.items():
        cmd = gpu_check.train_command(method, data, tmp_path / method, upstream if needs_upstream else None)
        config = Path(cmd[cmd.index("--config-dir") + 1]) / f"{cmd[cmd.index('--config-name') + 1]}.yaml"
        assert config.is_file() and config.parent.relative_to(REPO / "fairseq_mtssl" / "config") == Path(folder)
        for override in (
            "common.cpu=false",
            "common.fp16=true",
            "distributed_training.ddp_backend=c10d",
            "distributed_training.distributed_world_size=1",
            "optimization.max_update=20",
            f"task.data={data['manifests']}",
            f"hydra.run.dir={tmp_path / method}",
        ):
            assert override in cmd, (method, override)
        assert (f"model.upstream_path={upstream}" in cmd) == needs_upstream
        assert (f"task.label_dir={data['labels']}" in cmd) == (method in ("hubert", "mt4ssl"))
        if needs_upstream:
            with pytest.raises(ValueError, match="upstream"):
                gpu_check.train_command(method, data, tmp_path / method)


def test_last_loss_reads_fairseq_logs_with_nan_and_inf(gpu_check):
    log = (
        "[2026-12-03 10:00:00,000][train_inner][INFO] - epoch 001:      5 / 7 loss=6.123, ntokens=1, num_updates=5\n"
        "[2026-12-03 10:00:01,000][valid][INFO] - epoch 001 | valid on 'valid' subset | loss 9.5 | num_updates 7\n"
        "[2026-12-03 10:00:02,000][train][INFO] - epoch 001 | loss 5.87 | ntokens 1 | num_updates 7\n"
    )
    assert gpu_check.last_loss(log) == 5.87
    nan = log + "[2026-12-03 10:00:03,000][train_inner][INFO] - epoch 002:      3 / 7 loss=nan, num_updates=10\n"
    assert gpu_check.last_loss(nan) != gpu_check.last_loss(nan)  # nan
    assert gpu_check.last_loss(log.replace("loss 5.87", "loss inf")) == float("inf")
    assert gpu_check.last_loss("[train_inner] - epoch 001: ntokens=1\n") is None
