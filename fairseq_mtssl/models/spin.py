"""SPIN (Chang, Liu & Glass, Interspeech 2023): speaker-invariant clustering, fine-tuning any fairseq upstream.

Registered as ``spin``. An utterance and its speaker-perturbed copy both go through the student (the
upstream started from ``upstream_path``: a fairseq HuBERT, wav2vec 2.0, data2vec-audio or the plugin's
MT4SSL), whose top ``trainable_layers`` transformer layers learn (the authors' ``freeze_layers: [pos, 0..10]``
on HuBERT Base: the conv front end, its LayerNorm and projection, the positional convolution and layers
1-10 stay frozen, and the front end runs without a graph). Every frame of the top layer's output goes
through ``head`` (the authors' ``DNN`` with ``hid_dims: [256]``: one ``Linear(768 -> 256)``, no activation),
L2 normalisation and ``codebook``, a ``Linear(proj_dim -> num_clusters)`` without bias whose rows are kept
at unit norm: its outputs are cosine similarities to K prototypes, which the ``spin`` criterion turns into
Sinkhorn targets and the swapped-prediction loss (:mod:`fairseq_mtssl.losses.spin`).

The codebook rows are renormalised at build, in :meth:`SpinModel.set_num_updates` (which fairseq's
``train_step`` calls before every forward) and by the ``spin_finetuning`` task right after every optimizer
step (:meth:`~fairseq_mtssl.tasks.spin_finetuning.SpinFinetuningTask.optimizer_step`), so every forward,
validation and checkpoint sees unit rows. (The authors renormalise in Lightning's ``on_before_zero_grad``,
which runs after the next forward, so their forwards see rows one Adam step off unit norm.)

The student is in train mode while training, dropout included, in its frozen layers too (as the authors'
Lightning module); LayerDrop is ``layerdrop`` (the authors set 0). Features are the top layer's output
(the authors' ``use_layer: 12``); a pre-LN model's final LayerNorm is not applied (nor trained).

Batching: with a ``layer_norm`` front end all 2B waveforms run as one padded batch; with the
group-normalised ``default`` front end (HuBERT Base), where padding would change every frame, the
waveforms run in groups of equal length without padding (an utterance and its copy always share one;
the authors pad instead).
"""

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.models import BaseFairseqModel, register_model

from .. import upstream
from ..upstream.layers import run_encoder
from .score import ContentFinetuneConfig, TrainableSetError, check_normalize

logger = logging.getLogger(__name__)


@dataclass
class SpinConfig(ContentFinetuneConfig):
    trainable_layers: int = field(
        default=2,
        metadata={
            "help": "top transformer layers of the upstream that train; everything below stays frozen (authors: 2)"
        },
    )
    num_clusters: int = field(
        default=256,
        metadata={"help": "codebook size K: unit-norm prototypes the frames are clustered into (authors: 256)"},
    )


@register_model("spin", dataclass=SpinConfig)
class SpinModel(BaseFairseqModel):
    def __init__(self, cfg: SpinConfig, student: nn.Module):
        super().__init__()
        n_layers = len(student.encoder.layers)
        if not 0 < cfg.trainable_layers <= n_layers:
            raise TrainableSetError(
                f"model.trainable_layers={cfg.trainable_layers} but the upstream has {n_layers} layers"
            )
        self.cfg = cfg
        self.student = student
        student.encoder.layerdrop = cfg.layerdrop
        self.first_trainable = n_layers - cfg.trainable_layers
        top = tuple(f"encoder.layers.{i}." for i in range(self.first_trainable, n_layers))
        for name, p in student.named_parameters():
            p.requires_grad_(name.startswith(top))
        student.feature_grad_mult = 0.0  # the conv front end runs under no_grad
        self.trainable: List[str] = [n for n, p in student.named_parameters() if p.requires_grad]
        self.head = nn.Linear(student.encoder.embedding_dim, cfg.proj_dim)
        self.codebook = nn.Linear(cfg.proj_dim, cfg.num_clusters, bias=False)
        self.normalize_codebook()
        self.batchable = upstream.front_end_batchable(student)
        self.num_updates = 0

    @classmethod
    def build_model(cls, cfg: SpinConfig, task=None):
        model, upstream_task = upstream.load_speech_model(cfg.upstream_path)
        check_normalize(cfg.upstream_path, upstream_task, task)
        try:
            return cls(cfg, upstream.speech_encoder_of(model))
        except TypeError as err:
            raise TypeError(f"{cfg.upstream_path}: {err}") from None

    @torch.no_grad()
    def normalize_codebook(self) -> None:
        """Every codebook row (prototype) to unit L2 norm, in place."""
        w = self.codebook.weight
        w.copy_(F.normalize(w.float(), dim=1).to(w.dtype))

    def set_num_updates(self, num_updates):
        """Renormalise the codebook (fairseq calls this before every training forward). Not passed on:
        data2vec's ``set_num_updates`` would build and step an EMA teacher."""
        self.num_updates = num_updates
        self.normalize_codebook()

    def _top_layer(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The top transformer layer's output ``(B, T, C)``; the frozen layers below the trainable ones run
        without an autograd graph."""
        model, k = self.student, self.first_trainable
        n_layers = len(model.encoder.layers)
        if k == 0 or not torch.is_grad_enabled():
            return run_encoder(model, x, padding_mask, n_layers)[0]
        with torch.no_grad():
            feats, frame_mask = run_encoder(model, x, padding_mask, k)
        h = feats.transpose(0, 1)  # (T, B, C), as fairseq's layers take it
        drop = model.encoder.layerdrop if model.training else 0.0
        for layer in model.encoder.layers[k:]:
            if drop == 0 or np.random.random() > drop:  # fairseq's LayerDrop rule
                h, _ = layer(h, self_attn_padding_mask=frame_mask, need_weights=False)
        return h.transpose(0, 1)

    def encode(self, sources: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Top-layer features ``(T_i, C)`` of each waveform ``(N_i,)``: one padded batch when the front end
        allows it, else groups of equal length."""
        model = self.student
        if self.batchable:
            groups = [list(range(len(sources)))]
        else:
            by_length: Dict[int, List[int]] = {}
            for i, s in enumerate(sources):
                by_length.setdefault(len(s), []).append(i)
            groups = list(by_length.values())
        outs: List[Optional[torch.Tensor]] = [None] * len(sources)
        for idx in groups:
            lengths = [len(sources[i]) for i in idx]
            if len(set(lengths)) == 1:
                x, mask = torch.stack([sources[i] for i in idx]), None
            else:
                x, _, _ = upstream.batch_waveforms([sources[i] for i in idx], device=sources[idx[0]].device)
                mask = upstream.sample_padding_mask(model, lengths, x.device)
            feats = self._top_layer(x, mask)
            for j, i in enumerate(idx):
                outs[i] = feats[j, : upstream.frontend.frames_of(model, lengths[j])]
        return outs

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Cosine similarities ``(N, K)`` of frames ``(N, C)`` (through the head, normalised) to the prototypes."""
        return self.codebook(F.normalize(self.head(feats), dim=-1))

    def forward(self, source: List[torch.Tensor], perturbed: List[torch.Tensor]) -> dict:
        """``source`` (originals) and ``perturbed`` (their copies, same lengths), lists of ``(N_i,)``, through the
        student: ``scores`` = (view 1, view 2), each ``(frames, K)`` with frame ``n`` of both views the same
        moment; ``frames`` = frames per utterance ``(B,)``."""
        if len(source) != len(perturbed) or any(len(a) != len(b) for a, b in zip(source, perturbed)):
            raise ValueError("every utterance and its perturbed copy must have the same number of samples")
        b = len(source)
        outs = self.encode(list(source) + list(perturbed))
        frames = torch.tensor([len(o) for o in outs[:b]], device=outs[0].device)
        return {
            "scores": (self.scores(torch.cat(outs[:b])), self.scores(torch.cat(outs[b:]))),
            "frames": frames,
        }

    def speech_encoder(self) -> nn.Module:
        """The fine-tuned upstream: what downstream evaluation uses."""
        return self.student
