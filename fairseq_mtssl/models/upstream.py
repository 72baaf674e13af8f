"""Frozen upstreams: any speech encoder checkpoint the plugin knows, and all of its hidden states.

``load_upstream(path)`` reads fairseq HuBERT / wav2vec 2.0 / data2vec checkpoints and the plugin's
MT4SSL (a data2vec), SCORE (its student HuBERT) and VGS+SSL (its wav2vec 2.0) checkpoints, and returns
the speech encoder in eval mode with gradients off. ``hidden_states`` runs it once and returns, as
s3prl's upstreams do, the input of the first transformer layer and every layer's output.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn as nn


def speech_encoder_of(model: nn.Module) -> nn.Module:
    """The fairseq HuBERT / wav2vec 2.0 / data2vec module inside a checkpoint's model."""
    from fairseq.examples.data2vec.models.data2vec_audio import Data2VecAudioModel
    from fairseq.models.hubert import HubertModel
    from fairseq.models.wav2vec import Wav2Vec2Model

    if hasattr(model, "speech_encoder"):  # plugin wrappers (SCORE's student, VGS+SSL's wav2vec 2.0)
        model = model.speech_encoder()
    if not isinstance(model, (HubertModel, Wav2Vec2Model, Data2VecAudioModel)):
        raise TypeError(f"{type(model).__name__} is not a HuBERT, wav2vec 2.0, data2vec or plugin speech model")
    return model


def load_upstream(path: str) -> Tuple[nn.Module, bool]:
    """``(frozen speech encoder in eval mode, whether its task normalised the waveform)``."""
    from ..kmeans.features import load_speech_model

    model, task_cfg = load_speech_model(path)
    encoder = speech_encoder_of(model).eval().requires_grad_(False)
    return encoder, bool(getattr(task_cfg, "normalize", False))


def hidden_states(
    encoder: nn.Module, source: torch.Tensor, padding_mask: Optional[torch.Tensor]
) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """``([L + 1] x (B, T, C), frame padding mask (B, T) or None)`` of a fairseq speech encoder:
    the first layer's input, then each layer's output (a pre-LN model's final norm not applied)."""
    from fairseq.models.hubert import HubertModel

    captured: List[torch.Tensor] = []
    layers = encoder.encoder.layers
    hooks = [layers[0].register_forward_pre_hook(lambda m, args: captured.append(args[0]))]
    hooks += [layer.register_forward_hook(lambda m, args, out: captured.append(out[0])) for layer in layers]
    try:
        if isinstance(encoder, HubertModel):
            x, frame_mask = encoder.extract_features(
                source, padding_mask=padding_mask, mask=False, output_layer=len(layers)
            )
        else:
            out = encoder.extract_features(source, padding_mask, mask=False, layer=len(layers) - 1)
            x, frame_mask = out["x"], out["padding_mask"]
    finally:
        for h in hooks:
            h.remove()
    t = x.size(1)  # layers may see a copy padded to a multiple of required_seq_len_multiple
    p = getattr(encoder.encoder, "prefix_tokens", 0)  # VGS+SSL's CLS token comes first; not a frame
    states = [h.transpose(0, 1)[:, p : p + t] for h in captured]
    if frame_mask is not None and not frame_mask.any():
        frame_mask = None
    return states, frame_mask
