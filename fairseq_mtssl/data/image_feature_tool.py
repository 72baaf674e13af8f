"""``mtssl-image-features``: an image list -> the image feature store, from a backbone, the corpus's
scene features, or bottom-up-attention regions (TSV, or FaST-VGS's HDF5; see :mod:`.image_features` and :mod:`.region_features`)."""

import argparse
import logging

from ..errors import cli
from . import image_features
from .image_features import write_image_features
from .region_features import write_region_features


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=image_features.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", required=True, help="image list (a manifest's {split}.images)")
    p.add_argument("--root", help="directory the image paths are relative to (not with --tsv)")
    p.add_argument("--out", required=True, help="output prefix: writes {out}.npy and {out}.idx")
    p.add_argument(
        "--backbone",
        default="regions",
        help="'regions' (object blobs of the embedded scenes), 'scene' (4 x 4 grid) or a TorchScript backbone file",
    )
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dim", type=int, default=64, help="--backbone scene: feature size")
    p.add_argument("--tsv", nargs="+", help="bottom-up-attention region feature TSV files (instead of a backbone)")
    p.add_argument("--hdf5", nargs="+", help="FaST-VGS's HDF5 files of the same region features (needs h5py)")
    p.add_argument("--feature-dim", type=int, default=2048, help="--tsv/--hdf5: expected region feature width")
    p.add_argument("--regions", type=int, default=36, help="--tsv/--hdf5: regions kept per image, by object confidence")
    a = p.parse_args(argv)
    if a.tsv or a.hdf5:
        if a.tsv and a.hdf5:
            p.error("give --tsv or --hdf5, not both")
        fmt = "tsv" if a.tsv else "hdf5"
        n, d = write_region_features(a.images, a.tsv or a.hdf5, a.out, a.feature_dim, a.regions, fmt)
        print(f"{a.out}: {n} images, {d}-dim regions")
        return
    if not a.root:
        p.error("--root is required unless --tsv or --hdf5 is given")
    logging.getLogger("PIL").setLevel(logging.INFO)  # PIL logs every PNG chunk at DEBUG
    n, d = write_image_features(a.images, a.root, a.out, a.backbone, a.size, a.dim)
    print(f"{a.out}: {n} images, {d}-dim regions")


if __name__ == "__main__":
    main()
