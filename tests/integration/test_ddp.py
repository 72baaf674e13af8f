"""fairseq's own distributed path: two real fairseq-hydra-train ranks (gloo, CPU) for each method.

Each method's tiny config is started as rank 0 and rank 1 with
``distributed_init_method=tcp://127.0.0.1:PORT distributed_no_spawn=true distributed_rank=R``; both must
finish, rank 0 must save, the log must show a world of 2, and after every update both ranks must hold
the same parameters (a digest written by tests/ddp_shim/sitecustomize.py).

fairseq's ``hubert`` criterion says its logging outputs cannot be summed, so fairseq gathers them with
``all_gather_list``, which allocates a CUDA buffer: on a CPU the HuBERT case runs with the shim's
gloo-capable gather (``MTSSL_TEST_CPU_GATHER``); on GPUs fairseq's own gather is used. The plugin's
criteria (``mt4ssl``, ``vgs_ssl``, ``score``) sum their outputs and need no shim.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
from builders import free_port
from conftest import BIN, PACKAGE_DIR, REPO

pytestmark = pytest.mark.slow
SHIM = Path(__file__).resolve().parents[1] / "ddp_shim"


def _two_ranks(config_dir: Path, config: str, run: Path, overrides, cpu_gather: bool = False, updates: int = 4):
    port = free_port()
    digests = run / "digests"
    digests.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(SHIM),
               MTSSL_TEST_RANK_DIGEST=str(digests))  # fmt: skip
    if cpu_gather:
        env["MTSSL_TEST_CPU_GATHER"] = "1"
    procs = []
    for rank in (0, 1):
        cmd = [
            str(BIN / "fairseq-hydra-train"), "--config-dir", str(config_dir), "--config-name", config,
            f"common.user_dir={PACKAGE_DIR}", "common.cpu=true", "common.log_interval=1",
            "distributed_training.distributed_world_size=2", f"distributed_training.distributed_rank={rank}",
            f"distributed_training.distributed_init_method=tcp://127.0.0.1:{port}",
            "distributed_training.distributed_no_spawn=true", "distributed_training.distributed_backend=gloo",
            f"optimization.max_update={updates}", "checkpoint.save_interval_updates=0",
            f"hydra.run.dir={run / f'rank{rank}'}", *overrides,
        ]  # fmt: skip
        log = open(run / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=900))
        finally:
            log.close()
    logs = [(run / f"rank{r}.log").read_text() for r in (0, 1)]
    assert codes == [0, 0], "\n\n".join(text[-3000:] for text in logs)
    assert (run / "rank0" / "checkpoints" / "checkpoint_last.pt").exists(), logs[0][-3000:]
    assert "distributed init (rank 1)" in logs[1] and "training on 2 devices" in logs[0], logs[0][-3000:]
    records = [json.loads((digests / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in records] == [2, 2] and [r["updates"] for r in records] == [updates, updates]
    assert records[0]["digest"] == records[1]["digest"], "the ranks' parameters differ"
    return logs


def test_hubert_on_two_ranks(manifest_dir, mfcc_labels, tmp_path):
    _two_ranks(
        REPO / "fairseq_mtssl/config/hubert/pretrain", "hubert_tiny_cpu", tmp_path,
        [f"task.data={manifest_dir}", f"task.label_dir={mfcc_labels}", 'task.labels=["km"]', "model.label_rate=100"],
        cpu_gather=True,
    )  # fmt: skip


def test_mt4ssl_on_two_ranks(manifest_dir, mfcc_labels, tmp_path):
    logs = _two_ranks(
        REPO / "fairseq_mtssl/config/mt4ssl/pretrain", "mt4ssl_tiny_cpu", tmp_path,
        [f"task.data={manifest_dir}", f"task.label_dir={mfcc_labels}", 'task.labels=["km"]', "task.label_rate=100"],
        updates=10,  # tri_stage needs 10 updates for a decay stage
    )  # fmt: skip
    assert "target_var" in logs[0]  # data2vec's pooled variance, all-reduced over gloo


def test_vgs_ssl_on_two_ranks(vgs_data, tmp_path):
    _two_ranks(REPO / "fairseq_mtssl/config/vgs", "vgs_ssl_tiny_cpu", tmp_path, [f"task.data={vgs_data}"])


def test_score_on_two_ranks(manifest_dir, tiny_hubert_checkpoint, tmp_path):
    _two_ranks(
        REPO / "fairseq_mtssl/config/score", "score_tiny_cpu", tmp_path,
        [f"task.data={manifest_dir}", f"model.upstream_path={tiny_hubert_checkpoint}"],
    )  # fmt: skip
