"""``spin`` criterion: SPIN's swapped prediction between an utterance and its speaker-perturbed copy.

Each view's Sinkhorn-Knopp targets (``epsilon``, ``sinkhorn_iters``, float32, no gradient, sums all-reduced
across workers) are predicted from the other view's codebook scores at ``temperature``
(:func:`fairseq_mtssl.losses.spin.spin_loss`). The loss is the authors' mean over the batch's frames; a
batch counts as ``sample_size`` 1, so fairseq's gradient (summed over workers and accumulated batches,
divided by the summed sample sizes) is the mean of the per-batch losses, as DDP's averaging in the
authors' Lightning trainer. Logged besides the loss: ``acc`` (a view's best code is the other view's best
target), ``code_perplexity`` and ``prob_perplexity`` (the authors' statistics), each a mean over batches.
"""

from dataclasses import dataclass, field

from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from ..losses.spin import spin_loss

STATS = ("acc", "code_perplexity", "prob_perplexity")


@dataclass
class SpinCriterionConfig(FairseqDataclass):
    epsilon: float = field(default=0.02, metadata={"help": "Sinkhorn-Knopp entropy regularisation (authors: 0.02)"})
    sinkhorn_iters: int = field(default=3, metadata={"help": "Sinkhorn-Knopp iterations (authors: 3)"})
    temperature: float = field(default=0.1, metadata={"help": "softmax temperature of the predictions (authors: 0.1)"})


@register_criterion("spin", dataclass=SpinCriterionConfig)
class SpinCriterion(FairseqCriterion):
    def __init__(self, task, epsilon: float = 0.02, sinkhorn_iters: int = 3, temperature: float = 0.1):
        super().__init__(task)
        self.epsilon, self.sinkhorn_iters, self.temperature = epsilon, sinkhorn_iters, temperature

    def forward(self, model, sample, reduce=True):
        out = model(**sample["net_input"])
        s1, s2 = out["scores"]
        loss, stats = spin_loss(s1, s2, self.epsilon, self.sinkhorn_iters, self.temperature)
        n = len(sample["net_input"]["source"])
        log = {"loss": loss.data, "sample_size": 1, "nsentences": n, "ntokens": int(out["frames"].sum())}
        log.update(stats)
        return loss, 1, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        batches = utils.item(sum(log.get("sample_size", 0) for log in logging_outputs))
        loss = utils.item(sum(log.get("loss", 0) for log in logging_outputs))
        metrics.log_scalar("loss", loss / max(batches, 1), batches, round=4)
        frames = utils.item(sum(log.get("ntokens", 0) for log in logging_outputs))
        metrics.log_scalar("frames", frames / max(batches, 1), batches, round=1)
        for key in STATS:
            total = utils.item(sum(log.get(key, 0) for log in logging_outputs))
            metrics.log_scalar(key, total / max(batches, 1), batches, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
