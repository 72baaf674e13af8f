"""The main job's report: one markdown file with every model x metric, PNG plots and the commands.

Reads the stage results of :mod:`fairseq_mtssl.jobs.main_job` (training logs, each model's
``eval/<model>/results.json``) and writes, under the run folder:

  report.md            the tables (summary, ABX per layer, retrieval), the plots, where every command is
  plots/loss.png       training loss against updates, one panel per model
  plots/abx.png        ABX error (within / across speaker) against layer, every model
  plots/retrieval.png  recall@1/5/10 both ways, VGS models
"""

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..atomic import atomic_write
from ..evaluation.abx import best_layer
from ..upstream.readers import MFCC
from .training_log import read_stages

LABELS = {
    MFCC: "MFCC (no training)",
    "hubert_untrained": "HuBERT untrained",
    "hubert": "HuBERT iteration 1",
    "mt4ssl_untrained": "MT4SSL untrained",
    "mt4ssl_both": "MT4SSL (both targets)",
    "mt4ssl_offline_only": "MT4SSL offline only",
    "mt4ssl_online_only": "MT4SSL online only",
    "vgs_untrained": "wav2vec 2.0 + VGS untrained",
    "vgs_plus": "VGS+ (simultaneous)",
    "w2v2_then_vgs": "W2V2 -> VGS (sequential)",
    "score": "HuBERT + SCORE",
}
KS = (1, 5, 10)


def _fmt(v: Optional[float], digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def collect(results: Dict[str, dict], models: Sequence[str]) -> Dict[str, dict]:
    """Per model: its training curve and evaluation results (what exists of them)."""
    rows = {}
    for m in models:
        row: Dict[str, object] = {"label": LABELS.get(m, m)}
        train = results.get(f"train_{m}")
        if train:
            logs = [Path(p) for p in train["logs"] if Path(p).exists()]
            row["curve"], row["updates"] = read_stages(logs)
            row["train_seconds"] = train.get("seconds")
        ev = results.get(f"eval_{m}")
        if ev and Path(ev["results"]).exists():
            row["eval"] = json.loads(Path(ev["results"]).read_text())
        rows[m] = row
    return rows


def summary_table(rows: Dict[str, dict]) -> List[str]:
    """One row per model; the PR and retrieval columns only when some model has them."""
    evals = [r.get("eval") or {} for r in rows.values()]
    has_pr, has_ret = any("superb_pr" in e for e in evals), any("retrieval" in e for e in evals)
    head = (
        "| model | updates | train loss first -> last | ABX within / across, best layer (%) | phone probe test (%) "
        + ("| PR PER (%) " if has_pr else "")
        + "| QbE MAP (layer) "
        + ("| s->i R@1/5/10 | i->s R@1/5/10 " if has_ret else "")
        + "|"
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for m, r in rows.items():
        curve, ev = r.get("curve") or [], r.get("eval") or {}
        updates = "0 (initial)" if m.endswith("_untrained") else str(r["updates"]) if r.get("updates") else "-"
        loss = f"{curve[0]['loss']:.3f} -> {curve[-1]['loss']:.3f}" if curve and len(curve) > 1 else "-"
        abx = "-"
        if ev.get("abx"):
            best = best_layer(ev["abx"])
            abx = f"{best['within']:.2f} / {best['across']:.2f} (L{best['layer']})"
        probe = ev.get("phone_probe", {}).get("test_acc")
        cells = [r["label"], updates, loss, abx, _fmt(None if probe is None else 100 * probe, 1)]
        if has_pr:
            cells.append(_fmt(ev.get("superb_pr", {}).get("per")))
        # MTWV (in report.json) is at its floor, 0.000-0.011, for every model here: the table shows MAP
        cells.append(f"{ev['qbe']['map']:.3f} ({ev['qbe'].get('layer', '-')})" if ev.get("qbe") else "-")
        if has_ret:
            ret = ev.get("retrieval") or {}
            for d in ("s2i", "i2s"):
                cells.append(" / ".join(_fmt(ret.get(f"{d}_r{k}"), 1) for k in KS) if ret else "-")
        lines.append("| " + " | ".join(cells) + " |")
    chance = next((e["retrieval"]["chance"] for e in evals if "chance" in (e.get("retrieval") or {})), None)
    if chance:  # a scorer that ranks at random, on the same test split
        cells = ["chance (random ranking)", "-", "-", "-", "-"] + ["-"] * has_pr + ["-"]
        cells += [" / ".join(_fmt(chance[f"{d}_r{k}"], 1) for k in KS) for d in ("s2i", "i2s")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def abx_table(rows: Dict[str, dict]) -> List[str]:
    n = max((len(r.get("eval", {}).get("abx", [])) for r in rows.values()), default=0)
    lines = ["| model | " + " | ".join(f"layer {i}" for i in range(n)) + " |", "| --- |" + " --- |" * n]
    for r in rows.values():
        abx = {x["layer"]: x for x in r.get("eval", {}).get("abx", [])}
        if abx:
            cells = [f"{abx[i]['within']:.2f} / {abx[i]['across']:.2f}" if i in abx else "-" for i in range(n)]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return lines


def plot_all(rows: Dict[str, dict], plots: Path) -> List[str]:
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import sets the root logger to DEBUG
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    written = []
    trained = [(m, r) for m, r in rows.items() if r.get("curve")]
    if trained:
        cols = min(4, len(trained))
        nrows = (len(trained) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
        for ax, (m, r) in zip(axes.flat, trained):
            for stage in sorted({c["stage"] for c in r["curve"]}):
                pts = [c for c in r["curve"] if c["stage"] == stage]
                ax.plot(
                    [c["num_updates"] for c in pts],
                    [c["loss"] for c in pts],
                    "-o",
                    markersize=2,
                    label=f"stage {stage + 1}",
                )
            ax.set_title(r["label"], fontsize=9)
            ax.set_xlabel("updates")
            ax.set_ylabel("train loss")
            if len({c["stage"] for c in r["curve"]}) > 1:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(trained) :]:
            ax.axis("off")
        fig.tight_layout()
        written.append(_save(fig, plots / "loss.png"))
    evaluated = [(m, r) for m, r in rows.items() if r.get("eval", {}).get("abx")]
    if evaluated:
        fig, (a_w, a_x) = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
        for m, r in evaluated:
            abx = sorted(r["eval"]["abx"], key=lambda x: x["layer"])
            if len(abx) == 1:  # a feature with no layers (MFCC): a reference line
                a_w.axhline(abx[0]["within"], color="k", linestyle="--", label=r["label"])
                a_x.axhline(abx[0]["across"], color="k", linestyle="--", label=r["label"])
                continue
            a_w.plot([x["layer"] for x in abx], [x["within"] for x in abx], "-o", label=r["label"], markersize=3)
            a_x.plot([x["layer"] for x in abx], [x["across"] for x in abx], "-o", label=r["label"], markersize=3)
        for ax, title in ((a_w, "ABX within speaker"), (a_x, "ABX across speaker")):
            ax.set_title(title)
            ax.set_xlabel("layer (0 = input of the transformer)")
            ax.xaxis.get_major_locator().set_params(integer=True)
        a_w.set_ylabel("error (%)")
        a_x.legend(fontsize=7, loc="best")
        fig.tight_layout()
        written.append(_save(fig, plots / "abx.png"))
    vgs = [(m, r) for m, r in rows.items() if r.get("eval", {}).get("retrieval")]
    if vgs:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / len(vgs)
        names = [f"{d} R@{k}" for d in ("s->i", "i->s") for k in KS]
        for j, (m, r) in enumerate(vgs):
            ret = r["eval"]["retrieval"]
            vals = [ret[f"{d}_r{k}"] for d in ("s2i", "i2s") for k in KS]
            ax.bar([i + j * width for i in range(len(names))], vals, width, label=r["label"])
        chance = vgs[0][1]["eval"]["retrieval"].get("chance")
        if chance:
            levels = [chance[f"{d}_r{k}"] for d in ("s2i", "i2s") for k in KS]
            for i, level in enumerate(levels):
                ax.hlines(level, i - 0.1, i + 0.9, colors="grey", linestyles=":")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, fontsize=8)
        ax.set_ylabel("recall (%)")
        ax.set_title("retrieval on the test split (dotted: chance)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, plots / "retrieval.png"))
    return written


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path.name


def write_report(out: Path, results: Dict[str, dict], models: Sequence[str]) -> Path:
    out = Path(out)
    rows = collect(results, models)
    plots = plot_all(rows, out / "plots")
    stage_times = [f"| {name} | {info.get('seconds', 0):.0f} |" for name, info in results.items() if name != "report"]
    lines = [
        "# fairseq-mtssl main job report",
        "",
        f"Run folder: `{out}`. Every command each stage ran is in [`commands.sh`](commands.sh) (grouped by "
        "`# stage <name>`), its output in `logs/<stage>.log`; replace the manifests, labels and configs to run "
        "any stage at scale on your own data.",
        "",
        "Read each trained row against its architecture's untrained row (same config and seed, initial weights) "
        "and against MFCC. ABX: error rate (%) on triphone items of the held-out test speakers, lower is better. "
        "Phone probe: a linear classifier of the frame's phone, fitted on the frozen layer's frames of the "
        "training speakers, accuracy on the held-out test speakers. PR (``--pr-updates``): SUPERB-style phone "
        "recognition (frozen upstream, weighted layer sum, linear CTC head), PER on the test split. QbE: "
        "spoken-word queries against test utterances, s3prl's quesst14_dtw on every layer, the layer chosen on "
        "half of the words and MAP on the other half. Retrieval (``--retrieval``): test "
        "split, recall (%).",
        "",
        "## Summary",
        "",
        *summary_table(rows),
        "",
        "## ABX per layer (within / across speaker, %)",
        "",
        *abx_table(rows),
        "",
        "## Plots",
        "",
        *[f"![{p}](plots/{p})" for p in plots],
        "",
        "## Stage times (seconds, as run; a stage skipped on a rerun keeps its first time)",
        "",
        "| stage | seconds |",
        "| --- | --- |",
        *stage_times,
        "",
    ]
    path = out / "report.md"
    with atomic_write(path) as f:
        f.write("\n".join(lines))
    with atomic_write(out / "report.json") as f:
        json.dump(
            {
                m: {k: v for k, v in r.items() if k != "curve"}
                | {"final_loss": (r.get("curve") or [{}])[-1].get("loss")}
                for m, r in rows.items()
            },
            f,
            indent=1,
        )
    return path
