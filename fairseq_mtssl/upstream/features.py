"""Features once: every layer of every utterance of a split, from one forward each, for every metric.

    mtssl-cache-features UPSTREAM.pt --manifests data/manifests --out runs/features   # or mfcc; --splits ...

    reader = open_reader(checkpoint_or_mfcc)            # the checkpoint is loaded once
    test = extract_split(reader, "manifests/test.tsv")  # one forward per utterance
    abx_per_layer(items, test.by_utterance(), test.frame_rate)
    probe_split(test.layer(6), ...); qbe(...); retrieval(test.embeddings, ...)

As s3prl hands one list of hidden states to every downstream, :func:`extract_split` runs each utterance once
through the reader and keeps ``[layer 0 .. L]`` of all of them; the metrics read views. A split that does not
fit in memory (LibriSpeech dev/test at 768 dims x 13 layers is about 10 GB) streams to a memory-mapped
per-layer cache on disk (``cache=DIR``): ``layer_<k>.npy`` ``(frames of the split, C)`` float32,
``offsets.npy`` ``(N + 1,)``, ``utterances.txt`` and ``meta.json``, written into a temporary folder renamed
into place at the end (all or nothing); a cache whose ``meta.json`` matches (reader, manifest) is reused.
"""

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..atomic import atomic_directory
from ..data.batches import iter_audio_batches
from ..data.manifest import read_manifest
from ..errors import MtsslError, cli

logger = logging.getLogger(__name__)

IN_MEMORY_LIMIT = 4 << 30  # bytes of features a split may hold in memory without a cache folder


class FeatureCacheError(MtsslError, ValueError):
    """A split too large for memory without a cache folder, or a cache that does not match its request."""


@dataclass
class SplitFeatures:
    """Every layer's frames of one split. ``layers[k]`` is ``(frames of all utterances, C)`` (an array or a
    read-only memory map), utterance ``i`` the rows ``offsets[i]:offsets[i + 1]``; ``layer_ids[k]`` the hidden
    state it holds (all of them unless :func:`extract_split` was asked for fewer)."""

    utterances: List[str]  # manifest stems, in manifest order
    offsets: np.ndarray  # (N + 1,)
    layers: List[np.ndarray]
    layer_ids: List[int]
    frame_rate: float
    hop: int  # samples between frames
    window: int  # samples one frame reads
    embeddings: Optional[np.ndarray] = None  # (N, E) utterance embeddings (VGS models), else None
    meta: Optional[dict] = None  # a cache's meta.json: source, manifest, layers, frames, frame rate, hop, window

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _slot(self, layer: int) -> int:
        """Where hidden state ``layer`` is; single-layer features (MFCC) serve every request."""
        if self.layer_ids == [0] and len(self.layers) == 1:
            return 0
        if layer not in self.layer_ids:
            raise FeatureCacheError(f"layer {layer} was not extracted (have {self.layer_ids})")
        return self.layer_ids.index(layer)

    def layer(self, layer: int) -> Dict[str, np.ndarray]:
        """``{utterance: (T, C)}`` views of hidden state ``layer`` (0: the first transformer layer's input)."""
        x, o = self.layers[self._slot(layer)], self.offsets
        return {u: x[o[i] : o[i + 1]] for i, u in enumerate(self.utterances)}

    def by_utterance(self) -> Dict[str, List[np.ndarray]]:
        """``{utterance: [every extracted layer (T, C)]}`` (what ABX reads)."""
        o = self.offsets
        return {u: [x[o[i] : o[i + 1]] for x in self.layers] for i, u in enumerate(self.utterances)}


def _meta(reader, manifest_path, layer_ids, frames: int) -> dict:
    m = Path(manifest_path).resolve()
    st = m.stat()
    return {
        "source": str(reader.source),
        "manifest": str(m),
        "manifest_bytes": st.st_size,
        "manifest_mtime_ns": st.st_mtime_ns,
        "layers": list(layer_ids),
        "frames": frames,
        "frame_rate": reader.frame_rate,
        "hop": reader.hop,
        "window": reader.window,
    }


def read_meta(cache) -> dict:
    """A cache folder's ``meta.json``: source, manifest, layers, frames, frame rate, hop, window."""
    try:
        return json.loads((Path(cache) / "meta.json").read_text())
    except OSError:
        raise FeatureCacheError(f"{cache}: no feature cache here (no meta.json)") from None
    except ValueError as err:
        raise FeatureCacheError(f"{cache}/meta.json: {err}") from None


def open_cache(cache) -> SplitFeatures:
    """The features of a cache folder :func:`extract_split` wrote, memory-mapped (what the SUPERB task reads)."""
    cache = Path(cache)
    meta = read_meta(cache)
    emb = cache / "embeddings.npy"
    return SplitFeatures(
        utterances=(cache / "utterances.txt").read_text().splitlines(),
        offsets=np.load(cache / "offsets.npy"),
        layers=[np.load(cache / f"layer_{k}.npy", mmap_mode="r") for k in meta["layers"]],
        layer_ids=list(meta["layers"]),
        frame_rate=meta["frame_rate"],
        hop=meta["hop"],
        window=meta["window"],
        embeddings=np.load(emb) if emb.exists() else None,
        meta=meta,
    )


def _load_cache(cache: Path, meta: dict) -> Optional[SplitFeatures]:
    """The cache at ``cache`` if there is one; it must hold the features ``meta`` describes."""
    if not (cache / "meta.json").exists():
        return None
    found = open_cache(cache)
    if found.meta != meta:
        raise FeatureCacheError(f"{cache}/meta.json: a cache of other features ({found.meta['source']}); remove it")
    return found


def extract_split(
    reader,
    manifest_path,
    layers: Optional[Sequence[int]] = None,
    cache=None,
    embeddings: bool = False,
    memory_limit: int = IN_MEMORY_LIMIT,
) -> SplitFeatures:
    """Hidden states ``layers`` (default all) of every utterance of ``manifest_path``, one forward each, in
    memory or (``cache``) in a memory-mapped folder; with ``embeddings``, the reader's utterance embeddings
    from the same forwards (VGS models)."""
    manifest = read_manifest(manifest_path)
    layer_ids = list(range(reader.num_layers)) if layers is None else sorted(set(layers))
    if any(not 0 <= k < reader.num_layers for k in layer_ids):
        raise FeatureCacheError(f"{reader.source}: layers {layer_ids} requested, it has 0..{reader.num_layers - 1}")
    utts = [Path(e.path).stem for e in manifest.entries]
    frames = np.array([reader.num_frames(e.num_samples) for e in manifest.entries])
    offsets = np.concatenate([[0], np.cumsum(frames)]).astype(np.int64)
    total = int(offsets[-1])
    size = total * reader.dim * 4 * len(layer_ids)
    meta = _meta(reader, manifest_path, layer_ids, total)
    if embeddings and not hasattr(reader, "hidden_states_and_embedding"):
        raise FeatureCacheError(f"{reader.source}: model {reader.name!r} makes no utterance embeddings")
    if cache is None:
        if size > memory_limit:
            raise FeatureCacheError(
                f"{manifest_path}: {size / 2**30:.1f} GiB of features ({len(layer_ids)} layers x {total} frames x "
                f"{reader.dim}); give a cache folder (or fewer layers)"
            )
        store = [np.empty((total, reader.dim), np.float32) for _ in layer_ids]
        emb = _fill(reader, manifest, store, layer_ids, offsets, embeddings)
        return SplitFeatures(utts, offsets, store, layer_ids, reader.frame_rate, reader.hop, reader.window, emb)
    cache = Path(cache)
    found = _load_cache(cache, meta)
    if found is not None and (found.embeddings is not None or not embeddings):
        return found
    with atomic_directory(cache) as work:  # all or nothing, readable under the umask
        store = [
            np.lib.format.open_memmap(work / f"layer_{k}.npy", "w+", np.float32, (total, reader.dim)) for k in layer_ids
        ]
        emb = _fill(reader, manifest, store, layer_ids, offsets, embeddings)
        for x in store:
            x.flush()
        del store
        np.save(work / "offsets.npy", offsets)
        if emb is not None:
            np.save(work / "embeddings.npy", emb)
        (work / "utterances.txt").write_text("\n".join(utts) + "\n")
        (work / "meta.json").write_text(json.dumps(meta, indent=1))
    logger.info("features of %s: %d layers x %d frames cached in %s", manifest_path, len(layer_ids), total, cache)
    return _load_cache(cache, meta)


def _fill(reader, manifest, store, layer_ids, offsets, embeddings: bool) -> Optional[np.ndarray]:
    """Forward every utterance once into the per-layer arrays ``store``; the embeddings ``(N, E)`` or None."""
    emb: List[Optional[np.ndarray]] = [None] * len(manifest)
    for indices, wavs in iter_audio_batches(manifest, list(range(len(manifest))), 800_000):
        for i, wav in zip(indices, wavs):
            if embeddings:
                states, emb[i] = reader.hidden_states_and_embedding(wav)
            else:
                states = reader.hidden_states(wav)
            if len(states[0]) != offsets[i + 1] - offsets[i]:
                raise AssertionError(
                    f"{manifest.where(i)}: {len(states[0])} frames, expected {offsets[i + 1] - offsets[i]}"
                )
            for x, k in zip(store, layer_ids):
                x[offsets[i] : offsets[i + 1]] = states[k]
    return np.stack(emb) if embeddings else None


def cache_splits(source: str, manifests, out, splits: Sequence[str] = ("train", "valid", "test"), device="cpu") -> dict:
    """Every hidden state of ``source`` (a checkpoint, loaded once, or ``mfcc``) for each split
    ``{manifests}/{split}.tsv``, cached in ``{out}/{split}`` (what ``task.features`` of the SUPERB task reads)."""
    from .readers import open_reader

    reader = open_reader(source, device)
    result = {"source": str(reader.source), "layers": reader.num_layers, "splits": {}}
    for split in splits:
        feats = extract_split(reader, Path(manifests) / f"{split}.tsv", cache=Path(out) / split)
        result["splits"][split] = {"utterances": len(feats.utterances), "frames": int(feats.offsets[-1])}
    result["forwards"] = getattr(reader, "forwards", None)
    return result


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("upstream", help="fairseq / plugin checkpoint, or 'mfcc'")
    p.add_argument("--manifests", required=True, help="folder of the {split}.tsv manifests")
    p.add_argument("--out", required=True, help="the cache: one folder per split (an existing one is reused)")
    p.add_argument("--splits", nargs="+", default=["train", "valid", "test"])
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print(json.dumps(cache_splits(a.upstream, a.manifests, a.out, a.splits, a.device)))
