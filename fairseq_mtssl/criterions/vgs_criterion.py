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

Normalisation (data parallel included). fairseq sums the workers' gradients and divides by the summed
``sample_size``. Worker ``w`` holds ``S_w`` units of ``sample_size`` (masked frames when the SSL loss is
on, else its pairs) and ``P_w`` speech-image pairs (rows with an image; possibly none); ``S = sum_w S_w``,
``P = sum_w P_w`` come from one ``all_reduce`` of the two counts, which every worker reaches on every
step. With ``V_w`` the sum over worker ``w``'s pairs of the per-pair speech-image loss (``loss_s2i +
loss_i2s``, candidates gathered from every worker) and ``A_w`` its summed wav2vec 2.0 loss, worker ``w``
returns::

    loss_w = (1 - av_weight) * A_w + av_weight * V_w * S / P     (+ 0 * sum of its two heads' outputs)

so that after fairseq's all-reduce and division::

    sum_w loss_w / S = (1 - av_weight) * (sum_w A_w / S) + av_weight * (sum_w V_w / P)
                     = (1 - av_weight) * L_AUD per masked frame + av_weight * L_AV mean over the global pairs,

the authors' one mean over the global batch of pairs (FaST-VGS+ / scheduled_SSL_XSL), whatever the
split of frames and pairs over workers; with one worker ``S / P`` is just the local ratio. A worker
without a pair still runs the speech-image loss (a 0-row batch in its collectives) and adds ``0 x`` the
sum of the image and audio heads' outputs, so every trained parameter gets a (zero) gradient on every
worker, as c10d DDP requires. Only when no worker has a pair does the VGS part drop out (every worker
knows it from ``P``); with ``av_weight = 1`` that is an error, raised by every worker alike. Every
worker logs the same keys: ``vgs_loss`` (``V_w``) and ``vgs_pairs`` (``P_w``), 0 when it has none.
``av_weight = 0`` is fairseq's wav2vec 2.0 loss alone (no collective).

Precision: the speech-image similarity, logits and loss are float32 even when the model runs in
fp16 (as fairseq's wav2vec criterion casts its logits); the returned loss is float32.
"""

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from fairseq.criterions.wav2vec_criterion import Wav2vecCriterion, Wav2VecCriterionConfig
from fairseq.dataclass import ChoiceEnum

from ..losses.speech_image import LOSSES, SIMILARITIES, rank_and_world_size, speech_image_loss

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


def _global_counts(sample_size, pairs: int, device) -> Tuple[float, int]:
    """``(S, P)``: ``sample_size`` and speech-image pairs summed over data-parallel workers (one
    ``all_reduce``; every worker must call it on every step)."""
    size = float(sample_size)
    if rank_and_world_size()[1] == 1:
        return size, pairs
    counts = torch.tensor([size, float(pairs)], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    return float(counts[0]), int(round(float(counts[1])))


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
        rows = (sample["image_ids"] >= 0).nonzero().squeeze(1)
        pairs = len(rows)
        if self.av_weight < 1:
            recorder = _Recording(model)
            ssl_loss, sample_size, log = super().forward(recorder, sample, reduce)
            net_output = recorder.net_output
            log["ssl_loss"] = log.pop("loss")
        else:
            net_output = model(**net_input, ssl=False)
            ssl_loss, sample_size = None, pairs
            log = {"ntokens": sample_size, "nsentences": sample["id"].numel(), "sample_size": sample_size}
        if self.av_weight == 0:
            log["loss"] = utils.item(ssl_loss.data)
            return ssl_loss, sample_size, log

        speech_emb, image_emb = net_output["speech_emb"], net_output["image_emb"]
        total_size, total_pairs = _global_counts(sample_size, pairs, speech_emb.device)
        if total_pairs == 0:  # no worker has a pair: every worker takes this branch
            if ssl_loss is None:
                _, world = rank_and_world_size()
                raise ValueError(
                    f"batch of ids {sample['id'].tolist()[:5]}... has no images"
                    + (f" (nor have the other {world - 1} workers' batches)" if world > 1 else "")
                    + ", and av_weight=1 leaves no wav2vec 2.0 loss to train it"
                )
            vgs_sum = speech_emb.new_zeros((), dtype=torch.float32)
        else:  # every worker, with its pairs or none (its collectives then carry 0 rows)
            vgs_sum = speech_image_loss(
                speech_emb[rows],
                image_emb[rows],
                sample["image_ids"][rows],
                self.vgs_loss,
                self.margin,
                self.temperature,
                self.gather,
                self.similarity,
            )  # float32 (float64 stays float64), also from fp16 embeddings
        # every parameter of the two heads (and what feeds them) in the graph, with a zero gradient where
        # this worker has no pair: c10d DDP needs the same parameters to get gradients on every worker
        touch = (speech_emb.float().sum() + image_emb.float().sum()) * 0.0
        vgs = vgs_sum * (total_size / total_pairs) if total_pairs else vgs_sum
        loss = self.av_weight * vgs + touch
        if ssl_loss is not None:
            loss = loss + (1 - self.av_weight) * ssl_loss  # float32: fairseq casts the logits
        log["vgs_loss"] = utils.item(vgs_sum.data)
        log["vgs_pairs"] = pairs
        log["loss"] = utils.item(loss.data)
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
