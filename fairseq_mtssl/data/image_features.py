"""Precomputed image features: one memory-mapped ``.npy`` of region rows and an index, never one file per image.

    mtssl-image-features --images manifests/train.images --root CORPUS_ROOT --out features/train [--backbone regions]
    mtssl-image-features --images train.images --root COCO_ROOT --out feats/train --backbone resnet.ts --size 224
    mtssl-image-features --images train.images --tsv train2014_obj36.tsv val2014_obj36.tsv --out feats/train

``{out}.npy`` holds ``(total_regions, D)`` float32 rows; ``{out}.idx`` (tab-separated, with a header)
gives each image's ``image  offset  regions``. Backbones:

- ``regions`` (default): object regions of the embedded corpus's rendered scenes, found from the
  pixels (connected blobs of one colour): each row the object's colour, area, an 8 x 8 silhouette in its
  box, and the box (:mod:`fairseq_mtssl.data.scene_regions`); the kind of input the paper's
  bottom-up-attention regions give, with no weights involved.
- ``scene``: a deterministic pixel feature for the embedded corpus's rendered scenes: the
  image cut into a 4 x 4 grid, each cell a region: a fixed random projection (seed 0) of its pixels to
  ``D - 4`` dims, plus the cell's box ``(x0, y0, x1, y1)`` in [0, 1]; no weights involved. It carries
  colour but hardly shape or size (a linear probe reads an object's shape below the majority class),
  and VGS does not ground on it at this scale: kept for comparison.
- a TorchScript file (``torch.jit.save`` of any image backbone, e.g. a ResNet trunk or Faster R-CNN
  region head): images resized to ``--size``, ImageNet-normalised; an output ``(1, C, h, w)`` gives
  ``h * w`` regions of ``C`` dims (+ their boxes), ``(1, C)`` one global region.
- ``--tsv``: precomputed bottom-up-attention Faster R-CNN regions (the paper's: 36 x 2048 and their
  normalised boxes per image), read from their TSV files (:mod:`fairseq_mtssl.data.region_features`).

Every row ends with its region's box ``(x0, y0, x1, y1)`` in [0, 1].

Both files are written under temporary names and moved into place.
"""

import os
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_write
from ..errors import MtsslError
from .scene_regions import scene_regions

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class ImageFeatureError(MtsslError, ValueError):
    pass


def grid_boxes(h: int, w: int) -> np.ndarray:
    """``(h * w, 4)`` boxes ``(x0, y0, x1, y1)`` in [0, 1] of a row-major ``h x w`` grid."""
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([xs / w, ys / h, (xs + 1) / w, (ys + 1) / h], -1).reshape(-1, 4).astype(np.float32)


def scene_features(image: np.ndarray, dim: int = 64, grid: int = 4) -> np.ndarray:
    """``(grid * grid, dim)`` region features of an ``(H, W, 3)`` uint8 image (see the module doc)."""
    h, w, _ = image.shape
    ch, cw = h // grid, w // grid
    cells = (
        image[: ch * grid, : cw * grid].reshape(grid, ch, grid, cw, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, -1)
    )
    proj = np.random.default_rng(0).standard_normal((cells.shape[1], dim - 4)).astype(np.float32) / np.sqrt(
        cells.shape[1]
    )
    pixels = cells.astype(np.float32) / 255.0 - 0.5
    return np.concatenate([pixels @ proj, grid_boxes(grid, grid)], 1)


class TorchScriptBackbone:
    def __init__(self, path: str, size: int):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: backbone checkpoint not found")
        self.model = torch.jit.load(path, map_location="cpu").eval()
        self.size = size

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        img = Image.fromarray(image).resize((self.size, self.size), Image.BICUBIC)
        x = (np.asarray(img, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        out = self.model(torch.from_numpy(x).permute(2, 0, 1)[None])
        if out.dim() == 4:
            _, c, h, w = out.shape
            regions = out[0].reshape(c, h * w).T.numpy()
            return np.concatenate([regions, grid_boxes(h, w)], 1)
        if out.dim() == 2:
            return out.numpy()
        raise ImageFeatureError(f"backbone output has shape {tuple(out.shape)}; expected (1, C, h, w) or (1, C)")


def read_image_list(path) -> List[str]:
    names = Path(path).read_text(encoding="utf-8").splitlines()
    if not names:
        raise ImageFeatureError(f"{path}: empty image list")
    return names


def extractor(backbone: str, size: int = 224, dim: int = 64):
    """``image (H, W, 3) uint8 -> (R, D) float32`` for a ``backbone`` name (module doc) or TorchScript file."""
    if backbone == "regions":
        return scene_regions
    if backbone == "scene":
        return lambda img: scene_features(img, dim)
    return TorchScriptBackbone(backbone, size)


def write_image_features(
    images_list, root, out, backbone: str = "regions", size: int = 224, dim: int = 64
) -> Tuple[int, int]:
    """Compute and store features for every image of ``images_list`` (paths relative to ``root``)."""
    names = read_image_list(images_list)
    extract = extractor(backbone, size, dim)
    rows, index = [], []
    offset = 0
    for lineno, name in enumerate(names, start=1):
        path = Path(root) / name
        try:
            image = np.asarray(Image.open(path).convert("RGB"))
        except (OSError, ValueError) as err:
            raise ImageFeatureError(f"{images_list}:{lineno}: cannot read image {path}: {err}") from err
        feats = np.asarray(extract(image), dtype=np.float32)
        rows.append(feats)
        index.append(f"{name}\t{offset}\t{len(feats)}")
        offset += len(feats)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    matrix = np.concatenate(rows)
    with atomic_write(f"{out}.npy", "wb") as f:
        np.save(f, matrix)
    with atomic_write(f"{out}.idx") as f:
        f.write("image\toffset\tregions\n" + "\n".join(index) + "\n")
    return len(names), matrix.shape[1]


class ImageFeatureStore:
    """Read side: ``store[name] -> (regions, D)`` rows of a memory-mapped matrix."""

    def __init__(self, prefix):
        self.prefix = str(prefix)
        npy, idx = f"{prefix}.npy", f"{prefix}.idx"
        for p in (npy, idx):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: image feature file not found (write it with mtssl-image-features)")
        self.matrix = np.load(npy, mmap_mode="r")
        self.index: Dict[str, Tuple[int, int]] = {}
        with open(idx, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if lineno == 1:
                    continue
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 3:
                    raise ImageFeatureError(f"{idx}:{lineno}: expected 'image offset regions', got {line.rstrip()!r}")
                off, n = int(parts[1]), int(parts[2])
                if off + n > len(self.matrix):
                    raise ImageFeatureError(
                        f"{idx}:{lineno}: rows {off}..{off + n} beyond {npy} ({len(self.matrix)} rows)"
                    )
                self.index[parts[0]] = (off, n)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def __getitem__(self, name: str) -> np.ndarray:
        off, n = self.index[name]
        return np.asarray(self.matrix[off : off + n], dtype=np.float32)
