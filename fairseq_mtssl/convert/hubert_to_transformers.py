"""Export a fairseq HuBERT checkpoint as a Hugging Face transformers ``HubertModel`` directory.

    mtssl-export-transformers exported/hubert_score.pt exported/hubert_score_hf/

Reads any checkpoint :func:`~fairseq_mtssl.convert.hubert_checkpoint.load_hubert` accepts (official,
self-trained, or written by ``mtssl-export-hubert`` after SCORE) and writes ``config.json`` and the
weights with ``save_pretrained``; ``transformers.HubertModel.from_pretrained(dir)`` then gives the
same hidden states as fairseq (``output_hidden_states``: entry 0 is the encoder input after the
positional convolution and layer norm, entry ``i`` the output of layer ``i``). The training-only
parts (``label_embs_concat``, ``final_proj``) are dropped. The directory is written under a temporary
name and moved into place. transformers is only needed here, not by the plugin.
"""

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Dict

import torch

from ..errors import ExportError, cli
from ..upstream import conv_layers_of
from .hubert_checkpoint import load_hubert


class TransformersExportError(ExportError):
    pass


def transformers_hubert_config(model_cfg, model) -> dict:
    """HF ``HubertConfig`` keyword arguments equivalent to a fairseq ``HubertConfig``; the conv
    geometry is read off the built model's modules (the config holds it as a Python expression)."""
    conv = conv_layers_of(model)
    if model_cfg.activation_fn != "gelu":
        raise TransformersExportError(
            f"activation {model_cfg.activation_fn!r}: transformers' HuBERT export supports gelu only"
        )
    return dict(
        hidden_size=model_cfg.encoder_embed_dim,
        num_hidden_layers=model_cfg.encoder_layers,
        num_attention_heads=model_cfg.encoder_attention_heads,
        intermediate_size=model_cfg.encoder_ffn_embed_dim,
        hidden_act="gelu",
        feat_extract_activation="gelu",
        feat_extract_norm="layer" if model_cfg.extractor_mode == "layer_norm" else "group",
        conv_dim=[c[0] for c in conv],
        conv_kernel=[c[1] for c in conv],
        conv_stride=[c[2] for c in conv],
        conv_bias=bool(model_cfg.conv_bias),
        num_conv_pos_embeddings=model_cfg.conv_pos,
        num_conv_pos_embedding_groups=model_cfg.conv_pos_groups,
        do_stable_layer_norm=bool(model_cfg.layer_norm_first),
        feat_proj_layer_norm=True,
        layer_norm_eps=1e-5,
        hidden_dropout=model_cfg.dropout,
        attention_dropout=model_cfg.attention_dropout,
        activation_dropout=model_cfg.activation_dropout,
        feat_proj_dropout=model_cfg.dropout_input,
        layerdrop=model_cfg.encoder_layerdrop,
        mask_time_prob=model_cfg.mask_prob,
        mask_time_length=model_cfg.mask_length,
        apply_spec_augment=False,
    )


def _layer_keys(i: int) -> Dict[str, str]:
    ours, theirs = f"encoder.layers.{i}.", f"encoder.layers.{i}."
    pairs = {
        "self_attn.q_proj": "attention.q_proj",
        "self_attn.k_proj": "attention.k_proj",
        "self_attn.v_proj": "attention.v_proj",
        "self_attn.out_proj": "attention.out_proj",
        "self_attn_layer_norm": "layer_norm",
        "fc1": "feed_forward.intermediate_dense",
        "fc2": "feed_forward.output_dense",
        "final_layer_norm": "final_layer_norm",
    }
    return {f"{ours}{a}.{p}": f"{theirs}{b}.{p}" for a, b in pairs.items() for p in ("weight", "bias")}


def fairseq_to_transformers_state(
    fairseq_state: Dict[str, torch.Tensor], hf_keys, n_conv: int, n_layers: int, extractor_mode: str
) -> Dict[str, torch.Tensor]:
    """Rename a fairseq ``HubertModel`` state dict into transformers ``HubertModel`` names."""
    names = {
        "layer_norm.weight": "feature_projection.layer_norm.weight",
        "layer_norm.bias": "feature_projection.layer_norm.bias",
        "post_extract_proj.weight": "feature_projection.projection.weight",
        "post_extract_proj.bias": "feature_projection.projection.bias",
        "mask_emb": "masked_spec_embed",
        "encoder.layer_norm.weight": "encoder.layer_norm.weight",
        "encoder.layer_norm.bias": "encoder.layer_norm.bias",
        "encoder.pos_conv.0.bias": "encoder.pos_conv_embed.conv.bias",
    }
    for i in range(n_conv):
        for p in ("weight", "bias"):
            names[f"feature_extractor.conv_layers.{i}.0.{p}"] = f"feature_extractor.conv_layers.{i}.conv.{p}"
            norm = (
                f"feature_extractor.conv_layers.{i}.2.1.{p}"
                if extractor_mode == "layer_norm"
                else f"feature_extractor.conv_layers.{i}.2.{p}"
            )
            names[norm] = f"feature_extractor.conv_layers.{i}.layer_norm.{p}"
    for i in range(n_layers):
        names.update(_layer_keys(i))
    # the positional convolution's weight norm: old-style (weight_g, weight_v) or parametrizations
    g_key = next(
        k for k in hf_keys if k.startswith("encoder.pos_conv_embed.conv.") and k.endswith(("weight_g", "original0"))
    )
    v_key = next(
        k for k in hf_keys if k.startswith("encoder.pos_conv_embed.conv.") and k.endswith(("weight_v", "original1"))
    )
    names["encoder.pos_conv.0.weight_g"], names["encoder.pos_conv.0.weight_v"] = g_key, v_key

    dropped = ("label_embs_concat", "final_proj.")
    out = {}
    for k, v in fairseq_state.items():
        if k.startswith(dropped):
            continue
        if k not in names:
            raise TransformersExportError(f"no transformers name for fairseq parameter {k!r}")
        out[names[k]] = v.detach().clone()
    return out


def export_hubert_to_transformers(checkpoint, out_dir) -> Path:
    from transformers import HubertConfig, HubertModel

    model, state = load_hubert(checkpoint)  # load_hubert upgrades an ``args`` Namespace to ``cfg``
    cfg = state["cfg"].model
    if (
        cfg.get("conv_pos_batch_norm", False)
        or cfg.get("pos_enc_type", "abs") != "abs"
        or cfg.get("layer_type", "transformer") != "transformer"
    ):
        raise TransformersExportError(
            f"{checkpoint}: only the standard HuBERT encoder (transformer layers, absolute conv positions) exports"
        )
    hf_cfg = HubertConfig(**transformers_hubert_config(cfg, model))
    hf = HubertModel(hf_cfg).eval()
    state = fairseq_to_transformers_state(
        model.state_dict(),
        hf.state_dict().keys(),
        len(model.feature_extractor.conv_layers),
        len(model.encoder.layers),
        cfg.extractor_mode,
    )
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TransformersExportError(
            f"{checkpoint}: transformers HubertModel missing {missing}, unexpected {unexpected}"
        )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        hf.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a fairseq HuBERT checkpoint (e.g. written by mtssl-export-hubert)")
    p.add_argument("output_dir")
    a = p.parse_args(argv)
    print(export_hubert_to_transformers(a.checkpoint, a.output_dir))


if __name__ == "__main__":
    main()
