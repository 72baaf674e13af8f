"""fairseq HuBERT checkpoints in and out of the plugin.

In: :func:`load_hubert` (:mod:`fairseq_mtssl.models.hubert_checkpoint`, re-exported here) reads an
official or self-trained fairseq HuBERT checkpoint safely and builds fairseq's ``HubertModel``.

Out: :func:`save_vanilla_hubert` writes a model's weights as a plain fairseq HuBERT checkpoint (model
``hubert``, task ``hubert_pretraining`` with its dictionaries): what fairseq, s3prl's ``hubert_local``
upstream and converters to other toolkits read.
"""

import torch

from ..atomic import save_torch_atomic
from ..models.hubert_checkpoint import NotAHubertCheckpoint, load_hubert

__all__ = ["NotAHubertCheckpoint", "load_hubert", "save_vanilla_hubert"]


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
