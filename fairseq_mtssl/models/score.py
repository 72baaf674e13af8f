"""SCORE (Meghanani & Hain, ICASSP 2024): self-supervised correspondence fine-tuning of any fairseq upstream.

Registered as ``score``: a trainable copy of the upstream (the student, started from ``upstream_path``:
a fairseq HuBERT, wav2vec 2.0, data2vec-audio or the plugin's MT4SSL checkpoint) encodes one utterance
of a pair; a frozen copy of the start (the teacher, no gradient, eval mode unless ``teacher_dropout``)
encodes the other. Both last-layer outputs go through one projection ``Linear(dim -> proj_dim)`` and
L2 normalisation; the criterion compares them with the soft-DTW divergence. The projection and the
teacher are dropped at export (``mtssl-export-score``), which writes the upstream's own fairseq format.

What trains is ``trainable``, a list of parameter names or name prefixes of the upstream (negative
layer indices count from the top: ``encoder.layers.-1`` is the last layer). The default is the
authors' set, read off their freeze-by-position code (``runner_part_freeze_layers.py`` on s3prl's
``hubert_base``): the top 2 transformer layers, ``encoder.layer_norm`` (which a post-LN model such as
HuBERT Base applies *before* its first layer) and the front end's ``layer_norm`` (after the conv
features) -- both reached by gradients through the frozen layers -- plus ``final_proj`` and
``mask_emb`` (and HuBERT's ``label_embs_concat``), which feature extraction never uses. A named
parameter that SCORE's loss cannot reach would not change in training, and torch's DDP (fairseq's
default ``c10d`` backend, no ``find_unused_parameters``) stops at the second update on it; so a dry
forward and backward at build time (:meth:`ScoreModel.unreached_parameters`, a few frames of a
fixed input) finds them, they stay frozen (``requires_grad`` False), and one log line names them
(:attr:`ScoreModel.gradless`). The conv feature extractor runs without a graph unless one of its
parameters trains (s3prl sets ``feature_grad_mult = 0``); the frozen bottom runs without a graph up
to the lowest trainable layer when nothing below that layer trains. LayerDrop is ``layerdrop``
(default 0, as s3prl sets it) in both student and teacher.

``score_hubert`` (the earlier name: ``hubert_path``, top ``trainable_layers`` layers only) is kept so
older checkpoints still load.

Batching: with a ``layer_norm`` front end the pair sides are padded and run as batches; with the
group-normalised ``default`` front end (HuBERT Base, wav2vec 2.0 Base), where padding would change
every frame, each utterance runs on its own.
"""

import copy
import logging
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from omegaconf import MISSING

from .. import upstream
from ..errors import MtsslError
from ..upstream.layers import run_encoder
from .weight_norm import detach_weight_norm_weights

logger = logging.getLogger(__name__)

# The authors' trainable set in names that every supported upstream has (HuBERT adds label_embs_concat).
AUTHORS_TRAINABLE = [
    "encoder.layers.-2",
    "encoder.layers.-1",
    "encoder.layer_norm",
    "layer_norm",
    "final_proj",
    "mask_emb",
]
# Parameters that feature extraction does not use (pre-training heads, quantiser, mask embedding).
NOT_IN_FEATURE_PATH = ("mask_emb", "final_proj", "label_embs_concat", "quantizer", "project_q", "project_inp",
                       "target_glu", "offline_heads")  # fmt: skip


class TrainableSetError(MtsslError, ValueError):
    """A ``model.trainable`` entry that names nothing, or a set of which nothing would learn."""


@dataclass
class ContentFinetuneConfig(FairseqDataclass):
    """What SCORE, LASER and SPIN share: the upstream they fine-tune, the head's size, LayerDrop."""

    upstream_path: str = field(
        default=MISSING,
        metadata={
            "help": "fairseq checkpoint to start from: HuBERT, wav2vec 2.0, data2vec-audio or the plugin's MT4SSL"
        },
    )
    proj_dim: int = field(
        default=256, metadata={"help": "output size of the linear head before L2 normalisation (authors: 256)"}
    )
    layerdrop: float = field(
        default=0.0, metadata={"help": "LayerDrop of the upstream's transformer (SCORE's teacher too; s3prl sets 0)"}
    )


@dataclass
class ScoreConfig(ContentFinetuneConfig):
    trainable: List[str] = field(
        default_factory=lambda: list(AUTHORS_TRAINABLE),
        metadata={
            "help": "parameter names / prefixes of the upstream that train (encoder.layers.-1 = the top layer); "
            "default: the authors' set (top 2 layers, encoder.layer_norm, layer_norm, final_proj, mask_emb); "
            "named parameters that SCORE's loss cannot reach (final_proj, mask_emb) stay frozen and are logged"
        },
    )
    teacher_dropout: bool = field(
        default=False, metadata={"help": "keep dropout on in the frozen teacher (as the authors' code)"}
    )


def resolve_trainable(model: nn.Module, entries: Sequence[str]) -> List[str]:
    """Names of ``model``'s parameters that ``entries`` select (exact name or ``prefix.``), in model order.

    ``encoder.layers.-k`` is the k-th layer from the top. An entry that selects nothing is an error."""
    n_layers = len(model.encoder.layers)
    names = [n for n, _ in model.named_parameters()]
    chosen = set()
    for entry in entries:
        m = re.fullmatch(r"encoder\.layers\.(-?\d+)((?:\..+)?)", entry)
        resolved = entry
        if m:
            i = int(m.group(1))
            if not -n_layers <= i < n_layers:
                raise TrainableSetError(f"model.trainable: {entry!r} but the upstream has {n_layers} layers")
            resolved = f"encoder.layers.{i % n_layers}{m.group(2)}"
        hits = [n for n in names if n == resolved or n.startswith(resolved + ".")]
        if not hits:
            raise TrainableSetError(
                f"model.trainable: {entry!r} names no parameter of the {type(model).__name__} "
                f"(top-level names: {sorted({n.split('.')[0] for n in names})})"
            )
        chosen.update(hits)
    if not chosen:
        raise TrainableSetError("model.trainable is empty: nothing would train")
    return [n for n in names if n in chosen]


def graph_start(model: nn.Module, trainable: Sequence[str]) -> Tuple[bool, Optional[int]]:
    """Where the student's autograd graph has to start, for the parameters ``trainable``.

    Returns ``(conv front end trains, first layer with a graph)``: the layer index ``k`` when only
    layers ``>= k`` (and parameters outside feature extraction, or a pre-LN model's final norm) train,
    so layers ``< k`` can run without a graph; ``None`` when something before the first layer trains
    (the front end's ``layer_norm``, ``post_extract_proj``, ``encoder.pos_conv``, a post-LN model's
    ``encoder.layer_norm``), so the whole encoder needs one."""
    conv = any(n.startswith("feature_extractor.") for n in trainable)
    lowest = len(model.encoder.layers)
    front = conv
    for n in trainable:
        m = re.match(r"encoder\.layers\.(\d+)\.", n)
        if m:
            lowest = min(lowest, int(m.group(1)))
        elif n.startswith("encoder.layer_norm.") and model.encoder.layer_norm_first:
            pass  # applied after the last layer
        elif not n.startswith(NOT_IN_FEATURE_PATH):
            front = True
    return conv, None if front else lowest


def dry_run_samples(model: nn.Module, frames: int = 4) -> int:
    """The fewest samples from which ``model``'s conv front end makes ``frames`` frames (720 for 2 frames
    of the 50 Hz, 400-sample-receptive-field front end)."""
    n = frames
    for _, kernel, stride in reversed(upstream.conv_layers_of(model)):
        n = (n - 1) * stride + kernel
    return n


def module_names(names: Sequence[str]) -> List[str]:
    """Parameter names shortened to their modules, in order, once each (``final_proj.weight``,
    ``final_proj.bias``, ``mask_emb`` -> ``final_proj``, ``mask_emb``)."""
    return list(dict.fromkeys(n.rsplit(".", 1)[0] if "." in n else n for n in names))


class UpstreamMismatch(MtsslError, ValueError):
    """The SCORE task would feed the upstream differently from how it was trained."""


def check_normalize(path: str, upstream_task_cfg, task) -> None:
    """Refuse a ``task.normalize`` that differs from the upstream's own (every frame would shift)."""
    want = bool(getattr(upstream_task_cfg, "normalize", False))
    have = getattr(getattr(task, "cfg", None), "normalize", None)
    if have is not None and bool(have) != want:
        raise UpstreamMismatch(f"{path}: the upstream was trained with normalize={want} but task.normalize={have}")


# (B, T, C) after the first n layers (all, and a pre-LN model's final norm, when None)
features_after = run_encoder


@register_model("score", dataclass=ScoreConfig)
class ScoreModel(BaseFairseqModel):
    method = "SCORE"  # in messages
    with_teacher = True  # a frozen copy of the start encodes the other side of each pair

    def __init__(self, cfg: ScoreConfig, student: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.student = student
        detach_weight_norm_weights(student)
        student.encoder.layerdrop = cfg.layerdrop
        self.teacher = copy.deepcopy(student).requires_grad_(False).eval() if self.with_teacher else None
        named = resolve_trainable(student, self.trainable_entries())
        self._set_trainable(named)
        self.proj = nn.Linear(student.encoder.embedding_dim, cfg.proj_dim)
        self.batchable = upstream.front_end_batchable(student)
        # named in model.trainable but out of reach of the loss: left frozen (DDP refuses them)
        self.gradless: List[str] = self.unreached_parameters()
        if self.gradless:
            logger.info(
                "model.trainable names %s, which get no gradient in %s's forward: left frozen",
                ", ".join(module_names(self.gradless)),
                self.method,
            )
            unreached = set(self.gradless)
            named = [n for n in named if n not in unreached]
            if not named:
                raise TrainableSetError(
                    f"model.trainable {self.trainable_entries()}: none of it gets a gradient in {self.method}'s forward"
                )
            self._set_trainable(named)
        self.trainable: List[str] = named

    def _set_trainable(self, names: Sequence[str]) -> None:
        """Exactly ``names`` of the student learn; where its autograd graph starts follows from them."""
        chosen = set(names)
        for name, p in self.student.named_parameters():
            p.requires_grad_(name in chosen)
        conv, self.first_graph_layer = graph_start(self.student, names)
        if not conv:
            self.student.feature_grad_mult = 0.0  # the conv front end runs under no_grad (as s3prl sets it)
        elif self.student.feature_grad_mult <= 0:
            self.student.feature_grad_mult = 1.0

    def unreached_parameters(self) -> List[str]:
        """Names of the student's parameters with ``requires_grad`` that SCORE's loss does not reach, in
        model order: a dry forward of a fixed ``(dry_run_samples,)`` input through the student and the
        projection, then ``autograd.grad(..., allow_unused=True)``, which gives None for a parameter outside
        the graph. Run in eval mode (no dropout, no LayerDrop); every module's mode and numpy's random state
        are left as they were, and no ``.grad`` is written."""
        params = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]
        if not params:
            return []
        ref = self.proj.weight
        x = torch.randn(dry_run_samples(self.student), generator=torch.Generator().manual_seed(0))
        modes, np_state = [(m, m.training) for m in self.modules()], np.random.get_state()
        try:
            self.eval()
            with torch.enable_grad():
                feats, _ = self._encode(self.student, [x.to(device=ref.device, dtype=ref.dtype)])
                grads = torch.autograd.grad(self.project(feats).sum(), [p for _, p in params], allow_unused=True)
        finally:
            for m, mode in modes:
                m.training = mode
            np.random.set_state(np_state)
        return [n for (n, _), g in zip(params, grads) if g is None]

    def trainable_entries(self) -> List[str]:
        return list(self.cfg.trainable)

    @classmethod
    def build_model(cls, cfg: ScoreConfig, task=None):
        model, upstream_task = upstream.load_speech_model(cfg.upstream_path)
        check_normalize(cfg.upstream_path, upstream_task, task)
        try:
            return cls(cfg, upstream.speech_encoder_of(model))
        except TypeError as err:
            raise TypeError(f"{cfg.upstream_path}: {err}") from None

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.train(mode and self.cfg.teacher_dropout)
        return self

    def set_num_updates(self, num_updates):
        """Kept here: passed on, data2vec's ``set_num_updates`` would build and step an EMA teacher."""
        self.num_updates = num_updates

    def _extract(self, model, x: torch.Tensor, padding_mask) -> torch.Tensor:
        """Last-layer output ``(B, T, C)``. For the student, layers below ``first_graph_layer`` (and the
        conv front end unless it trains) run without an autograd graph."""
        k = self.first_graph_layer
        if model is self.teacher or not k or not torch.is_grad_enabled():
            return features_after(model, x, padding_mask)[0]
        with torch.no_grad():
            feats, frame_mask = features_after(model, x, padding_mask, k)
        h = feats.transpose(0, 1)  # (T, B, C), as fairseq's layers take it
        drop = model.encoder.layerdrop if model.training else 0.0
        for layer in model.encoder.layers[k:]:
            if drop == 0 or np.random.random() > drop:  # fairseq's LayerDrop rule
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
        """The student upstream: what downstream evaluation and export use."""
        return self.student


@dataclass
class ScoreHubertConfig(FairseqDataclass):
    hubert_path: str = field(default=MISSING, metadata={"help": "fairseq HuBERT checkpoint to start from"})
    trainable_layers: int = field(default=2, metadata={"help": "top transformer layers of the student that train"})
    proj_dim: int = field(default=256, metadata={"help": "projection size before L2 normalisation"})
    layerdrop: float = field(default=0.0, metadata={"help": "LayerDrop of student and teacher"})
    teacher_dropout: bool = field(
        default=False, metadata={"help": "keep dropout on in the frozen teacher (as the authors' code)"}
    )


@register_model("score_hubert", dataclass=ScoreHubertConfig)
class ScoreHubertModel(ScoreModel):
    """The earlier ``score_hubert``: a HuBERT upstream, only its top ``trainable_layers`` layers train."""

    def __init__(self, cfg: ScoreHubertConfig, student: nn.Module):
        n_layers = len(student.encoder.layers)
        if not 0 < cfg.trainable_layers <= n_layers:
            raise TrainableSetError(f"trainable_layers={cfg.trainable_layers} but the HuBERT has {n_layers} layers")
        super().__init__(cfg, student)

    def trainable_entries(self) -> List[str]:
        return [f"encoder.layers.{-i}" for i in range(self.cfg.trainable_layers, 0, -1)]

    @classmethod
    def build_model(cls, cfg: ScoreHubertConfig, task=None):
        from .hubert_checkpoint import load_hubert

        student, _ = load_hubert(cfg.hubert_path)
        return cls(cfg, student)
