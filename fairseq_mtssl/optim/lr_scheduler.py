"""``polynomial_decay_fraction``: fairseq's ``polynomial_decay`` with the warm-up given as a fraction
of the run's own updates (``total_num_update``, by default ``optimization.max_update``).

The FaST-VGS trainer (BertAdam, ``warmup_linear``) warms up over ``warmup_fraction`` x the run's updates
and then decays linearly to 0 at its last update; a stage of a sequential scenario is its own run, so
each stage warms up over its own 10 %. With power 1 and end learning rate 0 this is that schedule:
``lr * n / W`` for ``n <= W``, then ``lr * (N - n) / (N - W)``, ``W = round(warmup_fraction * N)``.
"""

from dataclasses import dataclass, field
from typing import Optional

from fairseq.optim.lr_scheduler import register_lr_scheduler
from fairseq.optim.lr_scheduler.polynomial_decay_schedule import (
    PolynomialDecayLRSchedule,
    PolynomialDecayLRScheduleConfig,
)
from omegaconf import DictConfig, open_dict


@dataclass
class PolynomialDecayFractionConfig(PolynomialDecayLRScheduleConfig):
    warmup_fraction: Optional[float] = field(
        default=None,
        metadata={
            "help": "warm up over this fraction of total_num_update (this run's max_update); replaces "
            "warmup_updates, which the saved config then shows as the computed count"
        },
    )


def warmup_updates(fraction: float, total: float) -> int:
    """The warm-up length ``round(fraction * total)`` (at least 1 update when the fraction is positive)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"lr_scheduler.warmup_fraction must be in [0, 1), got {fraction}")
    return max(1, round(fraction * total)) if fraction > 0 else 0


@register_lr_scheduler("polynomial_decay_fraction", dataclass=PolynomialDecayFractionConfig)
class PolynomialDecayFractionSchedule(PolynomialDecayLRSchedule):
    def __init__(self, cfg: PolynomialDecayFractionConfig, optimizer):
        if cfg.warmup_fraction is not None:
            n = warmup_updates(cfg.warmup_fraction, cfg.total_num_update)
            if isinstance(cfg, DictConfig):
                with open_dict(cfg):
                    cfg.warmup_updates = n
            else:
                cfg.warmup_updates = n
        super().__init__(cfg, optimizer)
