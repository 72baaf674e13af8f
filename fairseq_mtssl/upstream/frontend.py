"""The conv front end of wav2vec 2.0-family models: geometry, frame rate, and padded batches.

A front end is a list of ``(channels, kernel, stride)`` convolutions over 16 kHz samples. HuBERT,
wav2vec 2.0 and data2vec derive an utterance's valid frames from a sample-level padding mask, each in
its own way (:func:`sample_padding_mask`). The ``default`` front end group-normalises over time, so a
frame depends on how much padding follows it (:func:`front_end_batchable`); one utterance of it can still
be padded, inside :func:`group_norm_over_valid_frames`. :func:`bucket_length` gives the padded lengths
that keep a corpus to a bounded set of shapes. On CPU, the ``layer_norm`` front end runs channels-last
(:class:`ChannelsLastFrontEnd`, installed by :func:`use_channels_last_front_end`).
"""

from contextlib import contextmanager
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.models.wav2vec.wav2vec2 import ConvFeatureExtractionModel

SAMPLE_RATE = 16000


def conv_layers_of(model: nn.Module) -> List[Tuple[int, int, int]]:
    """``[(channels, kernel, stride), ...]`` of a wav2vec 2.0-family model's conv front end."""
    convs = [next(m for m in block if isinstance(m, nn.Conv1d)) for block in model.feature_extractor.conv_layers]
    return [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs]


def conv_output_frames(num_samples: int, conv_layers: Sequence[Tuple[int, int, int]]) -> int:
    """Frames produced from ``num_samples`` samples by the convolutions ``[(dim, kernel, stride), ...]``."""
    n = num_samples
    for _, k, s in conv_layers:
        n = (n - k) // s + 1
    return max(n, 0)


def frame_rate_of(conv_layers: Sequence[Tuple[int, int, int]], sample_rate: int = SAMPLE_RATE) -> float:
    """Frames per second: the sample rate over the product of the strides (50 Hz for stride 320)."""
    return sample_rate / int(np.prod([s for _, _, s in conv_layers]))


def front_end_batchable(model: nn.Module) -> bool:
    """Whether padding leaves every valid frame unchanged: not so for a group-normalised front end."""
    return not any(isinstance(m, nn.GroupNorm) for m in model.feature_extractor.modules())


class ValidFramesGroupNorm(nn.Module):
    """A front end's group norm (over time) applied to the first ``frames`` frames only, the frames the
    unpadded utterance has, which then come out exactly as its unpadded forward gives them; the frames past
    them are zeros. No later valid frame depends on those: each conv frame sees only the frames below it,
    and the encoder masks the padding. ``(B, C, T) -> (B, C, T)``."""

    def __init__(self, norm: nn.GroupNorm, frames: int):
        super().__init__()
        self.norm, self.frames = norm, frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        valid = self.norm(x[..., : self.frames])
        return torch.cat([valid, valid.new_zeros(*x.shape[:-1], x.size(-1) - valid.size(-1))], dim=-1)


@contextmanager
def group_norm_over_valid_frames(model: nn.Module, num_samples: int):
    """Within the block, ``model``'s group-normed front end normalises over the frames of ``num_samples``
    samples only: one utterance of ``num_samples`` samples, zero-padded past its end (with the sample
    padding mask of :func:`sample_padding_mask`), then gives the frames of its unpadded forward, so a
    group-normed model can run at a bounded set of padded lengths too. No-op for other front ends."""
    swapped = []
    n = num_samples
    try:
        for block, layer in zip(model.feature_extractor.conv_layers, conv_layers_of(model)):
            n = conv_output_frames(n, [layer])
            for i, m in enumerate(block):
                if isinstance(m, nn.GroupNorm):
                    block[i] = ValidFramesGroupNorm(m, n)
                    swapped.append((block, i, m))
        yield
    finally:
        for block, i, m in swapped:
            block[i] = m


def _layer_norm_block(block: nn.Module) -> bool:
    """Whether ``block`` is one of fairseq's ``layer_norm`` front-end blocks:
    ``Sequential(Conv1d, Dropout, Sequential(TransposeLast, LayerNorm, TransposeLast), GELU)``."""
    if not (isinstance(block, nn.Sequential) and len(block) == 4):
        return False
    conv, drop, norm, act = block
    return (
        isinstance(conv, nn.Conv1d)
        and conv.padding == (0,)
        and conv.dilation == (1,)
        and conv.groups == 1
        and isinstance(drop, nn.Dropout)
        and isinstance(norm, nn.Sequential)
        and len(norm) == 3
        and isinstance(norm[1], nn.LayerNorm)
        and isinstance(act, nn.GELU)
        and act.approximate == "none"
    )


def _layer_norm_front_end(extractor: nn.Module) -> bool:
    """Whether ``extractor``'s blocks are all fairseq's ``layer_norm`` blocks (and there is one at least)."""
    blocks = getattr(extractor, "conv_layers", ())
    return len(blocks) > 0 and all(_layer_norm_block(b) for b in blocks)


class ChannelsLastFrontEnd(ConvFeatureExtractionModel):
    """fairseq's ``layer_norm`` conv front end, the same function of the same parameters, computed in
    ``(B, T, C)`` on CPU.

    fairseq convolves in ``(B, C, T)`` and transposes around every LayerNorm (over channels), so on CPU
    most of a tiny model's step goes into copying those transposes and into element-wise kernels over
    strided tensors. Here each convolution is a matmul over the unfolded windows ``(B, T', C * k)`` of a
    ``(B, T, C)`` tensor, the LayerNorm and GELU act on contiguous channels, and only the output is a
    transposed view, ``(B, C, T')`` as fairseq returns it. It takes over the extractor's ``conv_layers``
    (same parameters, same state-dict keys); CUDA input runs fairseq's own forward (cuDNN).
    """

    def __init__(self, extractor: ConvFeatureExtractionModel):
        nn.Module.__init__(self)
        if not _layer_norm_front_end(extractor):
            raise ValueError("ChannelsLastFrontEnd takes fairseq's layer_norm front end only")
        self.conv_layers = extractor.conv_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` samples -> ``(B, C, T)`` features."""
        if x.is_cuda:
            return super().forward(x)
        h = x.unsqueeze(-1)  # (B, S, 1)
        for conv, dropout, norm, act in self.conv_layers:
            windows = h.unfold(1, conv.kernel_size[0], conv.stride[0])  # (B, T', C, k), a view
            h = F.linear(windows.flatten(2), conv.weight.flatten(1), conv.bias)  # (B, T', C_out)
            h = dropout(h)
            ln = norm[1]  # fairseq's Fp32LayerNorm: normalised in float32, returned in the input's dtype
            h = F.layer_norm(h.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps).type_as(h)
            h = act(h)
        return h.transpose(1, 2)


def use_channels_last_front_end(model: nn.Module) -> int:
    """Replace every ``layer_norm`` conv front end inside ``model`` by a :class:`ChannelsLastFrontEnd` on
    the same parameters; other front ends (``default``: group norm) stay. Returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is ConvFeatureExtractionModel and _layer_norm_front_end(child):
                setattr(parent, name, ChannelsLastFrontEnd(child))
                replaced += 1
    return replaced


def hubert_sample_padding_mask(conv_layers, lengths: Sequence[int], total: int, device="cpu") -> torch.Tensor:
    """A sample-level mask ``(B, total)`` from which HuBERT derives exactly ``conv_output_frames(len)`` valid frames.

    HuBERT splits the mask into ``total // F`` blocks and keeps a frame unless its whole block is
    padding, which would let frames computed past an utterance's end into attention; so the mask
    starts at the block of the first frame the conv stack does not produce.
    """
    block = total // conv_output_frames(total, conv_layers)
    mask = torch.zeros(len(lengths), total, dtype=torch.bool, device=device)
    for i, n in enumerate(lengths):
        mask[i, conv_output_frames(n, conv_layers) * block :] = True
    return mask


def bucket_length(num_samples: int, per_octave: int = 8) -> int:
    """The length ``num_samples`` is zero-padded to when shapes should come from a small set: the next
    multiple of ``2 ** (floor(log2 n) - log2 per_octave)``, so at most ``1 / per_octave`` (12.5 %) is padding
    and a corpus of any size yields about ``per_octave`` shapes per octave of duration. (oneDNN builds and
    keeps kernels for every input shape it meets; one shape per utterance length makes a long dump's
    memory grow without bound, benchmarks/README.md.)"""
    if num_samples <= per_octave:
        return num_samples
    step = 2 ** (int(num_samples).bit_length() - 1 - int(per_octave).bit_length() + 1)
    return -(-num_samples // step) * step


def sample_padding_mask(model: nn.Module, lengths: Sequence[int], device="cpu", total=None) -> torch.Tensor:
    """``(B, total)`` mask (True = padding; ``total`` defaults to ``max(lengths)``) from which ``model``
    derives exactly ``conv_output_frames(len)`` valid frames: wav2vec 2.0 / data2vec count unmasked samples
    through the conv formula, HuBERT needs :func:`hubert_sample_padding_mask`."""
    from fairseq.models.hubert import HubertModel

    total = max(lengths) if total is None else total
    if isinstance(model, HubertModel):
        return hubert_sample_padding_mask(conv_layers_of(model), lengths, total, device)
    mask = torch.zeros(len(lengths), total, dtype=torch.bool, device=device)
    for i, n in enumerate(lengths):
        mask[i, n:] = True
    return mask


def batch_waveforms(
    waveforms: Sequence, normalize: bool = False, device="cpu", total=None
) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Zero-padded ``(B, T)`` batch of waveforms ``(T_i,)`` (numpy or torch), each layer-normed first when
    ``normalize`` (the task's ``normalize``); ``T`` is ``total`` or the longest; returns ``(source,
    padding (B, T) True past each end, lengths)``."""
    xs = [torch.as_tensor(np.asarray(w, dtype=np.float32) if not torch.is_tensor(w) else w) for w in waveforms]
    xs = [F.layer_norm(x, x.shape) if normalize else x for x in xs]
    lengths = [len(x) for x in xs]
    total = max(lengths) if total is None else total
    source = torch.zeros(len(xs), total, dtype=xs[0].dtype, device=device)
    padding = torch.ones(len(xs), total, dtype=torch.bool, device=device)
    for i, x in enumerate(xs):
        source[i, : len(x)] = x
        padding[i, : len(x)] = False
    return source, padding, lengths


def frames_of(model: nn.Module, num_samples: int) -> int:
    """Frames ``model`` produces from ``num_samples`` samples."""
    return conv_output_frames(num_samples, conv_layers_of(model))


__all__ = [
    "batch_waveforms",
    "bucket_length",
    "conv_layers_of",
    "conv_output_frames",
    "frame_rate_of",
    "frames_of",
    "front_end_batchable",
    "group_norm_over_valid_frames",
    "hubert_sample_padding_mask",
    "sample_padding_mask",
    "use_channels_last_front_end",
]
