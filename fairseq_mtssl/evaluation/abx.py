"""ABX phoneme discrimination (ZeroSpeech 2021 / Libri-light), for every layer of a model.

    mtssl-abx-items --alignments corpus/alignments/test.phones.ctm --manifest manifests/test.tsv --out test.item
    mtssl-abx CHECKPOINT --manifest manifests/test.tsv --items test.item [--layers all] [--json abx.json]
    mtssl-abx --features DIR --frame-rate 50 --items test.item      # {utt}.npy (T, C) per utterance

Items are triphones: a phone with its previous and next phone (the context) and its speaker, one per
line of the ``.item`` file (``#file onset offset #phone prev-phone next-phone speaker``). A triplet
(A, B, X) has A and X of the same phone, B of another, all three in the same context; *within*
speaker all three come from one speaker, *across* speakers A and B from one and X from another. The
triplet is an error when ``d(A, X) >= d(B, X)`` (a tie counts half).

The convention is libri-light's ABX (``eval_ABX.py``, packaged as zerospeech-libriabx), read from its code:

- **Frames of an item** at frame rate ``r`` (frames per second) of an utterance of ``T`` frames: the
  half-open range ``[max(0, ceil(r * onset - 0.5)), min(T, floor(r * offset - 0.5)))``: the frames whose
  centre ``(t + 0.5) / r`` lies in ``[onset, offset - 1 / r]`` (a frame centred in the item's last
  ``1 / r`` seconds is *not* taken). An item with no frame there is **dropped** and counted in the result
  (``dropped_items``); libri-light drops it without a word.
- **Distance** ``d``: frame-wise angular distance ``arccos(cos) / pi`` (an all-zero frame is at distance
  1 from every other frame and 0 from another zero frame), summed along the cheapest DTW path (steps
  right, down, diagonal), divided by that path's number of cells; between equal predecessors the path
  prefers the diagonal, then the step along the second item. Float32, as libri-light.
- **Averaging**. *Within*: a cell (context, speaker, phone A, phone B) scores the mean over its triplets
  (X != A); cells are averaged over contexts per (speaker, A, B), then over speakers per (A, B), then
  over phone pairs. *Across*: a cell (context, A/B speaker, X speaker, A, B) scores the mean over its
  triplets; cells are pooled over context **and** X speaker per (A/B speaker, A, B), then averaged over
  A/B speakers per (A, B), then over phone pairs.
- **Every triplet** is scored: mtssl-abx gives libri-light's score with ``--max_size_group`` and
  ``--max_x_across`` above the largest group. At its defaults (10 and 5) libri-light samples at random
  up to 10 items per (context, speaker, phone) and 5 X speakers per (context, A/B speaker, A): a noisy
  estimate of the same score (a context with more than 5 X speakers then weighs less in "across").

Differences that remain: mtssl-abx computes the DTW of a pair once (libri-light once per orientation),
so a tie between the two single steps on the path can differ, and its float32 sums run in another
order; both change a score only where two distances are equal to about 1e-6.

``--item-frames fastabx`` takes fastabx's default instead: the same range with its last frame included
(``floor(r * offset - 0.5)`` inclusive, decimal arithmetic), which fastabx calls a fix of libri-light's
off-by-one; fastabx gives libri-light's numbers only with ``FASTABX_WITH_LIBRILIGHT_BUG=1``.
``--item-frames centre`` keeps the plugin's former rule (frames whose receptive-field centre
``t / r + window / 2`` lies in ``[onset, offset)``, at least the frame nearest the item's middle; no
item dropped), which follows a model's true frame timing rather than libri-light's. ``--context none``
drops the same-context condition, for corpora too small to hold enough triphone triplets (the embedded
corpus at test scale).
"""

import argparse
import itertools
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..atomic import atomic_write
from ..corpus.alignment import SILENCE, read_ctm
from ..errors import MtsslError, cli

logger = logging.getLogger(__name__)
ITEM_HEADER = "#file onset offset #phone prev-phone next-phone speaker"
ITEM_FRAME_RULES = ("libri-light", "fastabx", "centre")


class AbxInputError(MtsslError, ValueError):
    """Bad ABX input (item file, feature files): the message names the file (and line)."""


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
            raise AbxInputError(f"{phones_ctm}: utterance {utt} has no speaker")
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
                raise AbxInputError(
                    f"{path}:{lineno}: expected 'file onset offset phone prev next speaker', got {line.rstrip()!r}"
                )
            try:
                onset, offset = float(parts[1]), float(parts[2])
            except ValueError as err:
                raise AbxInputError(f"{path}:{lineno}: bad onset/offset in {line.rstrip()!r}") from err
            if offset <= onset:
                raise AbxInputError(f"{path}:{lineno}: offset {offset} is not after onset {onset}")
            items.append(AbxItem(parts[0], onset, offset, parts[3], parts[4], parts[5], parts[6]))
    if not items:
        raise AbxInputError(f"{path}: no ABX items")
    return items


# ----------------------------------------------------------------------------- item frames


def libri_light_span(onset: float, offset: float, frame_rate: float, n_frames: int) -> Optional[Tuple[int, int]]:
    """Libri-light's frames of an item: ``[max(0, ceil(r * onset - 0.5)), min(T, floor(r * offset - 0.5)))``
    (half-open), or None when that range is empty (libri-light drops the item)."""
    start = max(0, math.ceil(frame_rate * onset - 0.5))
    end = min(n_frames, math.floor(frame_rate * offset - 0.5))
    return (start, end) if start < end else None


def fastabx_span(onset: float, offset: float, frame_rate: float, n_frames: int) -> Optional[Tuple[int, int]]:
    """fastabx's default frames: ``ceil(r * onset - 0.5) .. floor(r * offset - 0.5)`` *inclusive*, in decimal
    arithmetic (fastabx calls libri-light's exclusive end a bug; ``FASTABX_WITH_LIBRILIGHT_BUG=1`` restores it).
    Cut at the utterance's end (fastabx refuses such an item); None when empty (fastabx refuses the file)."""
    r = Decimal(str(frame_rate))
    start = max(0, math.ceil(Decimal(str(onset)) * r - Decimal("0.5")))
    end = min(n_frames, math.floor(Decimal(str(offset)) * r - Decimal("0.5")) + 1)
    return (start, end) if start < end else None


def centre_span(onset: float, offset: float, frame_rate: float, n_frames: int, window_s: float = 0.025):
    """The former rule: frames whose receptive-field centre ``t / r + window / 2`` lies in ``[onset, offset)``;
    at least the one nearest the item's middle. Never empty. Half-open ``(start, end)``."""
    centres = np.arange(n_frames) / frame_rate + window_s / 2
    keep = np.nonzero((centres >= onset) & (centres < offset))[0]
    if len(keep) == 0:
        nearest = int(np.clip(np.argmin(np.abs(centres - (onset + offset) / 2)), 0, n_frames - 1))
        return nearest, nearest + 1
    return int(keep[0]), int(keep[-1]) + 1


def select_items(
    items: Sequence[AbxItem],
    utterance_feats: Dict[str, np.ndarray],
    frame_rate: float,
    rule: str = "libri-light",
    window_s: float = 0.025,
) -> Tuple[List[AbxItem], List[torch.Tensor], int]:
    """The items that keep at least one frame, their features ``(T_k, C)`` (float32), and how many were
    dropped. ``utterance_feats[utt]`` is ``(T, C)``; ``rule`` one of ``ITEM_FRAME_RULES``."""
    if rule not in ITEM_FRAME_RULES:
        raise ValueError(f"item frame rule must be one of {ITEM_FRAME_RULES}, got {rule!r}")
    missing = sorted({it.file for it in items} - set(utterance_feats))
    if missing:
        raise AbxInputError(f"items refer to utterances without features, e.g. {missing[:3]}")
    kept, feats = [], []
    for it in items:
        f = utterance_feats[it.file]
        if rule == "libri-light":
            span = libri_light_span(it.onset, it.offset, frame_rate, len(f))
        elif rule == "fastabx":
            span = fastabx_span(it.onset, it.offset, frame_rate, len(f))
        else:
            span = centre_span(it.onset, it.offset, frame_rate, len(f), window_s) if len(f) else None
        if span is None:
            continue
        kept.append(it)
        feats.append(torch.from_numpy(np.ascontiguousarray(f[span[0] : span[1]], dtype=np.float32)))
    return kept, feats, len(items) - len(kept)


# ----------------------------------------------------------------------------- distances


def angular_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``arccos(cos(a_i, b_j)) / pi`` for frames ``a (..., N, C)``, ``b (..., M, C)`` -> ``(..., N, M)``."""
    a = torch.nn.functional.normalize(a, dim=-1)
    b = torch.nn.functional.normalize(b, dim=-1)
    return torch.arccos((a @ b.transpose(-1, -2)).clamp(-1.0, 1.0)) / np.pi


def unit_frames(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Frames ``x (F, C)`` divided by their norm (float32), and which were all zero ``(F,)``."""
    x = x.float()
    sq = (x * x).sum(-1, keepdim=True)
    zero = sq[:, 0] == 0
    return x / torch.sqrt(sq).masked_fill(zero[:, None], 1.0), zero


def unit_angular_distances(a, b, zero_a, zero_b) -> torch.Tensor:
    """Angular distance of unit frames ``a (..., N, C)``, ``b (..., M, C)`` -> ``(..., N, M)``; a zero frame
    (``zero_a (..., N)``, ``zero_b (..., M)``) is at distance 1 from any other frame and 0 from a zero frame,
    as libri-light's ``normalize_with_singularity``."""
    cos = torch.matmul(a, b.transpose(-1, -2)).clamp_(-1.0, 1.0)
    if bool(zero_a.any()) or bool(zero_b.any()):
        za, zb = zero_a[..., :, None], zero_b[..., None, :]
        cos = torch.where(za & zb, 1.0, torch.where(za | zb, -1.0, cos))
    return torch.arccos_(cos).div_(math.pi)


def dtw_path_mean(dist: torch.Tensor, len_a: torch.Tensor, len_b: torch.Tensor) -> torch.Tensor:
    """Cost of the cheapest monotone path (steps right, down, diagonal) through each ``dist (P, N, M)``
    from ``(0, 0)`` to ``(len_a - 1, len_b - 1)``, divided by that path's number of cells: ``(P,)``.
    Between predecessors of equal cost the path takes the diagonal, then ``(i, j - 1)``, then ``(i - 1, j)``
    (libri-light's backtracking). Anti-diagonal recursion, vectorised over pairs and the cells of a
    diagonal; the sum runs in ``dist``'s dtype and the division in float64, as libri-light's Cython."""
    p, n, m = dist.shape
    w = m + 1
    cost = torch.full((p, (n + 1) * w), float("inf"), dtype=dist.dtype)
    steps = torch.zeros((p, (n + 1) * w), dtype=torch.int32)
    cost[:, 0] = 0.0
    flat = dist.reshape(p, n * m)
    for k in range(2, n + m + 1):
        i = torch.arange(max(1, k - m), min(n, k - 1) + 1)
        here = i * w + (k - i)
        c_diag, c_left, c_up = cost[:, here - w - 1], cost[:, here - 1], cost[:, here - w]
        take_diag = (c_diag <= c_left) & (c_diag <= c_up)
        take_left = ~take_diag & (c_left <= c_up)
        best = torch.where(take_diag, c_diag, torch.where(take_left, c_left, c_up))
        prev = torch.where(
            take_diag, steps[:, here - w - 1], torch.where(take_left, steps[:, here - 1], steps[:, here - w])
        )
        cost[:, here] = best + flat[:, (i - 1) * m + (k - i - 1)]
        steps[:, here] = prev + 1
    end = torch.arange(p), len_a * w + len_b
    return (cost[end].double() / steps[end].double()).to(dist.dtype)


def pair_distances(
    feats: Sequence[torch.Tensor],
    rows: np.ndarray,
    cols: np.ndarray,
    groups: Optional[np.ndarray] = None,
    chunk_cells: int = 1 << 21,
    block_values: int = 1 << 25,
) -> np.ndarray:
    """DTW-averaged angular distance ``d(feats[rows[k]], feats[cols[k]])`` for item features ``(T_i, C)``:
    ``(len(rows),)`` float32. ``groups (N,)``: a group id per item, both items of a pair in one group (the
    context); None: one group.

    Frame distances come from one matrix product per group (the group's frames against themselves, split
    by rows past ``block_values`` values), not from a gather of each pair's frames; the pairs of a batch of
    groups are then sorted by shape and their DTW batched (about ``chunk_cells`` cells a call)."""
    out = np.empty(len(rows), dtype=np.float32)
    if len(rows) == 0:
        return out
    n_items = len(feats)
    groups = np.zeros(n_items, dtype=np.int64) if groups is None else np.asarray(groups)
    if (groups[rows] != groups[cols]).any():
        raise ValueError("a pair joins two groups")
    perm = np.argsort(groups, kind="stable")  # items of a group contiguous, in their order
    lengths = np.array([len(f) for f in feats], dtype=np.int64)
    unit, zero = unit_frames(torch.cat([feats[i] for i in perm]))
    frame_start = np.empty(n_items, dtype=np.int64)  # where item i's frames start in `unit`
    frame_start[perm] = np.concatenate([[0], np.cumsum(lengths[perm])[:-1]])
    # blocks: (frames [r0, r1) of some items of a group) x (all frames [g0, g1) of the group)
    sorted_groups = groups[perm]
    edges = np.flatnonzero(np.diff(sorted_groups)) + 1
    block_of_item = np.empty(n_items, dtype=np.int64)
    blocks = []  # (r0, r1, g0, g1)
    for run in np.split(perm, edges):
        g0, g1 = int(frame_start[run[0]]), int(frame_start[run[-1]] + lengths[run[-1]])
        first = 0
        for k in range(len(run) + 1):
            if k == len(run) or (
                k > first
                and (frame_start[run[k]] + lengths[run[k]] - frame_start[run[first]]) * (g1 - g0) > block_values
            ):
                if k > first:
                    block_of_item[run[first:k]] = len(blocks)
                    blocks.append(
                        (int(frame_start[run[first]]), int(frame_start[run[k - 1]] + lengths[run[k - 1]]), g0, g1)
                    )
                first = k
    pair_block = block_of_item[rows]
    order = np.argsort(pair_block, kind="stable")
    bounds = np.searchsorted(pair_block[order], np.arange(len(blocks) + 1))
    b = 0
    while b < len(blocks):  # a batch of blocks, about block_values values in all
        stop, size = b, 0
        while stop < len(blocks) and (stop == b or size + _block_size(blocks[stop]) <= block_values):
            size += _block_size(blocks[stop])
            stop += 1
        base = np.cumsum([0] + [_block_size(blk) for blk in blocks[b:stop]])
        flat = torch.cat(
            [
                unit_angular_distances(unit[r0:r1], unit[g0:g1], zero[r0:r1], zero[g0:g1]).reshape(-1)
                for r0, r1, g0, g1 in blocks[b:stop]
            ]
        )
        part = order[bounds[b] : bounds[stop]]
        blk = pair_block[part]
        r0 = np.array([blocks[k][0] for k in range(b, stop)])[blk - b]
        g0 = np.array([blocks[k][2] for k in range(b, stop)])[blk - b]
        width = np.array([blocks[k][3] - blocks[k][2] for k in range(b, stop)])[blk - b]
        # element (s, t) of pair k: flat[base + (row frame s - r0) * width + (col frame t - g0)]
        row0 = base[blk - b] + (frame_start[rows[part]] - r0) * width
        col0 = frame_start[cols[part]] - g0
        _dtw_batches(flat, part, row0, width, col0, lengths[rows[part]], lengths[cols[part]], chunk_cells, out)
        b = stop
    return out


def _block_size(block) -> int:
    r0, r1, g0, g1 = block
    return (r1 - r0) * (g1 - g0)


def _dtw_batches(flat, part, row0, width, col0, la, lb, chunk_cells, out) -> None:
    """DTW of the pairs ``part``, sorted by shape and batched; frame distance ``(s, t)`` of a pair at
    ``flat[row0 + s * width + col0 + t]``. Writes ``out[part]``."""
    by_shape = np.lexsort((lb, la))
    sorted_la = la[by_shape]
    m_all = int(lb.max())
    start = 0
    while start < len(by_shape):  # a batch: one row length, about chunk_cells cells
        n = int(sorted_la[start])
        stop = min(start + max(1, chunk_cells // (n * m_all)), int(np.searchsorted(sorted_la, n, side="right")))
        sel = by_shape[start:stop]
        m = int(lb[sel].max())
        s = np.minimum(np.arange(n)[None, :], la[sel, None] - 1)  # padding repeats the last frame
        t = np.minimum(np.arange(m)[None, :], lb[sel, None] - 1)
        index = (row0[sel, None] + s * width[sel, None])[:, :, None] + (col0[sel, None] + t)[:, None, :]
        dist = flat[torch.from_numpy(index)]
        out[part[sel]] = dtw_path_mean(dist, torch.from_numpy(la[sel]), torch.from_numpy(lb[sel])).numpy()
        start += len(sel)


# ----------------------------------------------------------------------------- scoring


def _cells(items: Sequence[AbxItem], mode: str, context: str = "triphone"):
    """``{(context, speaker_ab, speaker_x, phone_a, phone_b): (A, B, X) index arrays}``; within
    speaker, X is drawn from A (and a triplet needs X != A)."""
    groups = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # context -> speaker -> phone -> items
    for k, it in enumerate(items):
        groups[(it.prev, it.next) if context == "triphone" else ()][it.speaker][it.phone].append(k)
    cells = {}
    for ctx, speakers in groups.items():
        speakers = {s: {ph: np.asarray(v) for ph, v in phones.items()} for s, phones in speakers.items()}
        for s_ab, phones in speakers.items():
            x_speakers = [s_ab] if mode == "within" else [s for s in speakers if s != s_ab]
            for s_x in x_speakers:
                for pa, pb in itertools.permutations(phones, 2):
                    xs = speakers[s_x].get(pa)
                    if xs is None or mode == "within" and len(xs) < 2:
                        continue
                    cells[(ctx, s_ab, s_x, pa, pb)] = (phones[pa], phones[pb], xs)
    return cells


def _stacked_cells(cells: Dict, budget: int = 1 << 22):
    """The cells' (A, B, X) index arrays stacked by shape: ``[(keys, A (K, |A|), B (K, |B|), X (K, |X|))]``,
    at most about ``budget`` triplets a stack."""
    by_shape = defaultdict(list)
    for key, (a, b, xs) in cells.items():
        by_shape[(len(a), len(b), len(xs))].append(key)
    stacks = []
    for (na, nb, nx), keys in by_shape.items():
        step = max(1, budget // (na * nb * nx))
        for s in range(0, len(keys), step):
            part = keys[s : s + step]
            stacks.append((part, *(np.stack([cells[k][v] for k in part]) for v in range(3))))
    return stacks


def _pair_codes(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """Unordered pair codes ``min * n + max``, broadcast."""
    return np.minimum(i, j) * n + np.maximum(i, j)


def abx_errors(
    items: Sequence[AbxItem],
    feats: Sequence[torch.Tensor],
    modes: Sequence[str] = ("within", "across"),
    context: str = "triphone",
) -> Dict[str, float]:
    """ABX error rates (0..1) ``{mode: error}`` of item features ``feats[k] (T_k, C)`` (each at least one
    frame) for ``items[k]``, libri-light's averaging (see the module docstring). ``context`` ``"triphone"``
    (the standard) compares phones in the same (prev, next) context; ``"none"`` drops the context condition.
    The modes share one computation of the frame distances."""
    for mode in modes:
        if mode not in ("within", "across"):
            raise ValueError(f"mode must be 'within' or 'across', got {mode!r}")
    if context not in ("triphone", "none"):
        raise ValueError(f"context must be 'triphone' or 'none', got {context!r}")
    if len(items) != len(feats):
        raise ValueError(f"{len(items)} items but {len(feats)} feature arrays")
    n = len(items)
    stacks = {}
    for mode in modes:
        cells = _cells(items, mode, context)
        if not cells:
            raise ValueError(f"no {mode}-speaker ABX triplets in these items")
        stacks[mode] = _stacked_cells(cells)
    codes = np.unique(
        np.concatenate(
            [
                _pair_codes(ab[:, :, None], xs[:, None, :], n).ravel()
                for mode in modes
                for _, a, b, xs in stacks[mode]
                for ab in (a, b)
            ]
        )
    )
    context_id = {}
    groups = np.array(
        [context_id.setdefault((it.prev, it.next) if context == "triphone" else (), len(context_id)) for it in items]
    )
    values = pair_distances(feats, codes // n, codes % n, groups)
    out = {}
    for mode in modes:
        # each cell's error over its triplets (within: X != A, libri-light's infinite d(A, A))
        by_speaker = defaultdict(list)
        for keys, a, b, xs in stacks[mode]:
            d_ax = values[np.searchsorted(codes, _pair_codes(a[:, :, None], xs[:, None, :], n))]  # (K, |A|, |X|)
            d_bx = values[np.searchsorted(codes, _pair_codes(b[:, :, None], xs[:, None, :], n))]  # (K, |B|, |X|)
            na, nb, nx = a.shape[1], b.shape[1], xs.shape[1]
            if mode == "within":  # X is A's group, in the same order
                d_ax[:, np.arange(na), np.arange(na)] = np.inf
            d_ax, d_bx = d_ax[:, :, None, :], d_bx[:, None, :, :]
            correct = (d_ax < d_bx).sum((1, 2, 3)) + 0.5 * (d_ax == d_bx).sum((1, 2, 3))
            errors = 1.0 - correct / (na * (na - 1) * nb if mode == "within" else na * nb * nx)
            for (ctx, s_ab, s_x, pa, pb), e in zip(keys, errors.tolist()):
                by_speaker[(s_ab, pa, pb)].append(e)
        # cells pooled per (A/B speaker, A, B): within over contexts, across over contexts and X speakers;
        # then means over speakers, then over phone pairs (libri-light's order)
        by_pair = defaultdict(list)
        for (s_ab, pa, pb), errs in by_speaker.items():
            by_pair[(pa, pb)].append(sum(errs) / len(errs))
        out[mode] = float(np.mean([sum(v) / len(v) for v in by_pair.values()]))
    return out


def abx_error(
    items: Sequence[AbxItem], feats: Sequence[torch.Tensor], mode: str = "within", context: str = "triphone"
) -> float:
    """ABX error rate (0..1) of one mode: :func:`abx_errors`."""
    return abx_errors(items, feats, (mode,), context)[mode]


def abx_scores(
    items: Sequence[AbxItem],
    utterance_feats: Dict[str, np.ndarray],
    frame_rate: float,
    context: str = "triphone",
    item_frames: str = "libri-light",
    modes: Sequence[str] = ("within", "across"),
) -> Dict:
    """``{"within": error, "across": error, "items": kept, "dropped_items": dropped}`` (errors 0..1) for
    utterance features ``(T, C)`` at ``frame_rate`` frames per second."""
    kept, feats, dropped = select_items(items, utterance_feats, frame_rate, item_frames)
    out = abx_errors(kept, feats, modes, context)
    return {**out, "items": len(kept), "dropped_items": dropped}


# ----------------------------------------------------------------------------- features


def layer_features(checkpoint: str, manifest_path, device: str = "cpu") -> Tuple[Dict[str, List[np.ndarray]], float]:
    """``{utt: [layer 0 (encoder input), layer 1, ..., layer L]}`` for every utterance, and the frame rate
    (:func:`~fairseq_mtssl.upstream.features.extract_split`); ``"mfcc"`` gives one MFCC layer."""
    from ..upstream.features import extract_split
    from ..upstream.readers import open_reader

    feats = extract_split(open_reader(checkpoint, device), manifest_path)
    return feats.by_utterance(), feats.frame_rate


def read_feature_dir(directory, utterances: Sequence[str]) -> Dict[str, List[np.ndarray]]:
    """``{utt: [DIR/utt.npy (T, C)]}`` for the given utterances (libri-light's ``--file_extension .npy``)."""
    feats = {}
    for utt in sorted(set(utterances)):
        path = Path(directory) / f"{utt}.npy"
        if not path.is_file():
            raise AbxInputError(f"{path}: no features for utterance {utt} of the item file")
        try:
            x = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise AbxInputError(f"{path}: not a plain .npy array ({err})") from err
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
            raise AbxInputError(f"{path}: expected a float (frames, dims) array, got {x.dtype} {x.shape}")
        feats[utt] = [x]
    return feats


def abx_per_layer(
    items: Sequence[AbxItem],
    feats: Dict[str, List[np.ndarray]],
    frame_rate: float,
    layers: Optional[Sequence[int]] = None,
    context: str = "triphone",
    item_frames: str = "libri-light",
) -> List[Dict]:
    """One row per layer: ``within`` and ``across`` in percent, ``items`` scored, ``dropped_items``."""
    n_layers = len(next(iter(feats.values())))
    rows = []
    for layer in layers if layers is not None else range(n_layers):
        s = abx_scores(items, {u: f[layer] for u, f in feats.items()}, frame_rate, context, item_frames)
        rows.append(
            {
                "layer": layer,
                "within": round(100 * s["within"], 2),
                "across": round(100 * s["across"], 2),
                "items": s["items"],
                "dropped_items": s["dropped_items"],
            }
        )
        logger.info(
            "ABX layer %d: within %.2f %%, across %.2f %% (%d items, %d dropped: no frame)",
            layer,
            rows[-1]["within"],
            rows[-1]["across"],
            s["items"],
            s["dropped_items"],
        )
    return rows


def best_layer(rows: Sequence[Dict]) -> Dict:
    """The row of :func:`abx_per_layer` that the reports call the best layer: the lowest within + across
    (one layer for both scores, so a table never mixes two layers)."""
    return min(rows, key=lambda r: r["within"] + r["across"])


def _speakers_for(manifest_path) -> Dict[str, str]:
    from ..data.manifest import read_manifest

    manifest = read_manifest(manifest_path)
    spk_path = Path(manifest_path).with_suffix(".spk")
    if not spk_path.is_file():
        raise AbxInputError(f"{spk_path}: speaker file (one speaker per manifest line) not found")
    speakers = spk_path.read_text().split("\n")[: len(manifest)]
    if len(speakers) != len(manifest) or any(not s for s in speakers):
        raise AbxInputError(f"{spk_path}: expected {len(manifest)} speakers, one per line of {manifest_path}")
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
    p.add_argument("checkpoint", nargs="?", help="fairseq / plugin checkpoint, or 'mfcc' (or give --features)")
    p.add_argument("--manifest", help="the utterances to encode (with a checkpoint or 'mfcc')")
    p.add_argument("--features", help="instead of a checkpoint: a folder of {utt}.npy (frames, dims) arrays")
    p.add_argument("--frame-rate", type=float, help="frames per second of --features (50 for HuBERT)")
    p.add_argument("--items", required=True)
    p.add_argument("--layers", default="all", help="'all' or comma-separated (0 = encoder input)")
    p.add_argument(
        "--context",
        choices=["triphone", "none"],
        default="triphone",
        help="'none' drops the same-context condition (small corpora)",
    )
    p.add_argument(
        "--item-frames",
        choices=ITEM_FRAME_RULES,
        default="libri-light",
        help="libri-light: frames ceil(r*onset-0.5) .. floor(r*offset-0.5) (exclusive), empty items dropped; "
        "fastabx: the same range with the end included (fastabx's default); "
        "centre: the former rule, receptive-field centres in [onset, offset), never empty",
    )
    p.add_argument("--json", help="write the per-layer table here too")
    a = p.parse_args(argv)
    if (a.checkpoint is None) == (a.features is None):
        p.error("give a checkpoint (or 'mfcc') with --manifest, or --features DIR with --frame-rate")
    if a.checkpoint is not None and a.manifest is None:
        p.error("a checkpoint needs --manifest")
    if a.features is not None and not a.frame_rate:
        p.error("--features needs --frame-rate (frames per second)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    items = read_items(a.items)  # an AbxInputError is one line from @cli, exit code 1
    if a.features is not None:
        feats, rate = read_feature_dir(a.features, [it.file for it in items]), a.frame_rate
    else:
        feats, rate = layer_features(a.checkpoint, a.manifest)
    layers = None if a.layers == "all" else [int(x) for x in a.layers.split(",")]
    rows = abx_per_layer(items, feats, rate, layers, a.context, a.item_frames)
    print("layer  within  across  items  dropped")
    for r in rows:
        print(f"{r['layer']:5d}  {r['within']:6.2f}  {r['across']:6.2f}  {r['items']:5d}  {r['dropped_items']:7d}")
    if a.json:
        with atomic_write(a.json) as f:
            json.dump(
                {
                    "checkpoint": a.checkpoint,
                    "features": a.features,
                    "items": a.items,
                    "context": a.context,
                    "item_frames": a.item_frames,
                    "layers": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
