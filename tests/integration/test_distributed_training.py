"""Two-rank CPU trainings of every method through fairseq-hydra-train, rank 0's logged loss against each worker's.

Each method's tiny config as two ``fairseq-hydra-train`` processes over
gloo (fairseq's own launcher with ``distributed_no_spawn``; one process per rank, as one would on CPUs).
How the losses are checked: fairseq logs on rank 0 only, and its logged ``loss`` is the criterion's
``reduce_metrics`` over the workers' logging outputs (summed by one all-reduce, or gathered for fairseq's
``hubert``). A test-only ``sitecustomize`` (written by this module, loaded through PYTHONPATH into each
rank) records, on every rank and every update, the local logging outputs *before* fairseq aggregates
them (``Trainer._aggregate_logging_outputs``' input). The test then runs the criterion's own
``reduce_metrics`` on (rank 0's + rank 1's) local outputs and on each rank's alone, and checks that rank
0's logged ``loss`` of that update (``log_interval=1``) equals the joint value, and that the joint value
is the sample-size-weighted mean of the two workers' own values (to the logged rounding). A rank that
did not count would make rank 0 log its own value, which the test also rules out where the ranks differ.
The shim also loads tests/ddp_shim/sitecustomize.py: its parameter digest shows both ranks hold the
same weights after the last update, and its gloo gather replaces fairseq's ``all_gather_list`` (which
allocates a CUDA buffer) for the HuBERT criterion, whose outputs fairseq gathers instead of summing.
"""

import json
import os
import re
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from builders import free_port
from conftest import BIN, PACKAGE_DIR, REPO

CONFIG_ROOT = REPO / "fairseq_mtssl/config"
DDP_SHIM = Path(__file__).resolve().parents[1] / "ddp_shim" / "sitecustomize.py"


SHIM = textwrap.dedent(
    f'''
    """Test-only, loaded into each fairseq-hydra-train rank (tests/integration/test_distributed_training.py)."""
    import importlib.util, json, os

    _spec = importlib.util.spec_from_file_location("_mtssl_ddp_shim", {str(DDP_SHIM)!r})
    _shim = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_shim)  # parameter digests, gloo gather for fairseq's hubert criterion

    if os.environ.get("MTSSL_TEST_FAKE_GPUS"):  # torchrun on CPUs: fairseq takes RANK % GPUs as the device
        import torch

        torch.cuda.device_count = lambda: int(os.environ["MTSSL_TEST_FAKE_GPUS"])

    if os.environ.get("MTSSL_TEST_LOCAL_LOGS"):
        import torch
        from fairseq import trainer as _trainer

        _aggregate = _trainer.Trainer._aggregate_logging_outputs

        def _number(v):
            if isinstance(v, (int, float)):
                return float(v)
            if torch.is_tensor(v) and v.numel() == 1:
                return float(v)
            return None

        def _record_then_aggregate(self, logging_outputs, *extra, ignore=False):
            if self.model.training:  # train steps (valid_step aggregates too)
                rows = [{{k: _number(v) for k, v in log.items() if _number(v) is not None}} for log in logging_outputs]
                path = os.path.join(os.environ["MTSSL_TEST_LOCAL_LOGS"], f"rank{{self.data_parallel_rank}}.jsonl")
                with open(path, "a") as f:
                    record = {{"update": self.get_num_updates() + 1, "ignore": bool(ignore), "logs": rows}}
                    f.write(json.dumps(record) + "\\n")
            return _aggregate(self, logging_outputs, *extra, ignore=ignore)

        _trainer.Trainer._aggregate_logging_outputs = _record_then_aggregate
    '''
)

LOSS_RE = re.compile(r"\[train_inner\]\[INFO\] - .*?[\s,]loss=([^,\s]+),.*?\bnum_updates=(\d+)")  # log_format simple


def _train_two_ranks(
    config: Path, run: Path, overrides, updates: int, cpu_gather: bool = False, torchrun: bool = False
):
    """Two fairseq-hydra-train ranks over gloo, started one by one (fairseq's tcp:// init, no spawn) or by
    ``torchrun --nproc_per_node 2`` (fairseq's env:// init); returns (rank 0's log, each rank's local outputs)."""
    port = free_port()
    shim, local, digests = run / "shim", run / "local_logs", run / "digests"
    for d in (shim, local, digests):
        d.mkdir(parents=True)
    (shim / "sitecustomize.py").write_text(SHIM)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(shim), PYTHONUNBUFFERED="1",
               MTSSL_TEST_LOCAL_LOGS=str(local), MTSSL_TEST_RANK_DIGEST=str(digests))  # fmt: skip
    if cpu_gather:
        env["MTSSL_TEST_CPU_GATHER"] = "1"
    common = [
        "--config-dir", str(config.parent), "--config-name", config.stem, f"common.user_dir={PACKAGE_DIR}",
        "common.cpu=true", "common.log_interval=1", "distributed_training.distributed_world_size=2",
        "distributed_training.distributed_backend=gloo", "distributed_training.ddp_backend=legacy_ddp",
        f"optimization.max_update={updates}", "checkpoint.save_interval_updates=0", "dataset.disable_validation=true",
        *overrides,
    ]  # fmt: skip
    procs, start = [], time.monotonic()
    if torchrun:  # one command; rank 1 logs warnings only, so its log is the same stream
        env["MTSSL_TEST_FAKE_GPUS"] = "1"
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(BIN / "fairseq-hydra-train"), *common, f"hydra.run.dir={run / 'rank0'}"]  # fmt: skip
        log = open(run / "rank0.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    for rank in () if torchrun else (0, 1):
        cmd = [
            str(BIN / "fairseq-hydra-train"), *common, f"distributed_training.distributed_rank={rank}",
            f"distributed_training.distributed_init_method=tcp://127.0.0.1:{port}",
            "distributed_training.distributed_no_spawn=true", "distributed_training.device_id=0",
            f"hydra.run.dir={run / f'rank{rank}'}",
        ]  # fmt: skip
        log = open(run / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    codes = []
    try:
        for proc, log in procs:
            codes.append(proc.wait(timeout=max(1, 900 - (time.monotonic() - start))))
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    logs = [(run / f"rank{r}.log").read_text() for r in ((0,) if torchrun else (0, 1))]
    print(f"{config.stem}: 2 ranks x {updates} updates in {time.monotonic() - start:.0f} s")
    assert set(codes) == {0}, "\n\n".join(text[-4000:] for text in logs)
    assert "training on 2 devices" in logs[0], logs[0][-3000:]
    if torchrun:
        assert "distributed init (rank 0): env://" in logs[0], logs[0][-3000:]
    else:
        assert "distributed init (rank 1)" in logs[1], logs[1][-3000:]
    assert (run / "rank0" / "checkpoints" / "checkpoint_last.pt").exists(), logs[0][-3000:]
    records = [json.loads((digests / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["updates"] for r in records] == [updates, updates] and [r["world"] for r in records] == [2, 2]
    assert records[0]["digest"] == records[1]["digest"], "the ranks' parameters differ after the last update"
    local_logs = [[json.loads(ln) for ln in (local / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    return logs[0], local_logs


def _reduced_loss(criterion: str, logging_outputs):
    """(value, weight) of ``loss`` as the criterion's reduce_metrics computes it from these outputs."""
    from fairseq import metrics
    from fairseq.criterions import CRITERION_REGISTRY

    import fairseq_mtssl  # noqa: F401

    with metrics.aggregate(new_root=True) as agg:
        CRITERION_REGISTRY[criterion].reduce_metrics(logging_outputs)
        meter = agg["loss"]
        return meter.avg, meter.count


def _check_logged_losses(criterion: str, log0: str, local_logs, updates: int):
    """Rank 0's logged loss at every update = the criterion's reduction over both workers' local outputs,
    which is the weighted mean of the workers' own values. Returns at how many updates the logged value
    could not have been either worker's own (the two differ by more than twice the logged rounding)."""
    found = LOSS_RE.findall(log0)
    logged = {int(n): float(v) for v, n in found}
    decimals = max([3] + [len(v.partition(".")[2]) for v, _ in found])  # the criterion's round= (3 or 4)
    tol = 1.5 * 10**-decimals
    assert sorted(logged) == list(range(1, updates + 1)), log0[-3000:]
    by_update = [{rec["update"]: rec for rec in ranks} for ranks in local_logs]
    differing = 0
    for n in range(1, updates + 1):
        recs = [by_update[r][n] for r in (0, 1)]
        if any(rec["ignore"] for rec in recs):  # a rank out of batches ran fairseq's dummy batch: it counts 0
            assert not all(rec["ignore"] for rec in recs)
            kept = [rec for rec in recs if not rec["ignore"]][0]
            value, _ = _reduced_loss(criterion, kept["logs"])
            assert logged[n] == pytest.approx(value, abs=tol, rel=1e-5), (n, logged[n], value)
            continue
        (v0, w0), (v1, w1) = (_reduced_loss(criterion, rec["logs"]) for rec in recs)
        joint, w = _reduced_loss(criterion, recs[0]["logs"] + recs[1]["logs"])
        assert w == pytest.approx(w0 + w1)
        assert joint == pytest.approx((w0 * v0 + w1 * v1) / (w0 + w1), rel=1e-6, abs=1e-9)
        assert logged[n] == pytest.approx(joint, abs=tol, rel=1e-5), (n, logged[n], joint, v0, v1)
        if min(abs(joint - v0), abs(joint - v1)) > 2 * tol:  # here no single worker's value would pass
            differing += 1
    losses = [logged[n] for n in sorted(logged)]
    print(f"{criterion}: logged losses {losses}; {differing} updates told apart from either rank alone")
    return differing


@pytest.mark.slow
def test_hubert_two_ranks(manifest_dir, mfcc_labels, tmp_path):
    updates = 5
    log0, local = _train_two_ranks(
        CONFIG_ROOT / "hubert/pretrain/hubert_tiny_cpu.yaml", tmp_path,
        [f"task.data={manifest_dir}", f"task.label_dir={mfcc_labels}", 'task.labels=["km"]', "model.label_rate=100"],
        updates, cpu_gather=True,
    )  # fmt: skip
    assert _check_logged_losses("hubert", log0, local, updates) > 0


@pytest.mark.slow
def test_hubert_two_ranks_started_by_torchrun(manifest_dir, mfcc_labels, tmp_path):
    """The README's torchrun command on CPUs: ``torchrun --nproc_per_node 2 fairseq-hydra-train ...``;
    fairseq reads torchrun's environment (init env://). A CPU has no GPU to divide RANK by, so the shim
    shows fairseq one (both ranks then take device 0, unused with common.cpu), and the tiny config's world
    size of 1 is overridden to 2."""
    updates = 5
    log0, local = _train_two_ranks(
        CONFIG_ROOT / "hubert/pretrain/hubert_tiny_cpu.yaml", tmp_path,
        [f"task.data={manifest_dir}", f"task.label_dir={mfcc_labels}", 'task.labels=["km"]', "model.label_rate=100"],
        updates, cpu_gather=True, torchrun=True,
    )  # fmt: skip
    assert _check_logged_losses("hubert", log0, local, updates) > 0


@pytest.mark.slow
def test_mt4ssl_two_ranks(manifest_dir, mfcc_labels, tmp_path):
    updates = 10  # tri_stage's phases need 10 updates
    log0, local = _train_two_ranks(
        CONFIG_ROOT / "mt4ssl/pretrain/mt4ssl_tiny_cpu.yaml", tmp_path,
        [f"task.data={manifest_dir}", f"task.label_dir={mfcc_labels}", 'task.labels=["km"]', "task.label_rate=100"],
        updates,
    )  # fmt: skip
    assert _check_logged_losses("mt4ssl", log0, local, updates) > 0
    assert "target_var" in log0


@pytest.mark.slow
def test_vgs_two_ranks(vgs_data, tmp_path):
    updates = 5
    log0, local = _train_two_ranks(
        CONFIG_ROOT / "vgs/vgs_ssl_tiny_cpu.yaml", tmp_path, [f"task.data={vgs_data}"], updates
    )
    assert _check_logged_losses("vgs_ssl", log0, local, updates) > 0


@pytest.mark.slow
def test_vgs_with_audio_only_speech_two_ranks_one_without_images(vgs_data, tmp_path):
    """Audio-only speech mixed in 3:1 and 2 utterances a batch: some batches of a worker carry no image
    (counted from the workers' own logging outputs: vgs_pairs 0 with speech in the batch); both finish,
    the weights stay equal, and rank 0's losses are the joint reduction."""
    lines = (vgs_data / "train.tsv").read_text().splitlines()
    speech = tmp_path / "speech_only.tsv"
    speech.write_text("\n".join([lines[0]] + lines[1:] * 3) + "\n")
    updates = 8
    log0, local = _train_two_ranks(
        CONFIG_ROOT / "vgs/vgs_ssl_tiny_cpu.yaml", tmp_path / "run",
        [f"task.data={vgs_data}", f"task.audio_only_manifest={speech}", "dataset.batch_size=2"], updates,
    )  # fmt: skip
    _check_logged_losses("vgs_ssl", log0, local, updates)
    real = [[rec for rec in rank if not rec["ignore"]] for rank in local]  # not fairseq's dummy batches

    def pairs(rec):
        return sum(log.get("vgs_pairs", 0) for log in rec["logs"])

    imageless = [(r, rec["update"]) for r in (0, 1) for rec in real[r]
                 if pairs(rec) == 0 and sum(log.get("nsentences", 0) for log in rec["logs"]) > 0]  # fmt: skip
    has_pairs = {
        n: sorted(pairs(rec) > 0 for rank in real for rec in rank if rec["update"] == n) for n in range(1, updates + 1)
    }
    one_sided = [n for n, both in has_pairs.items() if both == [False, True]]
    print(f"batches without an image (rank, update): {imageless}; updates where only one worker had pairs: {one_sided}")
    assert imageless and one_sided


@pytest.mark.slow
def test_score_two_ranks(manifest_dir, tiny_hubert_checkpoint, tmp_path):
    updates = 5
    log0, local = _train_two_ranks(
        CONFIG_ROOT / "score/score_tiny_cpu.yaml", tmp_path,
        [f"task.data={manifest_dir}", f"model.upstream_path={tiny_hubert_checkpoint}"], updates,
    )  # fmt: skip
    assert _check_logged_losses("score", log0, local, updates) > 0


@pytest.mark.slow
def test_superb_pr_two_ranks(manifest_dir, tiny_hubert_checkpoint, tmp_path):
    updates = 5
    log0, local = _train_two_ranks(
        CONFIG_ROOT / "superb/pr_tiny_cpu.yaml", tmp_path,
        [f"task.data={manifest_dir}", f"model.upstream_path={tiny_hubert_checkpoint}"], updates,
    )  # fmt: skip
    assert _check_logged_losses("superb_ctc", log0, local, updates) > 0
