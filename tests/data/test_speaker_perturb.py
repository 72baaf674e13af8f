"""Speaker perturbation: Praat's change gender, the cookbook equaliser, Praat missing or failing, speaker pitch ranges."""

import os
import pickle
import sys

import numpy as np
import pytest
from builders import voiced

from fairseq_mtssl.data import speaker_perturb

SR = 16000
needs_praat = pytest.mark.skipif(not speaker_perturb.praat_available(), reason="praat-parselmouth is not installed")


def _median_f0(x: np.ndarray) -> float:
    parselmouth = speaker_perturb.require_parselmouth()
    f0 = parselmouth.Sound(x.astype(np.float64), sampling_frequency=SR).to_pitch_ac(pitch_floor=75, pitch_ceiling=600)
    f = f0.selected_array["frequency"]
    return float(np.median(f[f > 0]))


@needs_praat
def test_change_gender_moves_the_pitch_median_and_keeps_the_length():
    x = voiced(24000, 150.0)
    y = speaker_perturb.change_gender(x, SR, 75, 600, formant_ratio=1.2, pitch_ratio=1.5, range_ratio=1.0)
    assert len(y) == len(x)
    assert abs(_median_f0(y) / _median_f0(x) - 1.5) < 0.05


@needs_praat
def test_a_praat_failure_leaves_the_clean_copy_equalised():
    x = (1e-4 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)  # nothing voiced
    out, how = speaker_perturb.perturb_speaker(x, SR, np.random.default_rng(7))
    assert not how["praat"] and len(out) == len(x)
    rng = np.random.default_rng(7)
    for _ in range(6):  # the three ratios and their coins, drawn before Praat runs, then Praat's seed
        rng.random()
    rng.integers(speaker_perturb.PRAAT_SEEDS)
    np.testing.assert_allclose(out, np.clip(speaker_perturb.random_eq(x, SR, rng), -1, 1).astype(np.float32), atol=1e-7)


def test_equaliser_filters_are_the_cookbooks():
    """Peaking: the gain at its centre; low shelf: the gain at DC; high shelf: at Nyquist; 0 dB: identity."""
    from scipy.signal import sosfreqz

    for g in (-12.0, -3.0, 6.0, 12.0):
        _, h = sosfreqz(speaker_perturb.peaking(g, 1000.0, 3.0, SR)[None], worN=[1000.0], fs=SR)
        assert abs(20 * np.log10(abs(h[0])) - g) < 1e-6
        _, h = sosfreqz(speaker_perturb.low_shelf(g, 200.0, 2.0, SR)[None], worN=[0.0], fs=SR)
        assert abs(20 * np.log10(abs(h[0])) - g) < 1e-6
        _, h = sosfreqz(speaker_perturb.high_shelf(g, 5000.0, 2.0, SR)[None], worN=[SR / 2], fs=SR)
        assert abs(20 * np.log10(abs(h[0])) - g) < 1e-6
    fc = speaker_perturb.eq_frequencies()
    assert len(fc) == 10 and abs(fc[0] - 60) < 1e-9 and abs(fc[-1] - 7600) < 1e-6
    flat = speaker_perturb.eq_sections(np.zeros(10), fc, np.full(10, 3.0), SR)
    x = np.random.default_rng(0).standard_normal(4000)
    from scipy.signal import sosfilt

    np.testing.assert_allclose(sosfilt(flat, x), x, atol=1e-9)
    q, gains = speaker_perturb.draw_eq(np.random.default_rng(0))
    assert q.min() >= 2 and q.max() <= 5 and np.abs(gains).max() <= 12


def test_missing_praat_is_one_clear_error(monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "parselmouth", None)  # not installed
    with pytest.raises(speaker_perturb.PraatUnavailable, match=r"pip install praat-parselmouth \(the PyPI name"):
        speaker_perturb.perturb_speaker(np.zeros(16000, np.float32), SR, np.random.default_rng(0))
    monkeypatch.setitem(sys.modules, "parselmouth", types.ModuleType("parselmouth"))  # the unrelated package
    with pytest.raises(speaker_perturb.PraatUnavailable, match="unrelated module"):
        speaker_perturb.require_parselmouth()
    assert not speaker_perturb.praat_available()
    out = speaker_perturb.random_eq(np.ones(100), SR, np.random.default_rng(0))  # the equaliser needs no Praat
    assert out.shape == (100,)


def test_speaker_pitch_ranges_from_a_tsv_or_the_authors_pickle(tmp_path):
    tsv = tmp_path / "ranges.tsv"
    tsv.write_text("speaker\tfloor\tceiling\nspkA\t70\t300\nspkB\t120\t500\n")
    assert speaker_perturb.read_speaker_pitch_ranges(tsv) == {"spkA": (70.0, 300.0), "spkB": (120.0, 500.0)}
    authors = {"train": {"19": ("F", (50, 450, 200)), "1447": ("M", (75, 300, 120)), "26": ("M", (np.float64(70.0), 250.0, 1))},
               "valid": {}}  # fmt: skip
    (tmp_path / "spk2info.dict").write_bytes(pickle.dumps(authors))
    table = speaker_perturb.read_speaker_pitch_ranges(tmp_path / "spk2info.dict", "train")
    assert table == {"19": (75.0, 450.0), "1447": (60.0, 400.0), "26": (70.0, 250.0)}  # the authors' corrections
    (tmp_path / "evil.dict").write_bytes(pickle.dumps({"train": {"1": (os.system, (1, 2, 3))}}))
    with pytest.raises(speaker_perturb.SpeakerInfoError, match="refusing to load"):
        speaker_perturb.read_speaker_pitch_ranges(tmp_path / "evil.dict")
    tsv.write_text("spkA\t70\n")
    with pytest.raises(speaker_perturb.SpeakerInfoError, match="ranges.tsv:1: expected"):
        speaker_perturb.read_speaker_pitch_ranges(tsv)
