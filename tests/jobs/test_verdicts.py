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


def test_study_claims_read_the_right_numbers():
    """The study's five claims from hand-made stage results: each comparison picks its metric and direction."""
    from types import SimpleNamespace

    from fairseq_mtssl.jobs.study import Study

    seeds = [1, 2, 3]
    results = {}
    for s in seeds:
        for variant, acc in (("both", 0.6), ("offline_only", 0.5), ("online_only", 0.4)):
            curve = [{"updates": u, "valid_acc": acc, "test_acc": acc + 0.01 * s + 0.001 * u} for u in (1, 2)]
            results[f"curve_mt4ssl_{variant}_seed{s}"] = {"curve": curve}
        results[f"eval_vgs_plus_seed{s}"] = {"mean_recall": 20.0 + s, "abx_across_final": 30.0 + s}
        results[f"eval_w2v2_then_vgs_seed{s}"] = {"mean_recall": 21.0 + s, "abx_across_final": 40.0 + s}

    def metric(start, values):
        return {"start": start, "score_values": values}

    results["score_evidence"] = {
        "summary": {
            "metrics": {
                "probe_gap": metric(-0.10, [-0.02, -0.03, -0.025]),  # gap magnitude shrinks: reproduced
                "abx_across_gap": metric(5.0, [5.5, 6.0, 6.5]),  # gap grows: contradicted
                "probe_clean": metric(0.50, [0.49, 0.50, 0.51]),  # no clear loss
                "abx_across_clean": metric(20.0, [20.5, 19.5, 20.0]),
            }
        }
    }
    args = SimpleNamespace(seeds=seeds, study_parts=["mt4ssl", "vgs", "score"])
    job = SimpleNamespace(args=args, out=None, pipeline=SimpleNamespace(results=results))
    claims = {c.text: c for c in Study(job).claims()}
    mt4ssl = claims["with both targets the model converges faster than with either alone"]
    assert [c["verdict"] for c in mt4ssl.comparisons] == [REPRODUCED, REPRODUCED]
    assert mt4ssl.comparisons[0]["a_values"][0] == pytest.approx(100 * (0.6 + 0.01 + 0.0015))  # curve mean, %
    seq = claims["sequential W2V2 -> VGS retrieves better than simultaneous VGS+"]
    assert seq.verdict == INCONCLUSIVE  # 22-24 against 21-23: the intervals overlap
    forget = claims["VGS+ keeps more phonetic structure than a sequential switch to VGS (forgets less)"]
    assert forget.verdict == REPRODUCED  # lower ABX is better
    gap = claims["fine-tuning narrows the gap between perturbed and clean test audio"]
    assert [c["verdict"] for c in gap.comparisons] == [REPRODUCED, CONTRADICTED] and gap.verdict == CONTRADICTED
    assert claims["without losing on clean audio"].verdict == REPRODUCED


def test_study_parts_judge_only_the_claims_they_ran():
    """``--study-parts vgs`` (a rerun of the VGS part): the two VGS+SSL claims, nothing that needs other runs."""
    from types import SimpleNamespace

    from fairseq_mtssl.jobs.study import Study

    results = {}
    for s in (1, 2):
        results[f"eval_vgs_plus_seed{s}"] = {"mean_recall": 20.0 + s, "abx_across_final": 30.0 + s}
        results[f"eval_w2v2_then_vgs_seed{s}"] = {"mean_recall": 30.0 + s, "abx_across_final": 40.0 + s}
    args = SimpleNamespace(seeds=[1, 2], study_parts=["vgs"])
    claims = Study(SimpleNamespace(args=args, out=None, pipeline=SimpleNamespace(results=results))).claims()
    assert [c.paper for c in claims] == ["VGS+SSL (Khorrami et al., EUSIPCO 2023)"] * 2
    assert Study(SimpleNamespace(args=SimpleNamespace(study_parts=["score"]), out=None, pipeline=None)).parts == [
        "score",
        "mt4ssl",
    ]  # SCORE starts from the strongest MT4SSL run
