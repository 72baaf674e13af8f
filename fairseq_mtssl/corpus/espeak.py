"""libespeak-ng (from the ``espeakng-loader`` wheel) through ctypes, with phoneme events.

:class:`EspeakSynthesizer` turns text into 16-bit audio at espeak's native rate (22050 Hz) together
with the phoneme and word events espeak reports, each carrying its sample position.
"""

import ctypes
import threading
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from ..errors import MtsslError

# espeak_AUDIO_OUTPUT and initialisation flags (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
# espeak_EVENT_TYPE
EVENT_LIST_TERMINATED, EVENT_WORD, EVENT_END, EVENT_PHONEME = 0, 1, 5, 7
# espeak_PARAMETER
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4
_POS_CHARACTER = 1
_CHARS_UTF8 = 1


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class SynthEvent:
    kind: int  # EVENT_WORD, EVENT_PHONEME or EVENT_END
    sample: int  # position in the output audio, in samples at ``sample_rate``
    text_position: int  # 1-based character position of the word in the input text
    length: int  # word length in characters (word events)
    phoneme: str  # espeak phoneme mnemonic, with stress marks (phoneme events)


@dataclass(frozen=True)
class Voice:
    """An espeak voice: a base language voice, a variant, and prosody parameters."""

    variant: str  # e.g. "m3", "f2" (espeak-ng-data/voices/!v)
    rate: int  # words per minute
    pitch: int  # 0-100
    pitch_range: int  # 0-100
    base: str = "en-us"

    @property
    def name(self) -> str:
        return f"{self.base}+{self.variant}"


_libc = ctypes.CDLL(None)


class EspeakError(MtsslError, RuntimeError):
    pass


class EspeakSynthesizer:
    """One libespeak-ng instance (the library is process-global; calls are serialised)."""

    _lock = threading.Lock()
    _lib = None
    _sample_rate = None

    def __init__(self):
        cls = type(self)
        with cls._lock:
            if cls._lib is None:
                import espeakng_loader

                lib = ctypes.CDLL(espeakng_loader.get_library_path())
                lib.espeak_Initialize.restype = ctypes.c_int
                lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
                lib.espeak_Synth.argtypes = [
                    ctypes.c_void_p,
                    ctypes.c_size_t,
                    ctypes.c_uint,
                    ctypes.c_int,
                    ctypes.c_uint,
                    ctypes.c_uint,
                    ctypes.POINTER(ctypes.c_uint),
                    ctypes.c_void_p,
                ]
                rate = lib.espeak_Initialize(
                    _AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), _INITIALIZE_PHONEME_EVENTS
                )
                if rate <= 0:
                    raise EspeakError("espeak_Initialize failed")
                cls._sample_rate = rate
                cls._lib = lib
        self._chunks: List[np.ndarray] = []
        self._events: List[SynthEvent] = []
        self._callback = _Callback(self._on_audio)  # keep a reference for the C side

    @property
    def sample_rate(self) -> int:
        return type(self)._sample_rate

    def _on_audio(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        i = 0
        while events[i].type != EVENT_LIST_TERMINATED:
            e = events[i]
            if e.type in (EVENT_WORD, EVENT_PHONEME, EVENT_END):
                phoneme = (
                    bytes(e.id.string).split(b"\0")[0].decode("ascii", "replace") if e.type == EVENT_PHONEME else ""
                )
                self._events.append(SynthEvent(e.type, e.sample, e.text_position, e.length, phoneme))
            i += 1
        return 0

    def synthesize(self, text: str, voice: Voice, noise_seed: int = 0) -> Tuple[np.ndarray, List[SynthEvent]]:
        """Return ``(int16 audio (T,), events)`` for ``text`` spoken by ``voice``.

        ``noise_seed`` seeds the random breath noise of some voices (libespeak-ng draws it from libc
        ``rand()``), so the same call gives the same samples.
        """
        lib = type(self)._lib
        data = text.encode("utf-8")
        with type(self)._lock:
            _libc.srand(ctypes.c_uint(noise_seed & 0xFFFFFFFF))
            lib.espeak_ng_SetRandSeed(ctypes.c_long(noise_seed))
            if lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
                raise EspeakError(f"unknown espeak voice {voice.name!r}")
            for param, value in (
                (_RATE, voice.rate),
                (_PITCH, voice.pitch),
                (_RANGE, voice.pitch_range),
                (_VOLUME, 100),
            ):
                lib.espeak_SetParameter(param, value, 0)
            lib.espeak_SetSynthCallback(self._callback)
            self._chunks, self._events = [], []
            err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            lib.espeak_Synchronize()
            if err != 0:
                raise EspeakError(f"espeak_Synth failed with code {err} for {text!r}")
            chunks, events = self._chunks, self._events
        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
        return audio, events
