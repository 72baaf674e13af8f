"""A k-means model on disk as plain data: centroids in ``.npy`` and what they cluster in ``.json``.

    km/kmeans.npy    (K, C) float32 centroids, read with ``np.load(allow_pickle=False)``
    km/kmeans.json   {"n_clusters": K, "dim": C, "feature": {...}, "inertia_per_frame": ...}

Nothing in these files can run code when read. fairseq's ``simple_kmeans`` saves a scikit-learn model
with joblib, which is a pickle: loading one executes whatever it references, so it is read only when
asked explicitly (``trust_pickle=True``, ``--trust-pickled-kmeans``), for files you made yourself.
"""

import json
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..atomic import atomic_write
from ..errors import MtsslError

PICKLED_SUFFIXES = (".joblib", ".pkl", ".pickle", ".bin")


class KmeansFileError(MtsslError, ValueError):
    """A k-means file that is not plain centroids, or disagrees with its description."""


def spec_path(npy: Path) -> Path:
    return Path(npy).with_suffix(".json")


def save_centroids(path, centroids: np.ndarray, feature: dict, inertia_per_frame: Optional[float] = None) -> None:
    """Write ``path`` (``.npy``) and its ``.json`` description, each all or nothing."""
    path = Path(path)
    if path.suffix != ".npy":
        raise KmeansFileError(f"{path}: k-means models are saved as .npy centroids; name the output <name>.npy")
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    with atomic_write(path, "wb") as f:
        np.save(f, centroids, allow_pickle=False)
    spec = {"n_clusters": int(centroids.shape[0]), "dim": int(centroids.shape[1]), "feature": feature}
    if inertia_per_frame is not None:
        spec["inertia_per_frame"] = float(inertia_per_frame)
    with atomic_write(spec_path(path)) as f:
        json.dump(spec, f, indent=1)


def load_centroids(path, trust_pickle: bool = False) -> Tuple[np.ndarray, dict]:
    """``(centroids (K, C), description)`` of a ``.npy`` k-means file, or of a pickled scikit-learn
    model (fairseq's ``simple_kmeans`` output) when ``trust_pickle``; the description of a pickled
    model is ``{}``."""
    path = Path(path)
    if not path.is_file():
        raise KmeansFileError(f"{path}: k-means file not found")
    if path.suffix in PICKLED_SUFFIXES:
        if not trust_pickle:
            raise KmeansFileError(
                f"{path}: a pickled k-means model executes code when loaded; pass --trust-pickled-kmeans "
                "only for a file you made yourself, or convert it with mtssl-learn-kmeans' .npy output"
            )
        import joblib

        km = joblib.load(path)  # executes code: only on the caller's explicit request
        centroids = getattr(km, "cluster_centers_", None)
        if centroids is None:
            raise KmeansFileError(f"{path}: unpickled a {type(km).__name__}, which has no cluster_centers_")
        return np.asarray(centroids, dtype=np.float32), {}
    try:
        centroids = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise KmeansFileError(f"{path}: not a .npy centroid array ({str(err).splitlines()[0]})") from None
    if centroids.ndim != 2 or not np.issubdtype(centroids.dtype, np.floating) or len(centroids) == 0:
        raise KmeansFileError(
            f"{path}: centroids must be a non-empty 2-D float array, got {centroids.dtype}{centroids.shape}"
        )
    spec = {}
    if spec_path(path).is_file():
        try:
            spec = json.loads(spec_path(path).read_text())
        except json.JSONDecodeError as err:
            raise KmeansFileError(f"{spec_path(path)}:{err.lineno}: not valid JSON ({err.msg})") from None
        if (spec.get("n_clusters"), spec.get("dim")) != centroids.shape:
            raise KmeansFileError(
                f"{spec_path(path)}: describes {spec.get('n_clusters')} x {spec.get('dim')} centroids but {path} "
                f"holds {centroids.shape[0]} x {centroids.shape[1]}"
            )
    return centroids, spec


def check_feature(path, spec: dict, feature: dict) -> None:
    """Refuse to apply centroids learnt on one feature to another (as recorded in their description)."""
    learnt = spec.get("feature")
    if not learnt:
        return
    keys = [k for k in ("feature", "layer", "dim") if k in learnt and k in feature]
    diff = {k: (learnt[k], feature[k]) for k in keys if learnt[k] != feature[k]}
    if diff:
        said = ", ".join(f"{k} {a!r} (asked: {b!r})" for k, (a, b) in diff.items())
        raise KmeansFileError(f"{path}: centroids were learnt on {said}")
