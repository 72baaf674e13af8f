"""Reading audio for fairseq: 16 kHz mono only, errors name the file (and manifest line)."""

import os
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np
import soundfile as sf

from ..errors import MtsslError

SAMPLE_RATE = 16000


class AudioFormatError(MtsslError, ValueError):
    """Audio that is unreadable, truncated, multi-channel or at the wrong sample rate."""


def _where(path, where: Optional[str]) -> str:
    return f"{where}: {path}" if where else str(path)


@dataclass(frozen=True)
class AudioInfo:
    num_samples: int
    sample_rate: int
    channels: int


def read_audio_info(path, where: Optional[str] = None, sample_rate: int = SAMPLE_RATE) -> AudioInfo:
    """Read only the header of ``path`` and check it is ``sample_rate`` Hz mono.

    ``where`` (e.g. ``"train.tsv:12"``) is prepended to error messages.
    """
    try:
        info = sf.info(str(path))
    except Exception as err:
        raise AudioFormatError(f"{_where(path, where)}: unreadable audio ({err})") from err
    if info.samplerate != sample_rate:
        raise AudioFormatError(
            f"{_where(path, where)}: sample rate {info.samplerate} Hz, expected {sample_rate} Hz "
            f"(resample it first, e.g. `sox in.wav -r {sample_rate} out.wav`)"
        )
    if info.channels != 1:
        raise AudioFormatError(f"{_where(path, where)}: {info.channels} channels, expected mono")
    if info.frames <= 0:
        raise AudioFormatError(f"{_where(path, where)}: empty audio (0 samples)")
    if info.format == "WAV":
        check_wav_data_chunk(path, where)
    return AudioInfo(info.frames, info.samplerate, info.channels)


def check_wav_data_chunk(path, where: Optional[str] = None) -> None:
    """Raise :class:`AudioFormatError` when a RIFF/WAVE file holds fewer data bytes than its ``data``
    chunk header declares (a truncated copy), which libsndfile would silently read short."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return
            cid, n = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                have = size - f.tell()
                if n not in (0, 0xFFFFFFFF) and have < n:  # 0 / -1: a header written before the length was known
                    raise AudioFormatError(
                        f"{_where(path, where)}: truncated WAV: its header declares {n} data bytes but the file "
                        f"holds {have}"
                    )
                return
            f.seek(n + (n & 1), os.SEEK_CUR)


def read_audio(
    path,
    where: Optional[str] = None,
    expected_samples: Optional[int] = None,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """Read ``path`` as float32 ``(T,)`` in [-1, 1]; check rate, channels and (if given) length."""
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:
        raise AudioFormatError(f"{_where(path, where)}: unreadable audio ({err})") from err
    if sr != sample_rate:
        raise AudioFormatError(f"{_where(path, where)}: sample rate {sr} Hz, expected {sample_rate} Hz")
    if wav.shape[1] != 1:
        raise AudioFormatError(f"{_where(path, where)}: {wav.shape[1]} channels, expected mono")
    wav = wav[:, 0]
    if expected_samples is not None and len(wav) != expected_samples:
        raise AudioFormatError(
            f"{_where(path, where)}: {len(wav)} samples decoded but the manifest says {expected_samples} "
            "(truncated or replaced file? rebuild the manifest)"
        )
    return wav
