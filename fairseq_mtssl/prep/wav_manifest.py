"""Any tree of wav/flac files -> fairseq manifests ``train.tsv`` and ``valid.tsv``.

    mtssl-manifest-wav /data/audio --dest manifests/mydata --ext flac --valid-percent 0.01

Each manifest is the absolute root on line 1, then ``relative/path<TAB>num_samples`` sorted by
path. Only headers are read; every file must be 16 kHz mono. The valid split is a stable hash of
each relative path, so adding files never moves existing ones between splits.
"""

import argparse
import os
from pathlib import Path
from typing import List

from ..data.manifest import ManifestError, write_manifest
from ..errors import cli
from .common import count_samples, in_valid_split


def find_audio(root: Path, extensions: List[str], must_contain: str = "") -> List[str]:
    found = []
    exts = tuple(f".{e.lstrip('.').lower()}" for e in extensions)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(exts):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                if must_contain in rel:
                    found.append(rel)
    return sorted(found)


def build_wav_manifests(
    root, dest, extensions=("wav", "flac"), valid_percent=0.01, seed=0, workers=0, must_contain=""
) -> dict:
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    rels = find_audio(root, list(extensions), must_contain)
    if not rels:
        raise ManifestError(f"{root}: no files ending in {', '.join(extensions)}")
    sizes = count_samples([str(root / r) for r in rels], workers=workers)
    rows = list(zip(rels, sizes))
    splits = {"train": [r for r in rows if not in_valid_split(r[0], valid_percent, seed)]}
    if valid_percent > 0:
        splits["valid"] = [r for r in rows if in_valid_split(r[0], valid_percent, seed)]
    return {name: write_manifest(Path(dest) / f"{name}.tsv", root, split_rows) for name, split_rows in splits.items()}


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="directory searched recursively")
    p.add_argument("--dest", required=True, help="output directory for train.tsv / valid.tsv")
    p.add_argument("--ext", default="wav,flac", help="comma-separated extensions")
    p.add_argument("--valid-percent", type=float, default=0.01, help="fraction (0-1) of files for valid.tsv")
    p.add_argument("--seed", type=int, default=0, help="salt of the split hash")
    p.add_argument("--path-must-contain", default="", help="keep only paths containing this string")
    p.add_argument("--workers", type=int, default=0, help="header-reading processes (0: up to 8)")
    a = p.parse_args(argv)
    counts = build_wav_manifests(
        a.root, a.dest, a.ext.split(","), a.valid_percent, a.seed, a.workers, a.path_must_contain
    )
    print(" ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
