"""Markdown table of VGS+SSL scenario runs (``run_scenarios.sh`` output folders), one row per scenario and run.

python examples/vgs/scenario_table.py runs/vgs_heads/paper_seed1 runs/vgs_heads/light_seed1
"""

import json
import sys
from pathlib import Path

from fairseq_mtssl.evaluation.abx import best_layer
from fairseq_mtssl.jobs.training_log import read_curves

SCENARIOS = ["w2v2", "vgs", "vgsp", "w2v2_vgs", "vgs_w2v2"]
LABELS = {"w2v2": "W2V2", "vgs": "VGS", "vgsp": "VGS+", "w2v2_vgs": "W2V2 -> VGS", "vgs_w2v2": "VGS -> W2V2"}


def recalls(r: dict, way: str) -> str:
    return " / ".join(f"{r[f'{way}_r{k}']:.1f}" for k in (1, 5, 10))


def row(run: Path, scenario: str) -> str:
    d = run / scenario
    stages = sorted(d.glob("stage*/hydra_train.log"))
    curve = [p for p in read_curves(stages, ("vgs_loss", "loss")) if "vgs_loss" in p]
    vgs = f"{curve[0]['vgs_loss']:.2f} -> {curve[-1]['vgs_loss']:.2f}" if len(curve) > 1 else "-"
    ret = json.loads((d / "retrieval.json").read_text())
    best = best_layer(json.loads((d / "abx.json").read_text())["layers"])
    return (
        f"| {run.name} | {LABELS[scenario]} | {recalls(ret, 's2i')} | {recalls(ret, 'i2s')} | {vgs} | "
        f"{best['within']:.2f} / {best['across']:.2f} (L{best['layer']}) |"
    )


def main(runs) -> None:
    print(
        "| run | scenario | s->i R@1 / 5 / 10 | i->s R@1 / 5 / 10 | train VGS loss first -> last | ABX within / across, best layer (%) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for scenario in SCENARIOS:
        for run in map(Path, runs):
            if (run / scenario / "abx.json").exists():
                print(row(run, scenario))


if __name__ == "__main__":
    main(sys.argv[1:])
