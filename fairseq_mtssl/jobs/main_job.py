"""The main job: every method of the plugin on the embedded corpus, evaluated, with a report.

    mtssl-main-job --out runs/main                      # about 23 minutes on 2 cores, 2.8 GB
    mtssl-main-job --out runs/main --hours 2 --updates 3000 --pr-updates 1000 --jobs 1   # longer
    mtssl-main-job --profile study --out runs/study     # the papers' claims over 3 seeds (jobs/study.py)

Stages (each a set of ordinary command lines, recorded in ``{out}/commands.sh``):

  corpus, manifests, image_features, labels_mfcc, abx_items     data: espeak-ng corpus, fairseq
                        manifests, object-region image features, MFCC k-means labels (``.km`` + ``dict.km.txt``)
  train_hubert          HuBERT iteration 1 on the MFCC labels (the base model)
  train_mt4ssl_both / _offline_only / _online_only            MT4SSL and its two ablations
  train_vgs_plus        wav2vec 2.0 + VGS trained simultaneously (alpha ``--av-weight``)
  train_w2v2_then_vgs   sequential: wav2vec 2.0, then VGS from its weights (20/70 : 50/70 of the updates)
  train_score           SCORE fine-tuning of the HuBERT
  train_<arch>_untrained   each architecture (hubert, mt4ssl, vgs) at its seed's initial weights: the
                        baseline every trained row is read against
  eval_<model>          ABX per layer, the frame-level phone probe and QbE at ``--layer``; speech <-> image
                        retrieval of every VGS model (R@1/5/10 both ways, chance beside it; ``--no-retrieval``
                        to skip); SUPERB-style PR with ``--pr-updates`` (at its floor in the default budget)
  eval_mfcc             the MFCC baseline (ABX, probe, QbE)
  labels_iter2          (``--iter2``) HuBERT iteration-2 labels from the base model's layer features
  report                ``report.md``: every model x metric, PNG plots, the commands

A finished stage is skipped by the next run; an interrupted training resumes from its last checkpoint
(saved every ``--save-interval`` updates). ``--jobs`` stages run side by side, each with ``--threads``
intra-op threads. Every training takes ``common.seed`` from ``--seed``.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Optional

from ..atomic import atomic_write
from ..config import config_dir
from ..upstream.readers import MFCC, MfccReader
from .report import write_report
from .stages import Pipeline
from .training_log import latest_update

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # common.user_dir
SPLITS = ("train", "valid", "test")
MT4SSL_VARIANTS = {"both": [], "offline_only": ["model.online_weight=0"], "online_only": ["model.offline_weights=[0]"]}
VGS_MODELS = {"vgs_plus": "VGS+", "w2v2_then_vgs": "W2V2,VGS"}
# Each architecture also appears untrained: fairseq builds it from the same config and seed as its trained
# runs (so at the same initial weights) and saves it after one update at learning rate 0, which changes no
# weight (Adam's step and its weight decay are both scaled by the learning rate).
UNTRAINED = {"hubert_untrained": "hubert", "mt4ssl_untrained": "mt4ssl", "vgs_untrained": "vgs"}
UNTRAINED_OVERRIDES = ("optimization.max_update=1", "optimization.lr=[0.0]")
# fairseq's tri_stage scheduler divides by its decay steps, int(0.1 x 1 update) = 0: decay over the one update
UNTRAINED_SCHEDULE = {"mt4ssl": ("lr_scheduler.phase_ratio=[0,0,1]",)}
MODELS = [
    "hubert_untrained",
    "hubert",
    "mt4ssl_untrained",
    "mt4ssl_both",
    "mt4ssl_offline_only",
    "mt4ssl_online_only",
    "vgs_untrained",
    "vgs_plus",
    "w2v2_then_vgs",
    "score",
]


MFCC_RATE = f"{MfccReader.frame_rate:g}"  # the MFCC labels' rate (Hz)


def max_update_of(config: Path, overrides) -> Optional[int]:
    """``optimization.max_update`` of a training: its override, else the config's (None: unset)."""
    for o in reversed([str(o) for o in overrides]):
        if o.startswith("optimization.max_update="):
            return int(o.split("=", 1)[1])
    from omegaconf import OmegaConf

    value = OmegaConf.select(OmegaConf.load(config), "optimization.max_update")
    return int(value) if value else None


def saved_updates(run_dir: Path) -> Optional[int]:
    """The updates of a run's ``checkpoint_last.pt`` (None: no checkpoint)."""
    from ..checkpoint_safety import load_checkpoint_safely

    ckpt = Path(run_dir) / "checkpoints" / "checkpoint_last.pt"
    if not ckpt.is_file():
        return None
    history = load_checkpoint_safely(ckpt).get("optimizer_history") or [{}]
    return history[-1].get("num_updates")


class MainJob:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.data = self.out / "data"
        self.manifests = self.data / "manifests"
        self.items = self.data / "test.item"
        self.pipeline = Pipeline(
            self.out,
            jobs=args.jobs,
            threads=args.threads,
            force=args.force,
            bin_dir=Path(sys.executable).parent,
            malloc_tunables=args.malloc_tunables,
        )

    def tensorboard_dir(self, model: str) -> Path:
        """Training curves of ``model`` (``tensorboard --logdir {out}/tensorboard`` shows every model)."""
        return self.out / "tensorboard" / model

    @property
    def mfcc_labels(self) -> Path:
        return self.data / "labels" / f"mfcc_km{self.args.clusters}"

    def hydra_train(
        self, stage: str, config_dir: Path, config: str, run_dir: Path, *overrides: str, save_interval: int = 0
    ) -> None:
        target = max_update_of(config_dir / f"{config}.yaml", overrides)
        done = saved_updates(run_dir)
        if target is not None and done is not None and done >= target:
            # killed after its last checkpoint, before the stage was marked done: fairseq resumed at max_update
            # would still run one more update, so the training is not started again
            return
        self.pipeline.run(
            stage,
            [
                "fairseq-hydra-train",
                "--config-dir",
                config_dir,
                "--config-name",
                config,
                f"common.user_dir={PACKAGE_DIR}",
                f"hydra.run.dir={run_dir}",
                f"common.tensorboard_logdir={self.tensorboard_dir(run_dir.name)}",
                "common.log_interval=10",
                f"checkpoint.save_interval_updates={save_interval or self.args.save_interval}",
                *overrides,
            ],
        )

    def architecture(self, arch: str):
        """``(config dir, config name, data overrides)`` of the tiny ``hubert``, ``mt4ssl`` or ``vgs`` model."""
        labels = [f"task.label_dir={self.mfcc_labels}", 'task.labels=["km"]']
        if arch == "hubert":
            return config_dir("hubert/pretrain"), "hubert_tiny_cpu", [*labels, f"model.label_rate={MFCC_RATE}"]
        if arch == "mt4ssl":
            return config_dir("mt4ssl/pretrain"), "mt4ssl_tiny_cpu", [*labels, f"task.label_rate={MFCC_RATE}"]
        if arch == "vgs":
            return config_dir("vgs"), "vgs_ssl_tiny_cpu", [f"criterion.av_weight={self.args.av_weight}"]
        raise ValueError(f"unknown architecture {arch!r}")

    def train_arch(
        self, stage: str, arch: str, run: Path, seed: int, *overrides: str, save_interval: int = 0
    ) -> Dict[str, object]:
        """One fairseq-hydra-train run of ``arch`` on the main job's data; returns its stage result."""
        cdir, name, data = self.architecture(arch)
        self.hydra_train(
            stage,
            cdir,
            name,
            run,
            f"task.data={self.manifests}",
            *data,
            f"common.seed={seed}",
            *overrides,
            save_interval=save_interval,
        )
        return {"checkpoint": str(run / "checkpoints/checkpoint_last.pt"), "logs": [str(run / "hydra_train.log")]}

    # -- data -----------------------------------------------------------------------------------
    def corpus(self):
        self.pipeline.run(
            "corpus",
            ["mtssl-synth-corpus", "--out", self.data / "corpus", "--hours", self.args.hours, "--seed", self.args.seed],
        )
        return json.loads((self.data / "corpus" / "corpus.json").read_text())["utterances"]

    def manifest_stage(self):
        self.pipeline.run("manifests", ["mtssl-manifest-corpus", self.data / "corpus", "--dest", self.manifests])

    def image_features(self):
        for split in SPLITS:
            self.pipeline.run(
                "image_features",
                [
                    "mtssl-image-features",
                    "--images",
                    self.manifests / f"{split}.images",
                    "--root",
                    self.data / "corpus",
                    "--out",
                    self.manifests / split,
                ],
            )

    def labels_mfcc(self):
        feats, km = self.data / "features" / MFCC, self.mfcc_labels / "kmeans.npy"
        self.pipeline.run(
            "labels_mfcc", ["mtssl-dump-features", self.manifests / "train.tsv", feats, "--feature", MFCC]
        )
        self.pipeline.run(
            "labels_mfcc",
            ["mtssl-learn-kmeans", feats, "train", "1", km, "--n-clusters", self.args.clusters, "--percent", "-1"],
        )
        for split in SPLITS:
            self.pipeline.run(
                "labels_mfcc",
                [
                    "mtssl-apply-kmeans",
                    km,
                    self.mfcc_labels,
                    "--manifest",
                    self.manifests / f"{split}.tsv",
                    "--feature",
                    MFCC,
                ],
            )
        return {"label_dir": str(self.mfcc_labels)}

    def abx_items(self):
        self.pipeline.run(
            "abx_items",
            [
                "mtssl-abx-items",
                "--alignments",
                self.data / "corpus" / "alignments" / "test.phones.ctm",
                "--manifest",
                self.manifests / "test.tsv",
                "--out",
                self.items,
            ],
        )

    # -- training -------------------------------------------------------------------------------
    def run_dir(self, model: str) -> Path:
        return self.out / "models" / model

    def train_hubert(self):
        updates = f"optimization.max_update={self.args.updates}"
        return self.train_arch("train_hubert", "hubert", self.run_dir("hubert"), self.args.seed, updates)

    def train_mt4ssl(self, variant: str):
        def fn():
            updates = f"optimization.max_update={self.args.updates}"
            return self.train_arch(
                f"train_mt4ssl_{variant}",
                "mt4ssl",
                self.run_dir(f"mt4ssl_{variant}"),
                self.args.seed,
                updates,
                *MT4SSL_VARIANTS[variant],
            )

        return fn

    def train_untrained(self, model: str):
        def fn():
            return self.train_arch(
                f"train_{model}",
                UNTRAINED[model],
                self.run_dir(model),
                self.args.seed,
                *UNTRAINED_OVERRIDES,
                *UNTRAINED_SCHEDULE.get(UNTRAINED[model], ()),
            )

        return fn

    def vgs_scenario(self, stage: str, scenario: str, run: Path, seed: int, updates: int, *overrides: str):
        """One ``mtssl-vgs-train`` scenario (``VGS+``, ``W2V2,VGS``, ...) on the main job's data."""
        self.pipeline.run(
            stage,
            [
                "mtssl-vgs-train",
                *("--scenario", scenario, "--data", self.manifests, "--out", run, "--updates", updates),
                *("--av-weight", self.args.av_weight, "--tensorboard-logdir", self.tensorboard_dir(run.name)),
                "common.log_interval=10",
                f"checkpoint.save_interval_updates={self.args.save_interval}",
                f"common.seed={seed}",
                *overrides,
            ],
        )
        summary = json.loads((run / "summary.json").read_text())
        logs = sorted(str(p) for p in run.glob("stage*/hydra_train.log"))
        return {"checkpoint": summary["final"], "logs": logs, "scenario": summary["scenario"]}

    def train_vgs(self, model: str):
        def fn():
            return self.vgs_scenario(
                f"train_{model}", VGS_MODELS[model], self.run_dir(model), self.args.seed, self.args.updates
            )

        return fn

    def train_score(self):
        run = self.run_dir("score")
        start = self.pipeline.results["train_hubert"]["checkpoint"]
        self.hydra_train(
            "train_score",
            config_dir("score"),
            "score_tiny_cpu",
            run,
            f"task.data={self.manifests}",
            f"model.upstream_path={start}",
            f"optimization.max_update={self.args.score_updates}",
            f"common.seed={self.args.seed}",
        )
        return {
            "checkpoint": str(run / "checkpoints/checkpoint_last.pt"),
            "logs": [str(run / "hydra_train.log")],
            "start": start,
        }

    def labels_iter2(self):
        ckpt = self.pipeline.results["train_hubert"]["checkpoint"]
        lab = self.data / "labels" / f"hubert_l{self.args.layer}_km{self.args.clusters}"
        feats = self.data / "features" / f"hubert_l{self.args.layer}"
        model_args = ["--feature", "model", "--checkpoint", ckpt, "--layer", self.args.layer]
        self.pipeline.run("labels_iter2", ["mtssl-dump-features", self.manifests / "train.tsv", feats, *model_args])
        self.pipeline.run(
            "labels_iter2",
            ["mtssl-learn-kmeans", feats, "train", "1", lab / "kmeans.npy", "--n-clusters", self.args.clusters],
        )
        for split in SPLITS:
            self.pipeline.run(
                "labels_iter2",
                [
                    "mtssl-apply-kmeans",
                    lab / "kmeans.npy",
                    lab,
                    "--manifest",
                    self.manifests / f"{split}.tsv",
                    *model_args,
                ],
            )
        return {"label_dir": str(lab)}

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate_checkpoint(self, stage: str, ck: str, out: Path, *, pr_updates: int = 0, retrieval: bool = False):
        """``mtssl-evaluate-upstream``: ABX (every layer), the phone probe and QbE at ``--layer``, PR when
        ``pr_updates`` > 0, retrieval when asked."""
        self.pipeline.run(
            stage,
            [
                "mtssl-evaluate-upstream",
                ck,
                *("--data", self.data, "--out", out, "--layer", self.args.layer, "--items", self.items),
                *("--pr-updates", pr_updates),
                *(["--retrieval"] if retrieval else []),
            ],
        )
        return {"results": str(out / "results.json")}

    def evaluate(self, model: str):
        def fn():
            if model == MFCC:
                return self.evaluate_checkpoint("eval_mfcc", MFCC, self.out / "eval" / model)
            return self.evaluate_checkpoint(
                f"eval_{model}",
                self.pipeline.results[f"train_{model}"]["checkpoint"],
                self.out / "eval" / model,
                pr_updates=self.args.pr_updates,
                retrieval=self.args.retrieval and (model in VGS_MODELS or UNTRAINED.get(model) == "vgs"),
            )

        return fn

    # -- the whole job --------------------------------------------------------------------------
    def training_progress(self, model: str, target: int):
        def progress() -> Optional[str]:
            logs = sorted(self.run_dir(model).glob("**/hydra_train.log"), key=lambda p: p.stat().st_mtime)
            n = latest_update(logs[-1]) if logs else None
            return None if n is None else f"update {n}/{target}"

        return progress

    def declare_data(self) -> None:
        stages = self.pipeline
        stages.add("corpus", self.corpus)
        stages.add("manifests", self.manifest_stage, after=["corpus"])
        stages.add("labels_mfcc", self.labels_mfcc, after=["manifests"])
        stages.add("image_features", self.image_features, after=["manifests"])
        stages.add("abx_items", self.abx_items, after=["manifests"])

    def declare(self) -> None:
        stages, models = self.pipeline, [m for m in MODELS if m in self.args.models]
        self.declare_data()
        # declaration order is scheduling priority: the longest chain (HuBERT -> SCORE) first
        needs_hubert = "hubert" in models or "score" in models
        if needs_hubert:
            stages.add(
                "train_hubert",
                self.train_hubert,
                after=["labels_mfcc"],
                progress=self.training_progress("hubert", self.args.updates),
            )
        if "score" in models:
            stages.add(
                "train_score",
                self.train_score,
                after=["train_hubert"],
                progress=self.training_progress("score", self.args.score_updates),
            )
        for m in models:
            if m in UNTRAINED:
                after = "image_features" if UNTRAINED[m] == "vgs" else "labels_mfcc"
                stages.add(f"train_{m}", self.train_untrained(m), after=[after])
            elif m.startswith("mt4ssl_"):
                stages.add(
                    f"train_{m}",
                    self.train_mt4ssl(m[len("mt4ssl_") :]),
                    after=["labels_mfcc"],
                    progress=self.training_progress(m, self.args.updates),
                )
            elif m in VGS_MODELS:
                stages.add(
                    f"train_{m}",
                    self.train_vgs(m),
                    after=["image_features"],
                    progress=self.training_progress(m, self.args.updates),
                )
        for m in models:
            stages.add(f"eval_{m}", self.evaluate(m), after=[f"train_{m}", "abx_items"])
        stages.add("eval_mfcc", self.evaluate(MFCC), after=["abx_items"])
        if self.args.iter2:
            stages.add("labels_iter2", self.labels_iter2, after=["train_hubert"])
        stages.add("report", self.report, after=[f"eval_{m}" for m in models] + ["eval_mfcc"])

    def report(self):
        path = write_report(self.out, self.pipeline.results, [MFCC] + [m for m in MODELS if m in self.args.models])
        return {"report": str(path)}

    def main(self) -> Dict[str, object]:
        self.declare()
        return self.execute()

    def execute(self) -> Dict[str, object]:
        """Run the declared stages; write ``summary.json`` (stage results, times, peak memory)."""
        self.out.mkdir(parents=True, exist_ok=True)
        print(
            f"main job in {self.out}: {len(self.pipeline.specs)} stages, {self.args.jobs} at a time x {self.args.threads} threads",
            flush=True,
        )
        results = self.pipeline.execute()
        summary = {
            "stages": results,
            "peak_pss_mb_this_run": round(self.pipeline.peak_pss_mb),
            "peak_pss_mb_by_stage_at_peak": {k: round(v) for k, v in self.pipeline.peak_breakdown_mb.items()},
            "stage_peak_pss_mb": {k: round(v) for k, v in sorted(self.pipeline.stage_peak_mb.items())},
            "stage_seconds_total": round(sum(r.get("seconds", 0) for r in results.values()), 1),
        }
        with atomic_write(self.out / "summary.json") as f:
            json.dump(summary, f, indent=1)
        final = results.get("report") or results.get("verdicts") or {}
        print(
            f"report: {final.get('report') or final.get('study')}\npeak memory of this run (PSS, all processes): {self.pipeline.peak_pss_mb:.0f} MB",
            flush=True,
        )
        return summary
