"""fairseq's distributed launch (torchrun, SLURM, one node) of every packaged config, as fairseq reads it.

A probe process pretends to have G GPUs (``torch.cuda.device_count``
patched before fairseq is imported, so fairseq's default world size is G as on a GPU node), composes each
packaged config as ``fairseq-hydra-train`` does (``hydra_init``, hydra compose, ``add_defaults``) and
hands it to fairseq's own ``distributed_utils.call_main`` with the environment that torchrun or SLURM
sets for each process; ``distributed_main`` and ``torch.multiprocessing.spawn`` are replaced by recorders
(nothing trains, no process group). What it reports is fairseq's own inference: init method, world size,
rank, CUDA device, spawn or not. The SLURM case runs ``examples/slurm/train.sbatch`` with a fake ``srun``
(its command line is recorded) and a fake ``scontrol``, and checks the resources its ``#SBATCH`` lines ask.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import BIN, PACKAGE_DIR, REPO

CONFIG_ROOT = REPO / "fairseq_mtssl/config"
PAPER_CONFIGS = sorted(p for p in CONFIG_ROOT.rglob("*.yaml") if not p.stem.endswith("tiny_cpu"))
TINY_CONFIGS = sorted(p for p in CONFIG_ROOT.rglob("*.yaml") if p.stem.endswith("tiny_cpu"))
SBATCH = REPO / "examples/slurm/train.sbatch"

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
