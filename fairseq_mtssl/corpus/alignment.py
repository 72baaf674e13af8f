"""Phone and word alignments from espeak events, and their on-disk format.

Alignment files (``alignments/{split}.phones.ctm`` and ``{split}.words.ctm``) have one segment per
line, ``utt_id start_s end_s label``, separated by single spaces, times in seconds (4 decimals) on
the 16 kHz audio, segments of an utterance contiguous, in time order, covering the whole file.
Word labels are lower-case words; words espeak speaks as one unit share a segment (``of+a``).
Phone labels are espeak-ng's English mnemonics without stress marks; pauses are ``sil``;
espeak's off-glide mark ``;`` is folded into the phone before it.
"""

from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

from ..errors import MtsslError
from .espeak import EVENT_END, EVENT_PHONEME, EVENT_WORD, SynthEvent

SILENCE = "sil"
GLIDE_MARK = ";"


@dataclass(frozen=True)
class Segment:
    start: float  # seconds
    end: float  # seconds
    label: str


def normalise_phoneme(mnemonic: str) -> str:
    """Drop espeak's stress marks (``'`` primary, ``,`` secondary); every pause becomes ``sil``."""
    if mnemonic.startswith("_") or not mnemonic.strip():
        return SILENCE
    return mnemonic.replace("'", "").replace(",", "")


def align_events(
    events: Sequence[SynthEvent], num_samples: int, text: str, events_rate: int, audio_rate: int
) -> Tuple[List[Segment], List[Segment]]:
    """Turn espeak events into contiguous phone and word segments covering ``num_samples`` (at ``audio_rate``).

    A phone lasts from its event to the next phoneme (or end) event. A word spans its phones; the
    stretches between words are ``sil``. Words espeak speaks as one unit share a segment labelled
    with the words joined by ``+`` (``of+a``).
    """
    scale = 1.0 / events_rate
    total = num_samples / audio_rate
    phonemes = [e for e in events if e.kind == EVENT_PHONEME]
    ends = [e.sample for e in events if e.kind == EVENT_END]
    end_sample = max(ends) if ends else None
    # Each word event owns the text up to the next one: espeak reports one event for words it
    # speaks as one (e.g. "of a"), whose segment is labelled "of+a".
    starts = sorted({e.text_position for e in events if e.kind == EVENT_WORD})
    words_at: Dict[int, str] = {
        pos: "+".join(text[pos - 1 : (starts[i + 1] - 1 if i + 1 < len(starts) else len(text))].lower().split())
        for i, pos in enumerate(starts)
    }
    raw: List[Tuple[float, float, str, int]] = []  # start, end, phone, word text position (0: none)
    for i, e in enumerate(phonemes):
        nxt = phonemes[i + 1].sample if i + 1 < len(phonemes) else (end_sample if end_sample is not None else e.sample)
        start, end = min(e.sample * scale, total), min(nxt * scale, total)
        if end <= start:
            continue
        label = normalise_phoneme(e.phoneme)
        if label == GLIDE_MARK and raw:  # espeak's palatal off-glide: part of the previous phone
            raw[-1] = (raw[-1][0], end, raw[-1][2], raw[-1][3])
            continue
        raw.append((start, end, label, 0 if label == SILENCE else e.text_position))

    phones: List[Segment] = []

    def push(start, end, label):
        if end - start <= 0:
            return
        if phones and phones[-1].label == SILENCE and label == SILENCE:
            phones[-1] = Segment(phones[-1].start, end, SILENCE)
        else:
            phones.append(Segment(start, end, label))

    cursor = 0.0
    for start, end, label, _ in raw:
        push(cursor, start, SILENCE)
        push(start, end, label)
        cursor = end
    push(cursor, total, SILENCE)

    words: List[Segment] = []
    wcursor = 0.0
    for pos in sorted({r[3] for r in raw if r[3]}):
        spans = [r for r in raw if r[3] == pos]
        start, end = spans[0][0], spans[-1][1]
        if start > wcursor:
            words.append(Segment(wcursor, start, SILENCE))
        words.append(Segment(start, end, words_at.get(pos, "?")))
        wcursor = end
    if total > wcursor:
        words.append(Segment(wcursor, total, SILENCE))
    return phones, words


def format_ctm(utt_id: str, segments: Iterable[Segment]) -> List[str]:
    return [f"{utt_id} {s.start:.4f} {s.end:.4f} {s.label}" for s in segments]


class AlignmentError(MtsslError, ValueError):
    """An alignment (CTM) file that is malformed or lacks an utterance; the message names file and line."""


def read_ctm(path) -> Dict[str, List[Segment]]:
    """Read an alignment file into ``{utt_id: [Segment, ...]}`` (errors name file and line)."""
    out: Dict[str, List[Segment]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if len(parts) != 4:
                raise AlignmentError(f"{path}:{lineno}: expected 'utt_id start end label', got {line.rstrip()!r}")
            try:
                seg = Segment(float(parts[1]), float(parts[2]), parts[3])
            except ValueError as err:
                raise AlignmentError(f"{path}:{lineno}: bad time in {line.rstrip()!r}") from err
            if seg.end < seg.start:
                raise AlignmentError(f"{path}:{lineno}: segment ends before it starts")
            out.setdefault(parts[0], []).append(seg)
    return out
