"""``mtssl-superb`` from the audio (the frozen upstream forwarded at every step, as s3prl trains) against the
same sweep from a feature cache (``--feature-cache``: every hidden state of train, dev and test once).

    .venv/bin/python benchmarks/bench_superb_features.py runs/main/models/hubert/checkpoints/checkpoint_last.pt \\
        --data runs/main/data [--lrs 1e-3 1e-2] [--updates 300] [--rounds 2]

Each round runs both variants, one after the other (the order alternates), each into a fresh folder, with
``--jobs 1`` (one training at a time, 2 threads on 2 cores: nothing else shares the machine). The cache
variant's time includes its extraction. Printed: wall medians, the ratio cache / audio, and each variant's
chosen lr with dev and test PER (the two differ only where fairseq's frame mask of a padded training batch
counts a frame that is partly padding as speech: the cache holds the exact one-utterance states).
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

BIN = Path(sys.executable).parent


def sweep(variant: str, args, out: Path) -> dict:
    cmd = [str(BIN / "mtssl-superb"), str(args.checkpoint), "--task", "pr", "--data", str(args.data)]
    cmd += ["--out", str(out / "sweep"), "--lrs", *map(str, args.lrs), "--updates", str(args.updates), "--jobs", "1"]
    if variant == "cache":
        cmd += ["--feature-cache", str(out / "features")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{variant}: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    result = json.loads((out / "sweep" / "superb_pr.json").read_text())
    return {"seconds": seconds, "lr": result["chosen_lr"], "dev": result["dev_per"], "test": result["test_per"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="a main-job data folder (its manifests/) or a manifest folder")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2])
    p.add_argument("--updates", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    runs = {"audio": [], "cache": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for variant in ("audio", "cache") if r % 2 == 0 else ("cache", "audio"):
                out = Path(tmp) / f"{variant}_{r}"
                runs[variant].append(sweep(variant, args, out))
                print(f"round {r} {variant}: {json.dumps(runs[variant][-1])}", flush=True)
    med = {v: statistics.median(x["seconds"] for x in runs[v]) for v in runs}
    ratio = med["cache"] / med["audio"]
    print(f"\nsweep of {len(args.lrs)} lrs x {args.updates} updates, PR, {args.rounds} rounds (medians)")
    print(f"  from the audio:         {med['audio']:.1f} s")
    print(f"  from a feature cache:   {med['cache']:.1f} s (extraction included)")
    print(f"  ratio cache / audio:    {ratio:.3f}")
    for v in runs:
        last = runs[v][-1]
        print(f"  {v}: chosen lr {last['lr']:g}, dev PER {last['dev']:.2f} %, test PER {last['test']:.2f} %")
    record("superb_features", "mtssl-superb from a feature cache / from the audio (extraction included)", ratio)


if __name__ == "__main__":
    main()
