"""Upstream readers: what turns 16 kHz audio into frame features, in a registry (lhotse's extractors).

    reader = open_reader("mfcc")                       # or a checkpoint path
    states = reader.hidden_states(wav)                 # [(T, C)] * reader.num_layers
    frames = reader.at_layer(6)(wavs)                  # one layer of a batch, for k-means dumping

Every reader knows its geometry: ``frame_rate`` (frames per second), ``hop`` and ``window`` (samples between
frames and a frame's receptive field, so frame ``t`` covers samples ``hop * t .. hop * t + window``),
``num_layers`` (hidden states per utterance: MFCC 1, a model ``L + 1``, layer 0 the first transformer layer's
input as in s3prl) and ``dim``. :func:`open_reader` picks the reader of a checkpoint by the name its model
was registered under in fairseq (``cfg.model._name``): HuBERT, wav2vec 2.0, data2vec-audio, MT4SSL, SCORE,
LASER, SPIN read the speech encoder inside; a VGS+SSL model also embeds each utterance for retrieval.
``"mfcc"`` is the one name that is not a checkpoint, and this module its one home.
"""

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..errors import CheckpointLoadError, MtsslError
from . import mfcc as mfcc_lib
from .checkpoint import load_model_and_task, model_name, read_checkpoint, speech_encoder_of
from .frontend import (
    SAMPLE_RATE,
    batch_waveforms,
    bucket_length,
    conv_layers_of,
    conv_output_frames,
    frame_rate_of,
    front_end_batchable,
    group_norm_over_valid_frames,
    sample_padding_mask,
)
from .layers import hidden_states, run_encoder

MFCC = "mfcc"


class FeatureSpecError(MtsslError, ValueError):
    """A feature request that cannot be served (no such layer, no reader for the model)."""


def receptive_field(conv_layers: Sequence) -> int:
    """Samples one frame of the conv stack ``[(dim, kernel, stride), ...]`` reads (400 for wav2vec 2.0's)."""
    field, jump = 1, 1
    for _, kernel, stride in conv_layers:
        field += (kernel - 1) * jump
        jump *= stride
    return field


# ----------------------------------------------------------------------------- MFCC


class MfccReader:
    """HuBERT iteration-1 features: 39-dim Kaldi MFCC + deltas at 100 Hz, one "layer"."""

    name = MFCC
    frame_rate = mfcc_lib.FRAME_RATE
    hop = mfcc_lib.FRAME_SHIFT
    window = mfcc_lib.FRAME_LENGTH
    dim = mfcc_lib.FEATURE_DIM
    num_layers = 1
    source = MFCC

    def num_frames(self, num_samples: int) -> int:
        return mfcc_lib.num_frames(num_samples)

    def hidden_states(self, wav: np.ndarray) -> List[np.ndarray]:
        return [mfcc_lib.batch_mfcc([wav])[0]]

    def embedding(self, wav: np.ndarray) -> Optional[np.ndarray]:
        return None

    def at_layer(self, layer: Optional[int] = None) -> "MfccReader":
        if layer not in (None, 0):
            raise FeatureSpecError(f"MFCC features have one layer (0), not {layer}")
        return self

    def __call__(self, wavs: Sequence[np.ndarray]) -> List[np.ndarray]:
        # One utterance per call: each is already vectorised over its frames, and on a CPU padding a
        # batch to its longest member costs more than it saves (benchmarks/bench_labels.py).
        return [mfcc_lib.batch_mfcc([w])[0] for w in wavs]

    def spec(self) -> dict:
        """What these features are (recorded beside dumps and k-means models)."""
        return {"feature": MFCC, "dim": self.dim}


# ----------------------------------------------------------------------------- speech models


class ModelReader:
    """Every hidden state of the speech encoder inside a fairseq or plugin checkpoint, loaded once.

    One utterance per forward, zero-padded to :func:`~.frontend.bucket_length` with its padding mask, so a
    corpus of any size gives a bounded set of shapes and memory stays flat; a group-normed front end then
    normalises over the utterance's own frames only (:func:`~.frontend.group_norm_over_valid_frames`), so
    every frame equals the unpadded forward's. On a CPU one utterance at a time is also faster than a batch
    padded to its longest member (benchmarks/README.md, "model dump"). ``forwards`` counts the forwards."""

    def __init__(self, path, model: nn.Module, cfg, task, device: str = "cpu"):
        self.source = source_name(path)
        self.model_name = str(cfg.model._name)
        self.model = model
        try:
            self.encoder = speech_encoder_of(model).eval().requires_grad_(False).to(device)
        except TypeError as err:
            raise CheckpointLoadError(f"{path}: {err}") from None
        self.cfg, self.task_cfg = cfg, task.cfg
        self.normalize = bool(getattr(task.cfg, "normalize", False))
        self.device = device
        self.conv_layers = conv_layers_of(self.encoder)
        self.frame_rate = frame_rate_of(self.conv_layers)
        self.hop = int(SAMPLE_RATE / self.frame_rate)
        self.window = receptive_field(self.conv_layers)
        self.num_layers = len(self.encoder.encoder.layers) + 1
        self.dim = self.encoder.encoder.embedding_dim
        self.batchable = front_end_batchable(self.encoder)  # no group norm: padding alone changes no frame
        self.forwards = 0

    @property
    def name(self) -> str:
        return self.model_name

    def num_frames(self, num_samples: int) -> int:
        return conv_output_frames(num_samples, self.conv_layers)

    def _input(self, wav: np.ndarray):
        """``(frames, source (1, T'), sample padding mask or None, group-norm context)`` of one utterance."""
        n = len(wav)
        total = bucket_length(n)
        source, _, _ = batch_waveforms([wav], self.normalize, self.device, total=total)
        mask = sample_padding_mask(self.encoder, [n], self.device, total) if total > n else None
        return self.num_frames(n), source, mask, group_norm_over_valid_frames(self.encoder, n)

    @torch.inference_mode()
    def hidden_states(self, wav: np.ndarray) -> List[np.ndarray]:
        """``[layer 0, 1, ..., L]`` of one utterance ``(T_samples,)``, each ``(T, C)`` float32."""
        n, source, mask, context = self._input(wav)
        with context:
            states, _ = hidden_states(self.encoder, source, mask)
        self.forwards += 1
        return [h[0, :n].float().cpu().numpy() for h in states]

    def embedding(self, wav: np.ndarray) -> Optional[np.ndarray]:
        """An utterance-level embedding, for models that make one (see :class:`VgsReader`)."""
        return None

    def at_layer(self, layer: int) -> "LayerReader":
        """The reader of transformer layer ``layer`` (1-based) alone, for k-means dumps."""
        if not 1 <= layer < self.num_layers:
            raise FeatureSpecError(
                f"{self.source}: layer {layer} requested but the model has layers 1..{self.num_layers - 1}"
            )
        return LayerReader(self, layer)


class LayerReader:
    """One transformer layer of a :class:`ModelReader`: ``reader(wavs) -> [(T, C)]``, the forward stopping at
    that layer; what k-means dumping and labelling read."""

    name = "model"

    def __init__(self, model_reader: ModelReader, layer: int):
        self.reader, self.layer = model_reader, layer
        self.frame_rate, self.hop, self.window = model_reader.frame_rate, model_reader.hop, model_reader.window
        self.dim, self.batchable = model_reader.dim, model_reader.batchable
        self.checkpoint = model_reader.source

    def num_frames(self, num_samples: int) -> int:
        return self.reader.num_frames(num_samples)

    @torch.inference_mode()
    def __call__(self, wavs: Sequence[np.ndarray]) -> List[np.ndarray]:
        out: List[np.ndarray] = []
        for w in wavs:
            n, source, mask, context = self.reader._input(w)
            with context:
                x, _ = run_encoder(self.reader.encoder, source, mask, self.layer)
            self.reader.forwards += 1
            out.append(x[0, :n].float().cpu().numpy())
        return out

    def spec(self) -> dict:
        """What these features are (recorded beside dumps and k-means models)."""
        return {
            "feature": "model",
            "checkpoint": self.checkpoint,
            "checkpoint_bytes": Path(self.checkpoint).stat().st_size,
            "layer": self.layer,
            "dim": self.dim,
        }


class VgsReader(ModelReader):
    """A VGS+SSL model (``wav2vec2_vgs``): the wav2vec 2.0 trunk's hidden states, and from the same forward the
    caption embedding its audio head makes of layer ``vgs_layer`` (what retrieval scores)."""

    @torch.inference_mode()
    def hidden_states_and_embedding(self, wav: np.ndarray):
        from .layers import record_layers

        n, source, mask, context = self._input(wav)
        encoder = self.encoder.encoder
        with context, record_layers(encoder.layers) as seen:
            states, frame_mask = hidden_states(self.encoder, source, mask)
        self.forwards += 1
        # seen: this forward's [input of layer 1, outputs of layers 1..L] (hidden_states records its own
        # copy too); layer vgs_layer with its prefix (CLS) token, as the model's own forward hands it on
        h = seen[self.model.cfg.vgs_layer].transpose(0, 1)
        prefix = getattr(encoder, "prefix_tokens", 0)
        t = states[0].size(1)
        frames, cls = h[:, prefix : prefix + t], (h[:, 0] if prefix else None)
        emb = self.model._audio_embedding(frames, frame_mask, cls)
        return [s[0, :n].float().cpu().numpy() for s in states], emb[0].float().cpu().numpy()

    def embedding(self, wav: np.ndarray) -> np.ndarray:
        return self.hidden_states_and_embedding(wav)[1]

    @torch.inference_mode()
    def image_embeddings(self, feats: Sequence[np.ndarray]) -> np.ndarray:
        """``(M, E)`` from each image's region features ``(R, image_dim)``."""
        return torch.cat([self.model.embed_images(torch.tensor(f)[None]) for f in feats]).float().numpy()


# ----------------------------------------------------------------------------- registry

READERS: Dict[str, Callable[..., ModelReader]] = {}


def register_reader(*model_names: str):
    """Class decorator: the reader of checkpoints whose model is registered in fairseq as ``model_names``."""

    def wrap(cls):
        for name in model_names:
            if name in READERS:
                raise ValueError(f"a reader is already registered for model {name!r}")
            READERS[name] = cls
        return cls

    return wrap


register_reader("hubert", "wav2vec2", "data2vec_audio", "mt4ssl", "score", "score_hubert", "laser", "spin")(ModelReader)
register_reader("wav2vec2_vgs")(VgsReader)


def source_name(source: str) -> str:
    """How a reader of ``source`` names it (``reader.source``, a feature cache's ``meta.json``): ``"mfcc"``, or
    the checkpoint's absolute path."""
    return MFCC if str(source) == MFCC else str(Path(source).resolve())


def open_reader(source: str, device: str = "cpu"):
    """The reader of ``source``: ``"mfcc"``, or a checkpoint path (read once, safely)."""
    if str(source) == MFCC:
        return MfccReader()
    state = read_checkpoint(source)
    name = model_name(state)
    if name not in READERS:
        raise FeatureSpecError(f"{source}: no upstream reader for model {name!r} (readers: {sorted(READERS)})")
    model, cfg, task = load_model_and_task(source, state)
    return READERS[name](source, model, cfg, task, device)


def layer_reader(source: str, layer: Optional[int] = None, device: str = "cpu"):
    """A one-layer reader (``reader(wavs) -> [(T, C)]``): MFCC, or transformer layer ``layer`` of a checkpoint."""
    if str(source) != MFCC and not layer:
        raise FeatureSpecError(f"{source}: a model's features need a layer (>= 1)")
    return open_reader(source, device).at_layer(layer)


def make_reader(feature: str, checkpoint: Optional[str] = None, layer: Optional[int] = None, device: str = "cpu"):
    """The k-means tools' spelling (``--feature mfcc`` or ``--feature model --checkpoint C --layer L``)."""
    if feature == MFCC:
        return MfccReader()
    if feature == "model":
        if not checkpoint or not layer:
            raise FeatureSpecError("--feature model needs --checkpoint and --layer")
        return layer_reader(checkpoint, layer, device)
    raise FeatureSpecError(f"unknown feature {feature!r} ({MFCC} or model)")
