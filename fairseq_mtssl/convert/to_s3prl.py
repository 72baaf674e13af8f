"""A plain fairseq checkpoint in the layout s3prl's ``*_local`` upstreams load directly.

s3prl 0.4.18 reads its own converted format (``task_cfg``, ``model_cfg``, ``model_weight`` and, for
HuBERT, ``dictionaries_symbols``): ``hubert_local(path)``, ``wav2vec2_local(path)`` and
``data2vec_local(path)`` load it with no fairseq installed. (``hubert_local`` and ``wav2vec2_local``
also convert a fairseq checkpoint themselves with ``fairseq=True``; ``data2vec_local`` has no such
option.) s3prl's data2vec drops ``final_proj`` before loading and expects the ``_ema`` entry, which
it discards.
"""

from ..atomic import save_torch_atomic
from .to_transformers import family_of

UPSTREAM = {"hubert": "hubert_local", "wav2vec2": "wav2vec2_local", "data2vec_audio": "data2vec_local"}


def s3prl_state(plain_state: dict) -> dict:
    """s3prl's converted checkpoint from a plain fairseq checkpoint state (``cfg`` as a dict)."""
    from omegaconf import OmegaConf

    cfg = plain_state["cfg"]
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    family = family_of(cfg["model"]["_name"])
    weights = dict(plain_state["model"])
    out = {"task_cfg": dict(cfg["task"]), "model_cfg": dict(cfg["model"])}
    if family == "hubert":
        out["dictionaries_symbols"] = [list(d.symbols) for d in plain_state["task_state"]["dictionaries"]]
    if family == "data2vec_audio":
        weights = {k: v for k, v in weights.items() if not k.startswith("final_proj.")}
        weights.setdefault("_ema", {})
    out["model_weight"] = weights
    return out


def export_s3prl(plain_checkpoint, out) -> str:
    """Write ``out`` from a plain fairseq checkpoint; returns the s3prl upstream that loads it."""
    from ..upstream import read_checkpoint

    state = read_checkpoint(plain_checkpoint)  # weights-only; an ``args`` Namespace -> ``cfg``
    converted = s3prl_state(state)
    save_torch_atomic(converted, out)
    return UPSTREAM[family_of(converted["model_cfg"]["_name"])]
