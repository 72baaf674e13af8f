"""``superb_ctc`` criterion: fairseq's CTC criterion (loss, and unit / word error counts when
validating) that also logs the downstream model's softmax layer weights as ``layer_w{i}``, so the
weights SUPERB reports are in the training log."""

from dataclasses import dataclass

from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from fairseq.criterions.ctc import CtcCriterion, CtcCriterionConfig


@dataclass
class SuperbCtcConfig(CtcCriterionConfig):
    pass


@register_criterion("superb_ctc", dataclass=SuperbCtcConfig)
class SuperbCtcCriterion(CtcCriterion):
    def forward(self, model, sample, reduce=True, **kwargs):
        loss, sample_size, log = super().forward(model, sample, reduce=reduce, **kwargs)
        n = log["nsentences"]
        for i, w in enumerate(model.layer_weights()):
            log[f"layer_w{i}"] = w * n  # summed over batches, divided by sentences when reduced
        return loss, sample_size, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        CtcCriterion.reduce_metrics(logging_outputs)
        n = utils.item(sum(log.get("nsentences", 0) for log in logging_outputs))
        keys = sorted({k for log in logging_outputs for k in log if k.startswith("layer_w")}, key=lambda k: int(k[7:]))
        for k in keys:
            metrics.log_scalar(k, utils.item(sum(log.get(k, 0) for log in logging_outputs)) / max(n, 1), n, round=3)
