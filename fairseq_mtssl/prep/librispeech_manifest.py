"""A LibriSpeech-layout directory -> ``{split}.tsv`` with ``.wrd``, ``.ltr`` and optionally ``.phn``.

    mtssl-manifest-librispeech /data/LibriSpeech/train-clean-100 --dest manifests/ls --split train
        [--lexicon librispeech-lexicon.txt | --alignments train.phones.ctm]

The layout is ``speaker/chapter/speaker-chapter.trans.txt`` with ``UTT_ID WORD WORD ...`` lines
and ``UTT_ID.flac`` beside it. Phones come from a lexicon (``WORD PH PH ...``, first pronunciation
wins; an entry ``OF+A`` covers words spoken as one unit) or from a phone alignment (``utt start end phone`` lines, ``sil`` dropped).

Everything is checked before anything is written (audio headers, lexicon coverage, alignments), so a
failed run leaves an old output folder as it was. Audio with no transcript line is an error; with
``--allow-untranscribed`` it is left out and counted.
"""

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..corpus.alignment import AlignmentError, read_ctm
from ..data.manifest import write_lines, write_manifest
from ..errors import MtsslError, cli
from .common import aligned_phones, count_samples, letters, write_dictionary, write_phone_transcripts


class LibriSpeechError(MtsslError, ValueError):
    """A LibriSpeech-layout directory that does not hold what its transcripts say."""


def untranscribed_audio(root: Path, rows, audio_ext: str) -> List[str]:
    """Audio files under ``root`` that no transcript line names (relative paths, sorted)."""
    named = {r[0] for r in rows}
    return sorted(
        str(p.relative_to(root)) for p in root.rglob(f"*.{audio_ext}") if str(p.relative_to(root)) not in named
    )


def read_lexicon(path) -> Dict[str, List[str]]:
    lexicon: Dict[str, List[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise LibriSpeechError(f"{path}:{lineno}: word without phones: {line.rstrip()!r}")
            lexicon.setdefault(parts[0].upper(), parts[1:])
    return lexicon


def pronounce(words: List[str], lexicon: Dict[str, List[str]], max_join: int = 3) -> Optional[List[str]]:
    """Phones of ``words``, longest match first: an entry ``OF+A`` (words spoken as one unit, as in
    the embedded corpus's lexicon) covers ``OF A``. ``None`` lists nothing; raises KeyError naming
    the first word that no entry covers."""
    phones, i = [], 0
    while i < len(words):
        for n in range(min(max_join, len(words) - i), 0, -1):
            key = "+".join(words[i : i + n])
            if key in lexicon:
                phones += lexicon[key]
                i += n
                break
        else:
            raise KeyError(words[i])
    return phones


def read_transcripts(root: Path, audio_ext: str) -> List[Tuple[str, str, str, str]]:
    """``(relative audio path, utt id, transcript, "file:line")`` for every line of every ``*.trans.txt``."""
    rows = []
    trans_files = sorted(root.rglob("*.trans.txt"))
    if not trans_files:
        raise LibriSpeechError(f"{root}: no *.trans.txt files (not a LibriSpeech-layout directory)")
    for trans in trans_files:
        with open(trans, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                utt, _, text = line.strip().partition(" ")
                audio = trans.parent / f"{utt}.{audio_ext}"
                if not audio.exists():
                    raise FileNotFoundError(f"{trans}:{lineno}: audio {audio.name} not found beside the transcript")
                rows.append((str(audio.relative_to(root)), utt, text, f"{trans}:{lineno}"))
    return rows


def build_librispeech_manifest(
    root,
    dest,
    split,
    lexicon: Optional[str] = None,
    alignments: Optional[str] = None,
    audio_ext: str = "flac",
    workers: int = 0,
    allow_untranscribed: bool = False,
) -> Tuple[int, int]:
    """Write the split's files; ``(utterances written, untranscribed audio files left out)``."""
    root, dest = Path(root).resolve(), Path(dest)
    rows = read_transcripts(root, audio_ext)
    missing = untranscribed_audio(root, rows, audio_ext)
    if missing and not allow_untranscribed:
        raise LibriSpeechError(
            f"{root / missing[0]}: no transcript line names this audio ({len(missing)} such files); "
            "pass --allow-untranscribed to leave them out"
        )
    sizes = count_samples([str(root / r[0]) for r in rows], [r[3] for r in rows], workers=workers)
    phones = None
    if lexicon:
        lex = read_lexicon(lexicon)
        phones = []
        for _, utt, text, where in rows:
            try:
                phones.append(" ".join(pronounce(text.upper().split(), lex)))
            except KeyError as err:
                raise LibriSpeechError(f"{where}: word not in lexicon {lexicon}: {err.args[0]}") from None
    elif alignments:
        segs = read_ctm(alignments)
        try:
            phones = [aligned_phones(segs, utt, where, alignments) for _, utt, _, where in rows]
        except AlignmentError as err:
            raise LibriSpeechError(str(err)) from None
    # everything checked: now write
    n = write_manifest(dest / f"{split}.tsv", root, zip([r[0] for r in rows], sizes))
    write_lines(dest / f"{split}.wrd", (r[2] for r in rows))
    write_lines(dest / f"{split}.ltr", (letters(r[2]) for r in rows))
    if split == "train":  # dictionaries come from the training split only
        write_dictionary(dest / "dict.ltr.txt", (c for r in rows for c in letters(r[2]).split()))
    if phones is not None:
        write_phone_transcripts(dest, split, phones)
    return n, len(missing)


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="e.g. LibriSpeech/train-clean-100")
    p.add_argument("--dest", required=True)
    p.add_argument("--split", required=True, help="output name, e.g. train or dev_clean")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--lexicon", help="WORD PH PH ... file for .phn")
    g.add_argument("--alignments", help="phone alignment (utt start end phone) for .phn")
    p.add_argument("--audio-ext", default="flac")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument(
        "--allow-untranscribed", action="store_true", help="leave out (and count) audio that no transcript names"
    )
    a = p.parse_args(argv)
    n, left_out = build_librispeech_manifest(
        a.root, a.dest, a.split, a.lexicon, a.alignments, a.audio_ext, a.workers, a.allow_untranscribed
    )
    print(f"{a.split}={n}" + (f" (left out {left_out} untranscribed audio files)" if left_out else ""))


if __name__ == "__main__":
    main()
