"""Check frame labels (``.km``) against their manifest before training: line counts and lengths.

    mtssl-check-labels data/manifests/train.tsv labels/train.km --label-rate 100

fairseq's ``HubertDataset`` only warns when an utterance's labels and audio differ by more than
0.1 s; here the same mismatch is an error naming the label file and line, and so is a label file
whose line count differs from the manifest's.
"""

import argparse
from typing import List

from ..errors import MtsslError, cli
from .manifest import read_manifest


class LabelMismatchError(MtsslError, ValueError):
    pass


def count_label_lines(label_path) -> List[int]:
    """Number of labels on each line of ``label_path``."""
    try:
        with open(label_path, encoding="utf-8") as f:
            return [len(line.split()) for line in f]
    except FileNotFoundError as err:
        raise LabelMismatchError(f"{label_path}: label file not found") from err


def check_frame_labels(
    manifest_path, label_path, label_rate: float, sample_rate: int = 16000, tolerance_s: float = 0.1
) -> int:
    """Raise :class:`LabelMismatchError` unless every utterance's label duration matches its audio.

    Returns the number of utterances checked. ``label_rate`` < 0 means sequence labels (only the line
    count is checked).
    """
    manifest = read_manifest(manifest_path)
    counts = count_label_lines(label_path)
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
    a = p.parse_args(argv)
    for path in a.labels:
        n = check_frame_labels(a.manifest, path, a.label_rate, a.sample_rate, a.tolerance)
        print(f"{path}: {n} utterances OK")


if __name__ == "__main__":
    main()
