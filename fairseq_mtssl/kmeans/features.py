"""Frame-level feature readers for k-means: MFCC (100 Hz) and a layer of a fairseq speech model (50 Hz).

A reader maps a list of 16 kHz waveforms ``(T_i,)`` to a list of ``(F_i, C)`` float32 arrays, one
utterance at a time (on a CPU a batch padded to its longest member costs more than it saves). What a speech model is as a feature
extractor (loading, front-end geometry, masks, layer capture) lives in :mod:`fairseq_mtssl.upstream`.
"""

import logging
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from .. import upstream
from ..errors import MtsslError
from . import mfcc as mfcc_lib

logger = logging.getLogger(__name__)


class FeatureSpecError(MtsslError, ValueError):
    """A feature request that cannot be served (no such layer, not a speech model)."""


class MfccReader:
    """HuBERT iteration-1 features: 39-dim Kaldi MFCC + deltas at 100 Hz."""

    name = "mfcc"
    frame_rate = mfcc_lib.FRAME_RATE
    dim = mfcc_lib.FEATURE_DIM

    def __call__(self, wavs: Sequence[np.ndarray]) -> List[np.ndarray]:
        # One utterance per call: each is already vectorised over its frames, and on a CPU padding a
        # batch to its longest member costs more than it saves (benchmarks/bench_labels.py).
        return [mfcc_lib.batch_mfcc([w])[0] for w in wavs]

    def spec(self) -> dict:
        """What these features are (recorded beside dumps and k-means models)."""
        return {"feature": "mfcc", "dim": self.dim}


class ModelLayerReader:
    """Hidden states after transformer layer ``layer`` (1-based) of a fairseq HuBERT, wav2vec 2.0,
    data2vec-audio or plugin (MT4SSL, SCORE, VGS+SSL) model."""

    name = "model"

    def __init__(self, checkpoint: str, layer: int, device: str = "cpu"):
        if layer < 1:
            raise FeatureSpecError(f"layer must be >= 1 (1-based transformer layer), got {layer}")
        self.checkpoint = str(Path(checkpoint).resolve())
        self.model, self.normalize = upstream.load_upstream(checkpoint)
        self.model.to(device)
        self.device = device
        self.layer = layer
        n_layers = len(self.model.encoder.layers)
        if layer > n_layers:
            raise FeatureSpecError(f"{checkpoint}: layer {layer} requested but the model has {n_layers} layers")
        self.conv_layers = upstream.conv_layers_of(self.model)
        self.frame_rate = upstream.frame_rate_of(self.conv_layers)
        self.dim = self.model.encoder.embedding_dim
        self.batchable = upstream.front_end_batchable(self.model)  # no group norm: padding alone changes no frame

    def spec(self) -> dict:
        """What these features are (recorded beside dumps and k-means models)."""
        size = Path(self.checkpoint).stat().st_size
        return {
            "feature": "model",
            "checkpoint": self.checkpoint,
            "checkpoint_bytes": size,
            "layer": self.layer,
            "dim": self.dim,
        }

    def num_frames(self, num_samples: int) -> int:
        return upstream.conv_output_frames(num_samples, self.conv_layers)

    def _inputs(self, wavs: Sequence[np.ndarray]):
        """``(frames, source (1, T), sample padding mask or None, context)`` for each utterance: one at a time,
        zero-padded to :func:`~fairseq_mtssl.upstream.bucket_length`, so that a corpus of any size gives a
        bounded set of shapes and memory stays flat; the forward runs inside ``context``, which makes a
        group-normed front end normalise over the utterance's own frames only. On a CPU one utterance at a
        time is also faster than a batch padded to its longest member (benchmarks/README.md, "model dump")."""
        for w in wavs:
            n = len(w)
            total = upstream.bucket_length(n)
            source, _, _ = upstream.batch_waveforms([w], self.normalize, self.device, total=total)
            mask = upstream.sample_padding_mask(self.model, [n], self.device, total) if total > n else None
            yield self.num_frames(n), source, mask, upstream.group_norm_over_valid_frames(self.model, n)

    @torch.inference_mode()
    def all_layers(self, wavs: Sequence[np.ndarray]) -> List[List[np.ndarray]]:
        """Per utterance ``[layer 0, 1, ..., L]`` (see :mod:`fairseq_mtssl.upstream.layers`), each ``(T, C)``."""
        out: List[List[np.ndarray]] = []
        for n, source, mask, context in self._inputs(wavs):
            with context:
                states, _ = upstream.hidden_states(self.model, source, mask)
            out.append([h[0, :n].float().cpu().numpy() for h in states])
        return out

    @torch.inference_mode()
    def __call__(self, wavs: Sequence[np.ndarray]) -> List[np.ndarray]:
        out: List[np.ndarray] = []
        for n, source, mask, context in self._inputs(wavs):
            with context:
                x, _ = upstream.layers.run_encoder(self.model, source, mask, self.layer)
            out.append(x[0, :n].float().cpu().numpy())
        return out


def make_reader(feature: str, checkpoint: Optional[str] = None, layer: Optional[int] = None, device: str = "cpu"):
    if feature == "mfcc":
        return MfccReader()
    if feature == "model":
        if not checkpoint or not layer:
            raise FeatureSpecError("--feature model needs --checkpoint and --layer")
        return ModelLayerReader(checkpoint, layer, device)
    raise FeatureSpecError(f"unknown feature {feature!r} (mfcc or model)")
