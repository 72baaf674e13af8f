"""Pieces shared by the manifest builders."""

import hashlib
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from tqdm import tqdm

from ..data.audio import read_audio_info
from ..data.manifest import write_lines


def letters(text: str) -> str:
    """fairseq's letter transcript: upper-case characters separated by spaces, ``|`` after each word."""
    words = text.upper().split()
    return " ".join(" ".join(w) + " |" for w in words)


def write_dictionary(path, symbols: Iterable[str], unseen: Iterable[str] = ()) -> None:
    """fairseq ``dict.*.txt``: ``symbol count`` a line, most frequent first (ties by symbol).
    ``unseen``: symbols of a closed inventory that other splits use, listed with count 0."""
    counts = Counter(symbols)
    for u in unseen:
        counts.setdefault(u, 0)
    write_lines(path, (f"{s} {c}" for s, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))


def aligned_phones(alignments: Dict[str, list], utt: str, where: str, align_path) -> str:
    """The phone sequence of ``utt`` from an alignment (``sil`` dropped); errors name the manifest line."""
    from ..corpus.alignment import SILENCE, AlignmentError

    if utt not in alignments:
        raise AlignmentError(f"{where}: utterance {utt} has no alignment in {align_path}")
    return " ".join(s.label for s in alignments[utt] if s.label != SILENCE)


def write_phone_transcripts(dest, split: str, phone_lines: List[str]) -> None:
    """``{split}.phn``, and ``dict.phn.txt`` when ``split`` is the training split."""
    write_lines(Path(dest) / f"{split}.phn", phone_lines)
    if split == "train":
        write_dictionary(Path(dest) / "dict.phn.txt", (p for line in phone_lines for p in line.split()))


def in_valid_split(relative_path: str, valid_percent: float, seed: int) -> bool:
    """A stable hash decides: the same file always lands in the same split, whatever else is in the tree."""
    digest = hashlib.sha1(f"{seed}:{relative_path}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < valid_percent


def _num_samples(args: Tuple[str, Optional[str]]) -> int:
    path, where = args
    return read_audio_info(path, where).num_samples


def count_samples(
    paths: Sequence[str], wheres: Optional[Sequence[str]] = None, workers: int = 0, desc: str = "audio headers"
) -> List[int]:
    """Number of samples of each file from its header, checking 16 kHz mono; parallel when ``workers`` > 1."""
    wheres = list(wheres) if wheres is not None else [None] * len(paths)
    jobs = list(zip(paths, wheres))
    workers = workers or min(8, os.cpu_count() or 1)
    bar = dict(total=len(jobs), desc=desc, unit="file", disable=None, mininterval=1.0)
    if workers <= 1 or len(jobs) < 2000:
        return [_num_samples(j) for j in tqdm(jobs, **bar)]
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(_num_samples, jobs, chunksize=256), **bar))
