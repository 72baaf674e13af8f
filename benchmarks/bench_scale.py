"""Cost as the data grows: seconds per hour of audio and peak memory of each label-preparation stage.

    .venv/bin/python benchmarks/bench_scale.py [--hours 0.5 2 8] [--work DIR] [--clusters 100] [--percent 0.1]

Builds the embedded corpus (``mtssl-synth-corpus --hours H``, not timed) at each size, then runs the
label-preparation commands as a user runs them, each in its own process with ``OMP_NUM_THREADS=1``
and the jobs' malloc tunables (:data:`fairseq_mtssl.jobs.commands.MALLOC_TUNABLES`):

  manifest     mtssl-manifest-corpus (all three splits)
  mfcc_dump    mtssl-dump-features --feature mfcc (train)
  model_dump   mtssl-dump-features --feature model, layer 2 of a tiny HuBERT (hubert_tiny_cpu's
               architecture, random weights, saved in fairseq's checkpoint format)
  kmeans       mtssl-learn-kmeans on the MFCC dump, fixed --percent (the sample grows with the corpus)
  assign       mtssl-apply-kmeans --manifest (MFCC computed from the audio, never stored)

Stages run stage by stage with the sizes side by side (so a change of load hits every size of a stage
alike). For each run: wall and CPU seconds (user + system of the process and its threads, from
``wait4``), peak PSS of the process tree sampled every 0.2 s (:func:`~fairseq_mtssl.jobs.commands.tree_pss_mb`)
and the kernel's exact peak RSS. Seconds per hour divide by the hours of audio the stage read (all
splits for the manifest, train otherwise). Ratios (largest size / smallest) are recorded for
``run_all.py``: CPU time per hour (target <= 1.3), peak RSS of the dumps and the assignment (exact for one process; target
<= 1.1: independent of corpus size), and the k-means memory that each extra MB of sample costs
(peak RSS, whose differences are exact; target <= 3: bounded by the sample, not by the dump).

With three sizes or more, the slope of the last span over the first's (CPU, start-up cost excluded) is
the linearity figure (target <= 1.3). ``--base-probe-seconds S`` also dumps layer 6 of a HuBERT Base
(random weights) on the first S/4 and S seconds of the smallest train split, for the slope of a real
model's dump (the extrapolation in benchmarks/README.md).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ratios import record  # noqa: E402

from fairseq_mtssl.config import config_dir  # noqa: E402
from fairseq_mtssl.jobs.child_process import child_kwargs  # noqa: E402
from fairseq_mtssl.jobs.commands import MALLOC_TUNABLES, tree_pss_mb  # noqa: E402

BIN = Path(sys.executable).parent
STAGES = ("manifest", "mfcc_dump", "model_dump", "kmeans", "assign")
MFCC_DIM, MFCC_RATE = 39, 100


@dataclass
class Cost:
    wall_s: float
    cpu_s: float
    peak_pss_mb: float
    max_rss_mb: float


def measure(cmd: List, log: Path, env: Dict[str, str], interval: float = 0.2) -> Cost:
    """Run ``cmd`` to its end; its wall and CPU time, sampled peak PSS of its tree, kernel peak RSS."""
    argv = [str(c) for c in cmd]
    exe = str(BIN / argv[0]) if (BIN / argv[0]).exists() else argv[0]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(argv) + "\n")
        f.flush()
        start = time.perf_counter()
        proc = subprocess.Popen([exe, *argv[1:]], stdout=f, stderr=subprocess.STDOUT, env=env, **child_kwargs())
        peak = 0.0
        while True:
            peak = max(peak, tree_pss_mb(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(interval)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{argv[0]} exited with {proc.returncode}; log {log}:\n{tail}")
    return Cost(wall, usage.ru_utime + usage.ru_stime, peak, usage.ru_maxrss / 1024.0)


def yaml_model_config(name: str) -> dict:
    """The ``model:`` section of a HuBERT pre-training config of the plugin, with ``label_rate`` 100."""
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(OmegaConf.load(Path(config_dir("hubert")) / "pretrain" / f"{name}.yaml").model)
    model.pop("_name")
    model["label_rate"] = 100
    return model


def save_random_hubert(path: Path, config_name: str, seed: int = 0, **overrides) -> None:
    """A HuBERT of ``config_name``'s architecture (``overrides`` changed) with random weights, saved as fairseq
    saves a checkpoint."""
    import torch
    from fairseq.data.dictionary import Dictionary
    from fairseq.models.hubert import HubertConfig, HubertModel
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    model_cfg = HubertConfig(**{**yaml_model_config(config_name), **overrides})
    task_cfg = HubertPretrainingConfig(data="unused", labels=["km"], label_rate=100)
    d = Dictionary()
    for i in range(100):
        d.add_symbol(str(i))
    model = HubertModel(model_cfg, task_cfg, [d])

    def plain(cfg, name):
        return {**OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True), "_name": name}

    state = {
        "cfg": {"model": plain(model_cfg, "hubert"), "task": plain(task_cfg, "hubert_pretraining"), "common": {}},
        "model": model.state_dict(),
        "args": None,
        "task_state": {"dictionaries": [d]},
        "optimizer_history": [
            {"criterion_name": "HubertCriterion", "optimizer_name": "Adam", "lr_scheduler_state": {"best": None}}
        ],
        "extra_state": {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def head_manifest(src: Path, dest: Path, seconds: float) -> float:
    """The first utterances of manifest ``src`` adding up to at least ``seconds``; returns their seconds."""
    root, *lines = src.read_text().splitlines()
    keep, total = [], 0.0
    for line in lines:
        if total >= seconds:
            break
        keep.append(line)
        total += int(line.split("\t")[1]) / 16000
    dest.write_text("\n".join([root, *keep]) + "\n")
    return total


def frame_count(feat_dir: Path) -> int:
    return sum(int(x) for x in (feat_dir / "train_0_1.len").read_text().split())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hours", type=float, nargs="+", default=[0.5, 2.0, 8.0], help="corpus sizes (train hours)")
    p.add_argument("--work", type=Path, help="keep corpora and outputs here (reused corpora are not rebuilt)")
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--percent", type=float, default=0.1, help="k-means sample, fraction of the frames")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the commands")
    p.add_argument("--base-probe-seconds", type=float, default=80, help="HuBERT Base dump on this much audio (0: none)")
    p.add_argument("--json", type=Path, help="write every measurement here")
    a = p.parse_args(argv)
    hours = sorted(set(a.hours))
    if len(hours) < 2:
        p.error("--hours needs at least two sizes to give a ratio")

    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    env.setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)
    tmp = None
    if a.work is None:
        tmp = tempfile.TemporaryDirectory()
        work = Path(tmp.name)
    else:
        work = a.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run(a, hours, env, work)
    finally:
        if tmp is not None:
            tmp.cleanup()


def run(a, hours: List[float], env: Dict[str, str], work: Path) -> int:
    print("load average at the start: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    corpora, audio_h, total_h = {}, {}, {}
    for h in hours:
        corpora[h] = work / f"corpus_{h:g}h"
        start = time.perf_counter()
        subprocess.run(
            [BIN / "mtssl-synth-corpus", "--out", corpora[h], "--hours", str(h), "--seed", "1"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            **child_kwargs(),
        )
        seconds = json.loads((corpora[h] / "corpus.json").read_text())["seconds"]
        audio_h[h], total_h[h] = seconds["train"] / 3600, sum(seconds.values()) / 3600
        print(
            f"corpus {h:g} h: {audio_h[h]:.3f} h train, {total_h[h]:.3f} h in all ({time.perf_counter() - start:.0f} s)"
        )
    tiny = work / "hubert_tiny_random.pt"
    if not tiny.exists():
        save_random_hubert(tiny, "hubert_tiny_cpu")
    out = {h: work / f"run_{h:g}h" for h in hours}
    for d in out.values():
        shutil.rmtree(d, ignore_errors=True)

    def command(stage: str, h: float) -> List:
        o, m = out[h], out[h] / "manifests"
        return {
            "manifest": ["mtssl-manifest-corpus", corpora[h], "--dest", m],
            "mfcc_dump": ["mtssl-dump-features", m / "train.tsv", o / "mfcc", "--feature", "mfcc"],
            "model_dump": [
                "mtssl-dump-features",
                m / "train.tsv",
                o / "hubert_l2",
                "--feature",
                "model",
                "--checkpoint",
                tiny,
                "--layer",
                "2",
            ],
            "kmeans": [
                "mtssl-learn-kmeans",
                o / "mfcc",
                "train",
                "1",
                o / "km.npy",
                "--n-clusters",
                a.clusters,
                "--percent",
                a.percent,
            ],
            "assign": ["mtssl-apply-kmeans", o / "km.npy", o / "labels", "--manifest", m / "train.tsv"],
        }[stage]

    costs: Dict[str, Dict[float, Cost]] = {s: {} for s in STAGES}
    for stage in STAGES:
        for h in hours:
            costs[stage][h] = c = measure(command(stage, h), out[h] / "logs" / f"{stage}.log", env)
            print(f"  {stage:<11} {h:>4g} h  {c.wall_s:7.1f} s wall  {c.cpu_s:7.1f} s CPU  {c.peak_pss_mb:6.0f} MB PSS")
    imports = measure(
        ["python", "-c", "import fairseq_mtssl.kmeans.learn_kmeans, time; time.sleep(1.5)"],
        work / "imports.log",
        env,
    )

    def read_h(stage, h):
        return total_h[h] if stage == "manifest" else audio_h[h]

    lo, hi = hours[0], hours[-1]
    span = f"{hi:g}h/{lo:g}h"
    print(
        f"\n{'stage':<11} {'hours':>6} {'wall s':>8} {'wall s/h':>9} {'CPU s/h':>8} {'peak PSS MB':>12} {'peak RSS MB':>12}"
    )
    for stage in STAGES:
        for h in hours:
            c, n = costs[stage][h], read_h(stage, h)
            print(
                f"{stage:<11} {n:6.2f} {c.wall_s:8.1f} {c.wall_s / n:9.1f} {c.cpu_s / n:8.1f} {c.peak_pss_mb:12.0f} {c.max_rss_mb:12.0f}"
            )

    frames = {h: frame_count(out[h] / "mfcc") for h in hours}
    sample_mb = {h: int(frames[h] * a.percent) * MFCC_DIM * 4 / 2**20 for h in hours}
    dump_mb = {h: frames[h] * MFCC_DIM * 4 / 2**20 for h in hours}
    km = costs["kmeans"]
    print(f"\nk-means (k={a.clusters}, --percent {a.percent:g}); imports alone: {imports.peak_pss_mb:.0f} MB PSS")
    print(f"{'hours':>6} {'frames':>9} {'dump MB':>8} {'sample MB':>10} {'PSS - imports':>14} {'RSS MB':>8}")
    for h in hours:
        print(
            f"{audio_h[h]:6.2f} {frames[h]:9d} {dump_mb[h]:8.1f} {sample_mb[h]:10.1f} {km[h].peak_pss_mb - imports.peak_pss_mb:14.1f} {km[h].max_rss_mb:8.1f}"
        )
    km_growth = (km[hi].max_rss_mb - km[lo].max_rss_mb) / (sample_mb[hi] - sample_mb[lo])

    print(f"\nratios {span}")
    for stage in STAGES:
        per = {h: costs[stage][h].cpu_s / read_h(stage, h) for h in hours}
        wall = {h: costs[stage][h].wall_s / read_h(stage, h) for h in hours}
        record("scale", f"{stage}: CPU s per hour of audio, {span}", per[hi] / per[lo], "<= 1.3")
        pss = costs[stage][hi].peak_pss_mb / costs[stage][lo].peak_pss_mb
        rss = costs[stage][hi].max_rss_mb / costs[stage][lo].max_rss_mb
        if stage in ("mfcc_dump", "model_dump", "assign"):  # k-means: its own figure below
            # the target on peak RSS: exact for one process, while its PSS moves by +-20 MB with what else
            # maps torch's libraries at the time
            record("scale", f"{stage}: peak RSS, {span}", rss, "<= 1.1")
            record("scale", f"{stage}: peak PSS, {span}", pss)
        print(
            f"  {stage:<11} CPU s/h {per[hi] / per[lo]:5.2f}   wall s/h {wall[hi] / wall[lo]:5.2f}   "
            f"peak RSS {rss:5.2f}   peak PSS {pss:5.2f}"
        )
    record("scale", f"kmeans: MB of peak RSS per extra MB of sample, {span}", km_growth, "<= 3")
    print(f"  k-means: {km_growth:.2f} MB of peak RSS per extra MB of sample (dump/sample = {1 / a.percent:g})")
    slopes = {
        stage: (costs[stage][hi].cpu_s - costs[stage][lo].cpu_s) / (read_h(stage, hi) - read_h(stage, lo))
        for stage in STAGES
    }
    print("\nmarginal CPU s per hour (slope " + span + "): " + ", ".join(f"{s} {v:.1f}" for s, v in slopes.items()))
    if len(hours) >= 3:  # linearity without the fixed start-up cost: the last span's slope against the first's
        for stage in STAGES:
            first, last = (
                (costs[stage][b].cpu_s - costs[stage][a].cpu_s) / (read_h(stage, b) - read_h(stage, a))
                for a, b in ((hours[0], hours[1]), (hours[-2], hours[-1]))
            )
            spans = f"{hours[-2]:g}-{hours[-1]:g}h / {hours[0]:g}-{hours[1]:g}h"
            record("scale", f"{stage}: marginal CPU s per hour, {spans}", last / first, "<= 1.3")
            print(f"  {stage:<11} marginal CPU s/h {spans}: {last / first:.2f}")

    base = None
    if a.base_probe_seconds > 0:  # two lengths, so that loading the model drops out of the slope
        ckpt = work / "hubert_base_random.pt"
        if not ckpt.exists():
            save_random_hubert(ckpt, "hubert_base_iter1")
        base = {}
        for secs in (a.base_probe_seconds / 4, a.base_probe_seconds):
            sub = out[lo] / "manifests" / f"head_{secs:g}s.tsv"
            got = head_manifest(out[lo] / "manifests" / "train.tsv", sub, secs)
            argv = ["mtssl-dump-features", sub, out[lo] / f"base_l6_{secs:g}s", "--feature", "model"]
            c = measure([*argv, "--checkpoint", ckpt, "--layer", "6"], out[lo] / "logs" / f"base_{secs:g}s.log", env)
            base[got] = c
            print(
                f"HuBERT Base layer 6 on {got:.1f} s: {c.wall_s:.1f} s wall, {c.cpu_s:.1f} s CPU, {c.peak_pss_mb:.0f} MB PSS"
            )
        (s0, c0), (s1, c1) = sorted(base.items())
        base_slope = (c1.cpu_s - c0.cpu_s) / (s1 - s0) * 3600
        print(f"HuBERT Base layer-6 dump: {base_slope:.0f} marginal CPU s per hour of audio")
        record("scale", "HuBERT Base layer-6 dump: marginal CPU s per hour of audio", base_slope)
        base = {"slope_cpu_s_per_h": base_slope, **{str(k): vars(v) for k, v in base.items()}}

    print("load average at the end: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "hours": hours,
                    "train_hours": audio_h,
                    "all_hours": total_h,
                    "costs": {s: {str(h): vars(c) for h, c in v.items()} for s, v in costs.items()},
                    "imports": vars(imports),
                    "kmeans_frames": frames,
                    "kmeans_sample_mb": sample_mb,
                    "slopes_cpu_s_per_h": slopes,
                    "base_probe": base,
                    "loadavg": os.getloadavg(),
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
