"""Every benchmark of the plugin in one command, with one table of the ratios the issues ask for.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only vgs score_step] [--markdown benchmarks/latest.md]

Runs each ``bench_*.py`` in its own process, one after another (so they do not disturb each other),
collects the figures they :func:`ratios.record`, and prints: benchmark, figure, value, target, met.
Each ratio is measured side by side inside its benchmark (interleaved rounds), never against a
stored time. ``--quick`` uses fewer rounds and smaller inputs (a smoke run; the README's figures are
from full runs). ``--markdown`` also writes the table with the machine it was measured on.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {  # name: (script, full arguments, quick arguments)
    "abx": ("bench_abx.py", [], ["--utts", "120", "--rounds", "2", "--no-default"]),
    "front_end": ("bench_front_end.py", [], ["--rounds", "1", "--batch", "4", "--seconds", "2"]),
    "dump_memory": ("bench_dump_memory.py", [], ["--hours", "0.2"]),
    "labels": ("bench_labels.py", [], ["--clusters", "50"]),
    "malloc": ("bench_malloc.py", ["--rounds", "3"], ["--rounds", "1", "--updates", "30"]),
    "mt4ssl_step": ("bench_mt4ssl_step.py", [], ["--rounds", "3"]),
    "score_parts": ("bench_score_parts.py", [], ["--frames", "60", "--batch", "2"]),
    "soft_dtw": (
        "bench_soft_dtw.py",
        [],
        ["--batch", "2", "--min-frames", "60", "--max-frames", "100", "--load-rounds", "1"],
    ),
    "scale": ("bench_scale.py", [], ["--hours", "0.1", "0.25", "--base-probe-seconds", "0"]),
    "score_step": (
        "bench_score_step.py",
        ["--rounds", "3", "--batch", "1", "--seconds", "12"],
        ["--rounds", "2", "--preset", "small"],
    ),
    "superb_step": ("bench_superb_step.py", [], ["--rounds", "2", "--seconds", "2"]),
    "vgs": ("bench_vgs.py", [], ["--rounds", "2", "--preset", "small"]),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS))
    p.add_argument("--markdown", type=Path)
    a = p.parse_args(argv)
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        sink = Path(tmp) / "figures.jsonl"
        for name, (script, full, quick) in BENCHMARKS.items():
            if a.only and name not in a.only:
                continue
            print(f"== {name}: {script} {' '.join(quick if a.quick else full)}", flush=True)
            start = time.time()
            proc = subprocess.run(
                [sys.executable, str(HERE / script), *(quick if a.quick else full)],
                env=dict(os.environ, MTSSL_BENCH_JSON=str(sink)),
            )
            print(f"   ({time.time() - start:.0f} s)", flush=True)
            if proc.returncode != 0:
                failed.append(name)
        if sink.exists():
            rows = [json.loads(line) for line in sink.read_text().splitlines()]
    where = machine()
    lines = [
        f"measured {time.strftime('%Y-%m-%d')} on {where}{' (--quick)' if a.quick else ''}",
        "",
        "| benchmark | figure | value | target | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"| {r['benchmark']} | {r['figure']} | {r['value']:.3f} | {r['target'] or '-'} | {met} |")
    print("\n" + "\n".join(lines))
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    if a.markdown:
        a.markdown.write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
