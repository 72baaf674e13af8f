"""Apply a learned k-means: ``{split}.km`` (one line of cluster ids per manifest line) and ``dict.km.txt``.

From dumped features:
    mtssl-apply-kmeans km/mfcc_k100.npy labels/ --split train --feat-dir feats/mfcc --nshard 4
Straight from audio (features computed in batches, never stored), one shard per job:
    mtssl-apply-kmeans km/mfcc_k100.npy labels/ --manifest data/manifests/train.tsv --feature mfcc [--rank R --nshard N]

With ``--nshard N`` each job writes ``{split}_{rank}_{N}.km``; the job that finds all N shards
written merges them, in order, into ``{split}.km`` (all or nothing). The k-means file is the
``.npy`` of mtssl-learn-kmeans; a pickled scikit-learn model (fairseq's ``simple_kmeans`` output)
executes code when loaded and is read only with ``--trust-pickled-kmeans``. Centroids learnt on one
feature are refused for another (as recorded in their ``.json``).

Assignment is the nearest centroid in float64 (``|x|^2 - 2 x.c + |c|^2``), batched over frames.
"""

import argparse
import logging
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import atomic_write
from ..data.batches import iter_audio_batches, shard_range
from ..data.manifest import read_manifest, write_lines
from ..errors import cli
from ..upstream.readers import make_reader
from .centroids import KmeansFileError, check_feature, load_centroids
from .dump_features import add_reader_args, load_features, read_dump_feature, read_rows, row_chunks

logger = logging.getLogger(__name__)


class CentroidAssigner:
    """Nearest-centroid labels for frames ``(N, C)``."""

    def __init__(self, centroids: np.ndarray):
        self.C = torch.from_numpy(np.asarray(centroids, dtype=np.float64))  # (K, C)
        self.C_norm = (self.C**2).sum(1)  # (K,)

    @classmethod
    def load(cls, km_path, trust_pickle: bool = False, feature: Optional[dict] = None) -> "CentroidAssigner":
        """From a k-means file (:func:`.centroids.load_centroids`), checked against ``feature`` when given."""
        centroids, spec = load_centroids(km_path, trust_pickle)
        if feature:
            check_feature(km_path, spec, feature)
        return cls(centroids)

    @property
    def n_clusters(self) -> int:
        return self.C.shape[0]

    @torch.inference_mode()
    def __call__(self, feats: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(feats, dtype=np.float64))
        if x.shape[1] != self.C.shape[1]:
            raise KmeansFileError(f"features have {x.shape[1]} dims but the k-means centroids have {self.C.shape[1]}")
        dist = (x**2).sum(1, keepdim=True) - 2 * x @ self.C.T + self.C_norm
        return dist.argmin(1).numpy()


def label_lines(assigner: CentroidAssigner, feats: Sequence[np.ndarray]) -> List[str]:
    """One ``.km`` line per utterance, assigning all frames of the batch at once."""
    if not feats:
        return []
    labels = assigner(np.concatenate(feats))
    bounds = np.cumsum([0] + [len(f) for f in feats])
    return [" ".join(map(str, labels[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]


def write_km_dict(lab_dir, n_clusters: int) -> None:
    write_lines(Path(lab_dir) / "dict.km.txt", (f"{i} 1" for i in range(n_clusters)))


def km_path_for(lab_dir, split, rank, nshard) -> Path:
    return Path(lab_dir) / (f"{split}.km" if nshard == 1 else f"{split}_{rank}_{nshard}.km")


def merge_shards(lab_dir, split: str, nshard: int) -> Optional[Path]:
    """``{split}.km`` from ``{split}_{r}_{nshard}.km``, r = 0..nshard-1, once all exist (else None)."""
    parts = [km_path_for(lab_dir, split, r, nshard) for r in range(nshard)]
    if not all(p.exists() for p in parts):
        return None
    out = Path(lab_dir) / f"{split}.km"
    with atomic_write(out) as f:
        for part in parts:
            with open(part) as src:
                for line in src:
                    f.write(line)
    logger.info("merged %d shards into %s", nshard, out)
    return out


def apply_to_dumped(km_path, lab_dir, split, feat_dir, nshard=1, trust_pickle=False) -> Path:
    assigner = CentroidAssigner.load(km_path, trust_pickle, read_dump_feature(feat_dir, split, nshard))
    shards = load_features(feat_dir, split, nshard)
    out = Path(lab_dir) / f"{split}.km"

    def lines() -> Iterable[str]:
        bar = tqdm(total=sum(len(n) for _, n in shards), desc=f"km {split}", unit="utt", disable=None, mininterval=2.0)
        for arr, lengths in shards:
            bounds = np.cumsum([0] + lengths)
            for first, last in row_chunks(arr, lengths):  # whole utterances, read from the file (read_rows)
                rows = read_rows(arr, int(bounds[first]), int(bounds[last]))
                for a, b in zip(bounds[first:last] - bounds[first], bounds[first + 1 : last + 1] - bounds[first]):
                    yield " ".join(map(str, assigner(rows[a:b])))
                bar.update(last - first)
        bar.close()

    write_lines(out, lines())
    write_km_dict(lab_dir, assigner.n_clusters)
    return out


def apply_to_audio(
    km_path,
    lab_dir,
    manifest_path,
    reader,
    split=None,
    rank=0,
    nshard=1,
    max_batch_samples=1_600_000,
    workers=4,
    trust_pickle=False,
) -> Path:
    """Label one shard of a manifest; returns ``{split}.km`` once every shard is done, else the shard file."""
    assigner = CentroidAssigner.load(km_path, trust_pickle, reader.spec())
    manifest = read_manifest(manifest_path)
    split = split or Path(manifest_path).stem
    start, end = shard_range(len(manifest), rank, nshard)
    out = km_path_for(lab_dir, split, rank, nshard)
    bar = tqdm(total=end - start, desc=f"{reader.name}+km {split}", unit="utt", disable=None, mininterval=2.0)
    with atomic_write(out) as f:
        for indices, wavs in iter_audio_batches(manifest, list(range(start, end)), max_batch_samples, workers):
            for line in label_lines(assigner, reader(wavs)):
                f.write(line + "\n")
            bar.update(len(indices))
    bar.close()
    write_km_dict(lab_dir, assigner.n_clusters)
    if nshard > 1:
        return merge_shards(lab_dir, split, nshard) or out
    return out


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("km_path", help="centroids from mtssl-learn-kmeans (<name>.npy)")
    p.add_argument("lab_dir")
    p.add_argument("--split", help="split name (default: manifest stem)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--feat-dir", help="read features dumped by mtssl-dump-features")
    src.add_argument("--manifest", help="compute features from this manifest's audio")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--nshard", type=int, default=1)
    add_reader_args(p)
    p.add_argument(
        "--trust-pickled-kmeans",
        action="store_true",
        help="read a joblib/pickle k-means model (fairseq's simple_kmeans output): this EXECUTES CODE from the file",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if a.feat_dir:
        if not a.split:
            p.error("--feat-dir needs --split")
        out = apply_to_dumped(a.km_path, a.lab_dir, a.split, a.feat_dir, a.nshard, a.trust_pickled_kmeans)
    else:
        reader = make_reader(a.feature, a.checkpoint, a.layer, a.device)
        out = apply_to_audio(
            a.km_path,
            a.lab_dir,
            a.manifest,
            reader,
            a.split,
            a.rank,
            a.nshard,
            a.max_batch_samples,
            a.workers,
            a.trust_pickled_kmeans,
        )
    print(out)


if __name__ == "__main__":
    main()
