"""Verdicts from seeds: the interval rule, written out by hand for small cases."""

import statistics

import pytest

from fairseq_mtssl.jobs.verdicts import CONTRADICTED, INCONCLUSIVE, REPRODUCED, Claim, Spread, all_of, compare


def test_spread_is_mean_and_sample_standard_deviation():
    s = Spread.of([1.0, 2.0, 6.0])
    assert s.mean == 3.0 and s.std == pytest.approx(statistics.stdev([1, 2, 6])) and s.low < 3 < s.high
    assert Spread.of([4.0]).std == 0.0
    with pytest.raises(ValueError):
        Spread.of([])


@pytest.mark.parametrize(
    "a, b, higher, expected",
    [
        ([10, 11, 12], [1, 2, 3], True, REPRODUCED),  # a clearly higher, higher is better
        ([10, 11, 12], [1, 2, 3], False, CONTRADICTED),  # a clearly higher, lower is better
        ([1, 2, 3], [10, 11, 12], False, REPRODUCED),
        ([1, 5, 9], [4, 5, 6], True, INCONCLUSIVE),  # intervals overlap
        ([3.0], [1.0, 2.0, 3.0], True, INCONCLUSIVE),  # a single value inside the other interval
        ([3.1], [1.0, 2.0, 2.5], True, REPRODUCED),  # above it: 1.83 + 0.76 < 3.1
    ],
)
def test_compare(a, b, higher, expected):
    assert compare(a, b, higher) == expected


def test_no_worse_is_contradicted_only_by_a_clear_loss():
    assert compare([5, 6, 7], [6.0], True, not_worse=True) == REPRODUCED  # overlaps: no clear loss
    assert compare([8, 9, 10], [6.0], True, not_worse=True) == REPRODUCED  # better
    assert compare([1, 2, 3], [6.0], True, not_worse=True) == CONTRADICTED
    assert compare([1, 2, 3], [6.0], False, not_worse=True) == REPRODUCED  # lower is better: a gained


def test_a_claim_of_several_comparisons():
    assert all_of([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert all_of([REPRODUCED, INCONCLUSIVE]) == INCONCLUSIVE
    assert all_of([REPRODUCED, CONTRADICTED]) == CONTRADICTED
    assert all_of([]) == INCONCLUSIVE
    c = Claim("p", "t", [Claim.comparison("x", [3, 4], "y", [0, 1], "m", True)])
    d = c.as_dict()
    assert d["verdict"] == REPRODUCED and d["comparisons"][0]["a_values"] == [3, 4]
