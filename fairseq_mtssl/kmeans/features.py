"""Frame-level feature readers for k-means: MFCC (100 Hz) and a layer of a fairseq speech model (50 Hz).

A reader maps a list of 16 kHz waveforms ``(T_i,)`` to a list of ``(F_i, C)`` float32 arrays,
batching internally where that cannot change any frame.
"""

import logging
from typing import List, Optional, Sequence

import numpy as np
import torch

from . import mfcc as mfcc_lib

logger = logging.getLogger(__name__)


class MfccReader:
    """HuBERT iteration-1 features: 39-dim Kaldi MFCC + deltas at 100 Hz."""

    name = "mfcc"
    frame_rate = mfcc_lib.FRAME_RATE
    dim = mfcc_lib.FEATURE_DIM
    batchable = True

    def __call__(self, wavs: Sequence[np.ndarray]) -> List[np.ndarray]:
        # One utterance per call: each is already vectorised over its frames, and on a CPU padding a
        # batch to its longest member costs more than it saves (benchmarks/bench_labels.py).
        return [mfcc_lib.batch_mfcc([w])[0] for w in wavs]


def conv_output_frames(num_samples: int, conv_layers) -> int:
    """Frames produced by a wav2vec 2.0 / HuBERT conv front end ``[(dim, kernel, stride), ...]``."""
    n = num_samples
    for _, k, s in conv_layers:
        n = (n - k) // s + 1
    return max(n, 0)


def conv_layers_of(model) -> list:
    """``[(channels, kernel, stride), ...]`` of a wav2vec 2.0-family model's conv front end."""
    convs = [next(m for m in block if isinstance(m, torch.nn.Conv1d)) for block in model.feature_extractor.conv_layers]
    return [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs]


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


def load_speech_model(checkpoint: str):
    """Load a fairseq HuBERT / wav2vec 2.0 (or plugin) checkpoint for feature extraction: ``(model, task_cfg)``."""
    from fairseq import checkpoint_utils

    import fairseq_mtssl  # noqa: F401  (registers the plugin's classes and the checkpoint allowlist)

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint])
    model = models[0].eval()
    return model, task.cfg


class ModelLayerReader:
    """Hidden states after transformer layer ``layer`` (1-based) of a fairseq HuBERT, wav2vec 2.0,
    data2vec-audio or MT4SSL model."""

    name = "model"
    batchable = True

    def __init__(self, checkpoint: str, layer: int, device: str = "cpu", max_chunk: int = 1_600_000):
        if layer < 1:
            raise ValueError(f"layer must be >= 1 (1-based transformer layer), got {layer}")
        from fairseq.examples.data2vec.models.data2vec_audio import Data2VecAudioModel
        from fairseq.models.hubert import HubertModel
        from fairseq.models.wav2vec import Wav2Vec2Model

        from ..models.upstream import speech_encoder_of

        model, task_cfg = load_speech_model(checkpoint)
        try:
            self.model = speech_encoder_of(model).eval().to(device)  # plugin wrappers: their speech encoder
        except TypeError as err:
            raise TypeError(f"{checkpoint}: {err}") from None
        self.device = device
        self.layer = layer
        self.max_chunk = max_chunk
        self.normalize = bool(getattr(task_cfg, "normalize", False))
        if isinstance(self.model, HubertModel):
            self._kind = "hubert"
        elif isinstance(self.model, (Wav2Vec2Model, Data2VecAudioModel)):  # incl. the plugin's MT4SSL
            self._kind = "wav2vec2"  # same extract_features(layer=0-based) and exact conv-length masks
        else:
            raise TypeError(f"{checkpoint}: {type(self.model).__name__} is not a HuBERT, wav2vec 2.0 or data2vec model")
        n_layers = len(self.model.encoder.layers)
        if layer > n_layers:
            raise ValueError(f"{checkpoint}: layer {layer} requested but the model has {n_layers} layers")
        extractor = self.model.feature_extractor
        self.conv_layers = conv_layers_of(self.model)
        self.frame_rate = 16000 / int(np.prod([s for _, _, s in self.conv_layers]))
        self.dim = self.model.encoder.embedding_dim
        # The "default" front end group-normalises over time, so a frame would depend on padding.
        self.batchable = not any(isinstance(m, torch.nn.GroupNorm) for m in extractor.modules())

    def num_frames(self, num_samples: int) -> int:
        return conv_output_frames(num_samples, self.conv_layers)

    def sample_padding_mask(self, lengths: Sequence[int]) -> torch.Tensor:
        """A sample-level mask ``(B, T)`` from which the model derives exactly ``num_frames(len)`` valid frames:
        wav2vec 2.0 / data2vec count unmasked samples through the conv formula, HuBERT needs
        :func:`hubert_sample_padding_mask`."""
        total = max(lengths)
        if self._kind == "hubert":
            return hubert_sample_padding_mask(self.conv_layers, lengths, total, self.device)
        mask = torch.zeros(len(lengths), total, dtype=torch.bool, device=self.device)
        for i, n in enumerate(lengths):
            mask[i, n:] = True
        return mask

    @torch.inference_mode()
    def _forward(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self._kind == "hubert":
            x, _ = self.model.extract_features(source, padding_mask=padding_mask, mask=False, output_layer=self.layer)
            return x
        return self.model.extract_features(source, padding_mask, mask=False, layer=self.layer - 1)["x"]

    def _prepare(self, wav: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(wav, dtype=np.float32)).to(self.device)
        if self.normalize:
            x = torch.nn.functional.layer_norm(x, x.shape)
        return x

    def all_layers(self, wavs: Sequence[np.ndarray]) -> List[List[np.ndarray]]:
        """Per utterance ``[layer 0, 1, ..., L]``: the input of the first transformer layer, then every
        layer's output (a pre-LN model's final layer norm not applied), each ``(T, C)``."""
        captured: List[torch.Tensor] = []
        layers = self.model.encoder.layers
        hooks = [layers[0].register_forward_pre_hook(lambda m, args: captured.append(args[0]))]
        hooks += [layer.register_forward_hook(lambda m, args, out: captured.append(out[0])) for layer in layers]
        saved, self.layer = self.layer, len(layers)
        try:
            per_layer = [[] for _ in range(len(layers) + 1)]
            for w in wavs if not self.batchable else [wavs]:
                batch = [w] if not self.batchable else list(w)
                captured.clear()
                self(batch)
                p = getattr(self.model.encoder, "prefix_tokens", 0)  # VGS+SSL's CLS token first: not a frame
                for k, h in enumerate(captured):  # (T, B, C), T possibly padded to a multiple
                    per_layer[k] += [
                        h[p : p + self.num_frames(len(x)), i].float().cpu().numpy() for i, x in enumerate(batch)
                    ]
        finally:
            self.layer = saved
            for h in hooks:
                h.remove()
        return [[per_layer[k][u] for k in range(len(per_layer))] for u in range(len(wavs))]

    def __call__(self, wavs: Sequence[np.ndarray]) -> List[np.ndarray]:
        if not self.batchable or len(wavs) == 1:
            return [self._forward(self._prepare(w)[None], None)[0].float().cpu().numpy() for w in wavs]
        lengths = [len(w) for w in wavs]
        source = torch.zeros(len(wavs), max(lengths), device=self.device)
        for i, w in enumerate(wavs):
            source[i, : len(w)] = self._prepare(w)
        padding_mask = self.sample_padding_mask(lengths)
        x = self._forward(source, padding_mask)
        return [x[i, : self.num_frames(n)].float().cpu().numpy() for i, n in enumerate(lengths)]


def make_reader(feature: str, checkpoint: Optional[str] = None, layer: Optional[int] = None, device: str = "cpu"):
    if feature == "mfcc":
        return MfccReader()
    if feature == "model":
        if not checkpoint or not layer:
            raise ValueError("--feature model needs --checkpoint and --layer")
        return ModelLayerReader(checkpoint, layer, device)
    raise ValueError(f"unknown feature {feature!r} (mfcc or model)")
