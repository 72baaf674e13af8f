"""``laser`` criterion: LASER's soft-DTW divergence plus alpha x the temporal regulariser of both sides.

Per pair (:func:`fairseq_mtssl.losses.laser.laser_loss`): ``D(x, y) + alpha * (I(x) + I(y))``, ``D`` the soft-DTW
divergence on squared Euclidean costs (gamma 0.1) NOT divided by length, ``I`` LAV's inverse-difference-moment
regulariser (window ``sigma``, margin ``margin``; float64 inside). The batch loss is the sum over pairs and
``sample_size`` the number of pairs (fairseq divides the accumulated gradient by it: the mean over pairs, as
the authors' ``loss / gradient_accumulate_steps``). Logged per pair: ``loss``, ``divergence`` (the authors'
``loss1``) and ``regulariser`` (``I(x) + I(y)``, unweighted: their ``loss2``).
"""

from dataclasses import dataclass, field
from typing import Optional

from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from ..losses.laser import laser_loss


@dataclass
class LaserCriterionConfig(FairseqDataclass):
    gamma: float = field(default=0.1, metadata={"help": "soft-DTW smoothing (authors: 0.1)"})
    sigma: int = field(
        default=0,
        metadata={
            "help": "regulariser window: frame pairs with |i - j| > sigma are pushed apart, the others pulled "
            "together (authors' HuBERT and WavLM runs: 0, the paper's window size 1)"
        },
    )
    margin: float = field(
        default=1.1,
        metadata={"help": "regulariser margin lambda on ||x_i - x_j|| (authors: 1.1 for HuBERT, 1.0 for WavLM)"},
    )
    alpha: float = field(
        default=0.4, metadata={"help": "weight of the regulariser (authors: 0.4 for HuBERT, 0.15 for WavLM)"}
    )
    soft_dtw_backend: Optional[str] = field(
        default=None,
        metadata={
            "help": "soft-DTW implementation: auto (numba kernels on CPU, numba CUDA kernels on a GPU, else the "
            "torch loop), numba, cuda or torch; unset: $MTSSL_SOFT_DTW_BACKEND, else auto"
        },
    )


@register_criterion("laser", dataclass=LaserCriterionConfig)
class LaserCriterion(FairseqCriterion):
    def __init__(
        self,
        task,
        gamma: float = 0.1,
        sigma: int = 0,
        margin: float = 1.1,
        alpha: float = 0.4,
        soft_dtw_backend: Optional[str] = None,
    ):
        super().__init__(task)
        self.gamma, self.sigma, self.margin, self.alpha = gamma, sigma, margin, alpha
        self.soft_dtw_backend = soft_dtw_backend

    def forward(self, model, sample, reduce=True):
        out = model(**sample["net_input"])
        loss, div, reg = laser_loss(
            out["x"].float(),
            out["y"].float(),
            out["len_x"],
            out["len_y"],
            gamma=self.gamma,
            sigma=self.sigma,
            margin=self.margin,
            alpha=self.alpha,
            backend=self.soft_dtw_backend,
        )
        n = len(sample["net_input"]["source"])
        total = loss.sum() if reduce else loss
        logging_output = {
            "loss": loss.sum().data,
            "divergence": div.sum().data,
            "regulariser": reg.sum().data,
            "sample_size": n,
            "nsentences": n,
            "ntokens": int(out["len_x"].sum()),
        }
        return total, n, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        n = utils.item(sum(log.get("sample_size", 0) for log in logging_outputs))
        for key in ("loss", "divergence", "regulariser"):
            value = utils.item(sum(log.get(key, 0) for log in logging_outputs))
            metrics.log_scalar(key, value / max(n, 1), n, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
