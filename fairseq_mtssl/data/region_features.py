"""Bottom-up-attention region features (Faster R-CNN, Anderson et al. 2018) into the image feature store.

    mtssl-image-features --images manifests/train.images --tsv train2014_obj36.tsv val2014_obj36.tsv \
        --out features/train

The features FaST-VGS and the EUSIPCO paper train on are distributed as tab-separated files, one image
a line, no header, the columns ``img_id img_h img_w objects_id objects_conf attrs_id attrs_conf
num_boxes boxes features``; the array columns are base64 of raw little-endian ``int64`` (ids),
``float32`` (confidences, ``boxes (num_boxes, 4)`` as pixel ``x0 y0 x1 y1``, ``features
(num_boxes, 2048)``). As FaST-VGS does, an image's regions are ordered by object confidence, highest
first, the first ``regions`` (36) kept, and each box divided by the image's width and height; a store
row is the 2048-d feature followed by its 4-d normalised box (the image head splits them again).

An image of the list (``{split}.images``; matched by its file stem, ``.../COCO_val2014_000000325114.jpg``
-> ``COCO_val2014_000000325114``) is looked up in the given files; lines of other images are skipped
undecoded. A missing image, a feature width other than ``feature_dim``, a box outside its image or a
corrupt line (column count, base64, sizes) is an error naming the file and line. The ``.npy`` is
written as the rows arrive (never all in memory: SpokenCOCO's 123k images are 36 GB of rows).

``--hdf5`` reads FaST-VGS's HDF5 conversion of the same files instead (datasets ``img_id``, ``img_h``,
``img_w``, ``objects_conf``, ``boxes``, ``features``; needs h5py), with the same ordering and boxes.
"""

import base64
import binascii
import os
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from ..atomic import atomic_write
from .image_features import ImageFeatureError, read_image_list

COLUMNS = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)
_HEADER_BYTES = 128  # room for any 2-d float32 .npy header; rewritten once the row count is known


class RegionFeatureError(ImageFeatureError):
    pass


def image_key(name: str) -> str:
    """The bottom-up-attention ``img_id`` of an image path: its file name without extension."""
    return os.path.splitext(os.path.basename(name))[0]


def _array(field: str, text: str, dtype, where: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RegionFeatureError(f"{where}: corrupt row: column {field} is not base64 ({err})") from None
    if len(raw) % np.dtype(dtype).itemsize:
        raise RegionFeatureError(
            f"{where}: corrupt row: column {field} has {len(raw)} bytes, not a whole number of {np.dtype(dtype).name}"
        )
    return np.frombuffer(raw, dtype=dtype)


def parse_row(line: str, where: str, feature_dim: int, regions: int) -> Tuple[str, np.ndarray]:
    """``(img_id, (min(num_boxes, regions), feature_dim + 4) float32)`` of one TSV line (see the module doc)."""
    cols = line.rstrip("\r\n").split("\t")
    if len(cols) != len(COLUMNS):
        raise RegionFeatureError(f"{where}: corrupt row: {len(cols)} tab-separated columns, expected {len(COLUMNS)}")
    row = dict(zip(COLUMNS, cols))
    try:
        h, w, n = int(row["img_h"]), int(row["img_w"]), int(row["num_boxes"])
    except ValueError:
        raise RegionFeatureError(f"{where}: corrupt row: img_h, img_w, num_boxes must be integers") from None
    if h <= 0 or w <= 0 or n <= 0:
        raise RegionFeatureError(f"{where}: corrupt row: img_h={h}, img_w={w}, num_boxes={n} must be positive")
    conf = _array("objects_conf", row["objects_conf"], np.float32, where)
    boxes = _array("boxes", row["boxes"], np.float32, where)
    feats = _array("features", row["features"], np.float32, where)
    if conf.size != n or boxes.size != 4 * n:
        raise RegionFeatureError(
            f"{where}: corrupt row: {conf.size} confidences and {boxes.size // 4} boxes for num_boxes={n}"
        )
    if feats.size % n:
        raise RegionFeatureError(f"{where}: corrupt row: {feats.size} feature values do not split into {n} boxes")
    if feats.size // n != feature_dim:
        raise RegionFeatureError(
            f"{where}: image {row['img_id']}: {feats.size // n}-dim region features, expected {feature_dim} "
            f"(--feature-dim)"
        )
    return row["img_id"], select_regions(conf, boxes.reshape(n, 4), feats.reshape(n, feature_dim), h, w, regions,
                                         f"{where}: image {row['img_id']}")  # fmt: skip


def select_regions(
    conf: np.ndarray, boxes: np.ndarray, feats: np.ndarray, h: int, w: int, regions: int, where: str
) -> np.ndarray:
    """``(min(n, regions), D + 4)``: the most confident regions first (FaST-VGS's ordered indices), each
    feature ``(n, D)`` followed by its pixel box ``(n, 4)`` divided by the image's width and height."""
    order = np.argsort(-conf, kind="stable")[:regions]
    box = boxes[order].astype(np.float32) / np.array([w, h, w, h], dtype=np.float32)
    if not (np.isfinite(box).all() and (box >= -1e-5).all() and (box <= 1 + 1e-5).all()):
        raise RegionFeatureError(f"{where}: a box lies outside its {w} x {h} image")
    return np.ascontiguousarray(np.concatenate([feats[order], np.clip(box, 0.0, 1.0)], 1), dtype=np.float32)


def _tsv_rows(tsv_files: Sequence, wanted, feature_dim: int, regions: int) -> Iterator[Tuple[str, np.ndarray]]:
    for tsv in tsv_files:
        with open(tsv, encoding="ascii", errors="replace", newline="\n") as src:
            for lineno, line in enumerate(src, start=1):
                img_id = line.split("\t", 1)[0]
                if img_id in wanted:
                    yield parse_row(line, f"{tsv}:{lineno}", feature_dim, regions)


def _hdf5_rows(files: Sequence, wanted, feature_dim: int, regions: int) -> Iterator[Tuple[str, np.ndarray]]:
    """FaST-VGS's HDF5 (``generate_hdf5_coco_places_flickr8k_imgfeat.py``): datasets ``img_id (n,)``,
    ``img_h``, ``img_w``, ``objects_conf (n, R)``, ``boxes (n, R, 4)`` in pixels, ``features (n, R, D)``."""
    try:
        import h5py
    except ImportError:
        raise RegionFeatureError("--hdf5 needs h5py (pip install h5py; it depends on numpy only)") from None

    for path in files:
        try:
            f = h5py.File(path, "r")
        except OSError as err:
            raise RegionFeatureError(f"{path}: not a readable HDF5 file ({err})") from None
        with f:
            for key in ("img_id", "img_h", "img_w", "objects_conf", "boxes", "features"):
                if key not in f:
                    raise RegionFeatureError(f"{path}: no dataset {key!r} (expected FaST-VGS's image feature HDF5)")
            feats = f["features"]
            if feats.ndim != 3 or feats.shape[2] != feature_dim:
                raise RegionFeatureError(f"{path}: features of shape {feats.shape}, expected (n, R, {feature_dim})")
            ids = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in f["img_id"][:]]
            for k, img_id in enumerate(ids):
                if img_id in wanted:
                    where = f"{path}: row {k}: image {img_id}"
                    yield img_id, select_regions(f["objects_conf"][k], f["boxes"][k], feats[k], int(f["img_h"][k]),
                                                 int(f["img_w"][k]), regions, where)  # fmt: skip


def _npy_header(rows: int, dim: int) -> bytes:
    """A version 1.0 ``.npy`` header for ``(rows, dim)`` float32, padded to exactly ``_HEADER_BYTES``."""
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % (rows, dim)
    body = text.ljust(_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


def write_region_features(
    images_list, tsv_files: Sequence, out, feature_dim: int = 2048, regions: int = 36, fmt: str = "tsv"
) -> Tuple[int, int]:
    """Store the regions of every image of ``images_list`` from bottom-up-attention ``tsv_files`` (or,
    ``fmt="hdf5"``, FaST-VGS's HDF5 conversion of them); returns ``(images, row width)``."""
    names = read_image_list(images_list)
    wanted: Dict[str, List[int]] = {}
    for lineno, name in enumerate(names, start=1):
        wanted.setdefault(image_key(name), []).append(lineno)
    for tsv in tsv_files:
        if not os.path.isfile(tsv):
            raise FileNotFoundError(f"{tsv}: region feature file not found")
    found: Dict[str, Tuple[int, int]] = {}
    offset, dim = 0, feature_dim + 4
    out = Path(out)
    with atomic_write(f"{out}.npy", "wb") as f:
        f.write(b"\0" * _HEADER_BYTES)
        rows = (_hdf5_rows if fmt == "hdf5" else _tsv_rows)(tsv_files, wanted, feature_dim, regions)
        for img_id, feats in rows:
            if img_id in found:
                continue
            f.write(feats.tobytes())
            found[img_id] = (offset, len(feats))
            offset += len(feats)
            if len(found) == len(wanted):
                break
        missing = [k for k in wanted if k not in found]
        if missing:
            first = min(wanted[k][0] for k in missing)
            raise RegionFeatureError(
                f"{images_list}:{first}: image {names[first - 1]} (img_id {image_key(names[first - 1])}) is in none of "
                f"{', '.join(map(str, tsv_files))} ({len(missing)} of {len(wanted)} images missing)"
            )
        f.seek(0)
        f.write(_npy_header(offset, dim))
    with atomic_write(f"{out}.idx") as f:
        f.write("image\toffset\tregions\n")
        for name in names:
            off, n = found[image_key(name)]
            f.write(f"{name}\t{off}\t{n}\n")
    return len(names), dim
