"""``vgs_ssl`` criterion: ``av_weight * L_AV + (1 - av_weight) * L_AUD`` (the EUSIPCO paper's
``alpha * L_AV + (1 - alpha) * L_AUD``: ``av_weight`` is the paper's alpha, the weight of the
audio-visual loss).

L_AUD is fairseq's own ``wav2vec`` criterion (contrastive InfoNCE + diversity and feature penalties,
as configured by ``infonce``, ``loss_weights``, ``log_keys``), per masked frame; L_AV the speech-image
loss (:mod:`fairseq_mtssl.losses.speech_image`: both directions summed, each a mean over the pairs),
on the same forward that produces the speech and image embeddings. ``av_weight = 0`` is SSL only (no
image needed), ``av_weight = 1`` VGS only (unmasked forward, no SSL heads run). The field was called
``alpha`` before with the opposite meaning (the wav2vec 2.0 weight); ``criterion.alpha`` is now an
error, so an old command cannot silently train the other mix.

Normalisation: fairseq divides gradients by ``sample_size`` (masked frames when the SSL loss is on,
else the number of pairs); the speech-image loss is added as its per-pair mean times
``sample_size`` so that after that division the two parts mix exactly by ``av_weight``.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from fairseq.criterions.wav2vec_criterion import Wav2vecCriterion, Wav2VecCriterionConfig
from fairseq.dataclass import ChoiceEnum

from ..losses.speech_image import LOSSES, SIMILARITIES, speech_image_loss

VGS_LOSSES = ChoiceEnum(list(LOSSES))
SIMILARITY = ChoiceEnum(list(SIMILARITIES))


@dataclass
class VgsSslCriterionConfig(Wav2VecCriterionConfig):
    av_weight: float = field(
        default=0.5,
        metadata={
            "help": "the paper's alpha: weight of the audio-visual (speech-image) loss; 1 - av_weight weighs the "
            "wav2vec 2.0 loss. 0 = wav2vec 2.0 only, 1 = VGS only"
        },
    )
    alpha: Optional[float] = field(
        default=None,
        metadata={"help": "removed (it meant the wav2vec 2.0 weight): setting it is an error; use av_weight"},
    )
    vgs_loss: VGS_LOSSES = field(default="margin_infonce", metadata={"help": "margin_infonce (FaST-VGS) or infonce"})
    similarity: SIMILARITY = field(
        default="dot",
        metadata={
            "help": "dot: plain dot product of the two embeddings (FaST-VGS); cosine: L2-normalised first. "
            "Retrieval (mtssl-vgs-retrieval) scores with the same similarity"
        },
    )
    margin: float = field(default=1.0, metadata={"help": "margin on the positive (margin_infonce)"})
    temperature: float = field(default=0.07, metadata={"help": "temperature (infonce)"})
    gather_negatives: bool = field(default=True, metadata={"help": "candidates from every data-parallel worker"})


class _Recording:
    """Passes calls to the model and keeps its last output, so wav2vec 2.0's criterion and the
    speech-image loss share one forward."""

    def __init__(self, model):
        self.model = model
        self.net_output = None

    def __call__(self, **kwargs):
        self.net_output = self.model(**kwargs)
        return self.net_output

    def __getattr__(self, name):
        return getattr(self.model, name)


@register_criterion("vgs_ssl", dataclass=VgsSslCriterionConfig)
class VgsSslCriterion(Wav2vecCriterion):
    def __init__(
        self,
        task,
        infonce=False,
        loss_weights=None,
        log_keys=None,
        av_weight=0.5,
        alpha=None,
        vgs_loss="margin_infonce",
        similarity="dot",
        margin=1.0,
        temperature=0.07,
        gather_negatives=True,
    ):
        super().__init__(task, infonce, loss_weights, log_keys)
        if alpha is not None:
            raise ValueError(
                f"criterion.alpha={alpha}: renamed to criterion.av_weight, which is the paper's alpha (weight of "
                f"the audio-visual loss); the old alpha weighed the wav2vec 2.0 loss (av_weight = 1 - old alpha)"
            )
        if not 0.0 <= av_weight <= 1.0:
            raise ValueError(f"criterion.av_weight must be in [0, 1], got {av_weight}")
        self.av_weight, self.vgs_loss, self.similarity = av_weight, str(vgs_loss), str(similarity)
        self.margin, self.temperature, self.gather = margin, temperature, gather_negatives

    def forward(self, model, sample, reduce=True):
        net_input = sample["net_input"]
        has_image = sample["image_ids"] >= 0
        if self.av_weight < 1:
            recorder = _Recording(model)
            ssl_loss, sample_size, log = super().forward(recorder, sample, reduce)
            net_output = recorder.net_output
        else:
            if not bool(has_image.any()):
                raise ValueError(
                    f"batch of ids {sample['id'].tolist()[:5]}... has no images, and av_weight=1 leaves no wav2vec 2.0 "
                    "loss to train it"
                )
            net_output = model(**net_input, ssl=False)
            ssl_loss, sample_size = None, int(has_image.sum())
            log = {"ntokens": sample_size, "nsentences": sample["id"].numel(), "sample_size": sample_size}
        vgs = None
        if self.av_weight > 0 and bool(has_image.any()):
            rows = has_image.nonzero().squeeze(1)
            vgs_sum = speech_image_loss(
                net_output["speech_emb"][rows],
                net_output["image_emb"][rows],
                sample["image_ids"][rows],
                self.vgs_loss,
                self.margin,
                self.temperature,
                self.gather,
                self.similarity,
            )
            vgs = vgs_sum / len(rows)
            log["vgs_loss"] = utils.item(vgs.data) * len(rows)
            log["vgs_pairs"] = len(rows)
        loss = (1 - self.av_weight) * ssl_loss if ssl_loss is not None else 0.0
        if vgs is not None:
            loss = loss + self.av_weight * vgs * sample_size
        elif self.av_weight > 0 and ssl_loss is None:
            raise ValueError("no speech-image pairs and no wav2vec 2.0 loss in this batch")
        if ssl_loss is not None:
            log["ssl_loss"] = log.pop("loss")
        log["loss"] = utils.item(loss.data) if torch.is_tensor(loss) else float(loss)
        return loss, sample_size, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        total = lambda key: utils.item(sum(log.get(key, 0) for log in logging_outputs))  # noqa: E731
        sample_size = total("sample_size")
        metrics.log_scalar("loss", total("loss") / max(1, sample_size), sample_size, round=3)
        if any("ssl_loss" in log for log in logging_outputs):  # in bits per masked frame, as wav2vec 2.0 logs it
            metrics.log_scalar("ssl_loss", total("ssl_loss") / max(1, sample_size) / math.log(2), sample_size, round=3)
            if total("count"):
                metrics.log_scalar("accuracy", total("correct") / total("count"), total("count"), round=4)
            for i in range(1, 4):
                if any(f"loss_{i}" in log for log in logging_outputs):
                    metrics.log_scalar(f"loss_{i}", total(f"loss_{i}") / max(1, sample_size), sample_size, round=3)
        pairs = total("vgs_pairs")
        if pairs:
            metrics.log_scalar("vgs_loss", total("vgs_loss") / pairs, pairs, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        """Every logged value is a sum that :meth:`reduce_metrics` divides by summed counts, so workers'
        outputs can be summed before it (one all-reduce; fairseq's gather path needs CUDA)."""
        return True
