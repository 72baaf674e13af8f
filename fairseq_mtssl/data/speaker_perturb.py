"""SPIN's speaker perturbation (Chang, Liu & Glass, Interspeech 2023): Praat's "Change gender", then a
random 10-band parametric equaliser, keeping the length.

As the authors' ``src/data/dataset.py`` and ``src/data/audio.py`` (github.com/vectominist/spin, after
NANSY and ContentVec), in their order of random draws:

1. formant shift ratio ``U(1, 1.4)``, pitch-median ratio ``U(1, 2)``, pitch-range ratio ``U(1, 1.5)``, each
   inverted with probability 1/2 (a coin after each draw);
2. Praat: the pitch track (autocorrelation, the speaker's pitch floor and ceiling, time step
   ``0.8 / floor``), its median over voiced frames, then ``Change gender`` (Sound + Pitch) with the
   formant ratio, ``median x pitch ratio`` as the new median, the range ratio and duration factor 1;
   if Praat fails (no voiced frame, too short), the clean copy goes on. Praat's PSOLA draws random
   numbers of its own (in unvoiced stretches), so Praat is seeded first with one more draw of the
   generator (the authors leave it unseeded; their generator is unseeded too);
3. the equaliser: a low shelf, 8 peaking filters and a high shelf at 10 frequencies log-spaced from 60
   to 7600 Hz, each with gain ``U(-12, 12)`` dB and Q log-uniform in ``[2, 5]`` (``2 (5/2)^U(0,1)``),
   biquads of the Audio EQ Cookbook (R. Bristow-Johnson; JUCE's shelf form), run as one cascade;
4. clipping to ``[-1, 1]``.

Praat comes from ``praat-parselmouth`` (PyPI name; ``import parselmouth``), not the unrelated PyPI
package ``parselmouth``. Without it the equaliser still works and :func:`change_gender` raises
:class:`PraatUnavailable`, a one-line error saying what to install.

Pitch floor and ceiling are per speaker: :func:`read_speaker_pitch_ranges` reads a TSV
(``speaker<TAB>floor<TAB>ceiling``) or the authors' ``spk2info.dict`` (ContentVec's pickle,
``{split: {speaker: (_, (floor, ceiling, _))}}``, read without executing anything it pickles, with
the authors' two corrections: a floor of 50 Hz becomes 75, LibriSpeech speaker 1447 gets 60-400 Hz).
"""

import io
import pickle
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
from scipy.signal import sosfilt

from ..errors import MtsslError

# the authors' ranges (src/data/dataset.py: random_formant_f0)
FORMANT_RATIO_MAX = 1.4
PITCH_RATIO_MAX = 2.0
RANGE_RATIO_MAX = 1.5
# the equaliser (random_eq): 10 bands log-spaced over 60-7600 Hz, Q in [2, 5], +-12 dB
EQ_BANDS = 10
EQ_LOW_HZ, EQ_HIGH_HZ = 60.0, 7600.0
EQ_Q_MIN, EQ_Q_MAX = 2.0, 5.0
EQ_GAIN_DB = 12.0
# Praat's default pitch range, for speakers of whom nothing is known
DEFAULT_PITCH_FLOOR, DEFAULT_PITCH_CEILING = 75.0, 600.0
PRAAT_SEEDS = 2**31 - 1  # Praat's seed is drawn from [0, PRAAT_SEEDS)

INSTALL_HINT = (
    "SPIN's speaker perturbation needs Praat: pip install praat-parselmouth "
    "(the PyPI name; it imports as parselmouth; the PyPI package 'parselmouth' is unrelated)"
)


class PraatUnavailable(MtsslError, ImportError):
    """praat-parselmouth is not installed."""


class SpeakerInfoError(MtsslError, ValueError):
    """A speaker pitch-range file that is malformed, pickles code, or lacks a speaker."""


class NoVoicedFrames(RuntimeError):
    """Praat found no voiced frame, so the pitch median (and Change gender) is undefined."""


def require_parselmouth():
    """The ``parselmouth`` module of praat-parselmouth, or :class:`PraatUnavailable`."""
    try:
        import parselmouth
    except ImportError:
        raise PraatUnavailable(INSTALL_HINT) from None
    if not hasattr(parselmouth, "praat"):  # the unrelated PyPI package 'parselmouth'
        raise PraatUnavailable(INSTALL_HINT + f"; found an unrelated module at {getattr(parselmouth, '__file__', '?')}")
    return parselmouth


def praat_available() -> bool:
    try:
        require_parselmouth()
    except PraatUnavailable:
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# The equaliser: Audio EQ Cookbook biquads, normalised second-order sections [b0 b1 b2 1 a1 a2]


def _omega(fc: float, fs: float) -> float:
    return 2 * np.pi * max(fc, 2.0) / fs


def low_shelf(gain_db: float, fc: float, q: float, fs: float) -> np.ndarray:
    """Second-order low shelf (JUCE's form of the cookbook: ``beta = sin(w) sqrt(A) / Q``), ``(6,)``."""
    a = 10 ** (gain_db / 40)
    w = _omega(fc, fs)
    cos, beta = np.cos(w), np.sin(w) * np.sqrt(a) / q
    b0 = a * ((a + 1) - (a - 1) * cos + beta)
    b1 = 2 * a * ((a - 1) - (a + 1) * cos)
    b2 = a * ((a + 1) - (a - 1) * cos - beta)
    a0 = (a + 1) + (a - 1) * cos + beta
    a1 = -2 * ((a - 1) + (a + 1) * cos)
    a2 = (a + 1) + (a - 1) * cos - beta
    return np.array([b0, b1, b2, a0, a1, a2]) / a0


def high_shelf(gain_db: float, fc: float, q: float, fs: float) -> np.ndarray:
    """Second-order high shelf (JUCE's form of the cookbook), ``(6,)``."""
    a = 10 ** (gain_db / 40)
    w = _omega(fc, fs)
    cos, beta = np.cos(w), np.sin(w) * np.sqrt(a) / q
    b0 = a * ((a + 1) + (a - 1) * cos + beta)
    b1 = -2 * a * ((a - 1) + (a + 1) * cos)
    b2 = a * ((a + 1) + (a - 1) * cos - beta)
    a0 = (a + 1) - (a - 1) * cos + beta
    a1 = 2 * ((a - 1) - (a + 1) * cos)
    a2 = (a + 1) - (a - 1) * cos - beta
    return np.array([b0, b1, b2, a0, a1, a2]) / a0


def peaking(gain_db: float, fc: float, q: float, fs: float) -> np.ndarray:
    """Peaking filter of the cookbook (gain ``gain_db`` at ``fc``, bandwidth from Q), ``(6,)``."""
    a = 10 ** (gain_db / 40)
    w = _omega(fc, fs)
    alpha = np.sin(w) / (2 * q)
    c = -2 * np.cos(w)
    a0 = 1 + alpha / a
    return np.array([1 + alpha * a, c, 1 - alpha * a, a0, c, 1 - alpha / a]) / a0


def eq_frequencies(bands: int = EQ_BANDS) -> np.ndarray:
    return np.exp(np.linspace(np.log(EQ_LOW_HZ), np.log(EQ_HIGH_HZ), bands))


def eq_sections(gains_db, freqs, qs, fs: float) -> np.ndarray:
    """``(bands, 6)`` sections: a low shelf, peaking filters, a high shelf (the authors' ``params2sos``)."""
    n = len(gains_db)
    design = [low_shelf] + [peaking] * (n - 2) + [high_shelf]
    return np.stack([f(g, fc, q, fs) for f, g, fc, q in zip(design, gains_db, freqs, qs)])


def draw_eq(
    rng: np.random.Generator, bands: int = EQ_BANDS, gain_db: float = EQ_GAIN_DB
) -> Tuple[np.ndarray, np.ndarray]:
    """``(Q, gains in dB)`` of the random equaliser, drawn as the authors (z for Q first, then gains)."""
    z = rng.uniform(0, 1, size=(bands,))
    q = EQ_Q_MIN * (EQ_Q_MAX / EQ_Q_MIN) ** z
    gains = rng.uniform(-gain_db, gain_db, size=(bands,))
    return q, gains


def random_eq(wav: np.ndarray, sample_rate: int, rng: np.random.Generator, gain_db: float = EQ_GAIN_DB) -> np.ndarray:
    """``wav`` through a random 10-band equaliser (same length, float64)."""
    q, gains = draw_eq(rng, gain_db=gain_db)
    return sosfilt(eq_sections(gains, eq_frequencies(), q, sample_rate), wav)


# ---------------------------------------------------------------------------------------------------
# Praat


def change_gender(
    wav: np.ndarray,
    sample_rate: int,
    pitch_floor: float,
    pitch_ceiling: float,
    formant_ratio: float,
    pitch_ratio: float,
    range_ratio: float,
    praat_seed: Optional[int] = None,
) -> np.ndarray:
    """Praat's ``Change gender`` of ``wav`` (the authors' ``change_gender``): the new pitch median is the
    voiced median of the autocorrelation pitch track times ``pitch_ratio``. ``praat_seed`` seeds Praat's
    random numbers (its PSOLA uses them in unvoiced stretches) for a reproducible result; Praat goes back
    to unpredictable seeding afterwards. Raises :class:`NoVoicedFrames` or parselmouth's ``PraatError``
    (both ``RuntimeError``) when Praat cannot do it."""
    parselmouth = require_parselmouth()
    if praat_seed is not None:
        parselmouth.praat.run(f"random_initializeWithSeedUnsafelyButPredictably ({int(praat_seed)})")
        try:
            return change_gender(wav, sample_rate, pitch_floor, pitch_ceiling, formant_ratio, pitch_ratio, range_ratio)
        finally:
            parselmouth.praat.run("random_initializeSafelyAndUnpredictably ()")
    sound = parselmouth.Sound(np.asarray(wav, dtype=np.float64), sampling_frequency=sample_rate)
    pitch = sound.to_pitch_ac(pitch_floor=pitch_floor, pitch_ceiling=pitch_ceiling, time_step=0.8 / pitch_floor)
    f0 = pitch.selected_array["frequency"]
    voiced = f0[f0 != 0]
    if voiced.size == 0:
        raise NoVoicedFrames("no voiced frame: the pitch median is undefined")
    median = float(np.median(voiced))
    out = parselmouth.praat.call([sound, pitch], "Change gender", formant_ratio, median * pitch_ratio, range_ratio, 1.0)
    return out.values[0]


def _ratio(rng: np.random.Generator, high: float) -> float:
    """``U(1, high)``, inverted when the following coin says so (the authors' ``coin = random() > 0.5``)."""
    r = rng.uniform(1, high)
    return float(r if rng.random() > 0.5 else 1 / r)


def fit_length(wav: np.ndarray, n: int) -> np.ndarray:
    """Cut or zero-pad ``wav`` to ``n`` samples."""
    return wav[:n] if len(wav) >= n else np.pad(wav, (0, n - len(wav)))


def perturb_speaker(
    wav: np.ndarray,
    sample_rate: int,
    rng: np.random.Generator,
    pitch_floor: float = DEFAULT_PITCH_FLOOR,
    pitch_ceiling: float = DEFAULT_PITCH_CEILING,
    eq_gain_db: float = EQ_GAIN_DB,
) -> Tuple[np.ndarray, dict]:
    """The speaker-perturbed copy of ``wav`` ``(T,)`` (float32, same length) and what was drawn.

    Every random number comes from ``rng`` (the authors' order, plus Praat's seed before Praat runs), so a
    seeded generator reproduces it.
    A Praat failure (``RuntimeError``) leaves the clean copy for the equaliser, as the authors'; a missing
    praat-parselmouth is :class:`PraatUnavailable`."""
    require_parselmouth()
    formant = _ratio(rng, FORMANT_RATIO_MAX)
    pitch = _ratio(rng, PITCH_RATIO_MAX)
    range_ = _ratio(rng, RANGE_RATIO_MAX)
    seed = int(rng.integers(PRAAT_SEEDS))
    how = {"formant_ratio": formant, "pitch_ratio": pitch, "range_ratio": range_, "praat": True}
    try:
        out = change_gender(wav, sample_rate, pitch_floor, pitch_ceiling, formant, pitch, range_, praat_seed=seed)
        if not np.all(np.isfinite(out)):
            raise NoVoicedFrames("Praat returned non-finite samples")
    except RuntimeError as err:  # parselmouth.PraatError, NoVoicedFrames
        out, how["praat"], how["praat_error"] = np.array(wav, dtype=np.float64), False, str(err).splitlines()[0]
    out = random_eq(fit_length(out, len(wav)), sample_rate, rng, eq_gain_db)
    return np.clip(out, -1.0, 1.0).astype(np.float32), how


# ---------------------------------------------------------------------------------------------------
# Speakers and their pitch ranges


def librispeech_speaker(path: str) -> str:
    """The authors' rule: the file name's part before the first ``-`` (``19-198-0001.flac`` -> ``19``)."""
    return Path(path).stem.split("-")[0]


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builtins (dicts, tuples, numbers, strings) and numpy scalars only; any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: the file pickles more than data")


def _authors_correction(speaker: str, floor: float, ceiling: float) -> Tuple[float, float]:
    """The authors' ``get_spk_info``: a floor of 50 Hz becomes 75; speaker 1447 gets 60-400 Hz."""
    if floor == 50:
        floor = 75.0
    if speaker == "1447":
        floor, ceiling = 60.0, 400.0
    return float(floor), float(ceiling)


def read_speaker_pitch_ranges(path, split: str = "train") -> Dict[str, Tuple[float, float]]:
    """``{speaker: (pitch floor, pitch ceiling)}`` from a TSV (``speaker<TAB>floor<TAB>ceiling``, an optional
    header line starting with ``speaker``) or from the authors' pickled ``spk2info.dict`` (its ``split``
    part: ``train`` for training, ``valid`` otherwise, as the authors pick it)."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix in (".tsv", ".txt"):
        table = {}
        for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
            if not line.strip() or (lineno == 1 and line.lower().startswith("speaker")):
                continue
            items = line.split("\t")
            try:
                spk, floor, ceiling = items[0], float(items[1]), float(items[2])
            except (IndexError, ValueError):
                raise SpeakerInfoError(
                    f"{path}:{lineno}: expected 'speaker<TAB>floor<TAB>ceiling', got {line!r}"
                ) from None
            if not 0 < floor < ceiling:
                raise SpeakerInfoError(
                    f"{path}:{lineno}: pitch floor {floor} and ceiling {ceiling} (need 0 < floor < ceiling)"
                )
            table[spk] = (floor, ceiling)
        return table
    try:
        info = _DataOnlyUnpickler(io.BytesIO(raw)).load()
    except Exception as err:  # noqa: BLE001 - any unreadable pickle is the same user error
        raise SpeakerInfoError(f"{path}: not a readable speaker-info pickle ({err})") from None
    if not isinstance(info, dict) or split not in info:
        keys = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise SpeakerInfoError(
            f"{path}: expected the authors' spk2info ({{split: {{speaker: ...}}}}) with '{split}', got {keys}"
        )
    table = {}
    for spk, value in info[split].items():
        try:
            _, (floor, ceiling, _) = value
        except (TypeError, ValueError):
            raise SpeakerInfoError(f"{path}: speaker {spk}: expected (_, (floor, ceiling, _)), got {value!r}") from None
        table[str(spk)] = _authors_correction(str(spk), float(floor), float(ceiling))
    return table


def pitch_range(table: Optional[Dict[str, Tuple[float, float]]], speaker: str) -> Tuple[float, float]:
    """The speaker's pitch floor and ceiling; without a table, Praat's defaults (75, 600 Hz)."""
    if table is None:
        return DEFAULT_PITCH_FLOOR, DEFAULT_PITCH_CEILING
    return table[speaker]
