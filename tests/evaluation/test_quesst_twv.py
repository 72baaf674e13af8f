"""QUESST 2014's term-weighted value (MTWV, ATWV) on cases worked by hand, as its scoring scripts compute it."""

import math

import numpy as np
import pytest

from fairseq_mtssl.evaluation.quesst import (
    BETA,
    EFFECTIVE_PRIOR,
    evaluate_quesst,
    mtwv,
    official_trials,
    twv,
)


def test_effective_prior_is_the_scoring_scripts():
    # score-TWV-Cnxe.sh hands the jar 0.0741289: P_target C_miss / (P_target C_miss + (1 - P_target) C_fa)
    assert math.floor(EFFECTIVE_PRIOR * 1e7) / 1e7 == 0.0741289
    assert BETA == pytest.approx(12.49, rel=1e-12)


def hand_case():
    """Queries A (targets f00, f01), B (target f02), C (no target: left out), 30 files. Unlisted trials score 0."""
    scores = np.zeros((3, 30))
    truth = np.zeros((3, 30), dtype=bool)
    truth[0, [0, 1]] = True
    truth[1, 2] = True
    scores[0, 0], scores[0, 5], scores[0, 1] = 5.0, 4.0, 3.8  # A: hit, false alarm, hit
    scores[1, 2], scores[1, 3] = 6.0, 3.5  # B: hit, false alarm
    scores[2, 10] = 10.0  # C's false alarm would cost if C counted
    return scores, truth


def test_mtwv_by_hand():
    scores, truth = hand_case()
    # Thresholds from the top (T = 2 queries, beta = 12.49, A has 28 non-target files, B 29):
    #   6   : A P_miss 1,   B P_miss 0                      -> TWV = 1 - (1 + 0) / 2              = 0.5
    #   5   : A P_miss 1/2                                  -> TWV = 1 - (1/2) / 2                 = 0.75
    #   4   : A P_miss 1/2, A P_fa 1/28                     -> TWV = 1 - (1/2 + 12.49/28) / 2     = 0.526964...
    #   3.8 : A P_miss 0,   A P_fa 1/28                     -> TWV = 1 - (12.49/28) / 2           = 0.776964...
    #   3.5 : ... and B P_fa 1/29                           -> TWV = 1 - (12.49/28 + 12.49/29) / 2 = 0.561622...
    #   0   : every trial                                   -> TWV = 1 - 12.49 (27/28 + 28/29) / 2 < 0
    got = mtwv(scores, truth)
    assert got["mtwv"] == pytest.approx(1 - (12.49 / 28) / 2, abs=1e-12)
    assert got["threshold"] == 3.8
    assert got["terms"] == 2
    assert (got["p_miss"], got["p_fa"]) == pytest.approx((0.0, (1 / 28) / 2))
    # not pooled over trials (that would be 1 - 12.49 / 57), and not NIST 2006's beta 999.9 (max at 5: 0.75)
    assert got["mtwv"] != pytest.approx(1 - 12.49 / 57, abs=1e-6)
    assert mtwv(scores, truth, beta=999.9)["threshold"] == 5.0
    # actual TWV of decisions: YES for A f00, A f05, B f02 -> 1 - (1/2 + 12.49/28 + 0) / 2
    yes = np.zeros_like(truth)
    yes[0, [0, 5]] = yes[1, 2] = True
    assert twv(yes, truth)["twv"] == pytest.approx(1 - (0.5 + 12.49 / 28) / 2, abs=1e-12)
    # nothing worth detecting: no detection, TWV 0
    none = mtwv(-scores + np.where(truth, -100, 0), truth)
    assert none["mtwv"] == 0.0 and none["threshold"] == math.inf


def test_unscored_trials_take_the_default_score():
    """As the scorer: every query of the term list against every file; trials s3prl did not write at -10, NO."""
    from fairseq_mtssl.evaluation.quesst import GroundTruth

    scores, truth = hand_case()
    terms = ("A", "B", "C", "D")
    files = tuple(f"f{k:02d}" for k in range(30))
    targets = {(terms[i], files[j]) for i, j in zip(*np.nonzero(truth))} | {("D", "f20")}
    gt = GroundTruth(terms, files, frozenset(targets))
    # the system scored A, B, C against f00-f09 only; D (another language) not at all
    sub = scores[:, :10]
    full, target, decided = official_trials(sub, ["A", "B", "C"], files[:10], gt, decisions=sub > 2.0)
    assert full.shape == (4, 30) and (full[:, 10:] == -10).all() and (full[3] == -10).all()
    assert target.sum() == 4 and not decided[:, 10:].any() and decided[0, 0]
    # T = 3 queries with a target (A, B, D); D is missed at every threshold above -10:
    #   at 3.8: TWV = 1 - (12.49/28 + 0 + 1) / 3 = 0.517976...
    got = evaluate_quesst(sub, ["A", "B", "C"], files[:10], gt)
    assert got["mtwv"] == pytest.approx(1 - (12.49 / 28 + 1) / 3, abs=1e-12)
    assert got["threshold"] == 3.8 and got["terms"] == 3
    # YES above 2: A f00, A f05, A f01, B f02, B f03 -> A P_fa 1/28, B P_fa 1/29, D P_miss 1
    assert got["atwv"] == pytest.approx(1 - (12.49 / 28 + 12.49 / 29 + 1) / 3, abs=1e-12)
