"""SUPERB-style downstream model: frozen upstream, learnable weighted layer sum, light CTC head.

Registered as ``superb_downstream``. The upstream (any checkpoint :func:`load_upstream` reads) stays
frozen and in eval mode; its hidden states are computed once per batch under ``no_grad``. A softmax
over one weight per hidden state mixes them (SUPERB's featurizer), and the head maps the mix to CTC
logits over the task's dictionary:

- ``linear``: one linear layer (phone recognition; ``hidden_dim`` > 0 adds a ReLU hidden layer of
  that size, as s3prl 0.4's PR problem does with 256);
- ``bilstm``: ``lstm_layers`` bidirectional LSTMs of ``lstm_dim`` per direction with dropout, then a
  linear layer (ASR, SUPERB: 2 x 1024, dropout 0.2), with SpecAugment-style masking while training.
"""

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from omegaconf import MISSING

from ..upstream import hidden_states, load_upstream

DOWNSTREAMS = ChoiceEnum(["linear", "bilstm"])


@dataclass
class SuperbDownstreamConfig(FairseqDataclass):
    upstream_path: str = field(default=MISSING, metadata={"help": "upstream checkpoint (fairseq or plugin), frozen"})
    downstream: DOWNSTREAMS = field(default="linear", metadata={"help": "linear (PR) or bilstm (ASR)"})
    hidden_dim: int = field(default=0, metadata={"help": "linear head: hidden ReLU layer size (0: none)"})
    lstm_dim: int = field(default=1024, metadata={"help": "bilstm head: units per direction"})
    lstm_layers: int = field(default=2, metadata={"help": "bilstm head: layers"})
    dropout: float = field(default=0.2, metadata={"help": "dropout in the head"})
    time_masks: int = field(default=2, metadata={"help": "bilstm head, training: time masks per utterance"})
    time_mask_width: int = field(default=40, metadata={"help": "bilstm head, training: max frames per time mask"})
    freq_masks: int = field(default=4, metadata={"help": "bilstm head, training: feature masks"})
    freq_mask_width: int = field(default=50, metadata={"help": "bilstm head, training: max features per mask"})


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


def spec_augment(x: torch.Tensor, time_masks: int, time_width: int, freq_masks: int, freq_width: int) -> torch.Tensor:
    """Zero random stretches of frames and of feature dimensions of ``x (B, T, C)`` (new tensor)."""
    x = x.clone()
    b, t, c = x.shape
    for i in range(b):
        for _ in range(time_masks):
            w = int(torch.randint(0, min(time_width, t) + 1, ()))
            s = int(torch.randint(0, t - w + 1, ()))
            x[i, s : s + w] = 0
        for _ in range(freq_masks):
            w = int(torch.randint(0, min(freq_width, c) + 1, ()))
            s = int(torch.randint(0, c - w + 1, ()))
            x[i, :, s : s + w] = 0
    return x


@register_model("superb_downstream", dataclass=SuperbDownstreamConfig)
class SuperbDownstreamModel(BaseFairseqModel):
    def __init__(self, cfg: SuperbDownstreamConfig, upstream: nn.Module, num_outputs: int):
        super().__init__()
        self.cfg = cfg
        self.upstream = upstream.eval().requires_grad_(False)
        dim = upstream.encoder.embedding_dim
        self.featurizer = WeightedLayerSum(len(upstream.encoder.layers) + 1)
        if cfg.downstream == "bilstm":
            self.lstm = nn.LSTM(
                dim,
                cfg.lstm_dim,
                num_layers=cfg.lstm_layers,
                bidirectional=True,
                batch_first=True,
                dropout=cfg.dropout if cfg.lstm_layers > 1 else 0.0,
            )
            self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(2 * cfg.lstm_dim, num_outputs))
        elif cfg.hidden_dim > 0:
            self.lstm = None
            self.head = nn.Sequential(
                nn.Linear(dim, cfg.hidden_dim),
                nn.ReLU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(cfg.hidden_dim, num_outputs),
            )
        else:
            self.lstm = None
            self.head = nn.Linear(dim, num_outputs)

    @classmethod
    def build_model(cls, cfg: SuperbDownstreamConfig, task):
        upstream, normalize = load_upstream(cfg.upstream_path)
        if bool(task.cfg.normalize) != normalize:
            raise ValueError(
                f"task.normalize={task.cfg.normalize} but the upstream {cfg.upstream_path} was trained with "
                f"normalize={normalize}: set task.normalize={normalize}"
            )
        return cls(cfg, upstream, len(task.target_dictionary))

    def train(self, mode: bool = True):
        super().train(mode)
        self.upstream.eval()  # frozen upstream: no dropout, no masking, ever
        return self

    def upstream_states(self, source: torch.Tensor, padding_mask):
        with torch.no_grad():
            return hidden_states(self.upstream, source, padding_mask)

    def forward(self, source: torch.Tensor, padding_mask=None, **kwargs) -> dict:
        states, frame_mask = self.upstream_states(source, padding_mask)
        x = self.featurizer(states)
        if self.lstm is not None:
            if self.training:
                c = self.cfg
                x = spec_augment(x, c.time_masks, c.time_mask_width, c.freq_masks, c.freq_mask_width)
            lengths = (~frame_mask).sum(1) if frame_mask is not None else torch.full((x.size(0),), x.size(1))
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
