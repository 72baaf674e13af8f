"""``mtssl-evaluate-upstream`` against its former self: one process and one feature pass against one process per metric.

    git worktree add /tmp/mtssl_old 486ecb6        # the last commit before the one-pass evaluation
    .venv/bin/python benchmarks/bench_evaluate_upstream.py runs/main/models/hubert/checkpoints/checkpoint_last.pt \\
        --data runs/main/data --items runs/main/data/test.item --old-tree /tmp/mtssl_old [--rounds 2]

Both evaluate the same checkpoint as the main job does (ABX every layer, the phone probe and QbE at
``--layer``, no PR), in interleaved rounds, each into a fresh folder, with one intra-op thread. The former one
ran ``mtssl-abx``, ``mtssl-phone-probe`` and ``mtssl-qbe`` as three processes, each loading the checkpoint and
forwarding its splits; the new one (``--qbe-method plugin``, the former QbE, so the work is the same) loads
once and forwards each split once. Loads are counted from what each recorded: the former's ``commands.sh``
lines that name the checkpoint, the new ``results.json``'s ``upstream_loads``; forwards from the new
``results.json`` (``forwards`` per split) and, for the former, the splits each of its commands reads
(ABX: test; probe: train, valid, test; QbE: valid, test). Printed: wall medians and the ratio new / former
(target <= 0.5), the same for the new default (s3prl's QbE on every layer), and the counts.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ratios import record  # noqa: E402

SPLIT_READS = {"mtssl-abx": ["test"], "mtssl-phone-probe": ["train", "valid", "test"], "mtssl-qbe": ["valid", "test"]}


def run(variant: str, args, out: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fairseq_mtssl.jobs.evaluate_upstream", str(args.checkpoint), "--data", str(args.data)]
    cmd += ["--out", str(out), "--layer", str(args.layer), "--pr-updates", "0", "--items", str(args.items)]
    if variant == "former":
        env["PYTHONPATH"] = str(args.old_tree)  # its subprocesses inherit it: the former code throughout
    elif variant == "new":
        cmd += ["--qbe-method", "plugin"]
    start = time.perf_counter()
    # cwd: not the repository (``python -m`` puts the working directory before PYTHONPATH)
    subprocess.run(cmd, check=True, env=env, cwd=out.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def counts(variant: str, out: Path, n_utts: dict) -> dict:
    if variant == "former":
        lines = [c for c in (out / "commands.sh").read_text().splitlines() if c.strip() and not c.startswith("#")]
        tools = [next((t for t in SPLIT_READS if f"{t} " in c), None) for c in lines]
        tools = [t for t in tools if t]
        forwards = {}
        for t in tools:
            for s in SPLIT_READS[t]:
                forwards[s] = forwards.get(s, 0) + n_utts[s]
        return {"loads": len(tools), "forwards": forwards}
    res = json.loads((out / "results.json").read_text())
    return {"loads": res["upstream_loads"], "forwards": res["forwards"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--items", type=Path, required=True)
    p.add_argument("--old-tree", type=Path, required=True, help="a checkout of the former implementation")
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    args.checkpoint, args.data, args.items = args.checkpoint.resolve(), args.data.resolve(), args.items.resolve()
    n_utts = {
        s: sum(1 for line in (args.data / "manifests" / f"{s}.tsv").read_text().splitlines()[1:] if line.strip())
        for s in ("train", "valid", "test")
    }
    times = {"former": [], "new": [], "new_default": []}
    seen = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for variant in times:
                out = Path(tmp) / f"{variant}_{r}"
                times[variant].append(run(variant, args, out))
                seen[variant] = counts(variant, out, n_utts)
                print(f"round {r} {variant:12s} {times[variant][-1]:7.1f} s  {seen[variant]}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio, ratio_default = med["new"] / med["former"], med["new_default"] / med["former"]
    print(f"former (3 processes)       {med['former']:7.1f} s  loads {seen['former']['loads']}")
    print(f"new, same QbE              {med['new']:7.1f} s  loads {seen['new']['loads']}")
    print(f"new, s3prl QbE every layer {med['new_default']:7.1f} s")
    print(f"new / former               {ratio:7.3f}   (target <= 0.5)")
    print(f"new default / former       {ratio_default:7.3f}")
    print(
        f"forwards per split: former {seen['former']['forwards']}, new {seen['new']['forwards']} (utterances {n_utts})"
    )
    record(
        "evaluate_upstream",
        "mtssl-evaluate-upstream one pass / former per-metric processes (same metrics)",
        ratio,
        "<= 0.5",
    )
    record("evaluate_upstream", "the same with s3prl's QbE on every layer (the new default)", ratio_default)


if __name__ == "__main__":
    main()
