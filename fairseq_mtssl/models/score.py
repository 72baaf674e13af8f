"""SCORE (Meghanani & Hain, ICASSP 2024): self-supervised correspondence fine-tuning of HuBERT.

Registered as ``score_hubert``. A trainable HuBERT (the student, started from ``hubert_path``, only its
top ``trainable_layers`` transformer layers updated) encodes one utterance of a pair; a frozen copy of
the starting HuBERT (the teacher, no gradient, eval mode unless ``teacher_dropout``) encodes the
other. Both last-layer outputs go through one projection ``Linear(dim -> proj_dim)`` and L2
normalisation; the criterion compares them with the soft-DTW divergence. The projection and the
teacher are dropped after training (``mtssl-export-hubert``).

Batching: with HuBERT's ``layer_norm`` front end the pair sides are padded and run as batches; with
the group-normalised ``default`` front end (HuBERT Base), where padding would change every frame,
each utterance runs on its own.
"""

import copy
from dataclasses import dataclass, field
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from omegaconf import MISSING

from .. import upstream
from ..convert.hubert_checkpoint import load_hubert
from .weight_norm import detach_weight_norm_weights


@dataclass
class ScoreHubertConfig(FairseqDataclass):
    hubert_path: str = field(default=MISSING, metadata={"help": "fairseq HuBERT checkpoint to start from"})
    trainable_layers: int = field(default=2, metadata={"help": "top transformer layers of the student that train"})
    proj_dim: int = field(default=256, metadata={"help": "projection size before L2 normalisation"})
    teacher_dropout: bool = field(
        default=False, metadata={"help": "keep dropout on in the frozen teacher (as the authors' code)"}
    )


@register_model("score_hubert", dataclass=ScoreHubertConfig)
class ScoreHubertModel(BaseFairseqModel):
    def __init__(self, cfg: ScoreHubertConfig, student: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.student = student
        detach_weight_norm_weights(student)
        self.teacher = copy.deepcopy(student).requires_grad_(False).eval()
        n_layers = len(student.encoder.layers)
        if not 0 < cfg.trainable_layers <= n_layers:
            raise ValueError(f"trainable_layers={cfg.trainable_layers} but the HuBERT has {n_layers} layers")
        self.student.requires_grad_(False)
        for layer in student.encoder.layers[n_layers - cfg.trainable_layers :]:
            layer.requires_grad_(True)
        self.proj = nn.Linear(student.encoder.embedding_dim, cfg.proj_dim)
        self.batchable = upstream.front_end_batchable(student)

    @classmethod
    def build_model(cls, cfg: ScoreHubertConfig, task=None):
        student, _ = load_hubert(cfg.hubert_path)
        return cls(cfg, student)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.train(mode and self.cfg.teacher_dropout)
        return self

    def _extract(self, model, x: torch.Tensor, padding_mask) -> torch.Tensor:
        """Last-layer output ``(B, T, C)``. For the student, the frozen bottom (front end and all but
        the top ``trainable_layers``) runs without an autograd graph; only the top layers record one."""
        n_frozen = len(model.encoder.layers) - self.cfg.trainable_layers
        if model is self.teacher or n_frozen == 0 or not torch.is_grad_enabled():
            return model.extract_features(x, padding_mask=padding_mask, mask=False)[0]
        with torch.no_grad():
            feats, frame_mask = model.extract_features(x, padding_mask=padding_mask, mask=False, output_layer=n_frozen)
        h = feats.transpose(0, 1)  # (T, B, C), as fairseq's layers take it
        for layer in model.encoder.layers[n_frozen:]:
            h, _ = layer(h, self_attn_padding_mask=frame_mask, need_weights=False)
        if model.encoder.layer_norm_first:
            h = model.encoder.layer_norm(h)
        return h.transpose(0, 1)

    def _encode(self, model, sources: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Last-layer outputs ``(B, T, C)`` of padded or one-at-a-time inputs and frame lengths ``(B,)``."""
        if self.batchable and len(sources) > 1:
            x, _, lengths = upstream.batch_waveforms(sources, device=sources[0].device)
            mask = upstream.sample_padding_mask(model, lengths, x.device)
            frames = [upstream.frontend.frames_of(model, n) for n in lengths]
            feats = self._extract(model, x, mask)
        else:
            outs = [self._extract(model, s[None], None)[0] for s in sources]
            frames = [len(o) for o in outs]
            feats = nn.utils.rnn.pad_sequence(outs, batch_first=True)
        return feats, torch.tensor(frames, device=feats.device)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(x), dim=-1)

    def forward(self, source: List[torch.Tensor], target_source: List[torch.Tensor]) -> dict:
        """``source`` through the student, ``target_source`` through the teacher (lists of ``(T_i,)``)."""
        x, len_x = self._encode(self.student, source)
        with torch.no_grad():
            y, len_y = self._encode(self.teacher, target_source)
        return {
            "student": self.project(x),
            "student_lengths": len_x,
            "teacher": self.project(y),
            "teacher_lengths": len_y,
        }

    def speech_encoder(self) -> nn.Module:
        """The student HuBERT: what downstream evaluation and export use."""
        return self.student
