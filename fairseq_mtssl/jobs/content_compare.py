"""SCORE, LASER and SPIN side by side: one start, the same budget and seeds, one table.

    mtssl-content-compare START.pt --data runs/main/data --out runs/content_compare \\
        [--seeds 1 2 3] [--updates 300] [--methods score laser spin] [--layer L] [--jobs 1] [--threads N]
    (or: python -m fairseq_mtssl.jobs.content_compare ...)

``START.pt`` is the model all three fine-tune (the main job's HuBERT: ``runs/main/models/hubert/checkpoints/
checkpoint_last.pt``); ``--data`` the main job's data folder (``manifests/``, ``corpus/alignments/``; the test
split holds held-out speakers, listed in ``test.spk``). Stages (:class:`~.stages.Pipeline`: each command recorded
in ``commands.sh``, its output in ``logs/<stage>.log``, a finished stage skipped by the next run):

1. ``perturbed``: the test split perturbed as ``mtssl-score-evidence`` perturbs it (speed 0.9/1.0/1.1, then pitch
   +-2 semitones; alignment rescaled; :meth:`~.score_evidence.Evidence.perturbed_data`), and the ABX item
   files of the clean and the perturbed test split.
2. ``train_<method>_seed<s>``: a plain ``fairseq-hydra-train`` of the method's tiny config (``score_tiny_cpu``,
   or the SCORE config for the start's model as ``mtssl-score-evidence`` picks it; ``laser_tiny_cpu``;
   ``spin_tiny_cpu``, speaker perturbation with Praat's default 75-600 Hz pitch range as no speaker table is
   given) with ``optimization.max_update=--updates``, ``common.seed=s`` and ``common.log_interval=1``.
   ``--config METHOD=NAME`` and ``--override METHOD KEY=VALUE`` change a method's config (the LASER and SPIN
   tiny configs are written for a HuBERT start).
3. ``eval_<model>`` for the start and every run: one ``mtssl-evaluate-upstream --perturbed`` (the checkpoint
   loaded once, each split forwarded once), the measures of ``mtssl-score-evidence``: the phone probe at layer
   ``L`` (default: the last, the one all three methods train), fitted on clean train, scored on the clean and
   on the perturbed test split; ABX at every layer on both, reported as the across-speaker error at the layer
   best on clean audio (lowest clean across error; the perturbed value at the same layer); each
   perturbed-minus-clean gap; and a speaker probe (:mod:`fairseq_mtssl.evaluation.speaker_probe`: mean-pooled
   layer-``L`` features of the clean test split, a linear classifier trained on some utterances of each
   speaker and scored on the others).
4. ``report``: per trained run, the seconds per update (the median over updates 2.. of 1 / fairseq's ``ups``
   in ``hydra_train.log``, data loading and perturbation included) and the training command's peak memory
   (PSS of its process tree, sampled by the pipeline every 0.5 s; fairseq's and torch's start-up included);
   ``results.json`` (every value), ``summary.json`` and ``summary.md``: method x metric, mean +- standard
   deviation (n - 1) over seeds.

Every command runs with ``--threads`` intra-op threads, numba's included (``NUMBA_NUM_THREADS``, unless the
environment sets it): numba's OpenMP pool, which SCORE's and LASER's soft-DTW start, would otherwise raise
torch's thread count to every core at its first call, and the methods would not train on equal threads.
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..atomic import atomic_write
from ..config import config_dir
from ..errors import MtsslError, cli
from .score_evidence import CONFIG_FOR, Evidence, _num_layers
from .stages import Pipeline
from .training_log import read_curve, trained_updates

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # common.user_dir
METHODS = ("score", "laser", "spin")
DEFAULT_CONFIGS = {"laser": "laser_tiny_cpu", "spin": "spin_tiny_cpu"}  # SCORE's: by the start's model
LABELS = {"start": "start", "score": "SCORE", "laser": "LASER", "spin": "SPIN"}
# (key, column title, digits): the table's columns, in order
COLUMNS = [
    ("probe_clean", "phone probe clean", 4),
    ("probe_perturbed", "phone probe perturbed", 4),
    ("probe_gap", "probe gap", 4),
    ("abx_across_clean", "ABX across clean %", 2),
    ("abx_across_perturbed", "ABX across perturbed %", 2),
    ("abx_across_gap", "ABX gap", 2),
    ("abx_layer", "ABX layer", 1),
    ("speaker_acc", "speaker probe", 4),
    ("speaker_frame_acc", "speaker probe, frames", 4),
    ("sec_per_update", "s / update", 3),
    ("peak_pss_mb", "peak PSS MB", 0),
]


class CompareError(MtsslError, ValueError):
    """A method, config or override the comparison cannot use."""


def seconds_per_update(log: Path) -> Optional[float]:
    """The median over updates 2.. of ``1 / ups`` in a ``log_interval=1`` fairseq training log (fairseq starts
    the ``ups`` meter at the end of the first update, so the first interval is not a step)."""
    rows = [r for r in read_curve(log, "train_inner", ("ups",)) if r["num_updates"] >= 2 and r.get("ups", 0) > 0]
    return statistics.median(1.0 / r["ups"] for r in rows) if rows else None


def best_across(rows: Sequence[Dict]) -> Dict:
    """The ABX row (one per layer) with the lowest across-speaker error; ties to the lower layer."""
    return min(rows, key=lambda r: (r["across"], r["layer"]))


def _mean_std(values: Sequence[Optional[float]]) -> Dict:
    vals = [float(v) for v in values if v is not None]
    return {
        "mean": statistics.mean(vals) if vals else None,
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "values": list(values),
    }


def summarise(results: Dict) -> Dict:
    """Per model (the start, then each method) and metric: mean, standard deviation (n - 1) and the values."""
    groups: Dict[str, List[Dict]] = {"start": [results["models"]["start"]]}
    for name, r in results["models"].items():
        if name != "start":
            groups.setdefault(r["method"], []).append(r)
    keys = [k for k, _, _ in COLUMNS] + ["speaker_chance", "speaker_frame_chance"]
    table = {m: {k: _mean_std([r.get(k) for r in rows]) for k in keys} for m, rows in groups.items()}
    return {
        "start": results["start"],
        "layer": results["layer"],
        "updates": results["updates"],
        "seeds": results["seeds"],
        "configs": results["configs"],
        "models": list(groups),
        "metrics": table,
    }


def summary_markdown(summary: Dict) -> str:
    def cell(m: Dict, digits: int) -> str:
        if m["mean"] is None:
            return "-"
        text = f"{m['mean']:.{digits}f}"
        return text if m["std"] is None else f"{text} +- {m['std']:.{digits}f}"

    chance = summary["metrics"]["start"]["speaker_chance"]["mean"]
    frame_chance = summary["metrics"]["start"].get("speaker_frame_chance", {}).get("mean")
    lines = [
        f"From `{summary['start']}`: {summary['updates']} updates per run, seeds {summary['seeds']} "
        f"(mean +- std over seeds); phone and speaker probes at layer {summary['layer']}; ABX across speakers at "
        f"the layer best on clean audio; gap = perturbed - clean; speaker probe chance "
        f"{'-' if chance is None else f'{chance:.4f}'} (utterances), "
        f"{'-' if frame_chance is None else f'{frame_chance:.4f}'} (frames). Configs: "
        + ", ".join(f"{LABELS[m]} `{c}`" for m, c in summary["configs"].items())
        + ".",
        "",
        "| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for model in summary["models"]:
        row = summary["metrics"][model]
        lines.append(f"| {LABELS[model]} | " + " | ".join(cell(row[k], d) for k, _, d in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def metrics_of(results: Dict) -> Dict:
    """The comparison's measures from ``mtssl-evaluate-upstream``'s ``results.json`` (with ``--perturbed`` and
    ``--speaker-probe``): probe accuracy clean and perturbed, ABX across at the layer best on clean audio (the
    perturbed value at the same layer), each gap (perturbed - clean), the speaker probe."""
    probe, spk = results["phone_probe"], results["speaker_probe"]
    clean, pert = results["abx"], {r["layer"]: r for r in results["abx_perturbed"]}
    best = best_across(clean)
    res = {
        "probe_clean": probe["test_acc"],
        "probe_perturbed": probe["test_perturbed_acc"],
        "abx_layer": best["layer"],
        "abx_across_clean": best["across"],
        "abx_across_perturbed": pert[best["layer"]]["across"],
        "abx_per_layer": {
            "clean": {r["layer"]: r["across"] for r in clean},
            "perturbed": {k: r["across"] for k, r in pert.items()},
        },
        "speaker_acc": spk["test_acc"],
        "speaker_chance": spk["chance"],
        "speaker_frame_acc": spk["frame_test_acc"],
        "speaker_frame_chance": spk["frame_chance"],
    }
    res["probe_gap"] = res["probe_perturbed"] - res["probe_clean"]
    res["abx_across_gap"] = res["abx_across_perturbed"] - res["abx_across_clean"]
    return res


class ContentCompare:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.start = Path(args.start).resolve()
        self.data = Path(args.data).resolve()
        self.m = self.data / "manifests"
        self.pert = self.out / "perturbed"
        cores = len(os.sched_getaffinity(0))
        self.pipeline = Pipeline(
            self.out,
            jobs=args.jobs,
            threads=args.threads or max(1, cores // max(1, args.jobs)),
            bin_dir=Path(sys.executable).parent,
        )
        if "NUMBA_NUM_THREADS" not in os.environ:
            # numba's OpenMP pool (soft-DTW, SCORE and LASER) would raise torch's thread count to every core at
            # its first call; with this, every method trains on the same number of threads
            self.pipeline.env["NUMBA_NUM_THREADS"] = self.pipeline.env["OMP_NUM_THREADS"]
        self.configs = self._configs()
        self.overrides = self._overrides()
        self.layer = args.layer

    # -- setup ----------------------------------------------------------------------------------
    def _configs(self) -> Dict[str, str]:
        from ..checkpoint_safety import load_checkpoint_safely, model_name

        if not self.start.is_file():
            raise FileNotFoundError(f"{self.start}: starting checkpoint not found")
        kind = model_name(load_checkpoint_safely(self.start))
        kind = "hubert" if kind.startswith("hubert") else kind
        configs = {m: DEFAULT_CONFIGS.get(m) for m in self.args.methods}
        if "score" in configs:
            configs["score"] = CONFIG_FOR.get(kind)
        for entry in self.args.config or []:
            method, _, name = entry.partition("=")
            if method not in configs or not name:
                raise CompareError(f"--config {entry!r}: expected METHOD=NAME with METHOD one of {list(configs)}")
            configs[method] = name
        for method, name in configs.items():
            if name is None:
                raise CompareError(
                    f"{self.start}: model {kind!r} has no default {method} config; give --config {method}=NAME"
                )
            if not (config_dir(method) / f"{name}.yaml").is_file():
                raise CompareError(f"--config {method}={name}: no {name}.yaml in {config_dir(method)}")
        if "spin" in configs:
            from ..data import speaker_perturb

            speaker_perturb.require_parselmouth()  # SPIN's perturbation: one clear line before any training
        return configs

    def _overrides(self) -> Dict[str, List[str]]:
        out: Dict[str, List[str]] = {m: [] for m in self.args.methods}
        for method, override in self.args.override or []:
            if method not in out or "=" not in override:
                raise CompareError(f"--override {method} {override}: expected METHOD KEY=VALUE, METHOD in {list(out)}")
            out[method].append(override)
        return out

    def runs(self) -> List[tuple]:
        """``(run name, method, seed)`` of every training."""
        return [(f"{m}_seed{s}", m, s) for m in self.args.methods for s in self.args.seeds]

    # -- stages ---------------------------------------------------------------------------------
    def perturbed(self) -> Dict:
        """The perturbed test split (score_evidence's layout and draws) and both ABX item files."""
        evidence = Evidence(argparse.Namespace(out=self.out, data=self.data, perturb_seed=self.args.perturb_seed))
        pert = evidence.perturbed_data()
        for audio, manifests, ctm in (
            ("clean", self.m, self.data / "corpus" / "alignments" / "test.phones.ctm"),
            ("perturbed", pert, pert / "test.phones.ctm"),
        ):
            items = self.out / f"test_{audio}.item"
            if not items.exists():
                cmd = ["mtssl-abx-items", "--alignments", ctm, "--manifest", manifests / "test.tsv", "--out", items]
                self.pipeline.run("perturbed", cmd)
        return {"perturbed": str(pert)}

    def train(self, run: str, method: str, seed: int):
        stage = f"train_{run}"

        def fn() -> Dict:
            run_dir = self.out / "runs" / run
            self.pipeline.run(
                stage,
                [
                    "fairseq-hydra-train",
                    "--config-dir",
                    config_dir(method),
                    "--config-name",
                    self.configs[method],
                    f"common.user_dir={PACKAGE_DIR}",
                    f"common.seed={seed}",
                    "common.log_interval=1",
                    f"task.data={self.m}",
                    f"model.upstream_path={self.start}",
                    f"optimization.max_update={self.args.updates}",
                    f"hydra.run.dir={run_dir}",
                    *self.overrides[method],
                ],
            )
            log = run_dir / "hydra_train.log"
            peak = self.pipeline.stage_peak_mb.get(stage)
            return {
                "checkpoint": str(run_dir / "checkpoints" / "checkpoint_last.pt"),
                "log": str(log),
                "updates": trained_updates([log]),
                "sec_per_update": seconds_per_update(log),
                "peak_pss_mb": None if peak is None else round(peak, 1),
            }

        return fn

    def evaluate(self, model: str, checkpoint_of):
        """``eval_<model>``: one ``mtssl-evaluate-upstream`` of the checkpoint ``checkpoint_of()`` gives (after its
        training): one load, one pass over each split, clean and perturbed test."""

        def fn() -> Dict:
            ckpt, layer = checkpoint_of(), self.layer
            d = self.out / "eval" / model
            self.pipeline.run(
                f"eval_{model}",
                ["mtssl-evaluate-upstream", ckpt, "--data", self.data, "--out", d, "--layer", layer,
                 "--items", self.out / "test_clean.item", "--perturbed", self.pert,
                 "--perturbed-items", self.out / "test_perturbed.item", "--abx-context", self.args.abx_context,
                 "--pr-updates", 0, "--no-qbe", "--speaker-probe"],
            )  # fmt: skip
            res = metrics_of(json.loads((d / "results.json").read_text()))
            with atomic_write(d / "metrics.json") as f:
                json.dump(res, f, indent=1)
            return {"metrics": str(d / "metrics.json")}

        return fn

    def report(self) -> Dict:
        results = {
            "start": str(self.start),
            "layer": self.layer,
            "updates": self.args.updates,
            "seeds": list(self.args.seeds),
            "configs": self.configs,
            "overrides": self.overrides,
            "models": {},
        }
        done = self.pipeline.results
        results["models"]["start"] = {"method": "start", **self._metrics("start")}
        for run, method, seed in self.runs():
            train = done[f"train_{run}"]
            results["models"][run] = {
                "method": method,
                "seed": seed,
                **self._metrics(run),
                **{k: train.get(k) for k in ("sec_per_update", "peak_pss_mb", "updates", "checkpoint")},
                "train_seconds": train.get("seconds"),
            }
        with atomic_write(self.out / "results.json") as f:
            json.dump(results, f, indent=1)
        summary = summarise(results)
        with atomic_write(self.out / "summary.json") as f:
            json.dump(summary, f, indent=1)
        with atomic_write(self.out / "summary.md") as f:
            f.write(summary_markdown(summary))
        return {"summary": str(self.out / "summary.md")}

    def _metrics(self, model: str) -> Dict:
        return json.loads((self.out / "eval" / model / "metrics.json").read_text())

    # -- the whole comparison -------------------------------------------------------------------
    def declare(self) -> None:
        p = self.pipeline
        if self.layer is None:
            self.layer = _num_layers(str(self.start))
        p.add("perturbed", self.perturbed)
        p.add("eval_start", self.evaluate("start", lambda: self.start), after=["perturbed"])
        for run, method, seed in self.runs():
            p.add(f"train_{run}", self.train(run, method, seed))
            p.add(
                f"eval_{run}",
                self.evaluate(run, lambda r=run: p.results[f"train_{r}"]["checkpoint"]),
                after=["perturbed", f"train_{run}"],
            )
        p.add("report", self.report, after=["eval_start"] + [f"eval_{r}" for r, _, _ in self.runs()])

    def main(self) -> Dict:
        self.declare()
        print(f"content comparison in {self.out}: {len(self.pipeline.specs)} stages", flush=True)
        self.pipeline.execute()
        return json.loads((self.out / "summary.json").read_text())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("start", help="the checkpoint all three methods fine-tune (e.g. the main job's HuBERT)")
    p.add_argument("--data", required=True, help="the main job's data folder (manifests/, corpus/alignments/)")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--updates", type=int, default=300, help="updates of every run (the equal budget)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--layer", type=int, help="layer of the phone and speaker probes (default: the last)")
    p.add_argument("--config", action="append", metavar="METHOD=NAME", help="a method's config name (repeatable)")
    p.add_argument(
        "--override", nargs=2, action="append", metavar=("METHOD", "KEY=VALUE"), help="a config override (repeatable)"
    )
    p.add_argument("--perturb-seed", type=int, default=0, help="seed of the test set's perturbation draws")
    p.add_argument("--abx-context", choices=["triphone", "none"], default="triphone")
    p.add_argument("--jobs", type=int, default=1, help="stages run side by side")
    p.add_argument("--threads", type=int, help="intra-op threads per stage (default: cores / jobs)")
    return p.parse_args(argv)


@cli
def main(argv: Optional[List[str]] = None) -> None:
    summary = ContentCompare(parse_args(argv)).main()
    print(summary_markdown(summary))


if __name__ == "__main__":
    main()
