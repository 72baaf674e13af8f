"""Memory of a CPU training with and without the main job's glibc malloc settings, side by side.

    .venv/bin/python benchmarks/bench_malloc.py [--corpus runs/main/data/corpus] [--updates 60] [--rounds 2]

Runs the tiny wav2vec 2.0 pre-training (``fairseq_mtssl/config/wav2vec2/pretraining/wav2vec2_tiny_cpu``)
for ``--updates`` updates, one intra-op thread, alternately with the default allocator and with
``GLIBC_TUNABLES=fairseq_mtssl.jobs.commands.MALLOC_TUNABLES``. It samples the process's PSS every 0.2 s
and prints, per setting, the median peak PSS and wall time, then the two ratios (tuned / default).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fairseq_mtssl.corpus.synth import ensure_corpus
from fairseq_mtssl.jobs.commands import MALLOC_TUNABLES, pss_mb
from fairseq_mtssl.prep.corpus_manifest import build_corpus_manifests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ratios import record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def train_once(manifests: Path, run_dir: Path, updates: int, tunables: str) -> tuple:
    """``(peak PSS MB, wall seconds)`` of one training."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    cmd = [
        str(Path(sys.executable).parent / "fairseq-hydra-train"),
        "--config-dir",
        str(ROOT / "fairseq_mtssl/config/wav2vec2/pretraining"),
        "--config-name",
        "wav2vec2_tiny_cpu",
        f"common.user_dir={ROOT / 'fairseq_mtssl'}",
        f"task.data={manifests}",
        f"hydra.run.dir={run_dir}",
        f"optimization.max_update={updates}",
        "checkpoint.no_save=true",
        "dataset.disable_validation=true",
    ]
    start, peak = time.time(), 0.0
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            peak = max(peak, pss_mb(proc.pid))
            time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}); log: {run_dir.parent / (run_dir.name + '.log')}")
    return peak, time.time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=ROOT / "runs/main/data/corpus")
    p.add_argument("--updates", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    ensure_corpus(a.corpus)
    with tempfile.TemporaryDirectory() as tmp:
        manifests = Path(tmp) / "manifests"
        build_corpus_manifests(a.corpus, manifests)
        runs = {"default": [], "tuned": []}
        for r in range(a.rounds):
            for name, tunables in (("default", ""), ("tuned", MALLOC_TUNABLES)):
                runs[name].append(train_once(manifests, Path(tmp) / f"{name}{r}", a.updates, tunables))
                print(
                    f"round {r} {name:8s} peak PSS {runs[name][-1][0]:6.0f} MB  {runs[name][-1][1]:5.1f} s", flush=True
                )
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in runs.items()}
    mem, wall = med["tuned"][0] / med["default"][0], med["tuned"][1] / med["default"][1]
    print(
        f"GLIBC_TUNABLES={MALLOC_TUNABLES}\nmedian peak PSS: default {med['default'][0]:.0f} MB, tuned {med['tuned'][0]:.0f} MB "
        f"(ratio {mem:.2f}); wall: default {med['default'][1]:.1f} s, tuned {med['tuned'][1]:.1f} s (ratio {wall:.2f})"
    )
    record("malloc", "peak PSS tuned / default (tiny wav2vec 2.0 training)", mem, "<= 0.75")
    record("malloc", "wall time tuned / default", wall, "<= 1.15")


if __name__ == "__main__":
    main()
