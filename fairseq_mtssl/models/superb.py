"""SUPERB downstream model as s3prl 0.4.18 runs it: frozen upstream, learnable weighted layer sum, CTC head.

Registered as ``superb_downstream``. The upstream (any checkpoint :func:`load_upstream` reads) stays
frozen and in eval mode; its hidden states (s3prl's list, :func:`fairseq_mtssl.upstream.hidden_states`)
are computed once per batch under ``no_grad``, or read from a feature cache (``task.features``). A softmax
over one weight per hidden state mixes them (s3prl's ``Featurizer``, ``upstream/interfaces.py``, no layer
norm before the sum: ``normalize=False``), then, as s3prl's downstream experts do:

- ``linear`` (phone recognition, ``downstream/ctc/libriphone.yaml`` + ``ctc/expert.py``): a projector
  ``Linear(D, 256)`` then s3prl's ``FrameLevel`` with no hidden layers, i.e. ``Linear(256, V)``; no
  activation, no dropout, no SpecAugment (the yaml's ``specaug`` block is commented out);
- ``bilstm`` (ASR, ``downstream/asr/config.yaml`` + ``asr/expert.py`` + ``asr/model.py``): SpecAugment on the
  weighted sum while training (time warp window 5, 4 feature masks < 50 dims, 2 time masks < 40 frames:
  ``downstream/specaug.py`` in the order it applies them), a projector ``Linear(D, 1024)``, 2 bidirectional
  LSTM layers of 1024 per direction each followed by dropout 0.2 (``RNNs``, no layer norm, no extra
  projection, no downsampling), then ``Linear(2048, V)``.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from omegaconf import MISSING

from ..upstream import hidden_states, load_upstream
from ..upstream.features import FeatureCacheError, read_meta
from ..upstream.readers import source_name

DOWNSTREAMS = ChoiceEnum(["linear", "bilstm"])
# s3prl's projector width per head: downstream/ctc/libriphone.yaml model.project_dim: 256 (PR),
# downstream/asr/config.yaml modelrc.project_dim: 1024 (ASR)
S3PRL_PROJECT_DIM = {"linear": 256, "bilstm": 1024}


@dataclass
class SuperbDownstreamConfig(FairseqDataclass):
    upstream_path: str = field(
        default=MISSING, metadata={"help": "upstream checkpoint (fairseq or plugin), frozen; 'mfcc': MFCC + deltas"}
    )
    downstream: DOWNSTREAMS = field(
        default="linear",
        metadata={"help": "linear: s3prl's PR head (ctc/libriphone.yaml); bilstm: s3prl's ASR head (asr/config.yaml)"},
    )
    project_dim: Optional[int] = field(
        default=None,
        metadata={
            "help": "width of the Linear projector between the weighted sum and the head (s3prl's project_dim); "
            "null: s3prl's value for the head, 256 for linear (ctc/libriphone.yaml) and 1024 for bilstm "
            "(asr/config.yaml); 0: no projector (not s3prl)"
        },
    )
    lstm_dim: int = field(
        default=1024,
        metadata={"help": "bilstm head: units per direction (s3prl asr/config.yaml RNNs.dim: [1024, 1024])"},
    )
    lstm_layers: int = field(
        default=2, metadata={"help": "bilstm head: LSTM layers (s3prl asr/config.yaml RNNs.dim has 2 entries)"}
    )
    dropout: float = field(
        default=0.2,
        metadata={
            "help": "bilstm head: dropout after each LSTM layer (s3prl asr/config.yaml RNNs.dropout: [0.2, 0.2]); "
            "the linear head has none (s3prl's FrameLevel)"
        },
    )
    time_warp_window: int = field(
        default=5,
        metadata={
            "help": "bilstm head, training: SpecAugment time warp window in frames, 0: no warp (s3prl "
            "asr/config.yaml specaug.time_warp_window: 5, bicubic as downstream/specaug.py)"
        },
    )
    time_masks: int = field(
        default=2, metadata={"help": "bilstm head, training: time masks per utterance (s3prl specaug.num_time_mask: 2)"}
    )
    time_mask_width: int = field(
        default=40,
        metadata={
            "help": "bilstm head, training: time mask widths are drawn from [0, this) frames "
            "(s3prl specaug.time_mask_width_range: [0, 40], torch.randint's exclusive upper bound)"
        },
    )
    freq_masks: int = field(
        default=4,
        metadata={"help": "bilstm head, training: feature masks per utterance (s3prl specaug.num_freq_mask: 4)"},
    )
    freq_mask_width: int = field(
        default=50,
        metadata={
            "help": "bilstm head, training: feature mask widths are drawn from [0, this) dims "
            "(s3prl specaug.freq_mask_width_range: [0, 50])"
        },
    )


class WeightedLayerSum(nn.Module):
    """``sum_l softmax(w)_l * h_l`` over hidden states ``[(B, T, C)] * L`` (weights start equal)."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_layers))

    def forward(self, states: List[torch.Tensor]) -> torch.Tensor:
        if len(states) != len(self.weights):
            raise ValueError(f"{len(states)} hidden states for {len(self.weights)} layer weights")
        w = F.softmax(self.weights, dim=0)
        return torch.einsum("l,lbtc->btc", w, torch.stack(states))

    def normalized(self) -> List[float]:
        return F.softmax(self.weights.detach(), 0).tolist()


def time_warp(x: torch.Tensor, lengths: torch.Tensor, window: int) -> torch.Tensor:
    """s3prl's ``TimeWarp`` (``downstream/specaug.py``) on ``x (B, T, C)``: each utterance's first
    ``lengths[i]`` frames split at a random ``center`` in ``[window, n - window)`` and the two parts
    resized (bicubic) so that the split lands at ``warped``, drawn from ``[center - window, center +
    window) + 1``; an utterance of ``n <= 2 window`` frames is left as it is; frames past the end are 0."""
    ys = x.new_zeros(x.shape)
    for i, n in enumerate(lengths.tolist()):
        y = x[i, :n]
        if n - window > window:
            center = int(torch.randint(window, n - window, (1,))[0])
            warped = int(torch.randint(center - window, center + window, (1,))[0]) + 1
            y4 = y[None, None]  # (1, 1, n, C)
            left = F.interpolate(y4[:, :, :center], (warped, y.size(1)), mode="bicubic", align_corners=False)
            right = F.interpolate(y4[:, :, center:], (n - warped, y.size(1)), mode="bicubic", align_corners=False)
            y = torch.cat([left, right], dim=2)[0, 0]
        ys[i, :n] = y
    return ys


def mask_along_axis(x: torch.Tensor, dim: int, num_masks: int, max_width: int) -> torch.Tensor:
    """s3prl's ``MaskAlongAxis`` (``downstream/specaug.py``, ``replace_with_zero``) on ``x (B, T, C)``,
    ``dim`` 1 (time) or 2 (features): per utterance ``num_masks`` stretches of width in ``[0, max_width)``,
    starting in ``[0, max(1, size - the batch's widest mask))``, set to 0 (new tensor)."""
    b, size = x.size(0), x.size(dim)
    width = torch.randint(0, max_width, (b, num_masks), device=x.device).unsqueeze(2)
    start = torch.randint(0, max(1, size - int(width.max())), (b, num_masks), device=x.device).unsqueeze(2)
    pos = torch.arange(size, device=x.device)[None, None, :]
    mask = ((start <= pos) & (pos < start + width)).any(dim=1)  # (B, size)
    return x.masked_fill(mask.unsqueeze(2) if dim == 1 else mask.unsqueeze(1), 0.0)


def spec_augment(
    x: torch.Tensor,
    lengths: torch.Tensor,
    warp_window: int,
    time_masks: int,
    time_width: int,
    freq_masks: int,
    freq_width: int,
) -> torch.Tensor:
    """s3prl's ``SpecAug`` on the weighted sum ``x (B, T, C)`` with ``lengths (B,)`` valid frames, in its
    order: time warp, feature masks, time masks (new tensor)."""
    if warp_window > 0:
        x = time_warp(x, lengths, warp_window)
    if freq_masks > 0:
        x = mask_along_axis(x, 2, freq_masks, freq_width)
    if time_masks > 0:
        x = mask_along_axis(x, 1, time_masks, time_width)
    return x


@register_model("superb_downstream", dataclass=SuperbDownstreamConfig)
class SuperbDownstreamModel(BaseFairseqModel):
    def __init__(self, cfg: SuperbDownstreamConfig, upstream: nn.Module, num_outputs: int):
        super().__init__()
        self.cfg = cfg
        self.upstream = upstream.eval().requires_grad_(False)
        dim = upstream.encoder.embedding_dim
        self.featurizer = WeightedLayerSum(len(upstream.encoder.layers) + 1)
        project_dim = S3PRL_PROJECT_DIM[cfg.downstream] if cfg.project_dim is None else cfg.project_dim
        self.projector = nn.Linear(dim, project_dim) if project_dim > 0 else nn.Identity()
        self._build_head(project_dim if project_dim > 0 else dim, num_outputs)

    def _build_head(self, dim: int, num_outputs: int) -> None:
        cfg = self.cfg
        if cfg.downstream == "bilstm":
            self.lstm = nn.LSTM(
                dim,
                cfg.lstm_dim,
                num_layers=cfg.lstm_layers,
                bidirectional=True,
                batch_first=True,
                dropout=cfg.dropout if cfg.lstm_layers > 1 else 0.0,  # after every layer but the last ...
            )
            # ... and after the last one here: s3prl's RNNLayer drops out each layer's output
            self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(2 * cfg.lstm_dim, num_outputs))
        else:
            self.lstm = None
            self.head = nn.Linear(dim, num_outputs)  # s3prl's FrameLevel without hiddens

    def upgrade_state_dict_named(self, state_dict, name):
        """A checkpoint written before the projector (the head read the weighted sum directly) loads as it
        was trained: no projector (``project_dim`` 0)."""
        super().upgrade_state_dict_named(state_dict, name)
        prefix = f"{name}." if name else ""
        if isinstance(self.projector, nn.Linear) and f"{prefix}projector.weight" not in state_dict:
            out = self.head[-1] if isinstance(self.head, nn.Sequential) else self.head
            self.projector = nn.Identity()
            self._build_head(self.upstream.encoder.embedding_dim, out.out_features)
            self.cfg.project_dim = 0

    @classmethod
    def build_model(cls, cfg: SuperbDownstreamConfig, task):
        upstream, normalize = load_upstream(cfg.upstream_path)
        if bool(task.cfg.normalize) != normalize:
            raise ValueError(
                f"task.normalize={task.cfg.normalize} but the upstream {cfg.upstream_path} was trained with "
                f"normalize={normalize}: set task.normalize={normalize}"
            )
        model = cls(cfg, upstream, len(task.target_dictionary))
        if getattr(task.cfg, "features", None):
            model.check_feature_caches(Path(task.cfg.features))
        return model

    def check_feature_caches(self, folder: Path) -> None:
        """Every split cached in ``folder`` (``task.features``) holds this upstream's every hidden state."""
        source = source_name(self.cfg.upstream_path)
        layers = list(range(len(self.featurizer.weights)))
        for meta_path in sorted(folder.glob("*/meta.json")):
            meta = read_meta(meta_path.parent)
            if meta["source"] != source or meta["layers"] != layers:
                raise FeatureCacheError(
                    f"{meta_path}: layers {meta['layers']} of {meta['source']}; the downstream needs layers "
                    f"{layers} of model.upstream_path {source}"
                )

    def train(self, mode: bool = True):
        super().train(mode)
        self.upstream.eval()  # frozen upstream: no dropout, no masking, ever
        return self

    def upstream_states(self, source: torch.Tensor, padding_mask):
        with torch.no_grad():
            return hidden_states(self.upstream, source, padding_mask)

    def forward(self, source=None, padding_mask=None, states=None, **kwargs) -> dict:
        """From audio ``source (B, T_samples)`` and its sample ``padding_mask``, or from the upstream's cached
        hidden ``states (B, L, T, C)`` (``task.features``) and their frame ``padding_mask (B, T)``."""
        if states is None:
            states, frame_mask = self.upstream_states(source, padding_mask)
        else:
            states, frame_mask = list(states.unbind(1)), padding_mask
        x = self.featurizer(states)
        lengths = (~frame_mask).sum(1) if frame_mask is not None else torch.full((x.size(0),), x.size(1))
        if self.lstm is not None and self.training:  # s3prl: SpecAugment before the projector
            c = self.cfg
            x = spec_augment(
                x, lengths, c.time_warp_window, c.time_masks, c.time_mask_width, c.freq_masks, c.freq_mask_width
            )
        x = self.projector(x)
        if self.lstm is not None:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            x, _ = self.lstm(packed)
            x, _ = nn.utils.rnn.pad_packed_sequence(x, batch_first=True, total_length=states[0].size(1))
        logits = self.head(x)
        return {"encoder_out": logits.transpose(0, 1), "encoder_padding_mask": frame_mask, "padding_mask": frame_mask}

    def get_normalized_probs(self, net_output, log_probs: bool, sample=None):
        logits = net_output["encoder_out"].float()
        return F.log_softmax(logits, dim=-1) if log_probs else F.softmax(logits, dim=-1)

    def get_logits(self, net_output):
        return net_output["encoder_out"]

    def layer_weights(self) -> List[float]:
        return self.featurizer.normalized()
