"""Verdicts on a paper's claim from a few seeds: reproduced in direction, contradicted, or inconclusive.

A claim compares two conditions on one metric (``a`` better than ``b``). Each condition is measured once
per seed; its interval is the mean plus or minus one sample standard deviation (n - 1), or the single
value of a condition measured once (a fixed starting model). The claim is

  reproduced    when the intervals do not overlap and ``a`` is on the better side,
  contradicted  when they do not overlap and ``a`` is on the worse side,
  inconclusive  when they overlap.

A claim that ``a`` loses nothing against ``b`` (``not_worse``) is contradicted when ``a``'s interval
lies wholly on the worse side of ``b``'s, and reproduced otherwise: such a claim is never inconclusive.

Three seeds give a rough interval; "reproduced in direction" says only that the difference is larger
than the run-to-run spread measured here, not that it is significant.
"""

import statistics
from dataclasses import dataclass
from typing import Dict, List, Sequence

REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced in direction", "contradicted", "inconclusive"


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (0 for one value) and the values of one condition."""

    mean: float
    std: float
    values: tuple

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        vals = tuple(float(v) for v in values)
        if not vals:
            raise ValueError("no values")
        return cls(statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, vals)

    @property
    def low(self) -> float:
        return self.mean - self.std

    @property
    def high(self) -> float:
        return self.mean + self.std

    def __str__(self) -> str:
        return f"{self.mean:.4g} +- {self.std:.2g} (n={len(self.values)})"


def compare(a: Sequence[float], b: Sequence[float], higher_is_better: bool, not_worse: bool = False) -> str:
    """The verdict on "``a`` is better than ``b``", or with ``not_worse`` on "``a`` is no worse than ``b``"
    (see the module docstring)."""
    sa, sb = Spread.of(a), Spread.of(b)
    overlap = sa.low <= sb.high and sb.low <= sa.high
    a_better = (sa.mean > sb.mean) == higher_is_better
    if not_worse:
        return REPRODUCED if overlap or a_better else CONTRADICTED
    if overlap:
        return INCONCLUSIVE
    return REPRODUCED if a_better else CONTRADICTED


def all_of(verdicts: Sequence[str]) -> str:
    """A claim made of several comparisons: contradicted if any is, reproduced only if all are."""
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return REPRODUCED if verdicts and all(v == REPRODUCED for v in verdicts) else INCONCLUSIVE


@dataclass
class Claim:
    """One paper claim, its comparisons (``a``, ``b``, metric) and the overall verdict."""

    paper: str
    text: str
    comparisons: List[Dict]

    @property
    def verdict(self) -> str:
        return all_of([c["verdict"] for c in self.comparisons])

    @staticmethod
    def comparison(
        a_name: str,
        a: Sequence[float],
        b_name: str,
        b: Sequence[float],
        metric: str,
        higher: bool,
        not_worse: bool = False,
    ) -> Dict:
        """One comparison of "``a`` better than (``not_worse``: no worse than) ``b``" on ``metric``."""
        return {
            "a": a_name,
            "b": b_name,
            "metric": metric,
            "higher_is_better": higher,
            "claim": "no worse than" if not_worse else "better than",
            "a_spread": str(Spread.of(a)),
            "b_spread": str(Spread.of(b)),
            "a_values": [round(float(v), 4) for v in a],
            "b_values": [round(float(v), 4) for v in b],
            "verdict": compare(a, b, higher, not_worse),
        }

    def as_dict(self) -> Dict:
        return {"paper": self.paper, "claim": self.text, "verdict": self.verdict, "comparisons": self.comparisons}
