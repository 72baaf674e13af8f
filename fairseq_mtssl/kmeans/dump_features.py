"""Dump frame features of a manifest shard as ``{split}_{rank}_{nshard}.npy`` + ``.len`` (npy-append-array).

    mtssl-dump-features data/manifests/train.tsv feats/mfcc --feature mfcc --nshard 4 --rank 0
    mtssl-dump-features data/manifests/train.tsv feats/hubert_l6 --feature model \\
        --checkpoint checkpoint_best.pt --layer 6

``.npy`` holds the frames of all utterances of the shard stacked ``(sum F_i, C)`` float32; ``.len``
one frame count a line, in manifest order. Work in progress lives in ``*.partial`` files; a run
killed at any point (even ``kill -9``) resumes where it stopped when started again, and the final
names appear only once the shard is complete.

What a dump is (manifest and its digest, shard, feature, checkpoint, layer) is recorded in
``{split}_{rank}_{nshard}.spec.json`` before the first frame is written; a run whose request differs
(another feature into the same folder, a reordered manifest) is refused, and so is a second run on
the same shard while one is writing it (a lock on ``.lock``).
"""

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Tuple

import numpy as np
from npy_append_array import NpyAppendArray
from tqdm import tqdm

from ..atomic import atomic_write
from ..data.batches import iter_audio_batches, shard_range
from ..data.manifest import read_manifest
from ..errors import MtsslError, cli
from ..upstream.readers import MFCC, make_reader

logger = logging.getLogger(__name__)


class FeatureDumpError(MtsslError, RuntimeError):
    pass


def shard_paths(feat_dir, split: str, rank: int, nshard: int) -> Tuple[Path, Path]:
    base = Path(feat_dir) / f"{split}_{rank}_{nshard}"
    return base.with_suffix(".npy"), base.with_suffix(".len")


def dump_spec_path(feat_dir, split: str, rank: int, nshard: int) -> Path:
    return Path(feat_dir) / f"{split}_{rank}_{nshard}.spec.json"


def dump_spec(manifest_path, reader, rank: int, nshard: int) -> dict:
    """What a dump of ``manifest_path`` through ``reader`` is: the identity a resumed or repeated run must share."""
    digest = hashlib.sha1(Path(manifest_path).read_bytes()).hexdigest()
    return {
        "manifest": str(Path(manifest_path).resolve()),
        "manifest_sha1": digest,
        "rank": rank,
        "nshard": nshard,
        **reader.spec(),
    }


def check_dump_spec(path: Path, want: dict) -> None:
    """Refuse a folder whose dump (partial or final) was made from another request."""
    if not path.exists():
        return
    have = json.loads(path.read_text())
    keys = ["manifest_sha1", "rank", "nshard", "feature", "layer", "dim", "checkpoint", "checkpoint_bytes"]
    diff = [k for k in keys if have.get(k) != want.get(k)]
    if diff:
        said = "; ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} asked" for k in diff)
        raise FeatureDumpError(f"{path}: this folder holds another dump ({said}); use another folder or delete it")


@contextlib.contextmanager
def shard_lock(feat_dir, split: str, rank: int, nshard: int):
    """Hold an exclusive lock on a shard's dump; a second writer is refused at once."""
    path = Path(feat_dir) / f"{split}_{rank}_{nshard}.lock"
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FeatureDumpError(f"{path}: another mtssl-dump-features is writing this shard; wait for it") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _npy_rows(path: Path) -> Tuple[int, int, int, np.dtype]:
    """``(rows in header, rows whose bytes are on disk, header length, dtype)`` of a 2-D .npy file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(
            version
        )
        if read_header is None:
            raise FeatureDumpError(f"{path}: unsupported .npy version {version}")
        shape, _, dtype = read_header(f)
        header_len = f.tell()
    row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
    on_disk = (path.stat().st_size - header_len) // row_bytes if row_bytes else 0
    return shape[0], on_disk, header_len, dtype


def recover_partial(npy: Path, lens: Path) -> int:
    """Make ``npy``/``lens`` consistent after an interruption; return the number of utterances done."""
    done_lens = []
    if lens.exists():
        raw = lens.read_text()
        complete = raw[: raw.rfind("\n") + 1] if "\n" in raw else ""
        done_lens = [int(x) for x in complete.splitlines()]
        if complete != raw:
            lens.write_text(complete)
    expected = sum(done_lens)
    if not npy.exists():
        if expected:
            raise FeatureDumpError(
                f"{lens}: lists {len(done_lens)} utterances but {npy} is missing; delete both and rerun"
            )
        lens.unlink(missing_ok=True)
        return 0
    header_rows, on_disk, _, _ = _npy_rows(npy)
    if min(header_rows, on_disk) < expected:
        raise FeatureDumpError(
            f"{npy}: holds {min(header_rows, on_disk)} frames but {lens} lists {expected}; delete both and rerun"
        )
    if header_rows != expected or on_disk != expected:
        logger.info("%s: trimming to the %d frames of %d finished utterances", npy, expected, len(done_lens))
        arr = np.load(npy, mmap_mode="r")
        tmp = npy.with_name(npy.name + ".trim")
        tmp.unlink(missing_ok=True)
        if expected:
            with NpyAppendArray(str(tmp)) as out:
                for s in range(0, expected, 100_000):
                    out.append(np.ascontiguousarray(arr[s : min(expected, s + 100_000)]))
            del arr
            os.replace(tmp, npy)
        else:
            del arr
            npy.unlink()
    return len(done_lens)


def dump_features(
    manifest_path, feat_dir, reader, split=None, rank=0, nshard=1, max_batch_samples=1_600_000, workers=4
) -> Tuple[Path, Path]:
    manifest = read_manifest(manifest_path)
    split = split or Path(manifest_path).stem
    npy, lens = shard_paths(feat_dir, split, rank, nshard)
    Path(feat_dir).mkdir(parents=True, exist_ok=True)
    with shard_lock(feat_dir, split, rank, nshard):
        spec_file, spec = dump_spec_path(feat_dir, split, rank, nshard), dump_spec(manifest_path, reader, rank, nshard)
        check_dump_spec(spec_file, spec)
        if npy.exists() and lens.exists():
            if not spec_file.exists():
                raise FeatureDumpError(f"{npy}: a dump with no record of what it is ({spec_file}); delete it and rerun")
            logger.info("%s already complete", npy)
            return npy, lens
        if not spec_file.exists():
            with atomic_write(spec_file) as f:
                json.dump(spec, f, indent=1)
        return _dump_shard(manifest, npy, lens, reader, split, rank, nshard, max_batch_samples, workers, manifest_path)


def _dump_shard(manifest, npy, lens, reader, split, rank, nshard, max_batch_samples, workers, manifest_path):
    part_npy, part_lens = npy.with_name(npy.name + ".partial"), lens.with_name(lens.name + ".partial")
    if npy.exists() and not lens.exists() and part_lens.exists():  # killed between the two final renames
        os.replace(npy, part_npy)
    start, end = shard_range(len(manifest), rank, nshard)
    if end == start:
        raise FeatureDumpError(f"{manifest_path}: shard {rank}/{nshard} is empty ({len(manifest)} utterances)")
    done = recover_partial(part_npy, part_lens)
    todo = list(range(start + done, end))
    bar = tqdm(
        total=end - start,
        initial=done,
        desc=f"{reader.name} {split} {rank}/{nshard}",
        unit="utt",
        disable=None,
        mininterval=2.0,
    )
    with open(part_lens, "a") as flen:
        for indices, wavs in iter_audio_batches(manifest, todo, max_batch_samples, workers):
            feats = reader(wavs)
            for i, f in zip(indices, feats):
                if len(f) == 0:
                    raise FeatureDumpError(
                        f"{manifest.where(i)}: {manifest.entries[i].path} is too short for one feature frame"
                    )
            with NpyAppendArray(str(part_npy)) as out:
                out.append(np.concatenate(feats).astype(np.float32, copy=False))
            flen.write("".join(f"{len(f)}\n" for f in feats))
            flen.flush()
            bar.update(len(indices))
    bar.close()
    os.replace(part_npy, npy)
    os.replace(part_lens, lens)
    return npy, lens


READ_CHUNK_BYTES = 32 * 2**20


def read_rows(arr: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a dump ``(N, C)`` (as :func:`load_features` maps it), copied into memory.

    The rows are read from the file, not through the mapping: pages read through a mapping stay in the
    process's resident set (RSS and PSS) until it is closed, so one pass over a dump would count as
    holding all of it (54 GB for the MFCC of LibriSpeech 960 h) in the kernel's accounting and in a
    scheduler's memory limit. Anything but a whole mapped ``.npy`` is sliced as it is.
    """
    if not isinstance(arr, np.memmap) or arr.filename is None or not arr.flags.c_contiguous:
        return np.array(arr[start:stop])
    row = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.itemsize
    if os.path.getsize(arr.filename) != arr.offset + len(arr) * row:  # a view of the mapping, not all of it
        return np.array(arr[start:stop])
    start, stop = max(0, start), min(len(arr), stop)
    n = max(0, stop - start)
    out = np.fromfile(arr.filename, dtype=arr.dtype, count=n * row // arr.itemsize, offset=arr.offset + start * row)
    if out.size * arr.itemsize != n * row:
        raise FeatureDumpError(f"{arr.filename}: rows {start}-{stop} could not be read (file changed?)")
    return out.reshape(n, *arr.shape[1:])


def row_chunks(arr: np.ndarray, lengths=None):
    """``[(start, stop), ...]`` covering the rows of ``arr`` in reads of at most :data:`READ_CHUNK_BYTES`.

    With ``lengths`` (frames per utterance, summing to ``len(arr)``) a piece holds whole utterances
    (one at least, however long), and the pairs are utterance indices, not rows.
    """
    row = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.itemsize)
    step = max(1, READ_CHUNK_BYTES // row)
    if lengths is None:
        return [(s, min(len(arr), s + step)) for s in range(0, len(arr), step)]
    bounds = np.cumsum([0, *lengths])
    pieces, first = [], 0
    while first < len(lengths):
        last = int(np.searchsorted(bounds, bounds[first] + step, side="right")) - 1
        last = min(max(first + 1, last), len(lengths))
        pieces.append((first, last))
        first = last
    return pieces


def load_features(feat_dir, split: str, nshard: int = 1):
    """A split's shards in order: ``[(features (N_r, C) memory-mapped, frame counts), ...]``."""
    shards = []
    for rank in range(nshard):
        npy, lens = shard_paths(feat_dir, split, rank, nshard)
        if not (npy.exists() and lens.exists()):
            raise FileNotFoundError(f"{npy} / {lens}: shard not dumped (or not finished)")
        arr = np.load(npy, mmap_mode="r")
        n = [int(x) for x in lens.read_text().split()]
        if sum(n) != len(arr):
            raise FeatureDumpError(f"{lens}: lengths sum to {sum(n)} but {npy} has {len(arr)} frames")
        shards.append((arr, n))
    return shards


def read_dump_feature(feat_dir, split: str, nshard: int = 1) -> dict:
    """The feature a split's dump holds (``feature``, ``layer``, ``dim``, ``checkpoint``), from its records."""
    specs = []
    for rank in range(nshard):
        path = dump_spec_path(feat_dir, split, rank, nshard)
        specs.append(json.loads(path.read_text()) if path.exists() else {})
    keys = ("feature", "layer", "dim", "checkpoint")
    feature = {k: specs[0][k] for k in keys if k in specs[0]}
    for rank, s in enumerate(specs[1:], 1):
        if {k: s[k] for k in keys if k in s} != feature:
            raise FeatureDumpError(
                f"{dump_spec_path(feat_dir, split, rank, nshard)}: shard {rank} holds another feature than shard 0"
            )
    return feature


def add_reader_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--feature", choices=[MFCC, "model"], default=MFCC)
    p.add_argument("--checkpoint", help="fairseq HuBERT / wav2vec 2.0 / plugin checkpoint (--feature model)")
    p.add_argument("--layer", type=int, help="1-based transformer layer (--feature model)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--max-batch-samples",
        type=int,
        default=1_600_000,
        help="audio samples read per batch (each utterance then runs alone, padded to its length bucket)",
    )
    p.add_argument("--workers", type=int, default=4, help="audio reading threads")


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest")
    p.add_argument("feat_dir")
    p.add_argument("--split", help="output name (default: manifest file stem)")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--nshard", type=int, default=1)
    add_reader_args(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    reader = make_reader(a.feature, a.checkpoint, a.layer, a.device)
    npy, lens = dump_features(a.manifest, a.feat_dir, reader, a.split, a.rank, a.nshard, a.max_batch_samples, a.workers)
    print(npy)


if __name__ == "__main__":
    main()
