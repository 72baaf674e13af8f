"""Waveform perturbations for SCORE-style pairs, in numpy/scipy (no torchaudio).

All functions take and return float32 mono ``(T,)`` at ``sample_rate`` (16 kHz by default).

- :func:`speed` -- sox ``speed``: play ``factor`` times faster; tempo and pitch both change,
  the length becomes ``T / factor`` (SCORE draws 0.9, 1.0 or 1.1).
- :func:`pitch_shift` -- shift the pitch by ``semitones`` keeping the duration: a WSOLA time-stretch by
  ``2^(s/12)`` followed by resampling back to the original length (SCORE draws +2 or -2).
- :func:`add_noise` -- additive noise at a given SNR (white, or a given noise signal); off in SCORE.
- :func:`reverberate` -- convolution with a synthetic exponentially decaying room response; off in SCORE.
"""

from fractions import Fraction
from typing import Optional

import numpy as np
from scipy.signal import correlate, fftconvolve, resample_poly

SAMPLE_RATE = 16000


def speed(wav: np.ndarray, factor: float) -> np.ndarray:
    """``factor`` times faster (sox ``speed``): ``(T,)`` -> ``(~T / factor,)``."""
    if factor <= 0:
        raise ValueError(f"speed factor must be > 0, got {factor}")
    if factor == 1.0:
        return wav.astype(np.float32, copy=True)
    ratio = Fraction(factor).limit_denominator(1000)
    return resample_poly(wav, ratio.denominator, ratio.numerator).astype(np.float32)


def time_stretch(
    wav: np.ndarray, stretch: float, sample_rate: int = SAMPLE_RATE, frame_ms: float = 30.0, tolerance_ms: float = 10.0
) -> np.ndarray:
    """WSOLA: ``(T,)`` -> ``(~T * stretch,)`` with the pitch unchanged.

    Output frames are laid every ``frame/2`` samples; each is the input segment near its nominal
    position ``k * hop / stretch`` (within ``tolerance``) that best continues the previous one
    (maximum cross-correlation), Hann-windowed and overlap-added.
    """
    if stretch <= 0:
        raise ValueError(f"stretch must be > 0, got {stretch}")
    n = int(sample_rate * frame_ms / 1000) // 2 * 2
    hop_out, tol = n // 2, int(sample_rate * tolerance_ms / 1000)
    hop_in = hop_out / stretch
    out_len = int(round(len(wav) * stretch))
    padded = np.concatenate(
        [np.zeros(tol, np.float32), wav.astype(np.float32), np.zeros(n + 2 * tol + hop_out, np.float32)]
    )
    window = np.hanning(n).astype(np.float32)
    frames = out_len // hop_out + 1
    out = np.zeros(frames * hop_out + n, np.float32)
    norm = np.zeros_like(out)
    prev = tol  # position (in padded) of the previously chosen segment
    for k in range(frames):
        nominal = tol + int(round(k * hop_in))
        if k == 0:
            start = nominal
        else:
            template = padded[prev + hop_out : prev + hop_out + n]
            region = padded[nominal - tol : nominal + tol + n]
            score = correlate(region, template, mode="valid", method="fft")
            start = nominal - tol + int(np.argmax(score))
        out[k * hop_out : k * hop_out + n] += window * padded[start : start + n]
        norm[k * hop_out : k * hop_out + n] += window
        prev = start
    out = out / np.maximum(norm, 1e-3)
    return out[:out_len]


def pitch_shift(wav: np.ndarray, semitones: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Shift the pitch by ``semitones`` (e.g. +2 / -2), keeping the length ``T``."""
    if semitones == 0:
        return wav.astype(np.float32, copy=True)
    r = 2.0 ** (semitones / 12.0)
    stretched = time_stretch(wav, r, sample_rate)
    shifted = speed(stretched, r)
    if len(shifted) >= len(wav):
        return shifted[: len(wav)]
    return np.pad(shifted, (0, len(wav) - len(shifted)))


def add_noise(
    wav: np.ndarray, snr_db: float, rng: np.random.Generator, noise: Optional[np.ndarray] = None
) -> np.ndarray:
    """``wav`` plus noise scaled to ``snr_db`` (white Gaussian unless ``noise`` is given, tiled to length)."""
    if noise is None:
        noise = rng.standard_normal(len(wav)).astype(np.float32)
    else:
        noise = np.resize(noise.astype(np.float32), len(wav))
    p_sig, p_noise = float(np.mean(wav**2)) + 1e-12, float(np.mean(noise**2)) + 1e-12
    return (wav + noise * np.sqrt(p_sig / (p_noise * 10 ** (snr_db / 10)))).astype(np.float32)


def reverberate(wav: np.ndarray, rt60: float, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Convolve with a synthetic room response: noise under an exponential decay reaching -60 dB at ``rt60`` s."""
    t = np.arange(int(rt60 * sample_rate)) / sample_rate
    rir = rng.standard_normal(len(t)) * np.exp(-6.9078 * t / rt60)
    rir[0] = 1.0
    rir /= np.sqrt(np.sum(rir**2))
    out = fftconvolve(wav, rir)[: len(wav)]
    return (out * (np.max(np.abs(wav)) / (np.max(np.abs(out)) + 1e-9))).astype(np.float32)
