"""``mtssl-superb``: SUPERB's learning-rate sweep for one upstream and one task, selected on dev.

    mtssl-superb UPSTREAM.pt --task pr --data runs/main/data --out runs/superb/pr_hubert
    mtssl-superb UPSTREAM.pt --task pr --config pr_base --data /ls/manifests --out runs/superb/pr   # prints the plan
    mtssl-superb UPSTREAM.pt --task asr --data runs/main/data --out runs/superb/asr_hubert --dry-run

SUPERB tunes the downstream learning rate per upstream and task and reports the run that is best on dev
(s3prl docs/superb.md; an untuned lr can cost a point of PER or more). This command:

1. trains the task's downstream head on the frozen upstream once per lr of a log-spaced grid (default PR
   1e-1 .. 1e-4, ASR 1e-2 .. 1e-6, one point a decade, endpoints included), each run a plain
   ``fairseq-hydra-train`` of the packaged config (``fairseq_mtssl/config/superb``) with
   ``optimization.lr=[LR]``, ``task.normalize`` set from the upstream, and fairseq's own best-checkpoint
   tracking on dev (``checkpoint.best_checkpoint_metric=uer`` for PR, ``wer`` for ASR, minimised), so
   each run's ``checkpoint_best.pt`` is its dev-selected checkpoint;
2. picks the lr whose best dev metric is lowest (a tie goes to the lr nearest, on the log scale, to the
   config's own lr, SUPERB's published one in the paper configs; then to the smaller lr);
3. evaluates only that run's ``checkpoint_best.pt`` on test (``mtssl-superb-eval``);
4. writes ``{out}/superb_{task}.json`` (every run's dev metric, curve and layer weights; the chosen lr;
   dev and test metric; the chosen run's softmaxed layer weights) and ``{out}/superb_{task}.md`` (one
   table row), both atomically, and prints the chosen lr with its dev and test metric.

Runs go side by side where the machine allows: a CPU config runs ``--jobs`` trainings (default: one per
core, at most one per lr) with ``cores / jobs`` threads each; a GPU config runs one lr per GPU of
``--gpus``. Every command is recorded in ``{out}/commands.sh``, its output in ``{out}/logs``. A finished
run (``{out}/done/train_lr_<LR>.json``) is not trained again, an interrupted one resumes from its own
``checkpoint_last.pt``, and a larger grid later trains only the new lrs.

``--dry-run`` prints the plan (the commands, the splits and what selects) and runs nothing; a paper-scale
config (``pr_base``, ``asr_base``: LibriSpeech train-clean-100 / dev-clean / test-clean) prints it
unless ``--run`` is given.
"""

import argparse
import json
import math
import os
import queue
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..atomic import atomic_write
from ..config import config_dir
from ..errors import MtsslError, cli
from ..upstream.readers import MFCC
from .commands import CommandFailed
from .stages import Pipeline
from .training_log import latest_update, read_curve

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # common.user_dir


class SweepError(MtsslError, ValueError):
    """The sweep cannot run as asked (unknown task, missing checkpoint or split, changed settings)."""


@dataclass(frozen=True)
class SuperbTask:
    name: str
    labels: str  # the transcripts it trains on: {split}.phn or {split}.ltr
    fairseq_metric: str  # what fairseq's CTC criterion logs on dev and tracks as best_<metric>
    metric: str  # what mtssl-superb-eval reports on test
    lr_max: float
    lr_min: float
    tiny_config: str
    paper_config: str


TASKS: Dict[str, SuperbTask] = {
    "pr": SuperbTask("pr", "phn", "uer", "per", 1e-1, 1e-4, "pr_tiny_cpu", "pr_base"),
    "asr": SuperbTask("asr", "ltr", "wer", "wer", 1e-2, 1e-6, "asr_tiny_cpu", "asr_base"),
}
# the LibriSpeech split behind each manifest name manifests/librispeech.sh writes
LIBRISPEECH = {
    "train": "train-clean-100",
    "dev_clean": "dev-clean",
    "dev_other": "dev-other",
    "test_clean": "test-clean",
    "test_other": "test-other",
}
TEST_OF_DEV = {"valid": "test", "dev_clean": "test_clean", "dev_other": "test_other"}


def get_task(name: str) -> SuperbTask:
    if name not in TASKS:
        raise SweepError(f"unknown task {name!r}: one of {sorted(TASKS)}")
    return TASKS[name]


# -- the grid ---------------------------------------------------------------------------------------
def lr_grid(lr_min: float, lr_max: float, points: Optional[int] = None) -> List[float]:
    """``points`` learning rates evenly spaced on a log scale from ``lr_min`` to ``lr_max``, both
    included, ascending, rounded to 3 significant digits; default one point a decade."""
    if not (0 < lr_min <= lr_max) or not all(map(math.isfinite, (lr_min, lr_max))):
        raise SweepError(f"lr grid {lr_min:g} .. {lr_max:g}: need 0 < min <= max")
    decades = math.log10(lr_max / lr_min)
    if points is None:
        points = int(round(decades)) + 1
    if points < 1 or (points == 1 and lr_min != lr_max):
        raise SweepError(f"lr grid {lr_min:g} .. {lr_max:g}: {points} points (at least 2 for a range)")
    if points == 1:
        return [_round(lr_min)]
    grid = [_round(10 ** (math.log10(lr_min) + decades * i / (points - 1))) for i in range(points)]
    grid[0], grid[-1] = _round(lr_min), _round(lr_max)
    return sorted(set(grid))


def _round(lr: float) -> float:
    return float(f"{lr:.3g}")


def lr_name(lr: float) -> str:
    """A short, unambiguous, sortable-looking name: 1e-02, 3.16e-03."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{exponent}"


# -- selection --------------------------------------------------------------------------------------
def select_lr(dev: Dict[float, float], default_lr: Optional[float] = None) -> float:
    """The lr with the lowest dev metric. A tie goes to the lr nearest (log scale) to ``default_lr``, then
    to the smaller lr. Runs without a dev value (diverged before their first validation: None, nan) lose."""
    scored = {lr: v for lr, v in dev.items() if v is not None and math.isfinite(v)}
    if not scored:
        raise SweepError(
            f"no run of the sweep has a dev metric: each diverged before validating (lrs {[lr_name(lr) for lr in sorted(dev)]})"
        )
    best = min(scored.values())
    tied = [lr for lr, v in scored.items() if v == best]

    def key(lr: float) -> Tuple[float, float]:
        distance = abs(math.log10(lr / default_lr)) if default_lr else 0.0
        return (round(distance, 9), lr)

    return min(tied, key=key)


# -- reading one run --------------------------------------------------------------------------------
def dev_curve(log: Path, subset: str, metric: str) -> List[Tuple[int, float]]:
    """``(update, metric)`` of every validation in a fairseq log, simple or json format."""
    log = Path(log)
    if not log.exists():
        return []
    rows = [(r["num_updates"], r[metric]) for r in read_curve(log, subset, (metric,)) if metric in r]
    if rows:
        return rows
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():  # log_format json
        if f'"{subset}_{metric}"' not in line or "{" not in line:
            continue
        try:
            stats = json.loads(line[line.index("{") :])
            rows.append((int(float(stats[f"{subset}_num_updates"])), float(stats[f"{subset}_{metric}"])))
        except (ValueError, KeyError):
            continue
    return rows


def read_best(run_dir: Path) -> dict:
    """What fairseq's best-checkpoint tracking kept: ``checkpoint_best.pt``'s dev metric, its update and
    the softmax of its layer weights (``featurizer.weights``)."""
    import torch

    from ..checkpoint_safety import load_checkpoint_safely

    path = Path(run_dir) / "checkpoints" / "checkpoint_best.pt"
    if not path.is_file():
        return {"dev": None, "best_update": None, "layer_weights": None, "checkpoint_best": None}
    state = load_checkpoint_safely(path)
    extra = state.get("extra_state") or {}
    dev = extra.get("val_loss", extra.get("best"))
    history = state.get("optimizer_history") or [{}]
    weights = state["model"].get("featurizer.weights")
    return {
        "dev": None if dev is None else round(float(dev), 4),
        "best_update": history[-1].get("num_updates"),
        "layer_weights": None if weights is None else [round(w, 4) for w in torch.softmax(weights.float(), 0).tolist()],
        "checkpoint_best": str(path),
    }


def diverged(log: Path) -> bool:
    """Whether the last command of a log stopped on fairseq's FloatingPointError (nan/inf gradients)."""
    lines = Path(log).read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.startswith("$ ")), default=-1)
    return any(line.startswith("FloatingPointError") for line in lines[last + 1 :])


def upstream_normalize(path: Path) -> bool:
    """Whether the upstream's pre-training task normalised the waveform (the downstream task must match)."""
    from ..upstream.checkpoint import read_checkpoint

    state = read_checkpoint(path)
    cfg = state.get("cfg") or {}
    task = cfg.get("task") or {}
    return bool(task.get("normalize", False))


def upstream_name(path: Path) -> str:
    """``hubert`` for ``runs/main/models/hubert/checkpoints/checkpoint_last.pt``, else the file's stem."""
    path = Path(path)
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return path.parent.parent.name
    return path.stem


def markdown_row(result: dict) -> str:
    m = result["metric"].upper()
    weights = result.get("layer_weights") or []
    cells = [
        result["task"].upper(),
        result["upstream_name"],
        ", ".join(lr_name(lr) for lr in result["lr_grid"]),
        lr_name(result["chosen_lr"]),
        f"{result['dev_' + result['metric']]:.2f}",
        f"{result['test_' + result['metric']]:.2f}",
        " / ".join(f"{w:.2f}" for w in weights) or "-",
    ]
    header = ["task", "upstream", "lr grid", "chosen lr", f"dev {m} (%)", f"test {m} (%)", "layer weights"]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header), "| " + " | ".join(cells) + " |"])


def write_outputs(out: Path, result: dict) -> Tuple[Path, Path]:
    """``superb_{task}.json`` and ``superb_{task}.md`` under ``out``, each written atomically."""
    out = Path(out)
    js, md = out / f"superb_{result['task']}.json", out / f"superb_{result['task']}.md"
    with atomic_write(js) as f:
        json.dump(result, f, indent=1)
    with atomic_write(md) as f:
        f.write(markdown_row(result) + "\n")
    return js, md


# -- the sweep --------------------------------------------------------------------------------------
class SuperbSweep:
    def __init__(
        self,
        upstream: Path,
        task: str,
        data: Path,
        out: Path,
        config: Optional[str] = None,
        lrs: Optional[Sequence[float]] = None,
        points: Optional[int] = None,
        updates: Optional[int] = None,
        test_split: Optional[str] = None,
        jobs: Optional[int] = None,
        gpus: Optional[Sequence[str]] = None,
        overrides: Sequence[str] = (),
        name: Optional[str] = None,
        heartbeat: float = 30.0,
        feature_cache: Optional[Path] = None,
    ):
        from omegaconf import OmegaConf

        self.task = get_task(task)
        mfcc = str(upstream) == MFCC  # the parameter-free MFCC upstream, SUPERB's baseline
        self.upstream = MFCC if mfcc else Path(upstream).resolve()
        if not mfcc and not self.upstream.is_file():
            raise SweepError(f"{upstream}: upstream checkpoint not found")
        self.name = name or (MFCC if mfcc else upstream_name(self.upstream))
        data = Path(data).resolve()
        self.manifests = data / "manifests" if (data / "manifests").is_dir() else data  # a main-job data folder
        self.out = Path(out).resolve()
        self.config = config or self.task.tiny_config
        path = config_dir("superb") / f"{self.config}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in config_dir("superb").glob("*.yaml"))
            raise SweepError(f"--config {self.config}: no {path.name} in {path.parent} (known: {known})")
        cfg = OmegaConf.load(path)
        labels = OmegaConf.select(cfg, "task.labels")
        if labels != self.task.labels:
            raise SweepError(
                f"--config {self.config} trains on .{labels} transcripts, task {self.task.name} on .{self.task.labels}"
            )
        self.cpu = bool(OmegaConf.select(cfg, "common.cpu", default=False))
        self.paper = not self.config.endswith("_cpu")
        self.default_lr = float(OmegaConf.select(cfg, "optimization.lr")[0])
        self.updates = int(updates or OmegaConf.select(cfg, "optimization.max_update"))
        self.train_split = OmegaConf.select(cfg, "dataset.train_subset", default="train")
        self.dev_split = OmegaConf.select(cfg, "dataset.valid_subset", default="valid")
        self.test_split = test_split or TEST_OF_DEV.get(self.dev_split)
        if not self.test_split:
            raise SweepError(
                f"--config {self.config} validates on {self.dev_split!r}: name the test split (--test-split)"
            )
        self.lrs = sorted({_round(lr) for lr in lrs}) if lrs else lr_grid(self.task.lr_min, self.task.lr_max, points)
        if any(lr <= 0 for lr in self.lrs):
            raise SweepError(f"learning rates must be positive: {self.lrs}")
        self.overrides = list(overrides)
        for o in self.overrides:
            if "=" not in o:
                raise SweepError(f"--set {o!r}: expected KEY=VALUE (a fairseq-hydra-train override)")
        cores = len(os.sched_getaffinity(0))
        self.gpus = list(gpus) if gpus else []
        if self.gpus:
            self.jobs = min(len(self.gpus), len(self.lrs))
        elif self.cpu:
            self.jobs = max(1, min(jobs or cores, len(self.lrs)))
        else:  # one run at a time on fairseq's default devices (every visible GPU)
            self.jobs = max(1, min(jobs or 1, len(self.lrs)))
        self.threads = max(1, cores // self.jobs)
        self.heartbeat = heartbeat
        self.feature_cache = Path(feature_cache).resolve() if feature_cache else None
        self._normalize: Optional[bool] = None

    # -- commands --
    @property
    def normalize(self) -> bool:
        if self._normalize is None:
            self._normalize = False if self.upstream == MFCC else upstream_normalize(self.upstream)
        return self._normalize

    def run_dir(self, lr) -> Path:
        """``{out}/runs/lr_<LR>`` (``lr`` a number, or a name such as ``<CHOSEN>``)."""
        return self.out / "runs" / f"lr_{lr if isinstance(lr, str) else lr_name(lr)}"

    def train_command(self, lr: float, gpu: Optional[str] = None) -> List[str]:
        prefix = ["env", f"CUDA_VISIBLE_DEVICES={gpu}"] if gpu is not None else []
        one_gpu = ["distributed_training.distributed_world_size=1"] if gpu is not None else []
        return [
            *prefix,
            *("fairseq-hydra-train", "--config-dir", str(config_dir("superb")), "--config-name", self.config),
            f"common.user_dir={PACKAGE_DIR}",
            f"task.data={self.manifests}",
            f"task.normalize={str(self.normalize).lower()}",
            f"model.upstream_path={self.upstream}",
            f"optimization.lr=[{lr!r}]",
            f"optimization.max_update={self.updates}",
            f"checkpoint.best_checkpoint_metric={self.task.fairseq_metric}",
            "checkpoint.maximize_best_checkpoint_metric=false",
            *([f"task.features={self.feature_cache}"] if self.feature_cache else []),
            *one_gpu,
            *self.overrides,
            f"hydra.run.dir={self.run_dir(lr)}",
        ]

    def features_command(self) -> List[str]:
        """Every hidden state of the upstream for train, dev and test, once, into ``feature_cache``."""
        splits = (self.train_split, self.dev_split, self.test_split)
        cmd = ["mtssl-cache-features", str(self.upstream), "--manifests", str(self.manifests)]
        return [*cmd, "--out", str(self.feature_cache), "--splits", *splits]

    def test_json(self, lr) -> Path:
        return self.out / f"test_lr_{lr if isinstance(lr, str) else lr_name(lr)}.json"

    def test_command(self, lr) -> List[str]:
        best = self.run_dir(lr) / "checkpoints" / "checkpoint_best.pt"
        return ["mtssl-superb-eval", str(best), "--split", self.test_split, "--json", str(self.test_json(lr))]

    def missing_splits(self) -> List[str]:
        need = [f"dict.{self.task.labels}.txt"]
        for split in (self.train_split, self.dev_split, self.test_split):
            need += [f"{split}.tsv", f"{split}.{self.task.labels}"]
        return [n for n in need if not (self.manifests / n).is_file()]

    def settings(self) -> dict:
        return {
            "task": self.task.name,
            "config": self.config,
            "upstream": str(self.upstream),
            "data": str(self.manifests),
            "updates": self.updates,
            "overrides": self.overrides,
            "feature_cache": str(self.feature_cache) if self.feature_cache else None,
        }

    # -- plan --
    def plan(self) -> str:
        t, m = self.task, self.task.fairseq_metric
        splits = (self.train_split, self.dev_split, self.test_split)
        where = ", ".join(
            s + (f" (LibriSpeech {LIBRISPEECH[s]})" if self.paper and s in LIBRISPEECH else "") for s in splits
        )
        run = f"{self.jobs} at a time, {self.threads} thread{'s' if self.threads > 1 else ''} each"
        if self.gpus:
            run += f", one per GPU of {self.gpus}"
        lines = [
            f"# SUPERB {t.name.upper()} lr sweep of {self.upstream} ({self.name}), config {self.config}, "
            f"{self.updates} updates a run",
            f"# data {self.manifests}: train / dev / test = {where}",
            f"# lr grid {' '.join(lr_name(lr) for lr in self.lrs)}: {len(self.lrs)} runs, {run}",
        ]
        missing = self.missing_splits()
        if missing:
            hint = " (bash manifests/librispeech.sh LS_ROOT DATA LEXICON)" if self.paper else ""
            lines.append(f"# missing in {self.manifests}: {' '.join(missing)}{hint}")
        if self.feature_cache:
            lines += ["# features: every hidden state of the upstream, once per split", _shell(self.features_command())]
        for i, lr in enumerate(self.lrs):
            gpu = self.gpus[i % len(self.gpus)] if self.gpus else None
            lines += [f"# train_lr_{lr_name(lr)}", _shell(self.train_command(lr, gpu))]
        lines += [
            f"# select: the lr whose checkpoint_best.pt has the lowest dev {m} (fairseq's best_{m} on "
            f"{self.dev_split}); a tie goes to the lr nearest {lr_name(self.default_lr)}, then the smaller",
            "# test: the selected run only",
            _shell(self.test_command("<CHOSEN>")),
            f"# -> {self.out / f'superb_{t.name}.json'} and .md",
        ]
        return "\n".join(lines)

    # -- running --
    def _check_settings(self) -> None:
        path = self.out / "sweep_settings.json"
        now = self.settings()
        if path.is_file():
            before = json.loads(path.read_text())
            changed = [k for k in now if before.get(k) != now[k]]
            if changed:
                k = changed[0]
                raise SweepError(
                    f"{self.out}: its runs were made with {k}={before.get(k)!r}, not {now[k]!r}; use another --out"
                )
        else:
            with atomic_write(path) as f:
                json.dump(now, f, indent=1)

    def _pipeline(self) -> Pipeline:
        return Pipeline(
            self.out,
            jobs=self.jobs,
            threads=self.threads,
            heartbeat=self.heartbeat,
            bin_dir=Path(sys.executable).parent,
        )

    def _train_stage(self, pipeline: Pipeline, lr: float, gpus: "queue.Queue"):
        stage = f"train_lr_{lr_name(lr)}"

        def fn() -> dict:
            gpu = gpus.get() if self.gpus else None
            info = {"lr": lr, "updates": self.updates, "run_dir": str(self.run_dir(lr))}
            try:
                pipeline.run(stage, self.train_command(lr, gpu))
            except CommandFailed:
                # fairseq stops a run whose gradients became nan/inf (FloatingPointError): at this lr the head
                # diverges, which is a result of the sweep (its checkpoint_best.pt, if any, still competes)
                if not diverged(pipeline.commands.log_path(stage)):
                    raise
                info["diverged"] = True
            finally:
                if gpu is not None:
                    gpus.put(gpu)
            return info

        def progress() -> Optional[str]:
            n = latest_update(pipeline.commands.log_path(stage))
            return f"update {n}/{self.updates}" if n is not None else None

        return stage, fn, progress

    def run(self) -> dict:
        missing = self.missing_splits()
        if missing:
            raise SweepError(f"{self.manifests}: missing {' '.join(missing)} (the config {self.config} needs them)")
        self.normalize  # noqa: B018 - reads the upstream now: a bad checkpoint fails before any training
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_settings()
        start = time.time()
        if self.feature_cache:  # before any training: every run reads it
            features = self._pipeline()
            features.add("features", lambda: features.run("features", self.features_command()))
            features.execute()
        pipeline = self._pipeline()
        gpus: "queue.Queue" = queue.Queue()
        for g in self.gpus:
            gpus.put(g)
        for lr in self.lrs:
            stage, fn, progress = self._train_stage(pipeline, lr, gpus)
            pipeline.add(stage, fn, progress=progress)
        pipeline.execute()

        m = self.task.fairseq_metric
        runs = []
        for lr in self.lrs:
            best = read_best(self.run_dir(lr))
            curve = dev_curve(pipeline.commands.log_path(f"train_lr_{lr_name(lr)}"), self.dev_split, m)
            diverged = bool(pipeline.results.get(f"train_lr_{lr_name(lr)}", {}).get("diverged"))
            runs.append({"lr": lr, **best, "diverged": diverged, "dev_curve": curve, "run_dir": str(self.run_dir(lr))})
        chosen = select_lr({r["lr"]: r["dev"] for r in runs}, self.default_lr)
        chosen_run = next(r for r in runs if r["lr"] == chosen)

        test = self._pipeline()
        stage = f"test_lr_{lr_name(chosen)}"
        test.add(stage, lambda: test.run(stage, self.test_command(chosen)))
        test.execute()
        evaluation = json.loads(self.test_json(chosen).read_text())

        metric = self.task.metric
        result = {
            "task": self.task.name,
            "metric": metric,
            "upstream": str(self.upstream),
            "upstream_name": self.name,
            "config": self.config,
            "data": str(self.manifests),
            "splits": {"train": self.train_split, "dev": self.dev_split, "test": self.test_split},
            "updates": self.updates,
            "lr_grid": self.lrs,
            "selection": f"lowest best_{m} on {self.dev_split} (checkpoint_best.pt); "
            f"ties: nearest {lr_name(self.default_lr)} (log scale), then the smaller lr",
            "chosen_lr": chosen,
            f"dev_{metric}": chosen_run["dev"],
            f"test_{metric}": evaluation[metric],
            "layer_weights": chosen_run["layer_weights"],
            "best_update": chosen_run["best_update"],
            "test_checkpoint": chosen_run["checkpoint_best"],
            "test": evaluation,
            "runs": runs,
            "seconds": round(time.time() - start, 1),
        }
        write_outputs(self.out, result)
        return result


def _shell(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(c)) for c in cmd)


def summary_line(result: dict) -> str:
    m = result["metric"]
    weights = " / ".join(f"{w:.2f}" for w in result["layer_weights"] or [])
    return (
        f"{result['task'].upper()} {result['upstream_name']}: chosen lr {lr_name(result['chosen_lr'])} of "
        f"{', '.join(lr_name(lr) for lr in result['lr_grid'])}; dev {m.upper()} {result['dev_' + m]:.2f} %, "
        f"test {m.upper()} {result['test_' + m]:.2f} %; layer weights {weights}"
    )


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="mtssl-superb", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("upstream", help="upstream checkpoint (fairseq HuBERT / wav2vec 2.0 / data2vec, or the plugin's)")
    p.add_argument("--task", required=True, help=f"one of {sorted(TASKS)}")
    p.add_argument("--data", required=True, help="a manifest folder, or a main-job data folder (its manifests/)")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--config",
        help="config in fairseq_mtssl/config/superb (default: pr_tiny_cpu / asr_tiny_cpu; paper: pr_base / asr_base)",
    )
    p.add_argument("--lrs", type=float, nargs="+", help="the learning rates (instead of the task's grid)")
    p.add_argument("--lr-min", type=float, help="smallest lr of the grid (default: the task's)")
    p.add_argument("--lr-max", type=float, help="largest lr of the grid (default: the task's)")
    p.add_argument("--points", type=int, help="lrs in the grid (default: one a decade, endpoints included)")
    p.add_argument("--updates", type=int, help="updates a run (default: the config's max_update)")
    p.add_argument("--test-split", help="test split (default: test for valid, test_clean for dev_clean)")
    p.add_argument("--jobs", type=int, help="CPU configs: runs side by side (default: one per core, at most the grid)")
    p.add_argument("--gpus", nargs="+", help="GPU ids: one run per GPU at a time (CUDA_VISIBLE_DEVICES)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra fairseq-hydra-train override for every run (repeatable)",
    )
    p.add_argument("--name", help="the upstream's name in the table (default: from its path)")
    p.add_argument(
        "--feature-cache",
        help="extract every hidden state of the upstream once (train, dev, test) into this folder and train every "
        "lr on them (task.features) instead of forwarding the frozen upstream at every step; its size is frames x "
        "layers x dims x 4 bytes (LibriSpeech train-clean-100 with a Base model: about 0.7 TB, so a tiny-scale option)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and run nothing")
    p.add_argument("--run", action="store_true", help="run a paper-scale config (which otherwise prints its plan)")
    a = p.parse_args(argv)
    task = get_task(a.task)
    lrs = a.lrs
    if not lrs and (a.lr_min or a.lr_max or a.points):
        lrs = lr_grid(a.lr_min or task.lr_min, a.lr_max or task.lr_max, a.points)
    sweep = SuperbSweep(
        Path(a.upstream), a.task, Path(a.data), Path(a.out), config=a.config, lrs=lrs, updates=a.updates,
        test_split=a.test_split, jobs=a.jobs, gpus=a.gpus, overrides=a.overrides, name=a.name,
        feature_cache=a.feature_cache,
    )  # fmt: skip
    print(sweep.plan(), flush=True)
    if a.dry_run or (sweep.paper and not a.run):
        why = "--dry-run" if a.dry_run else f"{sweep.config} is a paper-scale config: add --run to run it"
        print(f"# nothing run ({why})")
        return
    result = sweep.run()
    print(summary_line(result))
    print(f"# {sweep.out / f'superb_{task.name}.json'}")


if __name__ == "__main__":
    main()
