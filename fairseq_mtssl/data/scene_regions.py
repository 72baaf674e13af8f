"""Object regions of a rendered scene, found from its pixels: the embedded corpus's stand-in for
bottom-up-attention regions (one row per detected object: its appearance and its box).

    mtssl-image-features --images train.images --root CORPUS --out feats/train --backbone regions

A region is a connected blob (8-connectivity) of one colour that is not the background colour (the
most frequent colour along the image border); blobs under ``min_pixels`` are dropped as noise. Each
region's row, ``region_dim(mask_side)`` wide (72 for the default 8 x 8 mask)::

    [ mean colour (3, in [-1, 1]) | sqrt(area / image area) (1) | mask (mask_side**2, in [0, 1]) | box (4) ]

``mask`` is the blob's silhouette inside its own bounding box, area-resampled to ``mask_side`` x
``mask_side`` (so it carries the shape whatever the size), and ``box`` is ``(x0, y0, x1, y1)`` in [0, 1]
as every image feature row ends (the image heads read the last 4 columns as the box). Rows are ordered
by area, largest first, at most ``max_regions``. With ``scene_region`` a whole-image row comes first
(mean colour of the image, area 1, a full mask, box 0 0 1 1); an image with no blob gets only that row.
Nothing is learnt and nothing reads the scene labels: only the pixels.
"""

from typing import List

import numpy as np
from PIL import Image
from scipy import ndimage

MASK_SIDE = 8
MIN_PIXELS = 4
MAX_REGIONS = 8


def region_dim(mask_side: int = MASK_SIDE) -> int:
    """Width of one region row: colour 3, area 1, mask ``mask_side ** 2``, box 4."""
    return 3 + 1 + mask_side * mask_side + 4


def background_colour(image: np.ndarray) -> np.ndarray:
    """``(3,)`` the most frequent colour on the border of an ``(H, W, 3)`` uint8 image."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    colours, counts = np.unique(border, axis=0, return_counts=True)
    return colours[np.argmax(counts)]


def _mask_grid(blob: np.ndarray, side: int) -> np.ndarray:
    """``(side * side,)`` fraction of each cell of the blob's ``(h, w)`` bool box that the blob covers."""
    img = Image.fromarray(blob.astype(np.uint8) * 255)
    return (np.asarray(img.resize((side, side), Image.BOX), dtype=np.float32) / 255.0).reshape(-1)


def _row(colour: np.ndarray, blob: np.ndarray, top: int, left: int, shape, mask_side: int) -> np.ndarray:
    h, w = shape
    ys, xs = np.nonzero(blob)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = np.array([(left + x0) / w, (top + y0) / h, (left + x1) / w, (top + y1) / h], dtype=np.float32)
    area = np.float32(np.sqrt(blob.sum() / (h * w)))
    col = colour.astype(np.float32) / 127.5 - 1.0
    return np.concatenate([col, [area], _mask_grid(blob[y0:y1, x0:x1], mask_side), box]).astype(np.float32)


def scene_regions(
    image: np.ndarray,
    mask_side: int = MASK_SIDE,
    min_pixels: int = MIN_PIXELS,
    max_regions: int = MAX_REGIONS,
    scene_region: bool = False,
) -> np.ndarray:
    """``(R, region_dim(mask_side))`` float32 region rows of an ``(H, W, 3)`` uint8 image (module doc)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    h, w, _ = image.shape
    bg = background_colour(image)
    flat = image.reshape(-1, 3)
    colours, inverse = np.unique(flat, axis=0, return_inverse=True)
    inverse = inverse.reshape(h, w)
    found = []
    eight = np.ones((3, 3), dtype=bool)
    for k, colour in enumerate(colours):
        if np.array_equal(colour, bg):
            continue
        labels, n = ndimage.label(inverse == k, structure=eight)
        for j, sl in enumerate(ndimage.find_objects(labels), start=1):
            blob = labels[sl] == j
            size = int(blob.sum())
            if size >= min_pixels:
                found.append((size, _row(colour, blob, sl[0].start, sl[1].start, (h, w), mask_side)))
    found.sort(key=lambda t: -t[0])
    rows: List[np.ndarray] = [r for _, r in found[:max_regions]]
    if scene_region or not rows:
        mean = image.reshape(-1, 3).mean(0) / 127.5 - 1.0
        whole = np.concatenate([mean, [1.0], np.ones(mask_side * mask_side), [0.0, 0.0, 1.0, 1.0]])
        rows.insert(0, whole.astype(np.float32))
    return np.stack(rows).astype(np.float32)
