"""Markdown tables of VGS+SSL scenario runs (``run_scenarios.sh`` output folders): one row per scenario and
run, then one per scenario and recipe (runs named ``<recipe>_seed<N>``) with the mean and the half range
over its seeds.

    python examples/vgs/scenario_table.py runs/vgs_heads/paper_seed1 runs/vgs_heads/light_seed1 ...
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from fairseq_mtssl.evaluation.abx import best_layer
from fairseq_mtssl.jobs.training_log import read_curves

SCENARIOS = ["w2v2", "vgs", "vgsp", "w2v2_vgs", "vgs_w2v2"]
LABELS = {"w2v2": "W2V2", "vgs": "VGS", "vgsp": "VGS+", "w2v2_vgs": "W2V2 -> VGS", "vgs_w2v2": "VGS -> W2V2"}


def measures(d: Path) -> dict:
    curve = [p for p in read_curves(sorted(d.glob("stage*/hydra_train.log")), ("vgs_loss",)) if "vgs_loss" in p]
    ret = json.loads((d / "retrieval.json").read_text())
    return {
        "ret": ret,
        "vgs": (curve[0]["vgs_loss"], curve[-1]["vgs_loss"]) if len(curve) > 1 else None,
        "abx": best_layer(json.loads((d / "abx.json").read_text())["layers"]),
    }


def recalls(r: dict, way: str) -> str:
    return " / ".join(f"{r[f'{way}_r{k}']:.1f}" for k in (1, 5, 10))


def spread(values) -> str:
    return f"{statistics.mean(values):.2f} +- {(max(values) - min(values)) / 2:.2f}"


def main(runs) -> None:
    runs = [Path(r) for r in runs]
    print("| run | scenario | s->i R@1 / 5 / 10 | i->s R@1 / 5 / 10 | train VGS loss first -> last | ABX within / across, best layer (%) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    groups = defaultdict(list)
    for scenario in SCENARIOS:
        for run in runs:
            d = run / scenario
            if not (d / "abx.json").exists():
                continue
            m = measures(d)
            groups[(scenario, run.name.split("_seed")[0])].append(m)
            vgs = f"{m['vgs'][0]:.2f} -> {m['vgs'][1]:.2f}" if m["vgs"] else "-"
            a = m["abx"]
            print(
                f"| {run.name} | {LABELS[scenario]} | {recalls(m['ret'], 's2i')} | {recalls(m['ret'], 'i2s')} | {vgs} | "
                f"{a['within']:.2f} / {a['across']:.2f} (L{a['layer']}) |"
            )
    print()
    print("| scenario | recipe | seeds | mean R@10, s->i and i->s | last train VGS loss | ABX across, best layer (%) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (scenario, recipe), ms in groups.items():
        r10 = [(m["ret"]["s2i_r10"] + m["ret"]["i2s_r10"]) / 2 for m in ms]
        vgs = spread([m["vgs"][1] for m in ms]) if all(m["vgs"] for m in ms) else "-"
        across = spread([m["abx"]["across"] for m in ms])
        print(f"| {LABELS[scenario]} | {recipe} | {len(ms)} | {spread(r10)} | {vgs} | {across} |")


if __name__ == "__main__":
    main(sys.argv[1:])
