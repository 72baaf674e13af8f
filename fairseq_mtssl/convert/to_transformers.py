"""A plain fairseq HuBERT / wav2vec 2.0 / data2vec-audio checkpoint as a Hugging Face transformers directory.

The transformers class is the one whose network is the checkpoint's:

- HuBERT -> ``HubertModel``;
- wav2vec 2.0, and data2vec with fairseq's single weight-normed positional convolution
  (``pos_conv_depth: 1``) -> ``Wav2Vec2Model`` (both front ends: ``feat_extract_norm`` ``group`` for
  ``extractor_mode: default``, ``layer`` for ``layer_norm``; ``do_stable_layer_norm`` for pre-LN,
  ``layer_norm_first``);
- data2vec with a stack of positional convolutions (``pos_conv_depth > 1``, data2vec's own recipe)
  -> ``Data2VecAudioModel``: ``num_conv_pos_embeddings`` layers of kernel ``conv_pos_kernel_size =
  max(3, conv_pos // pos_conv_depth)``, as fairseq builds them. transformers' data2vec has only the
  layer-normalised front end and post-LN layers; other combinations are refused.

``output_hidden_states`` then gives the first layer's input and each layer's output, and
``last_hidden_state`` the encoder output (a pre-LN model's final layer norm applied), as fairseq.
The pre-training heads (quantiser, projections, label embeddings, EMA teacher) are dropped. Every
export is checked: the fairseq and transformers models run one random waveform and must agree.

Beside the model, ``preprocessor_config.json`` (a ``Wav2Vec2FeatureExtractor``, what
``AutoFeatureExtractor`` loads) prepares raw 16 kHz audio as the checkpoint was trained
(:func:`feature_extractor_config`): ``do_normalize`` is the task's ``normalize`` (a model trained on
layer-normalised waveforms and fed raw audio gives other hidden states), ``return_attention_mask`` is
True for a layer-normalised front end only, as in Hugging Face's own wav2vec 2.0 / HuBERT / data2vec
configs. The directory is written whole or not at all.
"""

from dataclasses import fields
from typing import Dict, Tuple

import torch

from ..atomic import atomic_directory
from ..checkpoint_safety import load_checkpoint_safely
from ..errors import ExportError

# fairseq parameters with no counterpart in transformers' bare encoder classes
DROPPED = {
    "hubert": ("label_embs_concat", "final_proj."),
    "wav2vec2": ("quantizer.", "input_quantizer.", "project_q.", "project_inp.", "final_proj.", "target_glu."),
    "data2vec_audio": ("final_proj.", "_ema"),
}
VERIFY_TOLERANCE = 1e-4


class TransformersExportError(ExportError):
    pass


def family_of(model_name: str) -> str:
    """``hubert`` | ``wav2vec2`` | ``data2vec_audio`` for a plain fairseq model name."""
    if model_name.startswith("hubert"):
        return "hubert"
    if model_name in ("wav2vec2", "data2vec_audio"):
        return model_name
    raise TransformersExportError(f"model {model_name!r} is not a plain fairseq HuBERT, wav2vec2 or data2vec_audio")


def load_plain_trunk(path) -> Tuple[str, torch.nn.Module, dict]:
    """``(family, fairseq model in eval mode, checkpoint state)`` of a plain fairseq checkpoint."""
    from fairseq.examples.data2vec.models.data2vec_audio import Data2VecAudioConfig, Data2VecAudioModel
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model

    from ..checkpoint_safety import model_name
    from .hubert_checkpoint import load_hubert

    state = load_checkpoint_safely(path)
    family = family_of(model_name(state))
    if family == "hubert":
        model, state = load_hubert(path)
        return family, model, state
    dataclass, cls = {
        "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
        "data2vec_audio": (Data2VecAudioConfig, Data2VecAudioModel),
    }[family]
    names = {f.name for f in fields(dataclass)}
    model = cls(dataclass(**{k: v for k, v in state["cfg"]["model"].items() if k in names}))
    weights = {k: v for k, v in state["model"].items() if k != "_ema"}  # data2vec's teacher: not built here
    model.load_state_dict(weights, strict=True)
    return family, model.eval(), state


def _conv_geometry(model):
    convs = [block[0] for block in model.feature_extractor.conv_layers]
    return [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs]


def transformers_class_name(family: str, model_cfg) -> str:
    if family == "hubert":
        return "HubertModel"
    depth = int(model_cfg.get("pos_conv_depth", 1) or 1)
    if depth == 1:
        return "Wav2Vec2Model"
    if model_cfg.get("extractor_mode") != "layer_norm" or model_cfg.get("layer_norm_first"):
        raise TransformersExportError(
            f"pos_conv_depth={depth} (data2vec's positional conv stack) exists in transformers only as "
            "Data2VecAudioModel, which has the layer_norm front end and post-LN layers only; this model has "
            f"extractor_mode={model_cfg.get('extractor_mode')!r}, layer_norm_first={model_cfg.get('layer_norm_first')}"
        )
    return "Data2VecAudioModel"


def transformers_config(class_name: str, model_cfg, model) -> dict:
    """Keyword arguments of the transformers config equivalent to a fairseq model config; the conv
    geometry is read off the built model (the config holds it as a Python expression)."""
    for key, ok in (
        ("activation_fn", ("gelu", "relu")),
        ("layer_type", ("transformer",)),
        ("pos_enc_type", ("abs",)),
    ):
        value = model_cfg.get(key, ok[0])
        if value not in ok:
            raise TransformersExportError(f"{key}={value!r}: transformers' encoders support {ok} only")
    if model_cfg.get("conv_pos_batch_norm", False):
        raise TransformersExportError("conv_pos_batch_norm: not supported by the transformers export")
    conv = _conv_geometry(model)
    kw = dict(
        hidden_size=model_cfg["encoder_embed_dim"],
        num_hidden_layers=model_cfg["encoder_layers"],
        num_attention_heads=model_cfg["encoder_attention_heads"],
        intermediate_size=model_cfg["encoder_ffn_embed_dim"],
        hidden_act=model_cfg.get("activation_fn", "gelu"),
        feat_extract_activation="gelu",
        conv_dim=[c[0] for c in conv],
        conv_kernel=[c[1] for c in conv],
        conv_stride=[c[2] for c in conv],
        conv_bias=bool(model_cfg.get("conv_bias", False)),
        num_conv_pos_embedding_groups=model_cfg["conv_pos_groups"],
        layer_norm_eps=1e-5,
        hidden_dropout=model_cfg.get("dropout", 0.1),
        attention_dropout=model_cfg.get("attention_dropout", 0.1),
        activation_dropout=model_cfg.get("activation_dropout", 0.0),
        feat_proj_dropout=model_cfg.get("dropout_input", 0.0),
        layerdrop=model_cfg.get("encoder_layerdrop", 0.0),
        mask_time_prob=model_cfg.get("mask_prob", 0.65),
        mask_time_length=model_cfg.get("mask_length", 10),
    )
    if class_name == "Data2VecAudioModel":
        depth = int(model_cfg["pos_conv_depth"])
        kw.update(num_conv_pos_embeddings=depth, conv_pos_kernel_size=max(3, model_cfg["conv_pos"] // depth))
    else:
        kw.update(
            num_conv_pos_embeddings=model_cfg["conv_pos"],
            feat_extract_norm="layer" if model_cfg.get("extractor_mode") == "layer_norm" else "group",
            do_stable_layer_norm=bool(model_cfg.get("layer_norm_first", False)),
            apply_spec_augment=False,
        )
    if class_name == "HubertModel":
        kw.update(feat_proj_layer_norm=True)
    return kw


def _layer_names(i: int) -> Dict[str, str]:
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
    p = f"encoder.layers.{i}."
    return {f"{p}{a}.{w}": f"{p}{b}.{w}" for a, b in pairs.items() for w in ("weight", "bias")}


def transformers_names(fairseq_keys, hf_keys, n_conv: int, n_layers: int, extractor_mode: str, pos_depth: int):
    """fairseq name -> transformers name for the encoder's parameters (the three classes share them
    except for the positional convolution)."""
    names = {
        "layer_norm.weight": "feature_projection.layer_norm.weight",
        "layer_norm.bias": "feature_projection.layer_norm.bias",
        "post_extract_proj.weight": "feature_projection.projection.weight",
        "post_extract_proj.bias": "feature_projection.projection.bias",
        "mask_emb": "masked_spec_embed",
        "encoder.layer_norm.weight": "encoder.layer_norm.weight",
        "encoder.layer_norm.bias": "encoder.layer_norm.bias",
    }
    for i in range(n_conv):
        for p in ("weight", "bias"):
            names[f"feature_extractor.conv_layers.{i}.0.{p}"] = f"feature_extractor.conv_layers.{i}.conv.{p}"
            norm = f"{i}.2.1.{p}" if extractor_mode == "layer_norm" else f"{i}.2.{p}"
            names[f"feature_extractor.conv_layers.{norm}"] = f"feature_extractor.conv_layers.{i}.layer_norm.{p}"
    for i in range(n_layers):
        names.update(_layer_names(i))
    if pos_depth > 1:  # data2vec: Sequential(Conv1d, SamePad, TransposeLast, LayerNorm (no affine), ...) x depth
        for j in range(pos_depth):
            for p in ("weight", "bias"):
                names[f"encoder.pos_conv.{j}.0.{p}"] = f"encoder.pos_conv_embed.layers.{j}.conv.{p}"
    else:  # one weight-normed conv: old-style (weight_g, weight_v) or parametrizations in transformers
        prefix = "encoder.pos_conv_embed.conv."
        g = next(k for k in hf_keys if k.startswith(prefix) and k.endswith(("weight_g", "original0")))
        v = next(k for k in hf_keys if k.startswith(prefix) and k.endswith(("weight_v", "original1")))
        names.update(
            {
                "encoder.pos_conv.0.weight_g": g,
                "encoder.pos_conv.0.weight_v": v,
                "encoder.pos_conv.0.bias": prefix + "bias",
            }
        )
    return names


def transformers_state(family: str, model, model_cfg, hf_keys) -> Dict[str, torch.Tensor]:
    """The fairseq model's weights under transformers names; an identity projection where fairseq has
    none (conv width = encoder width)."""
    fairseq_state = {k: v for k, v in model.state_dict().items() if not k.startswith(DROPPED[family])}
    names = transformers_names(
        fairseq_state,
        hf_keys,
        len(model.feature_extractor.conv_layers),
        len(model.encoder.layers),
        model_cfg.get("extractor_mode", "default"),
        int(model_cfg.get("pos_conv_depth", 1) or 1) if family != "hubert" else 1,
    )
    out = {}
    for k, v in fairseq_state.items():
        if k not in names:
            raise TransformersExportError(f"no transformers name for fairseq parameter {k!r}")
        out[names[k]] = v.detach().clone()
    if getattr(model, "post_extract_proj", None) is None:
        dim = model.encoder.embedding_dim
        out["feature_projection.projection.weight"] = torch.eye(dim)
        out["feature_projection.projection.bias"] = torch.zeros(dim)
    return out


def fairseq_hidden_states(model, wav: torch.Tensor) -> torch.Tensor:
    """``(L + 2, B, T, C)``: the first layer's input, each layer's output, then the encoder output
    (which differs from the last layer's output in a pre-LN model only)."""
    from ..upstream import hidden_states
    from ..upstream.layers import run_encoder

    with torch.no_grad():
        states, _ = hidden_states(model, wav, None)  # s3prl's: layer inputs, then the encoder output
        last, _ = run_encoder(model, wav, None, len(model.encoder.layers))  # the last layer's own output
    return torch.stack([*states[:-1], last, states[-1]])


def transformers_hidden_states(hf, wav: torch.Tensor) -> torch.Tensor:
    """The same ``(L + 2, B, T, C)`` from a transformers model."""
    with torch.no_grad():
        out = hf(wav, output_hidden_states=True)
    return torch.stack([*out.hidden_states, out.last_hidden_state])


def feature_extractor_config(model, task_cfg) -> dict:
    """Keyword arguments of the ``Wav2Vec2FeatureExtractor`` that turns raw audio into what the fairseq
    ``model`` was trained on, with ``task_cfg`` its checkpoint's task config (a dict or an OmegaConf config).

    - ``do_normalize``: the task's ``normalize``, False when the task has none, as the plugin reads it
      (:func:`fairseq_mtssl.upstream.load_upstream`) and as s3prl does. transformers then normalises each
      utterance to zero mean and unit variance (over its own samples in a padded batch), as fairseq's
      ``F.layer_norm`` of the waveform does (up to the epsilon, 1e-7 against 1e-5: transformers' waveform is
      larger by a factor ``1 + 5e-6 / variance``).
    - ``return_attention_mask``: whether padding leaves an utterance's valid frames unchanged
      (:func:`fairseq_mtssl.upstream.front_end_batchable`): True for a layer-normalised front end
      (``extractor_mode: layer_norm``: Large models, data2vec), False for a group-normalised one (HuBERT /
      wav2vec 2.0 Base), which transformers' models are to be given unmasked zero-padded batches.
    """
    from ..upstream import front_end_batchable
    from ..upstream.frontend import SAMPLE_RATE

    return dict(
        feature_size=1,
        sampling_rate=SAMPLE_RATE,
        padding_value=0.0,
        do_normalize=bool((task_cfg or {}).get("normalize", False)),
        return_attention_mask=front_end_batchable(model),
    )


def build_transformers(family: str, model, model_cfg):
    """``(transformers model in eval mode, its class name)`` with ``model``'s weights."""
    import transformers

    class_name = transformers_class_name(family, model_cfg)
    cls = getattr(transformers, class_name)
    config_cls = getattr(transformers, class_name.replace("Model", "Config"))
    hf = cls(config_cls(**transformers_config(class_name, model_cfg, model))).eval()
    missing, unexpected = hf.load_state_dict(
        transformers_state(family, model, model_cfg, hf.state_dict().keys()), strict=False
    )
    if missing or unexpected:
        raise TransformersExportError(f"transformers {class_name}: missing {missing}, unexpected {unexpected}")
    return hf, class_name


def export_transformers(plain_checkpoint, out_dir, verify: bool = True, source=None) -> dict:
    """Write ``out_dir`` (``config.json`` and weights, via ``save_pretrained``, and the feature extractor's
    ``preprocessor_config.json``) from a plain fairseq checkpoint; returns ``{"class", "feature_extractor",
    "max_abs_diff"}``. The directory appears whole or not at all. Errors name ``source`` (the checkpoint
    the user gave) when given, else ``plain_checkpoint``."""
    from transformers import Wav2Vec2FeatureExtractor

    source = source or plain_checkpoint
    family, model, state = load_plain_trunk(plain_checkpoint)
    model_cfg = state["cfg"]["model"]
    try:
        hf, class_name = build_transformers(family, model, model_cfg)
    except TransformersExportError as err:
        raise TransformersExportError(f"{source}: {err}") from None
    extractor = feature_extractor_config(model, state["cfg"].get("task"))
    info = {
        "class": class_name,
        "feature_extractor": {k: extractor[k] for k in ("do_normalize", "return_attention_mask")},
    }
    if verify:
        wav = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
        diff = float((fairseq_hidden_states(model, wav) - transformers_hidden_states(hf, wav)).abs().max())
        if not diff < VERIFY_TOLERANCE:
            raise TransformersExportError(
                f"{source}: transformers {class_name} differs from fairseq by {diff:.2e} on a test input"
            )
        info["max_abs_diff"] = diff
    with atomic_directory(out_dir) as tmp:
        hf.save_pretrained(tmp)
        Wav2Vec2FeatureExtractor(**extractor).save_pretrained(tmp)
    return info
