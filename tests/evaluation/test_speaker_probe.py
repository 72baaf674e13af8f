"""The speaker probe: its per-speaker split, and its classifier against scikit-learn's LogisticRegression."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from fairseq_mtssl.evaluation.speaker_probe import SpeakerProbeError, fit_predict, speaker_probe, split_by_speaker


def _speakers_data(n_speakers=5, per_speaker=8, dim=12, spread=4.0, seed=0):
    """Utterance vectors around one centre per speaker: separable when ``spread`` is large against 1."""
    rng = np.random.default_rng(seed)
    centres = spread * rng.standard_normal((n_speakers, dim))
    speakers = [f"spk{s}" for s in range(n_speakers) for _ in range(per_speaker)]
    x = np.stack([centres[int(s[3:])] + rng.standard_normal(dim) for s in speakers])
    return x, speakers


def test_split_holds_out_some_utterances_of_every_speaker_and_is_seeded():
    speakers = ["a"] * 4 + ["b"] * 2 + ["c"] + ["d"] * 5
    train, test = split_by_speaker(speakers, 0.5, seed=3)
    assert sorted(train + test) == list(range(len(speakers))) and not set(train) & set(test)
    held = {s: sum(speakers[i] == s for i in test) for s in "abcd"}
    assert held == {"a": 2, "b": 1, "c": 0, "d": 2}  # round(n/2), at least 1, never all; a singleton only trains
    assert all(any(speakers[i] == s for i in train) for s in "abcd")
    assert split_by_speaker(speakers, 0.5, seed=3) == (train, test)
    assert split_by_speaker(speakers, 0.5, seed=4) != (train, test)


def test_separable_speakers_are_all_recognised_as_scikit_learn_does():
    """Well separated speakers: every held-out utterance right, the same predictions as scikit-learn's
    multinomial LogisticRegression fitted on the same standardised training split."""
    x, speakers = _speakers_data()
    result = speaker_probe(x, speakers, test_fraction=0.5, seed=0)
    assert result["test_acc"] == 1.0 and result["speakers"] == 5
    assert result["train_utterances"] == result["test_utterances"] == 20 and result["chance"] == 0.2
    train, test = split_by_speaker(speakers, 0.5, seed=0)
    y = np.array([int(s[3:]) for s in speakers])
    scaler = StandardScaler().fit(x[train])
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(x[train]), y[train])
    ours = fit_predict(x[train], y[train], x[test], 5).argmax(1)
    assert np.array_equal(ours, ref.predict(scaler.transform(x[test]))) and np.array_equal(ours, y[test])


@pytest.mark.parametrize("l2", [1e-2, 1e-1])
def test_probabilities_equal_scikit_learns_at_the_same_penalty(l2):
    """Mean cross-entropy + l2 ||W||^2 is scikit-learn's C = 1 / (2 l2 N): the same optimum, so the same
    probabilities (overlapping speakers, so the optimum is not at the penalty's mercy alone)."""
    x, speakers = _speakers_data(n_speakers=4, per_speaker=15, dim=6, spread=0.8, seed=1)
    y = np.array([int(s[3:]) for s in speakers])
    train, test = split_by_speaker(speakers, 0.4, seed=1)
    scaler = StandardScaler().fit(x[train])
    c = 1.0 / (2 * l2 * len(train))
    ref = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(scaler.transform(x[train]), y[train])
    ours = fit_predict(x[train], y[train], x[test], 4, l2=l2)
    np.testing.assert_allclose(ours, ref.predict_proba(scaler.transform(x[test])), atol=1e-3)
    assert 0.3 < np.mean(ours.argmax(1) == y[test]) < 1.0  # neither trivial nor separable


def test_too_few_speakers_or_utterances_are_refused():
    x, _ = _speakers_data(n_speakers=2, per_speaker=1)
    with pytest.raises(SpeakerProbeError, match="2 or more speakers"):
        speaker_probe(x, ["a", "b"])  # one utterance each: nothing to test on
    with pytest.raises(SpeakerProbeError, match="one feature vector per speaker"):
        speaker_probe(x, ["a", "b", "c"])


def test_frame_probe_finds_speakers_in_separable_frames_and_not_in_noise():
    from fairseq_mtssl.evaluation.speaker_probe import frame_speaker_probe

    rng = np.random.default_rng(0)
    speakers = [f"s{i % 3}" for i in range(12)]
    centres = rng.normal(size=(3, 8)) * 3
    utts = [centres[i % 3] + rng.normal(size=(int(rng.integers(20, 40)), 8)) for i in range(12)]
    clear = frame_speaker_probe(utts, speakers)
    assert clear["frame_test_acc"] > 0.9 and clear["test_frames"] > 100
    noise = frame_speaker_probe([rng.normal(size=u.shape) for u in utts], speakers)
    assert noise["frame_test_acc"] < 0.6 and abs(noise["frame_chance"] - 1 / 3) < 0.2
    # the held-out utterances are those of the utterance-level probe's split
    assert clear["train_frames"] + clear["test_frames"] == sum(len(u) for u in utts)
