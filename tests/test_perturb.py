"""Perturbations: durations and pitches measured on test tones and on corpus speech."""

import numpy as np
import pytest

from fairseq_mtssl.data.perturb import add_noise, pitch_shift, reverberate, speed, time_stretch

SR = 16000


def tone(freq=220.0, seconds=2.0):
    t = np.arange(int(SR * seconds)) / SR
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * SR / len(x)


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_changes_length_and_pitch_by_the_factor(factor):
    y = speed(tone(), factor)
    assert abs(len(y) - 32000 / factor) <= 1
    assert abs(peak_hz(y) / 220.0 - factor) < 0.01


@pytest.mark.parametrize("semitones", [2, -2])
def test_pitch_shift_keeps_length_and_moves_pitch(semitones):
    y = pitch_shift(tone(), semitones)
    assert len(y) == 32000
    assert abs(peak_hz(y[1000:-1000]) / 220.0 - 2 ** (semitones / 12)) < 0.01


@pytest.mark.parametrize("stretch", [0.8, 1.25])
def test_time_stretch_keeps_pitch(stretch):
    y = time_stretch(tone(300.0), stretch)
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
