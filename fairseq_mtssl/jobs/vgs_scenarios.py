"""Train wav2vec 2.0 + VGS in one of the EUSIPCO 2023 scenarios: one method alone, or two in sequence.

    mtssl-vgs-train --scenario VGS+ --data runs/main/data/manifests --out runs/vgs/vgs_plus --updates 700
    mtssl-vgs-train --scenario W2V2,VGS --data ... --out runs/vgs/w2v2_then_vgs --updates 700 [--freeze-shared 2]
    mtssl-vgs-train --scenario W2V2,VGS --config-name vgs_ssl_base_spokencoco --data ... --out ... --updates 647570

Methods: ``W2V2`` (wav2vec 2.0 loss only, ``criterion.av_weight=0``), ``VGS`` (speech-image loss only,
``av_weight`` 1), ``VGS+`` (both, ``--av-weight``, the paper's alpha 0.5: weight of the audio-visual loss). ``A,B`` trains A for 20/70 of the
updates and B for the rest (the paper's 20 + 50 epochs), B starting from A's last checkpoint with a
new optimiser, learning-rate schedule and data iterator (fairseq's ``reset_*``). Each stage is its own
run with its own schedule: ``optimization.max_update`` is the stage's updates, and a warm-up given as
``lr_scheduler.warmup_fraction`` (scheduler ``polynomial_decay_fraction``, as the packaged configs do) is
that fraction of the stage's own updates, as the authors' BertAdam warms up over 10 % of each run.
``--handover last`` (default; the paper: "the model trained for 20 epochs") hands over A's last
checkpoint; ``--handover best-r1`` (the authors' code: ``best_bundle.pth``) keeps every checkpoint A saves
and hands over the one with the best mean valid R@1 of the two directions (``handover_choice.json``).
``--config-name-b`` gives stage B its own config, ``--override-a`` / ``--override-b`` its own overrides. Every parameter is
handed over (the model is the same in all scenarios); ``handover.json`` reports, for each part of the
model, whether stage A trained it, whether stage B changed it, and whether B froze it
(``--freeze-shared n``: conv front end and layers 1..n). Each stage is a plain ``fairseq-hydra-train``
run, recorded in ``commands.sh``; a rerun resumes an interrupted stage and skips finished ones.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import torch

from ..atomic import atomic_write
from ..checkpoint_safety import load_checkpoint_safely
from ..config import config_dir
from ..errors import MtsslError, cli
from .commands import CommandRunner

AV_WEIGHT = {"W2V2": 0.0, "VGS": 1.0, "VGS+": None}  # criterion.av_weight (the paper's alpha); VGS+: --av-weight
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # common.user_dir


class ScenarioError(MtsslError, ValueError):
    """A scenario that cannot be run as asked."""


def parameter_group(name: str, vgs_layer: int, n_layers: int) -> str:
    if name.startswith("w2v.encoder.layers."):
        i = int(name.split(".")[3])
        return f"shared layers 1-{vgs_layer}" if i < vgs_layer else f"SSL-only layers {vgs_layer + 1}-{n_layers}"
    if name.startswith(
        (
            "w2v.feature_extractor",
            "w2v.layer_norm",
            "w2v.post_extract_proj",
            "w2v.encoder.pos_conv",
            "w2v.mask_emb",
            "w2v.encoder.cls_token",
        )
    ):
        return "front end"
    if name.startswith("w2v.encoder.layer_norm"):
        return "front end"
    if name.startswith("w2v."):
        return "SSL heads (quantiser, projections)"
    return "VGS audio head" if name.startswith("audio_") else "VGS image head"


def best_r1_checkpoint(checkpoints: List[Path], split: str = "valid") -> Dict:
    """The checkpoint with the best mean R@1 of speech -> image and image -> speech on ``split`` (the
    authors' ``(A_r1 + I_r1) / 2``; the first of equals, so the earliest), with every candidate's recall."""
    from ..evaluation import retrieval

    if not checkpoints:
        raise ScenarioError("--handover best-r1: stage A saved no checkpoint to choose from")
    scores = {}
    for ck in checkpoints:
        r = retrieval.retrieval_of_checkpoint(str(ck), split)
        scores[str(ck)] = (r["s2i_r1"] + r["i2s_r1"]) / 2
    best = max(scores, key=lambda k: scores[k])  # dicts keep order: ties go to the earliest
    return {"split": split, "mean_r1": scores, "chosen": best}


def _update_of(path: Path) -> int:
    """Update count in fairseq's ``checkpoint_{epoch}_{updates}.pt`` names (``checkpoint_last``: largest)."""
    parts = path.stem.split("_")
    return int(parts[-1]) if parts[-1].isdigit() else 1 << 62


def trained_by(group: str, av_weight: float) -> bool:
    if group.startswith("VGS"):
        return av_weight > 0
    if group.startswith(("SSL-only", "SSL heads")):
        return av_weight < 1
    return True


def handover_report(stage_a: Path, stage_b: Path, av_weight_a: float, av_weight_b: float, freeze: int) -> Dict:
    a, b = load_checkpoint_safely(stage_a), load_checkpoint_safely(stage_b)
    model_cfg = b["cfg"]["model"]
    vgs_layer, n_layers = int(model_cfg["vgs_layer"]), int(model_cfg["encoder_layers"])
    groups: Dict[str, Dict] = {}
    for name, tensor in b["model"].items():
        g = parameter_group(name, vgs_layer, n_layers)
        entry = groups.setdefault(g, {"tensors": 0, "changed_in_b": False})
        entry["tensors"] += 1
        if name not in a["model"]:
            raise ScenarioError(f"{stage_b}: parameter {name} is not in stage A's checkpoint {stage_a}")
        entry["changed_in_b"] |= not torch.equal(a["model"][name], tensor)
    for g, entry in groups.items():
        entry["trained_in_a"] = trained_by(g, av_weight_a)
        entry["trained_in_b"] = trained_by(g, av_weight_b)
        entry["frozen_in_b"] = freeze > 0 and (g == "front end" or (g.startswith("shared") and freeze >= vgs_layer))
        entry["status"] = (
            "new to training in B (initial weights from A's untouched init)"
            if not entry["trained_in_a"] and entry["trained_in_b"]
            else "kept but unused in B"
            if entry["trained_in_a"] and not entry["trained_in_b"]
            else "carried over and trained on"
            if entry["trained_in_b"]
            else "unused in both"
        )
    return groups


class ScenarioRunner:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.commands = CommandRunner(self.out, bin_dir=Path(sys.executable).parent)

    def av_weight(self, method: str) -> float:
        if method not in AV_WEIGHT:
            raise ScenarioError(f"unknown method {method!r}: choose W2V2, VGS or VGS+")
        return self.args.av_weight if AV_WEIGHT[method] is None else AV_WEIGHT[method]

    def stage(self, name: str, method: str, updates: int, extra: List[str], config_name: str = "") -> Path:
        run = self.out / name
        last = run / "checkpoints" / "checkpoint_last.pt"
        cmd = [
            "fairseq-hydra-train",
            "--config-dir",
            str(self.args.config_dir),
            "--config-name",
            config_name or self.args.config_name,
            f"common.user_dir={PACKAGE_DIR}",
            f"task.data={Path(self.args.data).resolve()}",
            f"criterion.av_weight={self.av_weight(method)}",
            f"optimization.max_update={updates}",
            f"hydra.run.dir={run.resolve()}",
            *(
                [f"common.tensorboard_logdir={Path(self.args.tensorboard_logdir).resolve() / name}"]
                if self.args.tensorboard_logdir
                else []
            ),
            *self.args.overrides,
            *extra,
        ]
        if not self.commands.done.is_done(name):
            print(f"[{name}] {method}, {updates} updates", flush=True)
        self.commands.step(name, cmd, say=lambda msg: print(msg, flush=True))
        return last

    def run(self) -> Dict:
        methods = self.args.scenario.split(",")
        summary = {"scenario": self.args.scenario, "updates": self.args.updates}
        if len(methods) == 1:
            summary["final"] = str(self.stage("stage1_" + _slug(methods[0]), methods[0], self.args.updates, []))
        elif len(methods) == 2:
            first, second = methods
            n_a = round(self.args.updates * 20 / 70)
            keep = ["checkpoint.keep_interval_updates=-1"] if self.args.handover == "best-r1" else []
            ckpt_a = self.stage("stage1_" + _slug(first), first, n_a, keep + list(self.args.override_a))
            if self.args.handover == "best-r1":
                saved = sorted(ckpt_a.parent.glob("checkpoint_*_*.pt"), key=_update_of) + [ckpt_a]
                choice = best_r1_checkpoint(saved)
                with atomic_write(self.out / "handover_choice.json") as f:
                    json.dump(choice, f, indent=1)
                ckpt_a = Path(choice["chosen"])
                print(f"  handing over {ckpt_a.name} (best mean valid R@1 {choice['mean_r1'][str(ckpt_a)]:.2f})")
            stage_b = "stage2_" + _slug(second)
            resume = (self.out / stage_b / "checkpoints" / "checkpoint_last.pt").exists()
            extra = (
                []
                if resume
                else [
                    f"checkpoint.restore_file={ckpt_a.resolve()}",
                    "checkpoint.reset_optimizer=true",
                    "checkpoint.reset_lr_scheduler=true",
                    "checkpoint.reset_dataloader=true",
                    "checkpoint.reset_meters=true",
                ]
            )
            extra.append(f"model.freeze_shared_layers={self.args.freeze_shared}")
            extra += self.args.override_b
            ckpt_b = self.stage(stage_b, second, self.args.updates - n_a, extra, self.args.config_name_b)
            report = handover_report(
                ckpt_a, ckpt_b, self.av_weight(first), self.av_weight(second), self.args.freeze_shared
            )
            with atomic_write(self.out / "handover.json") as f:
                json.dump(report, f, indent=1)
            for g, e in report.items():
                print(
                    f"  {g:<38} {e['status']}{', frozen in B' if e['frozen_in_b'] else ''}{', changed in B' if e['changed_in_b'] else ''}"
                )
            summary.update(final=str(ckpt_b), stage_a=str(ckpt_a), updates_a=n_a, updates_b=self.args.updates - n_a)
        else:
            raise ScenarioError(f"--scenario takes one method or two joined by a comma, got {self.args.scenario!r}")
        with atomic_write(self.out / "summary.json") as f:
            json.dump(summary, f, indent=1)
        return summary


def _slug(method: str) -> str:
    return method.lower().replace("+", "_plus")


@cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", required=True, help="W2V2 | VGS | VGS+ | A,B (e.g. W2V2,VGS)")
    parser.add_argument("--data", required=True, help="manifest directory (with .img/.images and image features)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--updates", type=int, required=True, help="total updates (split 20:50 between two stages)")
    parser.add_argument(
        "--av-weight",
        type=float,
        default=0.5,
        help="VGS+: the paper's alpha, weight of the audio-visual loss (1 - it weighs the wav2vec 2.0 loss)",
    )
    parser.add_argument(
        "--handover",
        choices=["last", "best-r1"],
        default="last",
        help="A,B: hand stage A's last checkpoint to B (the paper) or the one with the best mean valid R@1 (the "
        "authors' code)",
    )
    parser.add_argument("--freeze-shared", type=int, default=0, help="stage B: freeze the front end and layers 1..n")
    parser.add_argument(
        "--config-dir",
        default=str(config_dir("vgs")),
        help="folder of the stage config (default: the packaged VGS configs)",
    )
    parser.add_argument("--config-name", default="vgs_ssl_tiny_cpu")
    parser.add_argument("--config-name-b", default="", help="stage B's config (default: --config-name)")
    parser.add_argument("--override-a", action="append", default=[], help="a hydra override for stage A only")
    parser.add_argument("--override-b", action="append", default=[], help="a hydra override for stage B only")
    parser.add_argument(
        "--tensorboard-logdir",
        help="write each stage's training curves under DIR/<stage> (fairseq's common.tensorboard_logdir)",
    )
    parser.add_argument("overrides", nargs="*", help="more hydra overrides for every stage")
    args = parser.parse_args(argv)
    print(json.dumps(ScenarioRunner(args).run()))


if __name__ == "__main__":
    main()
