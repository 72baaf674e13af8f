"""``mt4ssl`` criterion: fairseq's ``model_criterion`` with the batch's label sets passed to the model.

The model returns its (already weighted) losses as sums over the masked frames and their number as
``sample_size``, so the total is (CE + regression) / masked frames, as MT4SSL trains. Logged besides
each loss: ``acc_offline_{i}``, the masked-frame accuracy of label set i.
"""

import functools

from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from fairseq.criterions.model_criterion import ModelCriterion, ModelCriterionConfig


@register_criterion("mt4ssl", dataclass=ModelCriterionConfig)
class MT4SSLCriterion(ModelCriterion):
    def forward(self, model, sample, reduce=True):
        # ModelCriterion calls model(**net_input); the label sets travel beside net_input.
        with_targets = functools.partial(model, target_list=sample.get("target_list"))
        return super().forward(with_targets, sample, reduce)

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        ModelCriterion.reduce_metrics(logging_outputs)
        i = 0
        while any(f"_offline_count_{i}" in log for log in logging_outputs):
            correct = utils.item(sum(log.get(f"_offline_correct_{i}", 0) for log in logging_outputs))
            count = utils.item(sum(log.get(f"_offline_count_{i}", 0) for log in logging_outputs))
            metrics.log_scalar(f"_offline_correct_{i}", correct)
            metrics.log_scalar(f"_offline_count_{i}", count)
            metrics.log_derived(
                f"acc_offline_{i}",
                functools.partial(_accuracy, i=i),
            )
            i += 1


def _accuracy(meters, i):
    count = meters[f"_offline_count_{i}"].sum
    return round(meters[f"_offline_correct_{i}"].sum / count, 4) if count > 0 else float("nan")
