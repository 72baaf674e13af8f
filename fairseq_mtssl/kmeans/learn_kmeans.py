"""Learn k-means on dumped features with fairseq's simple_kmeans settings; save the centroids as .npy.

    mtssl-learn-kmeans feats/mfcc train 1 km/mfcc_k100.npy --n-clusters 100 --percent 0.1

The model is written as plain data (:mod:`.centroids`: ``.npy`` centroids and a ``.json`` naming the
feature they were learnt on), never as a pickle.

MiniBatchKMeans(k-means++, batch 10000, n_init 20, max_iter 100, max_no_improvement 100,
reassignment_ratio 0, tol 0) on a random ``--percent`` of the frames (``-1``: all).

Memory is bounded by the sample, not by the dump: the sample (frames x dims x 4 bytes), one 32 MB read
and scikit-learn's working arrays. The chosen rows are read from the file in chunks, never through a
mapping of all of it (benchmarks/bench_scale.py measures it).
"""

import argparse
import logging

import numpy as np
from sklearn.cluster import MiniBatchKMeans

from ..errors import cli
from .centroids import KmeansFileError, save_centroids
from .dump_features import load_features, read_dump_feature, read_rows, row_chunks

logger = logging.getLogger(__name__)


def fairseq_minibatch_kmeans(
    n_clusters: int,
    seed: int = 0,
    batch_size: int = 10000,
    n_init: int = 20,
    max_iter: int = 100,
    max_no_improvement: int = 100,
    init: str = "k-means++",
    reassignment_ratio: float = 0.0,
) -> MiniBatchKMeans:
    return MiniBatchKMeans(
        n_clusters=n_clusters,
        init=init,
        max_iter=max_iter,
        batch_size=batch_size,
        verbose=0,
        compute_labels=False,
        tol=0.0,
        max_no_improvement=max_no_improvement,
        init_size=None,
        n_init=n_init,
        reassignment_ratio=reassignment_ratio,
        random_state=seed,
    )


def sample_frames(arrays, percent: float, seed: int) -> np.ndarray:
    """A uniform random ``percent`` of all frames (all of them if ``percent`` <= 0 or >= 1), float32 ``(n, C)``.

    Memory: the sample plus one read chunk (:func:`.dump_features.read_rows`), whatever the dump's size.
    """
    rng = np.random.default_rng(seed)
    keeps = [
        np.sort(rng.choice(len(arr), size=max(1, int(len(arr) * percent)), replace=False)) if 0 < percent < 1 else None
        for arr in arrays
    ]
    total = sum(len(arr) if keep is None else len(keep) for arr, keep in zip(arrays, keeps))
    out = np.empty((total, *arrays[0].shape[1:]), dtype=np.float32)
    pos = 0
    for arr, keep in zip(arrays, keeps):
        for start, stop in row_chunks(arr):
            if keep is not None:
                lo, hi = np.searchsorted(keep, [start, stop])
                if lo == hi:
                    continue
                rows = read_rows(arr, int(keep[lo]), int(keep[hi - 1]) + 1)[keep[lo:hi] - keep[lo]]
            else:
                rows = read_rows(arr, start, stop)
            out[pos : pos + len(rows)] = rows
            pos += len(rows)
    return out


def learn_kmeans(
    feat_dir, split, nshard, km_path, n_clusters, percent=-1.0, seed=0, **kmeans_kwargs
) -> MiniBatchKMeans:
    feats = sample_frames([arr for arr, _ in load_features(feat_dir, split, nshard)], percent, seed)
    if len(feats) < n_clusters:
        raise KmeansFileError(
            f"{feat_dir}: {len(feats)} sampled frames for {n_clusters} clusters; raise --percent or lower --n-clusters"
        )
    logger.info("k-means: %d frames x %d dims -> %d clusters", feats.shape[0], feats.shape[1], n_clusters)
    km = fairseq_minibatch_kmeans(n_clusters, seed=seed, **kmeans_kwargs).fit(feats)
    inertia = -km.score(feats) / len(feats)
    logger.info("k-means inertia per frame: %.5f", inertia)
    save_centroids(km_path, km.cluster_centers_, read_dump_feature(feat_dir, split, nshard), inertia)
    return km


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("feat_dir")
    p.add_argument("split")
    p.add_argument("nshard", type=int)
    p.add_argument("km_path", help="output centroids, <name>.npy (+ <name>.json)")
    p.add_argument("--n-clusters", type=int, required=True)
    p.add_argument("--percent", type=float, default=-1, help="fraction of frames to fit on (-1: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=10000)
    p.add_argument("--n-init", type=int, default=20)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--max-no-improvement", type=int, default=100)
    p.add_argument("--init", default="k-means++")
    p.add_argument("--reassignment-ratio", type=float, default=0.0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    learn_kmeans(
        a.feat_dir,
        a.split,
        a.nshard,
        a.km_path,
        a.n_clusters,
        a.percent,
        a.seed,
        batch_size=a.batch_size,
        n_init=a.n_init,
        max_iter=a.max_iter,
        max_no_improvement=a.max_no_improvement,
        init=a.init,
        reassignment_ratio=a.reassignment_ratio,
    )


if __name__ == "__main__":
    main()
