"""``score`` criterion: SCORE's soft-DTW divergence between student and teacher projections.

Per pair: ``sdtw(x, y) - (sdtw(x, x) + sdtw(y, y)) / 2`` on squared Euclidean frame costs (gamma 0.1),
divided by ``len_x + len_y``; the batch loss is the sum and ``sample_size`` the number of pairs.
"""

from dataclasses import dataclass, field

from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from ..losses.soft_dtw import soft_dtw_divergence


@dataclass
class ScoreCriterionConfig(FairseqDataclass):
    gamma: float = field(default=0.1, metadata={"help": "soft-DTW smoothing"})


@register_criterion("score", dataclass=ScoreCriterionConfig)
class ScoreCriterion(FairseqCriterion):
    def __init__(self, task, gamma: float = 0.1):
        super().__init__(task)
        self.gamma = gamma

    def forward(self, model, sample, reduce=True):
        out = model(**sample["net_input"])
        div = soft_dtw_divergence(
            out["student"].float(), out["teacher"].float(), out["student_lengths"], out["teacher_lengths"], self.gamma
        )
        loss = div.sum() if reduce else div
        n = len(sample["net_input"]["source"])
        return (
            loss,
            n,
            {"loss": loss.data, "sample_size": n, "nsentences": n, "ntokens": int(out["student_lengths"].sum())},
        )

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        loss = utils.item(sum(log.get("loss", 0) for log in logging_outputs))
        n = utils.item(sum(log.get("sample_size", 0) for log in logging_outputs))
        metrics.log_scalar("loss", loss / max(n, 1), n, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
