"""``score`` criterion: SCORE's soft-DTW divergence between student and teacher projections.

Per pair: ``sdtw(x, y) - (sdtw(x, x) + sdtw(y, y)) / 2`` on squared Euclidean frame costs (gamma 0.1),
divided by ``len_x + len_y``; the batch loss is the sum and ``sample_size`` the number of pairs.
``soft_dtw_backend`` picks the implementation (see :mod:`fairseq_mtssl.losses.soft_dtw`).
"""

from dataclasses import dataclass, field
from typing import Optional

from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from ..losses.soft_dtw import soft_dtw_divergence


@dataclass
class ScoreCriterionConfig(FairseqDataclass):
    gamma: float = field(default=0.1, metadata={"help": "soft-DTW smoothing"})
    soft_dtw_backend: Optional[str] = field(
        default=None,
        metadata={
            "help": "soft-DTW implementation: auto (numba kernels on CPU, numba CUDA kernels on a GPU, else the "
            "torch loop), numba, cuda or torch; unset: $MTSSL_SOFT_DTW_BACKEND, else auto"
        },
    )


@register_criterion("score", dataclass=ScoreCriterionConfig)
class ScoreCriterion(FairseqCriterion):
    def __init__(self, task, gamma: float = 0.1, soft_dtw_backend: Optional[str] = None):
        super().__init__(task)
        self.gamma = gamma
        self.soft_dtw_backend = soft_dtw_backend

    def forward(self, model, sample, reduce=True):
        out = model(**sample["net_input"])
        div = soft_dtw_divergence(
            out["student"].float(),
            out["teacher"].float(),
            out["student_lengths"],
            out["teacher_lengths"],
            self.gamma,
            backend=self.soft_dtw_backend,
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
