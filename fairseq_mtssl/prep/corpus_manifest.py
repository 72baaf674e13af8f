"""The embedded corpus -> fairseq manifests for every split, with every label format.

    mtssl-manifest-corpus data/corpus --dest data/manifests

Writes, for each split (train, valid, test): ``.tsv``, ``.img``/``.images``/``.spk``/``.wrd``/``.ltr``
(as :mod:`spokencoco_manifest`), ``.phn`` (phones from the alignments, ``sil`` dropped), and the
training split's ``dict.ltr.txt`` and ``dict.phn.txt`` (counts from train; symbols only other
splits use listed with count 0).
"""

import argparse
from pathlib import Path

from ..corpus.alignment import read_ctm
from ..data.manifest import read_manifest
from ..errors import cli
from .common import aligned_phones, write_dictionary, write_phone_transcripts
from .spokencoco_manifest import build_spokencoco_manifest

SPLITS = ("train", "valid", "test")


def build_corpus_manifests(corpus, dest, workers: int = 0) -> dict:
    corpus, dest = Path(corpus), Path(dest)
    if not (corpus / "corpus.json").exists():
        raise FileNotFoundError(f"{corpus}/corpus.json not found: build the corpus with mtssl-synth-corpus first")
    counts = {}
    for split in SPLITS:
        counts[split] = build_spokencoco_manifest(
            corpus / "captions" / f"{split}.json", corpus, corpus, dest, split, workers
        )
        align_path = corpus / "alignments" / f"{split}.phones.ctm"
        segs = read_ctm(align_path)
        manifest = read_manifest(dest / f"{split}.tsv")
        phones = [
            aligned_phones(segs, Path(e.path).stem, manifest.where(i), align_path)
            for i, e in enumerate(manifest.entries)
        ]
        write_phone_transcripts(dest, split, phones)
    # The phone and letter inventories are closed: symbols only the held-out speakers' captions use
    # are listed (count 0), so evaluation splits have no out-of-dictionary symbols.
    for labels in ("phn", "ltr"):
        lines = {split: (dest / f"{split}.{labels}").read_text(encoding="utf-8").split() for split in SPLITS}
        write_dictionary(dest / f"dict.{labels}.txt", lines["train"], (s for split in SPLITS[1:] for s in lines[split]))
    return counts


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus")
    p.add_argument("--dest", required=True)
    p.add_argument("--workers", type=int, default=0)
    a = p.parse_args(argv)
    print(" ".join(f"{k}={v}" for k, v in build_corpus_manifests(a.corpus, a.dest, a.workers).items()))


if __name__ == "__main__":
    main()
