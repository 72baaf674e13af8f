"""Kaldi-compatible MFCC (+delta, +delta-delta) as HuBERT iteration 1 uses, batched in torch.

Matches ``torchaudio.compliance.kaldi.mfcc`` with its defaults (25 ms Povey window, 10 ms shift,
snip_edges, pre-emphasis 0.97, 23 mel bins from 20 Hz to Nyquist, 13 cepstra, lifter 22, no energy,
no dither) followed by ``compute_deltas`` twice (window 5), i.e. 39 dims at 100 Hz. Checked against
kaldi-native-fbank in the tests. Padding never changes a frame: each frame reads only its own
25 ms window, and deltas repeat each utterance's own edge frames.
"""

from functools import lru_cache
from types import SimpleNamespace
from typing import List, Optional, Sequence

import numpy as np
import torch

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 25 ms
FRAME_SHIFT = 160  # 10 ms -> 100 Hz
FFT_SIZE = 512
NUM_MEL_BINS = 23
NUM_CEPS = 13
LOW_FREQ = 20.0
CEPSTRAL_LIFTER = 22.0
PREEMPHASIS = 0.97
DELTA_WINDOW = 2  # (win_length 5 - 1) / 2
FRAME_RATE = SAMPLE_RATE / FRAME_SHIFT
FEATURE_DIM = 3 * NUM_CEPS


def num_frames(num_samples: int) -> int:
    """Frames of a ``num_samples`` signal with snip_edges (0 if shorter than one window)."""
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


def _mel(freq):
    return 1127.0 * np.log(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


@lru_cache(maxsize=4)
def _constants(dtype: torch.dtype):
    n = np.arange(FRAME_LENGTH)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * n / (FRAME_LENGTH - 1))) ** 0.85
    # Kaldi triangular mel banks on the FFT bins below Nyquist (the Nyquist bin gets weight 0).
    mel_lo, mel_hi = _mel(LOW_FREQ), _mel(SAMPLE_RATE / 2)
    delta = (mel_hi - mel_lo) / (NUM_MEL_BINS + 1)
    bin_mel = _mel(np.arange(FFT_SIZE // 2) * SAMPLE_RATE / FFT_SIZE)
    left = mel_lo + np.arange(NUM_MEL_BINS)[:, None] * delta
    center, right = left + delta, left + 2 * delta
    up, down = (bin_mel - left) / (center - left), (right - bin_mel) / (right - center)
    banks = np.clip(np.minimum(up, down), 0.0, None)
    banks = np.concatenate([banks, np.zeros((NUM_MEL_BINS, 1))], axis=1)  # (23, 257)
    # Orthonormal DCT-II rows 0..12, then the cepstral lifter.
    k = np.arange(NUM_CEPS)[:, None]
    dct = np.sqrt(2.0 / NUM_MEL_BINS) * np.cos(np.pi / NUM_MEL_BINS * (np.arange(NUM_MEL_BINS) + 0.5) * k)
    dct[0] = np.sqrt(1.0 / NUM_MEL_BINS)
    lifter = 1.0 + 0.5 * CEPSTRAL_LIFTER * np.sin(np.pi * np.arange(NUM_CEPS) / CEPSTRAL_LIFTER)
    dct = dct * lifter[:, None]
    as_t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    return as_t(window), as_t(banks.T), as_t(dct.T)  # (400,), (257, 23), (23, 13)


def mfcc(waves: torch.Tensor) -> torch.Tensor:
    """13 Kaldi MFCCs of a padded batch ``(B, T)`` -> ``(B, F, 13)`` with ``F = num_frames(T)``."""
    window, banks, dct = _constants(waves.dtype)
    frames = waves.unfold(1, FRAME_LENGTH, FRAME_SHIFT)  # (B, F, 400)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = (frames - PREEMPHASIS * prev) * window
    power = torch.fft.rfft(frames, n=FFT_SIZE).abs().pow(2)  # (B, F, 257)
    eps = torch.finfo(torch.float32).eps
    log_mel = torch.clamp(power @ banks, min=eps).log()  # (B, F, 23)
    return log_mel @ dct


def deltas(feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``compute_deltas`` (window 5, replicate edges) of ``(B, F, C)`` where item b has ``lengths[b]`` frames."""
    B, F, _ = feats.shape
    t = torch.arange(F)
    last = (lengths - 1).clamp(min=0)[:, None]  # (B, 1)
    out = torch.zeros_like(feats)
    denom = 2 * sum(n * n for n in range(1, DELTA_WINDOW + 1))
    for n in range(1, DELTA_WINDOW + 1):
        fwd = torch.minimum((t + n)[None, :], last)  # (B, F)
        bwd = torch.clamp(t - n, min=0)[None, :].expand(B, F)
        out += n * (
            torch.gather(feats, 1, fwd[..., None].expand_as(feats))
            - torch.gather(feats, 1, bwd[..., None].expand_as(feats))
        )
    return out / denom


def mfcc_with_deltas(waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """39-dim features ``(B, F, 39)`` of a padded batch ``(B, T)`` with per-item sample ``lengths``."""
    frames = torch.tensor([num_frames(int(n)) for n in lengths])
    base = mfcc(waves)
    d1 = deltas(base, frames)
    d2 = deltas(d1, frames)
    return torch.cat([base, d1, d2], dim=-1)


def batch_mfcc(wavs: Sequence[np.ndarray], dtype: torch.dtype = torch.float32) -> List[np.ndarray]:
    """MFCC+deltas of each waveform ``(T_i,)`` -> list of ``(num_frames(T_i), 39)`` arrays."""
    lengths = torch.tensor([len(w) for w in wavs])
    if int(lengths.min()) < FRAME_LENGTH:
        short = int(torch.argmin(lengths))
        raise ValueError(
            f"utterance {short} of the batch has {int(lengths[short])} samples, fewer than one {FRAME_LENGTH}-sample frame"
        )
    padded = torch.zeros(len(wavs), int(lengths.max()), dtype=dtype)
    for i, w in enumerate(wavs):
        padded[i, : len(w)] = torch.from_numpy(np.asarray(w)).to(dtype)
    with torch.inference_mode():
        feats = mfcc_with_deltas(padded, lengths)
    return [feats[i, : num_frames(int(n))].numpy() for i, n in enumerate(lengths)]


class MfccUpstream(torch.nn.Module):
    """MFCC + deltas as a frozen SUPERB upstream (s3prl has an ``mfcc`` baseline upstream; this one is the
    Kaldi-compatible MFCC above): one hidden state ``(B, F, 39)`` at 100 Hz and no parameters. ``encoder``
    carries what the SUPERB model reads of a speech encoder (``embedding_dim``, ``layers``)."""

    def __init__(self):
        super().__init__()
        self.encoder = SimpleNamespace(embedding_dim=FEATURE_DIM, layers=())

    def hidden_states(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """``([(B, F, 39)], frame padding mask (B, F) or None)`` of a padded batch ``source (B, T)``."""
        b, t = source.shape
        lengths = (~padding_mask).sum(1) if padding_mask is not None else torch.full((b,), t)
        feats = mfcc_with_deltas(source.float(), lengths.cpu()).to(source.dtype)
        frames = torch.tensor([num_frames(int(n)) for n in lengths], device=feats.device)
        mask = torch.arange(feats.size(1), device=feats.device)[None, :] >= frames[:, None]
        return [feats], (mask if mask.any() else None)
