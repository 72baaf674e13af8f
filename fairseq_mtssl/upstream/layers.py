"""Hidden states of every transformer layer of a fairseq speech encoder, captured with forward hooks.

:func:`hidden_states` returns s3prl's list for a fairseq model (s3prl 0.4.18 ``upstream/hubert/expert.py``
and ``upstream/wav2vec2/expert.py``: a forward hook on each of ``model.encoder.layers`` keeps the layer's
*input*, one on ``model.encoder`` keeps its *output*): the inputs of layers ``1..L``, then the encoder's
output. Layer ``0`` is the first layer's input (after positional convolution and, for a post-LN model,
the encoder's layer norm); entry ``k`` (``1 <= k < L``) is layer ``k``'s output; entry ``L`` is the
encoder output, which is layer ``L``'s output for a post-LN model and layer ``L``'s output *through the
encoder's final layer norm* for a pre-LN one (``layer_norm_first=True``: Large / XLS-R style models;
fairseq's ``TransformerEncoder.forward`` applies it when no target layer is given). The raw output of
layer ``L`` of a pre-LN model is what :func:`run_encoder` returns for ``layer=L``.

fairseq's layers take and return ``(T, B, C)``. An encoder with ``prefix_tokens`` (VGS+SSL's FaST-VGS+
CLS token, prepended to the frames) has them dropped.
"""

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn as nn


@contextlib.contextmanager
def record_layers(layers: nn.ModuleList, upto: Optional[int] = None) -> Iterator[List[torch.Tensor]]:
    """Within the block, every forward appends layer 0's input and then the outputs of layers
    ``1..upto`` (all by default), each ``(T, B, C)``, to the yielded list. Under LayerDrop a skipped
    layer records nothing, so the list's last entry is what the top recorded layer hands upward."""
    seen: List[torch.Tensor] = []
    upto = len(layers) if upto is None else upto
    hooks = [layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))]
    hooks += [layer.register_forward_hook(lambda m, args, out: seen.append(out[0])) for layer in layers[:upto]]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def run_encoder(
    encoder: nn.Module, source: torch.Tensor, padding_mask: Optional[torch.Tensor], layer: Optional[int] = None
):
    """``(output of transformer layer ``layer`` (1-based) (B, T, C), frame padding mask (B, T) or None)``,
    unmasked, for HuBERT, wav2vec 2.0 and data2vec alike; ``layer=None``: after every layer and, for a
    pre-LN model, the encoder's final norm."""
    from fairseq.models.hubert import HubertModel

    if isinstance(encoder, HubertModel):
        return encoder.extract_features(source, padding_mask=padding_mask, mask=False, output_layer=layer)
    out = encoder.extract_features(source, padding_mask, mask=False, layer=None if layer is None else layer - 1)
    return out["x"], out["padding_mask"]


def hidden_states(
    encoder: nn.Module, source: torch.Tensor, padding_mask: Optional[torch.Tensor]
) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """``([L + 1] x (B, T, C), frame padding mask (B, T) or None)`` of a fairseq speech encoder: s3prl's
    ``hidden_states`` (the inputs of layers 1..L, then the encoder output: a pre-LN model's final layer
    norm applied). Under LayerDrop a skipped layer records nothing (s3prl switches LayerDrop off; a
    frozen upstream in eval mode has none). An upstream that computes its own (``MfccUpstream``) is asked."""
    if hasattr(encoder, "hidden_states"):
        return encoder.hidden_states(source, padding_mask)
    layers = encoder.encoder.layers
    with record_layers(layers, upto=len(layers) - 1) as captured:
        x, frame_mask = run_encoder(encoder, source, padding_mask)  # all layers, then any final norm
    t = x.size(1)  # layers may see a copy padded to a multiple of required_seq_len_multiple
    p = getattr(encoder.encoder, "prefix_tokens", 0)  # a learned CLS token first (VGS+SSL's FaST-VGS+): not a frame
    states = [h.transpose(0, 1)[:, p : p + t] for h in captured] + [x]
    if frame_mask is not None and not frame_mask.any():
        frame_mask = None
    return states, frame_mask
