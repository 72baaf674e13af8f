"""A wav2vec 2.0 or VGS+SSL checkpoint as a plain fairseq ``wav2vec2`` checkpoint (the speech trunk).

    mtssl-export runs/vgs_plus/stage1_vgs_plus/checkpoints/checkpoint_last.pt exported/vgs_plus/

The result loads in vanilla fairseq (no ``user_dir``): model ``wav2vec2`` under task
``audio_pretraining`` with the trunk's weights (its quantiser and projections included, so wav2vec 2.0
pre-training can continue from it). A VGS+SSL model's audio and image heads go to a file of their own
(:func:`write_vgs_heads`); :func:`load_vgs_export` joins the two back into the plugin's model for
retrieval. A trunk that a plain fairseq ``Wav2Vec2Model`` cannot represent (a parameter it does not
have, such as a learned CLS token inside the input, or one of another shape) is refused.
"""

from dataclasses import fields
from pathlib import Path
from typing import Dict, Tuple

import torch

from ..atomic import save_torch_atomic
from ..checkpoint_safety import load_checkpoint_safely
from ..errors import ExportError

TRUNK_PREFIX = {"wav2vec2": "", "wav2vec2_vgs": "w2v."}


class TrunkNotRepresentable(ExportError):
    pass


def _plain(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True) if OmegaConf.is_config(cfg) else cfg


def _fields(dataclass) -> set:
    return {f.name for f in fields(dataclass)}


def split_trunk(weights: Dict[str, torch.Tensor], model_name: str) -> Tuple[Dict, Dict]:
    """``(trunk weights with fairseq Wav2Vec2Model names, every other weight)`` of a checkpoint."""
    prefix = TRUNK_PREFIX[model_name]
    trunk = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    rest = {k: v for k, v in weights.items() if not k.startswith(prefix)}
    return trunk, rest


def check_representable(model_cfg: dict, trunk: Dict[str, torch.Tensor], src) -> None:
    """Load ``trunk`` strictly into a fresh fairseq ``Wav2Vec2Model`` built from ``model_cfg``; raise
    :class:`TrunkNotRepresentable` (one line, naming the file and the parameters) if it does not fit."""
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model

    plain = Wav2Vec2Model(Wav2Vec2Config(**{k: v for k, v in model_cfg.items() if k != "_name"}))
    expected = plain.state_dict()
    extra = sorted(set(trunk) - set(expected))
    missing = sorted(set(expected) - set(trunk))
    shape = sorted(k for k in set(trunk) & set(expected) if trunk[k].shape != expected[k].shape)
    if extra or missing or shape:
        what = "; ".join(
            f"{label} {names[:4]}"
            for label, names in (("not in wav2vec2", extra), ("missing", missing), ("other shape", shape))
            if names
        )
        raise TrunkNotRepresentable(
            f"{src}: the speech trunk cannot be written as a plain fairseq wav2vec2 checkpoint ({what})"
        )


def export_wav2vec2_trunk(src, dst, heads_dst=None) -> dict:
    """Write ``src`` (model ``wav2vec2`` or ``wav2vec2_vgs``) as a plain fairseq wav2vec 2.0 checkpoint
    ``dst``; with ``heads_dst`` (VGS+SSL only) also the VGS heads. Returns the written state."""
    from fairseq.criterions.wav2vec_criterion import Wav2VecCriterionConfig
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config
    from fairseq.tasks.audio_pretraining import AudioPretrainingConfig

    state = load_checkpoint_safely(src)
    if state.get("cfg") is None and state.get("args") is not None:  # a pre-hydra release (``args`` Namespace)
        from ..upstream import read_checkpoint

        state = read_checkpoint(src)  # weights-only again, and fairseq's args -> cfg upgrade
    cfg = _plain(state.get("cfg"))
    model_cfg = (cfg or {}).get("model") or {}
    name = model_cfg.get("_name")
    if name not in TRUNK_PREFIX:
        raise ExportError(f"{src}: model is {name!r}, not a wav2vec 2.0 or VGS+SSL (wav2vec2_vgs) checkpoint")
    trunk, rest = split_trunk(state["model"], name)
    new_model_cfg = {k: v for k, v in model_cfg.items() if k in _fields(Wav2Vec2Config)}
    check_representable(new_model_cfg, trunk, src)
    new_model_cfg["_name"] = "wav2vec2"
    task = cfg.get("task") or {}
    new_task_cfg = {k: v for k, v in task.items() if k in _fields(AudioPretrainingConfig)}
    new_task_cfg["_name"] = "audio_pretraining"
    criterion = cfg.get("criterion") or {}
    new_criterion = {k: v for k, v in criterion.items() if k in _fields(Wav2VecCriterionConfig)}
    new_criterion["_name"] = "wav2vec"
    history = [dict(h) for h in state.get("optimizer_history", [])[-1:]] or [
        {"criterion_name": "Wav2vecCriterion", "optimizer_name": "Adam", "lr_scheduler_state": {"best": None}}
    ]
    history[-1].setdefault("num_updates", 0)
    out = {
        "cfg": {
            **{k: v for k, v in cfg.items() if k not in ("model", "task", "criterion")},
            "common": {**(cfg.get("common") or {}), "user_dir": None},
            "model": new_model_cfg,
            "task": new_task_cfg,
            "criterion": new_criterion,
        },
        "model": trunk,
        "args": None,
        "optimizer_history": history,  # metadata only; fairseq reads the last entry
        "extra_state": {},
        "last_optimizer_state": None,
    }
    save_torch_atomic(out, dst)
    if heads_dst is not None and name == "wav2vec2_vgs":
        write_vgs_heads(model_cfg, rest, Path(dst).name, heads_dst)
    return out


def write_vgs_heads(vgs_model_cfg: dict, heads: Dict[str, torch.Tensor], trunk_name: str, out) -> None:
    """The VGS+SSL model's audio and image heads with the full model config, beside the trunk."""
    state = {"vgs_model_cfg": dict(vgs_model_cfg), "model": heads, "trunk": trunk_name}
    save_torch_atomic(state, out)


def load_vgs_export(trunk_path, heads_path):
    """The plugin's ``Wav2Vec2VgsModel`` (eval mode) from an exported trunk and its heads file."""
    from ..models.wav2vec2_vgs import Wav2Vec2VgsConfig, Wav2Vec2VgsModel

    heads = load_checkpoint_safely(heads_path)
    if "vgs_model_cfg" not in heads:
        raise ExportError(f"{heads_path}: not a VGS heads file (no vgs_model_cfg)")
    trunk = load_checkpoint_safely(trunk_path)["model"]
    cfg = {k: v for k, v in heads["vgs_model_cfg"].items() if k in _fields(Wav2Vec2VgsConfig)}
    model = Wav2Vec2VgsModel(Wav2Vec2VgsConfig(**cfg))
    model.load_state_dict({**{f"w2v.{k}": v for k, v in trunk.items()}, **heads["model"]}, strict=True)
    return model.eval()
