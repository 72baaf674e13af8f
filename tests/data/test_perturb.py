"""Perturbations: durations and pitches measured on test tones and speech-like signals; the phase-vocoder
pitch shift checked against librosa's phase vocoder (installed for the tests only)."""

import numpy as np
import pytest
from scipy.signal import lfilter

from fairseq_mtssl.data.perturb import (
    add_noise,
    phase_vocoder_stretch,
    pitch_shift,
    reverberate,
    speed,
    time_stretch,
)

SR = 16000


def tone(freq=220.0, seconds=2.0):
    t = np.arange(int(SR * seconds)) / SR
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def speechlike(f0_start=120.0, f0_end=120.0, seconds=2.0, seed=0):
    """A voiced-speech stand-in: harmonics of a (gliding) f0 up to 4 kHz with a 1/k glottal-like tilt,
    through three formant resonators (700, 1200, 2600 Hz), under a 4 Hz syllabic envelope, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    f0 = np.linspace(f0_start, f0_end, len(t))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    src = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k for k in range(1, int(4000 / f0_end)))
    for fc, bw in ((700, 90), (1200, 110), (2600, 160)):
        r = np.exp(-np.pi * bw / SR)
        src = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * fc / SR), r * r], src)
    env = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
    x = src * env
    x = x / np.abs(x).max() * 0.5 + 0.002 * rng.standard_normal(len(t))
    return x.astype(np.float32)


def peak_hz(x):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * SR / len(x)


def f0_track(x, lo, hi, frame=0.2, harmonics=8):
    """Per 0.2 s frame, the f0 in [lo, hi] whose first harmonics carry the most log-magnitude
    (8x zero-padded spectrum, 0.05 Hz grid): a brute-force harmonic-sum pitch estimator."""
    n = int(frame * SR)
    cands = np.arange(lo, hi, 0.05)
    out = []
    for start in range(n // 2, len(x) - n - n // 2, n // 2):
        seg = x[start : start + n] * np.hanning(n)
        spec = np.log(np.abs(np.fft.rfft(seg, 8 * n)) + 1e-6)
        freqs = np.fft.rfftfreq(8 * n, 1 / SR)
        score = sum(np.interp(k * cands, freqs, spec) for k in range(1, harmonics + 1))
        out.append(cands[np.argmax(score)])
    return np.array(out)


def envelope(x, hop=320):
    """RMS envelope in 20 ms frames."""
    n = len(x) // hop
    return np.sqrt((x[: n * hop].reshape(n, hop) ** 2).mean(1))


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_changes_length_and_pitch_by_the_factor(factor):
    y = speed(tone(), factor)
    assert abs(len(y) - 32000 / factor) <= 1
    assert abs(peak_hz(y) / 220.0 - factor) < 0.01


@pytest.mark.parametrize("method", ["phase_vocoder", "wsola"])
@pytest.mark.parametrize("freq", [150.0, 220.0, 440.0])
@pytest.mark.parametrize("semitones", [2, -2])
def test_pitch_shift_of_a_tone_keeps_length_and_moves_pitch(semitones, freq, method):
    y = pitch_shift(tone(freq), semitones, method=method)
    assert len(y) == 32000
    assert abs(peak_hz(y[1000:-1000]) / freq / 2 ** (semitones / 12) - 1) < 0.01


@pytest.mark.parametrize("method", ["phase_vocoder", "wsola"])
@pytest.mark.parametrize("glide", [(120.0, 120.0), (105.0, 150.0)], ids=["steady", "intonation"])
@pytest.mark.parametrize("semitones", [2, -2])
def test_pitch_shift_of_speechlike_audio_moves_f0_by_the_interval_and_keeps_timing(semitones, glide, method):
    x = speechlike(*glide)
    y = pitch_shift(x, semitones, method=method)
    ratio = 2 ** (semitones / 12)
    assert len(y) == len(x)
    f_x = f0_track(x, 0.8 * glide[0], 1.25 * glide[1])
    f_y = f0_track(y, 0.8 * glide[0] * ratio, 1.25 * glide[1] * ratio)
    assert abs(np.median(f_y / f_x) / ratio - 1) < 0.01, np.median(f_y / f_x) / ratio
    # the duration and the timing are kept: the syllabic envelope lines up, with no lag
    ex, ey = envelope(x), envelope(y)
    ex, ey = ex - ex.mean(), ey - ey.mean()
    xc = np.correlate(ey, ex, mode="full")
    assert abs(int(np.argmax(xc)) - (len(ex) - 1)) <= 1
    assert np.corrcoef(ex, ey)[0, 1] > 0.9


def _librosa_reference(x, stretch):
    librosa = pytest.importorskip(
        "librosa", reason="librosa (test-only reference phase vocoder, in requirements.txt) is not installed"
    )
    spec = librosa.stft(x.astype(np.float64), n_fft=512, hop_length=128, window="hann", center=True, pad_mode="reflect")
    spec = librosa.phase_vocoder(spec, rate=1 / stretch, hop_length=128, n_fft=512)
    return librosa, librosa.istft(spec, hop_length=128, n_fft=512, window="hann", length=round(len(x) * stretch))


@pytest.mark.parametrize("signal", ["tone", "speechlike"])
@pytest.mark.parametrize("semitones", [2, -2])
def test_phase_vocoder_matches_librosa(signal, semitones):
    """The stretch equals librosa's phase vocoder (same STFT geometry, run in float64 as ours accumulates
    phases) to float32 precision; the whole
    pitch shift equals librosa's stretch followed by soxr resampling, up to the resamplers' difference."""
    x = tone(220.0) if signal == "tone" else speechlike()
    stretch = 2 ** (semitones / 12)
    librosa, ref = _librosa_reference(x, stretch)
    ours = phase_vocoder_stretch(x, stretch)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-6 * np.abs(ref).max()

    shifted = pitch_shift(x, semitones)
    ref_shift = librosa.resample(ref, orig_sr=int(SR * stretch), target_sr=SR, res_type="soxr_hq")[: len(x)]
    inner = slice(512, len(ref_shift) - 512)
    err = np.linalg.norm(shifted[inner] - ref_shift[inner]) / np.linalg.norm(ref_shift[inner])
    assert err < 0.01, err  # measured: 4e-4 (tone), 2e-3 (speech-like)


def test_pitch_shift_refuses_unknown_methods_and_too_short_input():
    with pytest.raises(ValueError, match="method must be one of"):
        pitch_shift(tone(), 2, method="psola")
    with pytest.raises(ValueError, match="too short for n_fft 512"):
        pitch_shift(tone(seconds=0.01), 2)


@pytest.mark.parametrize("stretch", [0.8, 1.25])
def test_time_stretches_keep_pitch(stretch):
    for fn in (time_stretch, phase_vocoder_stretch):
        y = fn(tone(300.0), stretch)
        assert abs(len(y) - 32000 * stretch) <= 1
        assert abs(peak_hz(y[1000:-1000]) - 300.0) < 3.0


def test_noise_reaches_the_requested_snr_and_reverb_keeps_length():
    rng = np.random.default_rng(0)
    x = tone()
    y = add_noise(x, 10.0, rng)
    snr = 10 * np.log10(np.mean(x**2) / np.mean((y - x) ** 2))
    assert abs(snr - 10.0) < 0.1
    r = reverberate(x, 0.3, rng)
    assert len(r) == len(x) and not np.allclose(r, x)
