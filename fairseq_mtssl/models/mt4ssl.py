"""MT4SSL (Ma et al., Interspeech 2023): a data2vec-audio student trained on two kinds of targets.

- online: fairseq's data2vec regression onto an EMA teacher's average of its top-K instance-normed
  layer outputs (``Data2VecAudioModel``'s own loss, unchanged);
- offline: cross-entropy of each k-means label set (``.km`` files from the ``hubert_pretraining``
  family of tasks) on the masked frames, through one head per label set: a linear softmax classifier
  (the authors') or HuBERT's cosine-similarity logits with a temperature.

Registered as ``mt4ssl``. The model subclasses ``Data2VecAudioModel`` rather than copying it:
``apply_mask`` records the mask data2vec draws, and ``final_proj`` records its input (the student's
outputs at the masked frames), so the offline heads see exactly the frames the regression uses and
a checkpoint's parameter names stay those of data2vec. Ablations: ``online_weight=0`` is offline-only
(no teacher is built or run), ``offline_weights`` all 0 (or no labels) is online-only.
"""

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import ChoiceEnum
from fairseq.examples.data2vec.models.data2vec_audio import Data2VecAudioConfig, Data2VecAudioModel
from fairseq.models import register_model

from .. import upstream
from .weight_norm import detach_weight_norm_weights

logger = logging.getLogger(__name__)


@dataclass
class MT4SSLConfig(Data2VecAudioConfig):
    online_weight: float = field(
        default=1.0, metadata={"help": "weight of the EMA-teacher regression loss; 0 = offline-only (no teacher)"}
    )
    offline_weights: List[float] = field(
        default_factory=lambda: [1.0],
        metadata={"help": "weight of each label set's cross-entropy, in task.labels order; all 0 = online-only"},
    )
    offline_head: ChoiceEnum(["linear", "cosine"]) = field(
        default="linear", metadata={"help": "linear: softmax classifier (MT4SSL); cosine: HuBERT's cosine logits"}
    )
    offline_logit_temp: float = field(default=0.1, metadata={"help": "temperature of the cosine head"})
    offline_final_dim: int = field(default=256, metadata={"help": "projection size of the cosine head"})
    offline_num_classes: Optional[List[int]] = field(
        default=None,
        metadata={
            "help": "classes per label set; filled from the task's dictionaries when the model is first "
            "built and saved with the checkpoint, so fine-tuning never needs the label directory"
        },
    )
    offline_label_rates: Optional[List[float]] = field(
        default=None, metadata={"help": "labels per second of each label set; filled like offline_num_classes"}
    )
    label_frame_tolerance: int = field(
        default=5, metadata={"help": "largest allowed gap, in feature frames, between labels and audio in a batch"}
    )


class CosineHead(nn.Module):
    """HuBERT's prediction head: cosine similarity of a projection with label embeddings, / temperature."""

    def __init__(self, dim: int, num_classes: int, final_dim: int, temperature: float):
        super().__init__()
        self.proj = nn.Linear(dim, final_dim)
        self.label_embs = nn.Parameter(torch.empty(num_classes, final_dim).uniform_())
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(M, dim)`` -> logits ``(M, num_classes)``."""
        return F.cosine_similarity(self.proj(x)[:, None, :], self.label_embs[None], dim=-1) / self.temperature


class _InputRecordingLinear(nn.Linear):
    """``nn.Linear`` that keeps its last input (data2vec applies ``final_proj`` to the masked frames)."""

    recorded: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.recorded = x
        return super().forward(x)


def frame_targets(targets: torch.Tensor, num_frames: int, label_rate: float, pad: int, feature_rate: float = 50.0):
    """Labels ``(B, L)`` at ``label_rate`` -> ``(one label per feature frame (B, num_frames), label frames (B,))``.

    Frame t takes label ``round(t * label_rate / feature_rate)`` (the front end's frame rate,
    :func:`fairseq_mtssl.upstream.frame_rate_of`); frames past an utterance's labels get ``pad``.
    The second output is how many feature frames each utterance's labels cover.
    """
    ratio = label_rate / feature_rate
    lengths = (targets != pad).sum(1)
    idx = (torch.arange(num_frames, device=targets.device) * ratio).round().long()
    gathered = targets.gather(1, idx.clamp(max=targets.size(1) - 1)[None].expand(targets.size(0), -1))
    out = torch.where(idx[None, :] < lengths[:, None], gathered, torch.full_like(gathered, pad))
    return out, (lengths.float() / ratio).floor().long()


@register_model("mt4ssl", dataclass=MT4SSLConfig)
class MT4SSLModel(Data2VecAudioModel):
    @staticmethod
    def compute_var(y: torch.Tensor) -> torch.Tensor:
        """Mean over channels of the standard deviation of ``y (..., C)`` across all frames of all
        workers, as data2vec logs it (``target_var``, ``pred_var``). data2vec moves the frame count to
        CUDA before its all-reduce, which fails under gloo on CPU; here every reduced tensor stays on
        ``y``'s device, so the same DDP path runs on CPU and on GPUs."""
        y = y.reshape(-1, y.size(-1)).float()
        count = torch.tensor(float(y.size(0)), device=y.device)
        total, squares = y.sum(0), (y**2).sum(0)
        if dist.is_available() and dist.is_initialized():
            for t in (count, total, squares):
                dist.all_reduce(t)
        var = squares / (count - 1) - total**2 / (count * (count - 1))  # unbiased, from the pooled sums
        return torch.sqrt(var + 1e-6).mean()

    def __init__(self, cfg: MT4SSLConfig, num_classes: List[int], label_rates: List[float], pads: List[int]):
        super().__init__(cfg)
        self.final_proj = _InputRecordingLinear(self.embed, self.embed)
        if len(cfg.offline_weights) != len(num_classes):
            raise ValueError(
                f"model.offline_weights has {len(cfg.offline_weights)} entries but the task gives {len(num_classes)} label sets"
            )
        self.offline_weights = list(cfg.offline_weights)
        self.label_rates, self.pads = list(label_rates), list(pads)
        self.feature_rate = upstream.frame_rate_of(upstream.conv_layers_of(self))  # 50 Hz for stride 320
        self._num_classes = list(num_classes)
        if cfg.offline_head == "linear":
            heads = [nn.Linear(self.embed, n) for n in num_classes]
        else:
            heads = [CosineHead(self.embed, n, cfg.offline_final_dim, cfg.offline_logit_temp) for n in num_classes]
        self.offline_heads = nn.ModuleList(heads)
        self._mask_indices: Optional[torch.Tensor] = None
        if self.online_weight == 0 and not any(self.offline_weights):
            raise ValueError("online_weight and every offline weight are 0: nothing to learn")
        # an ablation's unused head gets no gradient: frozen, so torch DDP (c10d) accepts the model and its
        # optimizer holds only what learns (weight decay would otherwise shrink the head on some paths only)
        unused = [] if self.online_weight else ["final_proj"]
        unused += [f"offline_heads.{i}" for i, w in enumerate(self.offline_weights) if w == 0]
        for name in unused:
            self.get_submodule(name).requires_grad_(False)
        if unused:
            logger.info(f"MT4SSL ablation: {', '.join(unused)} take no part in the loss: left frozen")

    @property
    def online_weight(self) -> float:
        return self.cfg.online_weight

    @classmethod
    def build_model(cls, cfg: MT4SSLConfig, task=None):
        """Head sizes come from the config when a checkpoint recorded them (e.g. when fairseq's
        ``wav2vec_ctc`` rebuilds the model for fine-tuning), else from the task's dictionaries."""
        if cfg.offline_num_classes is not None:
            num_classes, rates = list(cfg.offline_num_classes), list(cfg.offline_label_rates)
        else:
            dicts = task.dictionaries
            num_classes = [len(d) for d in dicts]
            rates = getattr(task, "label_rates", None) or [float(task.cfg.label_rate)] * len(dicts)
        return cls(cfg, num_classes, [float(r) for r in rates], [1] * len(num_classes))  # fairseq's <pad> is 1

    def task_derived_config(self) -> Dict[str, object]:
        """Config fields this model took from the task; the task writes them into the saved config."""
        return {"offline_num_classes": list(self._num_classes), "offline_label_rates": list(self.label_rates)}

    # -- data2vec hooks -------------------------------------------------------------------------
    def apply_mask(self, x, padding_mask, mask_indices=None, mask_channel_indices=None):
        x, mask_indices = super().apply_mask(x, padding_mask, mask_indices, mask_channel_indices)
        self._mask_indices = mask_indices
        return x, mask_indices

    def make_ema_teacher(self):
        detach_weight_norm_weights(self)
        super().make_ema_teacher()

    def set_num_updates(self, num_updates):
        if self.online_weight == 0:  # offline-only: no teacher to build or update
            self.num_updates = num_updates
            return
        super().set_num_updates(num_updates)

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        source,
        padding_mask=None,
        mask=True,
        features_only=False,
        layer=None,
        mask_indices=None,
        mask_channel_indices=None,
        padding_count=None,
        target_list=None,
    ) -> Dict:
        """Data2vec's forward (same positional arguments) plus the offline losses of ``target_list``
        (one ``(B, L_i)`` label tensor per label set). Returns ``{"losses", "sample_size", "logs", ...}``;
        every loss is a sum over the masked frames and ``sample_size`` is their number."""
        kwargs = dict(
            layer=layer,
            mask_indices=mask_indices,
            mask_channel_indices=mask_channel_indices,
            padding_count=padding_count,
        )
        if features_only:
            return super().forward(source, padding_mask, mask=mask, features_only=True, **kwargs)
        if self.online_weight != 0:
            result = super().forward(source, padding_mask, mask=True, **kwargs)
            result["losses"]["regression"] = result["losses"]["regression"] * self.online_weight
            student = self.final_proj.recorded  # (M, C): the student's outputs at the masked frames
            self.final_proj.recorded = None
        else:
            out = super().forward(source, padding_mask, mask=True, features_only=True, **kwargs)
            student = out["x"][self._mask_indices]
            result = {"losses": {}, "sample_size": student.size(0)}
        mask_indices = self._mask_indices
        logs = {}
        for i, (head, weight) in enumerate(zip(self.offline_heads, self.offline_weights)):
            if weight == 0:
                continue
            if target_list is None:
                raise ValueError("offline targets requested (offline_weights) but the batch has no target_list")
            labels, label_frames = frame_targets(
                target_list[i], mask_indices.size(1), self.label_rates[i], self.pads[i], self.feature_rate
            )
            self._check_label_lengths(label_frames, padding_mask, source, i)
            masked_labels = labels[mask_indices].long()
            keep = masked_labels != self.pads[i]
            logits = head(student[keep])
            result["losses"][f"offline_{i}"] = (
                F.cross_entropy(logits.float(), masked_labels[keep], reduction="sum") * weight
            )
            with torch.no_grad():
                logs[f"_offline_correct_{i}"] = int((logits.argmax(-1) == masked_labels[keep]).sum())
                logs[f"_offline_count_{i}"] = int(keep.sum())
        result["logs"] = logs
        return result

    def _check_label_lengths(self, label_frames: torch.Tensor, padding_mask, source, i: int) -> None:
        lengths = torch.full_like(label_frames, source.size(1)) if padding_mask is None else (~padding_mask).sum(1)
        frames = self._get_feat_extract_output_lengths(lengths)
        gap = (frames - label_frames).abs()
        if int(gap.max()) > self.cfg.label_frame_tolerance:
            b = int(gap.argmax())
            raise ValueError(
                f"label set {i} ({self.label_rates[i]:g} Hz): batch item {b} has labels for {int(label_frames[b])} "
                f"feature frames but its audio gives {int(frames[b])} (label_rate wrong, or labels from another manifest?)"
            )

    def remove_pretraining_modules(self, last_layer=None):
        super().remove_pretraining_modules(last_layer)
        self.offline_heads = None
