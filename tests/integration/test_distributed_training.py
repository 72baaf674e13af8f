"""Every method on fairseq's distributed paths: the launchers (torchrun, SLURM, one node) as fairseq reads
them, and two-rank CPU trainings through fairseq-hydra-train whose logged losses are checked against
what each worker computed.

Launchers (quick, no training): a probe process pretends to have G GPUs (``torch.cuda.device_count``
patched before fairseq is imported, so fairseq's default world size is G as on a GPU node), composes each
packaged config as ``fairseq-hydra-train`` does (``hydra_init``, hydra compose, ``add_defaults``) and
hands it to fairseq's own ``distributed_utils.call_main`` with the environment that torchrun or SLURM
sets for each process; ``distributed_main`` and ``torch.multiprocessing.spawn`` are replaced by recorders
(nothing trains, no process group). What it reports is fairseq's own inference: init method, world size,
rank, CUDA device, spawn or not. The SLURM case runs ``examples/slurm/train.sbatch`` with a fake ``srun``
(its command line is recorded) and a fake ``scontrol``, and checks the resources its ``#SBATCH`` lines ask.

Two-rank trainings (``slow``): each method's tiny config as two ``fairseq-hydra-train`` processes over
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
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import BIN, PACKAGE_DIR, REPO

CONFIG_ROOT = REPO / "fairseq_mtssl/config"
PAPER_CONFIGS = sorted(p for p in CONFIG_ROOT.rglob("*.yaml") if not p.stem.endswith("tiny_cpu"))
TINY_CONFIGS = sorted(p for p in CONFIG_ROOT.rglob("*.yaml") if p.stem.endswith("tiny_cpu"))
SBATCH = REPO / "examples/slurm/train.sbatch"
DDP_SHIM = Path(__file__).resolve().parents[1] / "ddp_shim" / "sitecustomize.py"

# ---------------------------------------------------------------------------------------------- launchers

PROBE = r"""
import json, os, sys
import torch

SPEC = json.load(sys.stdin)
torch.cuda.device_count = lambda: SPEC["gpus"]          # before fairseq's dataclass defaults are computed
SET_DEVICE = []
torch.cuda.set_device = lambda d: SET_DEVICE.append(int(d))
torch.cuda.is_available = lambda: False                  # nothing else may touch CUDA

from fairseq.dataclass.initialize import add_defaults, hydra_init
from fairseq.distributed import utils as dist_utils
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import fairseq_mtssl  # noqa: F401  (registers the plugin's task and model dataclasses)

RECORD = {}
def _distributed_main(i, main, cfg, kwargs):
    RECORD.update(launch="process", device_arg=int(i))
def _spawn(fn, args=(), nprocs=1, join=True, **kw):
    RECORD.update(launch="spawn", nprocs=int(nprocs))
def _single(cfg, **kwargs):
    RECORD.update(launch="single")
dist_utils.distributed_main = _distributed_main
torch.multiprocessing.spawn = _spawn

LAUNCHER_VARS = [k for k in os.environ if k.startswith("SLURM_")] + [
    "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"]
out = []
for case in SPEC["cases"]:
    path = case["config"]
    name = os.path.splitext(os.path.basename(path))[0]
    hydra_init(name)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.dirname(path), version_base="1.1"):
        composed = compose(name, overrides=case["overrides"])
    add_defaults(composed)
    base = OmegaConf.to_container(composed, resolve=False, enum_to_str=True)
    for env in case["envs"]:
        for k in LAUNCHER_VARS:
            os.environ.pop(k, None)
        os.environ.update(env)
        cfg = OmegaConf.create(base)
        OmegaConf.set_struct(cfg, True)
        RECORD.clear()
        del SET_DEVICE[:]
        try:
            dist_utils.call_main(cfg, _single)
        except Exception as e:  # what this process would die of
            RECORD.update(launch="error", error=f"{type(e).__name__}: {e}")
        d = cfg.distributed_training
        out.append(dict(config=path, env=env, init_method=d.distributed_init_method,
                        world_size=d.distributed_world_size, rank=d.distributed_rank,
                        device_id=int(d.device_id), no_spawn=bool(d.distributed_no_spawn),
                        set_device=list(SET_DEVICE), **RECORD))
print("PROBE" + json.dumps(out))
"""


def _probe(gpus: int, cases, tmp_path: Path):
    """fairseq's launch decisions for ``cases`` (config, overrides, one env per process) with ``gpus`` GPUs."""
    fake = tmp_path / "fakebin"
    fake.mkdir(exist_ok=True)
    scontrol = fake / "scontrol"  # `scontrol show hostnames LIST`: one host a line (LIST comma separated here)
    scontrol.write_text(f"#!{sys.executable}\nimport sys\nprint('\\n'.join(sys.argv[3].split(',')))\n")
    scontrol.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{fake}:{env['PATH']}", CUDA_VISIBLE_DEVICES="")
    spec = json.dumps({"gpus": gpus, "cases": cases})
    proc = subprocess.run([sys.executable, "-c", PROBE], input=spec, capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE")][-1]
    return json.loads(line[len("PROBE") :])


def _overrides(config: Path):
    """What every probed command line carries besides the launcher's part (``???`` fields stay unresolved)."""
    return [f"common.user_dir={PACKAGE_DIR}", "task.data=/data", "hydra.run.dir=/run"]


def _torchrun_env(rank: int, nproc: int, nnodes: int = 1):
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": str(nproc * nnodes),
            "RANK": str(rank), "LOCAL_RANK": str(rank % nproc), "LOCAL_WORLD_SIZE": str(nproc)}  # fmt: skip


def test_torchrun_one_node_gives_each_process_its_rank_and_gpu(tmp_path):
    """``torchrun --nproc_per_node 4 $(which fairseq-hydra-train) ...`` on a 4-GPU node, every paper config:
    fairseq reads WORLD_SIZE/RANK (init ``env://``), no spawning, device = LOCAL_RANK (fairseq computes
    RANK % GPUs; it does not read LOCAL_RANK itself)."""
    nproc = 4
    cases = [{"config": str(c), "overrides": _overrides(c), "envs": [_torchrun_env(r, nproc) for r in range(nproc)]}
             for c in PAPER_CONFIGS]  # fmt: skip
    results = _probe(nproc, cases, tmp_path)
    assert len(results) == nproc * len(PAPER_CONFIGS)
    expected = lambda r: dict(init_method="env://", world_size=nproc, rank=int(r["env"]["RANK"]),  # noqa: E731
                              device_id=int(r["env"]["LOCAL_RANK"]), no_spawn=True, launch="process")  # fmt: skip
    bad = _mismatches(results, expected)
    assert not bad, "\n".join(bad)


def _mismatches(results, expected):
    """One line per (config, process) whose launch differs from ``expected(result)``."""
    bad = []
    for r in results:
        want = expected(r)
        got = {k: r.get(k) for k in want}
        if got != want:
            bad.append(f"{Path(r['config']).relative_to(CONFIG_ROOT)} {r['env']}: got {got}, want {want}")
    return bad


def test_torchrun_two_nodes_ranks_and_devices(tmp_path):
    """Two nodes x 2 GPUs under torchrun: ranks 0..3, devices 0, 1 on each node."""
    envs = [_torchrun_env(r, 2, nnodes=2) for r in range(4)]
    cases = [{"config": str(c), "overrides": _overrides(c), "envs": envs} for c in PAPER_CONFIGS]

    def expected(r):
        return dict(world_size=4, rank=int(r["env"]["RANK"]), device_id=int(r["env"]["LOCAL_RANK"]))

    bad = _mismatches(_probe(2, cases, tmp_path), expected)
    assert not bad, "\n".join(bad)


def test_one_node_without_a_launcher_spawns_one_process_per_gpu(tmp_path):
    """A plain ``fairseq-hydra-train`` of a paper config on a 3-GPU node: fairseq spawns 3 processes, as
    many as the GPUs (no config pins a world size that would then not fit: that is an assertion error)."""
    cases = [{"config": str(c), "overrides": _overrides(c), "envs": [{}]} for c in PAPER_CONFIGS]
    results = _probe(3, cases, tmp_path)
    bad = _mismatches(results, lambda r: dict(launch="spawn", nprocs=3, world_size=3))
    bad += [
        f"{r['config']}: init {r['init_method']}"
        for r in results
        if not str(r["init_method"]).startswith("tcp://localhost:")
    ]
    assert not bad, "\n".join(bad)


def test_tiny_cpu_configs_stay_one_process_where_gpus_are_visible(tmp_path):
    """Every ``*_tiny_cpu`` config trains in one process even on a 4-GPU node (fairseq's default world
    size would be 4, spawning 4 ranks); a launcher's environment does not change that either."""
    cases = [{"config": str(c), "overrides": _overrides(c), "envs": [{}, _torchrun_env(1, 2)]} for c in TINY_CONFIGS]
    results = _probe(4, cases, tmp_path)
    assert len(results) == 2 * len(TINY_CONFIGS)
    bad = _mismatches(results, lambda r: dict(launch="single", init_method=None, world_size=1))
    assert not bad, "\n".join(bad)


def _sbatch_resources(text: str):
    res = {}
    for m in re.finditer(r"^#SBATCH\s+--([\w-]+)(?:[= ](\S+))?", text, re.M):
        res[m.group(1)] = m.group(2)
    return res


def _run_sbatch_script(tmp_path: Path, config: Path, nodes: int, tasks_per_node: int, extra):
    """Run the example sbatch script as the batch step would, with a fake ``srun`` recording its argv."""
    fake = tmp_path / "srunbin"
    fake.mkdir(exist_ok=True)
    record = tmp_path / "srun.json"
    (fake / "srun").write_text(
        f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n"
    )
    (fake / "srun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{fake}:{env['PATH']}", SLURM_JOB_ID="123456", SLURM_JOB_NUM_NODES=str(nodes),
               SLURM_NNODES=str(nodes), SLURM_NTASKS_PER_NODE=str(tasks_per_node),
               SLURM_NTASKS=str(nodes * tasks_per_node), SLURM_CPUS_PER_TASK="8",
               FAIRSEQ_HYDRA_TRAIN=str(BIN / "fairseq-hydra-train"), PLUGIN_DIR=str(PACKAGE_DIR))  # fmt: skip
    proc = subprocess.run(["bash", str(SBATCH), str(config.parent), config.stem, *extra], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(record.read_text())
    i = argv.index(str(BIN / "fairseq-hydra-train"))
    srun_opts, train = argv[:i], argv[i + 1 :]
    assert train[0] == "--config-dir" and train[2] == "--config-name" and train[3] == config.stem
    return srun_opts, train[4:]


def test_slurm_example_gives_every_task_its_own_rank_and_gpu(tmp_path):
    """examples/slurm/train.sbatch: one task per GPU, all of a node's GPUs visible to its tasks; run as
    SLURM runs it (its #SBATCH nodes x tasks), for every paper config fairseq gives task (node n, local l)
    rank n x tasks + l, device l, a world of nodes x tasks, one tcp:// rendezvous on the first node."""
    text = SBATCH.read_text()
    res = _sbatch_resources(text)
    assert "gpus-per-task" not in res and "gpu-bind" not in res and "ntasks" not in res
    nodes, per_node, gpus = int(res["nodes"]), int(res["ntasks-per-node"]), int(res["gpus-per-node"])
    assert per_node == gpus and nodes > 1
    hosts = [f"gpu{n:03d}" for n in range(nodes)]
    cases = []
    for config in PAPER_CONFIGS:
        srun_opts, overrides = _run_sbatch_script(
            tmp_path, config, nodes, per_node, ["task.data=/data", "hydra.run.dir=/run"]
        )
        assert not any("gpus-per-task" in o or "gpu-bind" in o for o in srun_opts)
        envs = []
        for n in range(nodes):
            for local in range(per_node):
                envs.append({"SLURM_STEP_NODELIST": ",".join(hosts), "SLURM_JOB_NODELIST": ",".join(hosts),
                             "SLURM_NNODES": str(nodes), "SLURM_NTASKS_PER_NODE": str(per_node),
                             "SLURM_NTASKS": str(nodes * per_node), "SLURM_NODEID": str(n), "SLURM_LOCALID": str(local),
                             "SLURM_PROCID": str(n * per_node + local), "SLURM_JOB_ID": "123456"})  # fmt: skip
        cases.append({"config": str(config), "overrides": overrides, "envs": envs})
    results = _probe(gpus, cases, tmp_path)  # --gpus-per-node: every task sees its node's GPUs
    world = nodes * per_node
    port = 20000 + 123456 % 20000
    for config in PAPER_CONFIGS:
        rs = [r for r in results if r["config"] == str(config)]
        assert len(rs) == world
        assert {r["init_method"] for r in rs} == {f"tcp://{hosts[0]}:{port}"}, rs[0]
        assert {r["world_size"] for r in rs} == {world} and sorted(r["rank"] for r in rs) == list(range(world))
        for r in rs:
            assert r["rank"] == int(r["env"]["SLURM_PROCID"]) and r["no_spawn"] and r["launch"] == "process", r
            assert r["device_id"] == int(r["env"]["SLURM_LOCALID"]) < gpus, r
        for n in range(nodes):  # distinct devices on every node, each one that the task can see
            devices = [r["device_id"] for r in rs if r["env"]["SLURM_NODEID"] == str(n)]
            assert sorted(devices) == list(range(gpus)), (config, n, devices)


def test_slurm_one_gpu_per_task_is_what_the_example_avoids(tmp_path):
    """Why the example does not ask --gpus-per-task=1: each task then sees one GPU (its device 0), yet
    fairseq still selects device SLURM_LOCALID: tasks 1.. of a node ask for a device they cannot see."""
    config = CONFIG_ROOT / "hubert/pretrain/hubert_base_iter1.yaml"
    envs = [{"SLURM_STEP_NODELIST": "a,b", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": str(n),
             "SLURM_LOCALID": str(lo), "SLURM_PROCID": str(2 * n + lo), "SLURM_JOB_ID": "1"}
            for n in range(2) for lo in range(2)]  # fmt: skip
    overrides = _overrides(config) + [
        "distributed_training.distributed_world_size=4",
        "distributed_training.distributed_port=29000",
    ]
    results = _probe(1, [{"config": str(config), "overrides": overrides, "envs": envs}], tmp_path)
    assert [r["device_id"] for r in results] == [0, 1, 0, 1]  # with 1 visible GPU, device 1 does not exist
    assert [r["set_device"] for r in results] == [[], [1], [], [1]]


def test_a_world_size_pinned_to_one_makes_torchrun_ranks_train_alone(tmp_path):
    """Why the paper configs pin no world size: fairseq returns before reading torchrun's environment when
    the config says 1, so each of torchrun's processes trains on its own (the tiny CPU configs do pin it)."""
    config = CONFIG_ROOT / "hubert/pretrain/hubert_base_iter1.yaml"
    overrides = _overrides(config) + ["distributed_training.distributed_world_size=1"]
    results = _probe(
        2, [{"config": str(config), "overrides": overrides, "envs": [_torchrun_env(r, 2) for r in range(2)]}], tmp_path
    )
    assert [(r["launch"], r["rank"], r["world_size"]) for r in results] == [("single", 0, 1), ("single", 0, 1)]


def test_readme_gives_the_tested_commands():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Multi-GPU and clusters") :]
    section = section[: section.index("\n## ", 3)]
    assert "torchrun --nproc_per_node" in section and "$(which fairseq-hydra-train)" in section
    assert "examples/slurm/train.sbatch" in section and "--gpus-per-task" in section  # (said not to use)


# ------------------------------------------------------------------------------------ two-rank trainings

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_two_ranks(
    config: Path, run: Path, overrides, updates: int, cpu_gather: bool = False, torchrun: bool = False
):
    """Two fairseq-hydra-train ranks over gloo, started one by one (fairseq's tcp:// init, no spawn) or by
    ``torchrun --nproc_per_node 2`` (fairseq's env:// init); returns (rank 0's log, each rank's local outputs)."""
    port = _free_port()
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
