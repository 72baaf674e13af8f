"""Check frame labels (``.km``) against their manifest before training: line counts and lengths.

    mtssl-check-labels data/manifests/train.tsv labels/train.km --label-rate 100

fairseq's ``HubertDataset`` only warns when an utterance's labels and audio differ by more than
0.1 s; here the same mismatch is an error naming the label file and line, and so is a label file
whose line count differs from the manifest's, and a label that is not in the label dictionary
(``dict.km.txt``; fairseq would map it to ``<unk>`` and train on nothing).
"""

import argparse
import os
from typing import List, Optional, Set

from ..errors import MtsslError, cli
from .manifest import read_manifest


class LabelMismatchError(MtsslError, ValueError):
    pass


def read_dictionary_symbols(dict_path) -> Set[str]:
    """The symbols of a fairseq ``dict.*.txt`` (``symbol count`` a line)."""
    try:
        with open(dict_path, encoding="utf-8") as f:
            return {line.split(" ", 1)[0] for line in f if line.strip()}
    except FileNotFoundError as err:
        raise LabelMismatchError(f"{dict_path}: label dictionary not found") from err


def count_label_lines(label_path, symbols: Optional[Set[str]] = None, dict_path=None) -> List[int]:
    """Number of labels on each line of ``label_path``; with ``symbols``, every label must be one of
    them (fairseq would silently map any other token to ``<unk>``)."""
    counts = []
    try:
        with open(label_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                tokens = line.split()
                if symbols is not None:
                    unknown = [t for t in tokens if t not in symbols]
                    if unknown:
                        raise LabelMismatchError(
                            f"{label_path}:{lineno}: label {unknown[0]!r} is not in {dict_path} "
                            f"({len(unknown)} unknown on this line; labels from another k-means?)"
                        )
                counts.append(len(tokens))
    except FileNotFoundError as err:
        raise LabelMismatchError(f"{label_path}: label file not found") from err
    return counts


def check_frame_labels(
    manifest_path,
    label_path,
    label_rate: float,
    sample_rate: int = 16000,
    tolerance_s: float = 0.1,
    dict_path=None,
) -> int:
    """Raise :class:`LabelMismatchError` unless every utterance's label duration matches its audio.

    Returns the number of utterances checked. ``label_rate`` < 0 means sequence labels (only the line
    count is checked). ``dict_path`` (a ``dict.<label>.txt``): every label must be one of its symbols.
    """
    manifest = read_manifest(manifest_path)
    symbols = read_dictionary_symbols(dict_path) if dict_path is not None else None
    counts = count_label_lines(label_path, symbols, dict_path)
    if len(counts) != len(manifest):
        raise LabelMismatchError(
            f"{label_path}: {len(counts)} lines but {manifest_path} lists {len(manifest)} utterances "
            "(labels must be aligned line for line with the manifest)"
        )
    if label_rate <= 0:
        return len(counts)
    for i, (entry, n) in enumerate(zip(manifest.entries, counts)):
        audio_s, label_s = entry.num_samples / sample_rate, n / label_rate
        if abs(audio_s - label_s) > tolerance_s:
            raise LabelMismatchError(
                f"{label_path}:{i + 1}: {n} labels at {label_rate:g} Hz = {label_s:.3f} s, but the audio "
                f"({manifest.where(i)}: {entry.path}, {entry.num_samples} samples) lasts {audio_s:.3f} s "
                f"(tolerance {tolerance_s} s; wrong label_rate, or labels from another manifest?)"
            )
    return len(counts)


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest")
    p.add_argument("labels", nargs="+")
    p.add_argument("--label-rate", type=float, required=True, help="labels per second (-1: sequence labels)")
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--tolerance", type=float, default=0.1, help="seconds")
    p.add_argument(
        "--dict",
        help="the label dictionary every label must be in (default: dict.<ext>.txt beside each label file)",
    )
    a = p.parse_args(argv)
    for path in a.labels:
        ext = os.path.splitext(path)[1].lstrip(".")
        dict_path = a.dict or os.path.join(os.path.dirname(path) or ".", f"dict.{ext}.txt")
        n = check_frame_labels(a.manifest, path, a.label_rate, a.sample_rate, a.tolerance, dict_path)
        print(f"{path}: {n} utterances OK")


if __name__ == "__main__":
    main()
