"""ABX phoneme discrimination (ZeroSpeech 2021 / Libri-light style), for every layer of a model.

    mtssl-abx-items --alignments corpus/alignments/test.phones.ctm --manifest manifests/test.tsv --out test.item
    mtssl-abx CHECKPOINT --manifest manifests/test.tsv --items test.item [--layers all] [--json abx.json]

Items are triphones: a phone with its previous and next phone (the context) and its speaker, one per
line of the ``.item`` file (``#file onset offset #phone prev-phone next-phone speaker``). A triplet
(A, B, X) has A and X of the same phone, B of another, all three in the same context; *within*
speaker all three come from one speaker, *across* speakers A and B from one and X from another. The
triplet is an error when ``d(A, X) >= d(B, X)`` (a tie counts half). ``d`` is the frame-wise
angular distance (``arccos(cos) / pi``) averaged along the best DTW path. Errors are averaged over
all triplets of a cell (context, speaker(s), phone pair), then over contexts, then speakers, then
phone pairs, as Libri-light's ABX does. ``--context none`` drops the same-context condition, for
corpora too small to hold enough triphone triplets (the embedded corpus at test scale).
"""

import argparse
import itertools
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..atomic import atomic_write
from ..corpus.alignment import SILENCE, read_ctm
from ..errors import cli

logger = logging.getLogger(__name__)
ITEM_HEADER = "#file onset offset #phone prev-phone next-phone speaker"


@dataclass(frozen=True)
class AbxItem:
    file: str  # utterance id (the audio file's stem)
    onset: float  # seconds
    offset: float
    phone: str
    prev: str
    next: str
    speaker: str


# ----------------------------------------------------------------------------- item files


def make_items(phones_ctm, speakers: Dict[str, str]) -> List[AbxItem]:
    """Every non-silence phone with a phone (or pause) on both sides, from an alignment file."""
    items = []
    for utt, segs in read_ctm(phones_ctm).items():
        if utt not in speakers:
            raise KeyError(f"{phones_ctm}: utterance {utt} has no speaker")
        for prev, seg, nxt in zip(segs, segs[1:], segs[2:]):
            if seg.label != SILENCE:
                items.append(AbxItem(utt, seg.start, seg.end, seg.label, prev.label, nxt.label, speakers[utt]))
    return items


def write_items(items: Sequence[AbxItem], path) -> None:
    with atomic_write(path) as f:
        f.write(ITEM_HEADER + "\n")
        for it in items:
            f.write(f"{it.file} {it.onset:.4f} {it.offset:.4f} {it.phone} {it.prev} {it.next} {it.speaker}\n")


def read_items(path) -> List[AbxItem]:
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno == 1 and line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 7:
                raise ValueError(
                    f"{path}:{lineno}: expected 'file onset offset phone prev next speaker', got {line.rstrip()!r}"
                )
            try:
                onset, offset = float(parts[1]), float(parts[2])
            except ValueError as err:
                raise ValueError(f"{path}:{lineno}: bad onset/offset in {line.rstrip()!r}") from err
            if offset <= onset:
                raise ValueError(f"{path}:{lineno}: offset {offset} is not after onset {onset}")
            items.append(AbxItem(parts[0], onset, offset, parts[3], parts[4], parts[5], parts[6]))
    if not items:
        raise ValueError(f"{path}: no ABX items")
    return items


# ----------------------------------------------------------------------------- distances


def angular_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``arccos(cos(a_i, b_j)) / pi`` for frames ``a (..., N, C)``, ``b (..., M, C)`` -> ``(..., N, M)``."""
    a = torch.nn.functional.normalize(a, dim=-1)
    b = torch.nn.functional.normalize(b, dim=-1)
    return torch.arccos((a @ b.transpose(-1, -2)).clamp(-1.0, 1.0)) / np.pi


def dtw_path_mean(dist: torch.Tensor, len_a: torch.Tensor, len_b: torch.Tensor) -> torch.Tensor:
    """Cost of the cheapest monotone path (steps right, down, diagonal) through each ``dist (P, N, M)``
    from ``(0, 0)`` to ``(len_a - 1, len_b - 1)``, divided by that path's number of cells: ``(P,)``.
    Vectorised over pairs; loops over the (small) ``N x M`` cells."""
    p, n, m = dist.shape
    inf = torch.tensor(float("inf"), dtype=dist.dtype)
    cost = torch.full((p, n + 1, m + 1), float("inf"), dtype=dist.dtype)
    steps = torch.zeros((p, n + 1, m + 1), dtype=dist.dtype)
    cost[:, 0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            prev = torch.stack([cost[:, i - 1, j - 1], cost[:, i - 1, j], cost[:, i, j - 1]], 1)
            prev_steps = torch.stack([steps[:, i - 1, j - 1], steps[:, i - 1, j], steps[:, i, j - 1]], 1)
            best, arg = prev.min(1)
            cost[:, i, j] = torch.where(torch.isinf(best), inf, best + dist[:, i - 1, j - 1])
            steps[:, i, j] = prev_steps.gather(1, arg[:, None])[:, 0] + 1
    idx = torch.arange(p)
    return cost[idx, len_a, len_b] / steps[idx, len_a, len_b]


def pair_distances(feats: Sequence[torch.Tensor], pairs: Sequence[Tuple[int, int]], chunk: int = 4096) -> np.ndarray:
    """DTW-averaged angular distance for each ``(i, j)`` pair of item features ``(T_i, C)``."""
    out = np.empty(len(pairs))
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        la = torch.tensor([len(feats[i]) for i, _ in part])
        lb = torch.tensor([len(feats[j]) for _, j in part])
        a = torch.nn.utils.rnn.pad_sequence([feats[i] for i, _ in part], batch_first=True)
        b = torch.nn.utils.rnn.pad_sequence([feats[j] for _, j in part], batch_first=True)
        out[start : start + len(part)] = dtw_path_mean(angular_distances(a, b), la, lb).numpy()
    return out


# ----------------------------------------------------------------------------- scoring


def _cells(items: Sequence[AbxItem], mode: str, context: str = "triphone"):
    """``{(context, speaker_ab, speaker_x, phone_a, phone_b): (A, B, X) index lists}``."""
    groups = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # context -> speaker -> phone -> items
    for k, it in enumerate(items):
        groups[(it.prev, it.next) if context == "triphone" else ()][it.speaker][it.phone].append(k)
    cells = {}
    for ctx, speakers in groups.items():
        for s_ab, phones in speakers.items():
            x_speakers = [s_ab] if mode == "within" else [s for s in speakers if s != s_ab]
            for s_x in x_speakers:
                for pa, pb in itertools.permutations(phones, 2):
                    xs = speakers[s_x].get(pa, [])
                    if mode == "within" and len(xs) < 2 or not xs:
                        continue
                    cells[(ctx, s_ab, s_x, pa, pb)] = (phones[pa], phones[pb], xs)
    return cells


def abx_error(
    items: Sequence[AbxItem], feats: Sequence[torch.Tensor], mode: str = "within", context: str = "triphone"
) -> float:
    """ABX error rate (0..1) of item features ``feats[k] (T_k, C)`` for ``items[k]``. ``context``
    ``"triphone"`` (the standard) compares phones in the same (prev, next) context; ``"none"`` drops
    the context condition (for corpora too small to have enough triphone triplets)."""
    if mode not in ("within", "across"):
        raise ValueError(f"mode must be 'within' or 'across', got {mode!r}")
    if context not in ("triphone", "none"):
        raise ValueError(f"context must be 'triphone' or 'none', got {context!r}")
    cells = _cells(items, mode, context)
    if not cells:
        raise ValueError(f"no {mode}-speaker ABX triplets in these items")
    n = len(items)
    cells = {k: tuple(np.asarray(v) for v in abc) for k, abc in cells.items()}
    codes = np.unique(
        np.concatenate(
            [
                np.minimum(i, j).ravel() * n + np.maximum(i, j).ravel()
                for a, b, xs in cells.values()
                for i, j in (np.meshgrid(a, xs), np.meshgrid(b, xs))
            ]
        )
    )
    pairs = list(zip((codes // n).tolist(), (codes % n).tolist()))
    dist = np.full((n, n), np.nan)
    values = pair_distances(feats, pairs)
    dist[codes // n, codes % n] = values
    dist[codes % n, codes // n] = values
    # each cell's error over its (a, b, x) triplets (x != a), then means over contexts, speakers, phone pairs
    by_speaker = defaultdict(list)
    for (ctx, s_ab, s_x, pa, pb), (a, b, xs) in cells.items():
        d_ax, d_bx = dist[np.ix_(a, xs)][:, None, :], dist[np.ix_(b, xs)][None, :, :]
        score = (d_ax < d_bx) + 0.5 * (d_ax == d_bx)  # (|A|, |B|, |X|)
        valid = np.broadcast_to((a[:, None] != xs[None, :])[:, None, :], score.shape)
        by_speaker[(s_ab, s_x, pa, pb)].append(1.0 - float(score[valid].mean()))
    by_pair = defaultdict(list)
    for (s_ab, s_x, pa, pb), errs in by_speaker.items():
        by_pair[(pa, pb)].append(float(np.mean(errs)))
    return float(np.mean([np.mean(v) for v in by_pair.values()]))


def item_features(
    items: Sequence[AbxItem], utterance_feats: Dict[str, np.ndarray], frame_rate: float, window_s: float = 0.025
) -> List[torch.Tensor]:
    """Frames whose receptive-field centre (``t / rate + window / 2``) lies in ``[onset, offset)``;
    at least the one nearest the item's middle."""
    out = []
    for it in items:
        f = utterance_feats[it.file]
        centres = np.arange(len(f)) / frame_rate + window_s / 2
        keep = np.nonzero((centres >= it.onset) & (centres < it.offset))[0]
        if len(keep) == 0:
            keep = [int(np.clip(np.argmin(np.abs(centres - (it.onset + it.offset) / 2)), 0, len(f) - 1))]
        out.append(torch.from_numpy(np.ascontiguousarray(f[keep[0] : keep[-1] + 1], dtype=np.float32)))
    return out


# ----------------------------------------------------------------------------- models


def layer_features(checkpoint: str, manifest_path, device: str = "cpu") -> Tuple[Dict[str, List[np.ndarray]], float]:
    """``{utt: [layer 0 (encoder input), layer 1, ..., layer L]}`` for every utterance, and the frame rate.
    ``checkpoint`` ``"mfcc"`` gives a single-layer MFCC baseline."""
    from ..data.batches import iter_audio_batches
    from ..data.manifest import read_manifest
    from ..kmeans.features import make_reader

    manifest = read_manifest(manifest_path)
    if checkpoint == "mfcc":
        reader = make_reader("mfcc")
        feats = {}
        for indices, wavs in iter_audio_batches(manifest, list(range(len(manifest))), 1):
            for i, f in zip(indices, reader(wavs)):
                feats[Path(manifest.entries[i].path).stem] = [f]
        return feats, 100.0
    reader = make_reader("model", checkpoint, 1, device)
    feats = {}
    for indices, wavs in iter_audio_batches(manifest, list(range(len(manifest))), 800_000 if reader.batchable else 1):
        for i, layers in zip(indices, reader.all_layers(wavs)):
            feats[Path(manifest.entries[i].path).stem] = layers
    return feats, reader.frame_rate


def abx_per_layer(
    items: Sequence[AbxItem],
    feats: Dict[str, List[np.ndarray]],
    frame_rate: float,
    layers: Optional[Sequence[int]] = None,
    context: str = "triphone",
) -> List[Dict]:
    missing = sorted({it.file for it in items} - set(feats))
    if missing:
        raise KeyError(f"items refer to utterances without features, e.g. {missing[:3]}")
    n_layers = len(next(iter(feats.values())))
    rows = []
    for layer in layers if layers is not None else range(n_layers):
        per_item = item_features(items, {u: f[layer] for u, f in feats.items()}, frame_rate)
        rows.append(
            {
                "layer": layer,
                "within": round(100 * abx_error(items, per_item, "within", context), 2),
                "across": round(100 * abx_error(items, per_item, "across", context), 2),
            }
        )
        logger.info("ABX layer %d: within %.2f %%, across %.2f %%", layer, rows[-1]["within"], rows[-1]["across"])
    return rows


def _speakers_for(manifest_path) -> Dict[str, str]:
    from ..data.manifest import read_manifest

    manifest = read_manifest(manifest_path)
    spk_path = Path(manifest_path).with_suffix(".spk")
    if not spk_path.is_file():
        raise FileNotFoundError(f"{spk_path}: speaker file (one speaker per manifest line) not found")
    speakers = spk_path.read_text().split("\n")[: len(manifest)]
    if len(speakers) != len(manifest) or any(not s for s in speakers):
        raise ValueError(f"{spk_path}: expected {len(manifest)} speakers, one per line of {manifest_path}")
    return {Path(e.path).stem: s for e, s in zip(manifest.entries, speakers)}


@cli
def items_main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write an ABX .item file from a phone alignment and a manifest (+ .spk).")
    p.add_argument("--alignments", required=True, help="{split}.phones.ctm")
    p.add_argument("--manifest", required=True, help="{split}.tsv with {split}.spk beside it")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    items = make_items(a.alignments, _speakers_for(a.manifest))
    write_items(items, a.out)
    print(f"{a.out}: {len(items)} items")


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="fairseq / plugin checkpoint, or 'mfcc'")
    p.add_argument("--manifest", required=True)
    p.add_argument("--items", required=True)
    p.add_argument("--layers", default="all", help="'all' or comma-separated (0 = encoder input)")
    p.add_argument(
        "--context",
        choices=["triphone", "none"],
        default="triphone",
        help="'none' drops the same-context condition (small corpora)",
    )
    p.add_argument("--json", help="write the per-layer table here too")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    feats, rate = layer_features(a.checkpoint, a.manifest)
    layers = None if a.layers == "all" else [int(x) for x in a.layers.split(",")]
    rows = abx_per_layer(read_items(a.items), feats, rate, layers, a.context)
    print("layer  within  across")
    for r in rows:
        print(f"{r['layer']:5d}  {r['within']:6.2f}  {r['across']:6.2f}")
    if a.json:
        with atomic_write(a.json) as f:
            json.dump({"checkpoint": a.checkpoint, "items": a.items, "context": a.context, "layers": rows}, f, indent=1)


if __name__ == "__main__":
    main()
