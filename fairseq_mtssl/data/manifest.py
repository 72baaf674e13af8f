"""fairseq audio manifests (``{split}.tsv``): a root line, then ``relative/path<TAB>num_samples``."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Tuple

from ..atomic import atomic_write
from ..errors import MtsslError


class ManifestError(MtsslError, ValueError):
    """A manifest that is empty or malformed; the message names file and line."""


@dataclass(frozen=True)
class ManifestEntry:
    path: str  # relative to the manifest root, as written in the file
    num_samples: int
    line: int  # 1-based line number in the manifest file (the root is line 1)


@dataclass
class Manifest:
    source: str
    root: str
    entries: List[ManifestEntry]

    def __len__(self) -> int:
        return len(self.entries)

    def audio_path(self, i: int) -> str:
        return os.path.join(self.root, self.entries[i].path)

    def where(self, i: int) -> str:
        return f"{self.source}:{self.entries[i].line}"


def read_manifest(path, allow_empty: bool = False) -> Manifest:
    """Parse a fairseq manifest; raise :class:`ManifestError` naming the file and line on bad input."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError as err:
        raise ManifestError(f"{path}: manifest not found") from err
    if not lines or not lines[0].strip():
        raise ManifestError(f"{path}:1: empty manifest (expected the audio root directory on line 1)")
    root = lines[0].strip()
    if not os.path.isdir(root):
        raise ManifestError(f"{path}:1: the audio root {root} is not a directory (moved data? rebuild the manifest)")
    entries = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            raise ManifestError(f"{path}:{lineno}: blank line in manifest")
        items = line.split("\t")
        if len(items) != 2:
            raise ManifestError(f"{path}:{lineno}: expected 'path<TAB>num_samples', got {line!r}")
        try:
            n = int(items[1])
        except ValueError as err:
            raise ManifestError(f"{path}:{lineno}: number of samples {items[1]!r} is not an integer") from err
        if n <= 0:
            raise ManifestError(f"{path}:{lineno}: non-positive number of samples {n}")
        entries.append(ManifestEntry(items[0], n, lineno))
    if not entries and not allow_empty:
        raise ManifestError(f"{path}: empty manifest (a root line but no audio files)")
    return Manifest(path, root, entries)


def check_task_dirs(cfg, *fields: str) -> None:
    """Each ``task.<field>`` that is set must be a directory. fairseq-hydra-train changes into
    ``hydra.run.dir`` before the task starts, so a relative path is resolved against the run folder:
    the error says so."""
    for name in fields:
        value = getattr(cfg, name, None)
        if value in (None, "") or os.path.isdir(value):
            continue
        hint = ""
        if not os.path.isabs(value):
            hint = (
                f"; a relative path is resolved against the run directory {os.getcwd()} (fairseq-hydra-train "
                f"changes into hydra.run.dir): give an absolute one, e.g. task.{name}=$PWD/{value}"
            )
        raise ManifestError(f"task.{name}={value}: not a directory{hint}")


def write_manifest(path, root, rows: Iterable[Tuple[str, int]]) -> int:
    """Atomically write a manifest; return the number of entries."""
    n = 0
    with atomic_write(path) as f:
        f.write(f"{Path(root).resolve()}\n")
        for rel, num_samples in rows:
            if "\t" in rel or "\n" in rel:
                raise ManifestError(f"{path}: file name with a tab or newline cannot be written: {rel!r}")
            f.write(f"{rel}\t{num_samples}\n")
            n += 1
    return n


def write_lines(path, lines: Iterable[str]) -> int:
    """Atomically write one text line per item (labels, transcripts, image indices)."""
    n = 0
    with atomic_write(path) as f:
        for line in lines:
            f.write(f"{line}\n")
            n += 1
    return n
