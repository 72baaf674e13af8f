"""Waveform perturbations for SCORE-style pairs, in numpy/scipy and torch's STFT (no torchaudio).

All functions take and return float32 mono ``(T,)`` at ``sample_rate`` (16 kHz by default).

- :func:`speed` -- sox ``speed``: play ``factor`` times faster; tempo and pitch both change,
  the length becomes ``T / factor`` (SCORE draws 0.9, 1.0 or 1.1).
- :func:`pitch_shift` -- shift the pitch by ``semitones`` keeping the duration: a time-stretch by
  ``2^(s/12)`` followed by resampling back to the original length (SCORE draws +2 or -2). The stretch
  is a phase vocoder (``method="phase_vocoder"``, the default: what the authors' torchaudio
  ``PitchShift`` does, STFT n_fft 512, hop 128, Hann window) or WSOLA (``method="wsola"``).
- :func:`phase_vocoder_stretch`, :func:`time_stretch` -- the two time-stretches.
- :func:`add_noise` -- additive noise at a given SNR (white, or a given noise signal); off in SCORE.
- :func:`reverberate` -- convolution with a synthetic exponentially decaying room response; off in SCORE.
"""

import functools
import math
from fractions import Fraction
from typing import Optional

import numpy as np
import torch
from scipy.signal import correlate, fftconvolve, firwin, resample_poly

SAMPLE_RATE = 16000
N_FFT, HOP = 512, 128  # torchaudio PitchShift's defaults (hop = n_fft // 4), as the authors ran it
PITCH_METHODS = ("phase_vocoder", "wsola")


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


def phase_vocoder(spec: torch.Tensor, rate: float, hop: int) -> torch.Tensor:
    """Phase-vocoder time scaling of a complex STFT ``(F, N)`` -> ``(F, ceil(N / rate))``, ``rate`` > 1 faster.

    Output frame ``j`` reads input position ``t = j * rate``: its magnitude is interpolated between
    frames ``floor(t)`` and ``floor(t) + 1``; its phase is the previous output phase plus the measured
    phase advance between those two frames (the bin's expected advance ``pi * hop * f / (F - 1)`` plus the
    deviation wrapped to ``[-pi, pi]``), starting from frame 0's phase. Run in float64 (phases accumulate
    to ~1e5 rad at the top bins; torchaudio runs in the STFT's float32)."""
    n_freq, n_frames = spec.shape
    steps = torch.arange(0, n_frames, rate, dtype=torch.float64)
    alpha = (steps % 1.0)[None, :]
    i = steps.long()
    magnitude, angle = (torch.nn.functional.pad(v, [0, 2]) for v in (spec.abs(), spec.angle()))
    expected = torch.linspace(0, math.pi * hop, n_freq, dtype=torch.float64)[:, None]
    advance = angle[:, i + 1] - angle[:, i] - expected
    advance = advance - 2 * math.pi * torch.round(advance / (2 * math.pi)) + expected
    phase = torch.cumsum(torch.cat([angle[:, :1], advance[:, :-1]], dim=1), dim=1)
    magnitude = alpha * magnitude[:, i + 1] + (1 - alpha) * magnitude[:, i]
    return torch.polar(magnitude, phase)


def phase_vocoder_stretch(wav: np.ndarray, stretch: float, n_fft: int = N_FFT, hop: int = HOP) -> np.ndarray:
    """``(T,)`` -> ``(round(T * stretch),)`` with the pitch unchanged: STFT (periodic Hann, centred,
    reflect padding; float64), :func:`phase_vocoder` at rate ``1 / stretch``, inverse STFT to the new length."""
    if stretch <= 0:
        raise ValueError(f"stretch must be > 0, got {stretch}")
    if len(wav) <= n_fft // 2:
        raise ValueError(f"phase vocoder: {len(wav)} samples is too short for n_fft {n_fft}")
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float64))
    window = torch.hann_window(n_fft, dtype=torch.float64)
    spec = torch.stft(x, n_fft, hop, window=window, center=True, pad_mode="reflect", return_complex=True)
    out = torch.istft(
        phase_vocoder(spec, 1.0 / stretch, hop).to(spec.dtype),
        n_fft,
        hop,
        window=window,
        length=round(len(wav) * stretch),
    )
    return out.numpy().astype(np.float32)


@functools.lru_cache(maxsize=16)
def _resampling_filter(up: int, down: int) -> np.ndarray:
    """scipy ``resample_poly``'s own default filter (Kaiser beta 5, 10 zero crossings), designed once."""
    return firwin(2 * 10 * max(up, down) + 1, 1.0 / max(up, down), window=("kaiser", 5.0))  # resample_poly scales by up


def resample(wav: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Polyphase resampling ``(T,)`` -> ``(ceil(T * new / orig),)`` (the filter cached per ratio)."""
    g = math.gcd(orig_rate, new_rate)
    up, down = new_rate // g, orig_rate // g
    return resample_poly(wav, up, down, window=_resampling_filter(up, down)).astype(np.float32)


def pitch_shift(
    wav: np.ndarray, semitones: float, sample_rate: int = SAMPLE_RATE, method: str = "phase_vocoder"
) -> np.ndarray:
    """Shift the pitch by ``semitones`` (e.g. +2 / -2), keeping the length ``T``.

    As torchaudio's ``pitch_shift``: stretch by ``1 / rate`` with ``rate = 2^(-s/12)``, then resample
    from ``int(sample_rate / rate)`` Hz to ``sample_rate`` and crop or zero-pad to ``T``."""
    if method not in PITCH_METHODS:
        raise ValueError(f"pitch-shift method must be one of {PITCH_METHODS}, got {method!r}")
    if semitones == 0:
        return wav.astype(np.float32, copy=True)
    rate = 2.0 ** (-semitones / 12.0)
    if method == "phase_vocoder":
        stretched = phase_vocoder_stretch(wav, 1.0 / rate)
    else:
        stretched = time_stretch(wav, 1.0 / rate, sample_rate)
    shifted = resample(stretched, int(sample_rate / rate), sample_rate)
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
