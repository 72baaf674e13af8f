"""fairseq HuBERT checkpoints in and out of the plugin.

In: :func:`load_hubert` reads an official or self-trained fairseq HuBERT checkpoint (``args``
Namespace or ``cfg``) with torch's weights-only loader (the plugin allowlists the plain-data classes
it holds; a checkpoint that pickles code is refused) and builds fairseq's ``HubertModel``.

Out: :func:`save_vanilla_hubert` writes a model's weights as a plain fairseq HuBERT checkpoint (model
``hubert``, task ``hubert_pretraining`` with its dictionaries): what fairseq, s3prl's ``hubert_local``
upstream and converters to other toolkits read.
"""

from pathlib import Path
from typing import Tuple

import torch

from ..atomic import save_torch_atomic
from ..errors import MtsslError
from ..upstream.checkpoint import read_checkpoint


class NotAHubertCheckpoint(MtsslError, ValueError):
    pass


def _model_name(state: dict) -> str:
    cfg = state.get("cfg") or {}
    if cfg.get("model") is not None:
        return str(cfg["model"].get("_name") or "")
    args = state.get("args")
    return str(getattr(args, "arch", "") or "")


def load_hubert(path) -> Tuple[torch.nn.Module, dict]:
    """``(fairseq HubertModel in eval mode, the checkpoint's state dict)``; clear errors otherwise."""
    from fairseq import checkpoint_utils
    from fairseq.models.hubert import HubertModel

    import fairseq_mtssl  # noqa: F401

    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    state = read_checkpoint(path)  # weights-only, plus fairseq's args -> cfg upgrade; names the file on refusal
    name = _model_name(state)
    if not name.startswith("hubert"):
        raise NotAHubertCheckpoint(f"{path}: model is {name or 'unknown'!r}, not a fairseq HuBERT checkpoint")
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    model = models[0]
    if not isinstance(model, HubertModel):
        raise NotAHubertCheckpoint(f"{path}: built {type(model).__name__}, not HubertModel")
    return model.eval(), state


def save_vanilla_hubert(model: torch.nn.Module, source_state: dict, out) -> None:
    """Write ``model``'s weights (a fairseq ``HubertModel``) under the source checkpoint's HuBERT
    config and task state (dictionaries), without optimizer state."""
    from omegaconf import OmegaConf

    cfg = source_state.get("cfg")
    if cfg is not None and OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if cfg is not None and cfg.get("task", {}).get("_name") != "hubert_pretraining":  # plugin task -> fairseq's
        cfg["task"] = {k: v for k, v in cfg["task"].items() if k not in ("label_tolerance_s", "label_rates")}
        cfg["task"]["_name"] = "hubert_pretraining"
    if cfg is not None:
        cfg["common"] = {**cfg.get("common", {}), "user_dir": None}
    state = {
        "cfg": cfg,
        "args": source_state.get("args") if cfg is None else None,
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "task_state": source_state.get("task_state", {}),
        "optimizer_history": [
            {
                "criterion_name": "HubertCriterion",
                "optimizer_name": "Adam",
                "lr_scheduler_state": {"best": None},
                "num_updates": 0,
            }
        ],
        "extra_state": {},
        "last_optimizer_state": None,
    }
    save_torch_atomic(state, out)
