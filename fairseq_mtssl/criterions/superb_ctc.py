"""``superb_ctc`` criterion: fairseq's CTC criterion (loss, and unit / word error counts when
validating) that also logs the downstream model's softmax layer weights as ``layer_w{i}``, so the
weights SUPERB reports are in the training log.

The loss it optimises is s3prl's by default (``ctc_reduction: s3prl``): s3prl 0.4.18's PR and ASR experts
(``downstream/ctc/expert.py`` and ``downstream/asr/expert.py``) use ``nn.CTCLoss`` with its default
``reduction='mean'``, each utterance's loss divided by its target length, then the mean over the batch
(and over the ``gradient_accumulate_steps`` batches of an update, ``downstream/runner.py``). Here each
utterance contributes ``loss / target length`` and the sample size is the number of utterances, so fairseq's
division by the update's summed sample size gives that mean. ``ctc_reduction: fairseq`` is fairseq's CTC
criterion as it is (summed loss over summed target length: longer utterances weigh more). Either way the
logged ``loss`` is fairseq's (summed loss / summed target length, in bits), ``utt_loss`` the mean over
utterances of loss / target length (bits).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from fairseq.criterions.ctc import CtcCriterion, CtcCriterionConfig
from fairseq.dataclass import ChoiceEnum

CTC_REDUCTIONS = ChoiceEnum(["s3prl", "fairseq"])


@dataclass
class SuperbCtcConfig(CtcCriterionConfig):
    ctc_reduction: CTC_REDUCTIONS = field(
        default="s3prl",
        metadata={
            "help": "s3prl: mean over utterances of CTC loss / target length (nn.CTCLoss's default "
            "reduction='mean', s3prl downstream/ctc/expert.py and downstream/asr/expert.py); fairseq: summed "
            "loss / summed target length (fairseq's ctc criterion)"
        },
    )


class _Replay:
    """Stands in for the model inside :meth:`CtcCriterion.forward`, handing it an output already computed."""

    def __init__(self, model, net_output):
        self._model, self._out = model, net_output
        self.training = model.training

    def __call__(self, **kwargs):
        return self._out

    def get_normalized_probs(self, *args, **kwargs):
        return self._model.get_normalized_probs(*args, **kwargs)


@register_criterion("superb_ctc", dataclass=SuperbCtcConfig)
class SuperbCtcCriterion(CtcCriterion):
    def __init__(self, cfg: SuperbCtcConfig, task):
        super().__init__(cfg, task)
        self.ctc_reduction = cfg.ctc_reduction

    def utterance_losses(self, net_output, sample, model) -> torch.Tensor:
        """``(B,)`` CTC loss of each utterance divided by its target length (``nn.CTCLoss(reduction='mean')``
        before its batch mean)."""
        lprobs = model.get_normalized_probs(net_output, log_probs=True).contiguous()  # (T, B, V)
        mask = net_output["padding_mask"]
        if mask is not None:
            input_lengths = (~mask).long().sum(-1)
        else:
            input_lengths = lprobs.new_full((lprobs.size(1),), lprobs.size(0), dtype=torch.long)
        keep = (sample["target"] != self.pad_idx) & (sample["target"] != self.eos_idx)
        target_lengths = keep.sum(-1)
        with torch.backends.cudnn.flags(enabled=False):
            losses = F.ctc_loss(
                lprobs,
                sample["target"].masked_select(keep),
                input_lengths,
                target_lengths,
                blank=self.blank_idx,
                reduction="none",
                zero_infinity=self.zero_infinity,
            )
        return losses / target_lengths.clamp(min=1).to(losses.dtype)

    def forward(self, model, sample, reduce=True, **kwargs):
        net_output = model(**sample["net_input"])
        loss, sample_size, log = super().forward(_Replay(model, net_output), sample, reduce=reduce, **kwargs)
        per_utterance = self.utterance_losses(net_output, sample, model).sum()
        log["utt_loss"] = utils.item(per_utterance.data)
        if self.ctc_reduction == "s3prl":
            loss, sample_size = per_utterance, log["nsentences"]  # log["sample_size"] stays fairseq's
        n = log["nsentences"]
        for i, w in enumerate(model.layer_weights()):
            log[f"layer_w{i}"] = w * n  # summed over batches, divided by sentences when reduced
        return loss, sample_size, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        CtcCriterion.reduce_metrics(logging_outputs)
        n = utils.item(sum(log.get("nsentences", 0) for log in logging_outputs))
        if any("utt_loss" in log for log in logging_outputs):
            total = utils.item(sum(log.get("utt_loss", 0) for log in logging_outputs))
            metrics.log_scalar("utt_loss", total / max(n, 1) / math.log(2), n, round=3)
        keys = sorted({k for log in logging_outputs for k in log if k.startswith("layer_w")}, key=lambda k: int(k[7:]))
        for k in keys:
            metrics.log_scalar(k, utils.item(sum(log.get(k, 0) for log in logging_outputs)) / max(n, 1), n, round=3)
