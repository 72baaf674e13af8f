"""A frozen upstream's hidden states, read from a feature cache instead of computed from audio at every step.

A SUPERB downstream trains on a frozen upstream in eval mode: its hidden states of an utterance are the same
at every epoch and for every learning rate of a sweep. :class:`CachedStatesDataset` wraps fairseq's audio
dataset of a split, keeps everything that decides batches (sizes in samples, order, filtering), and hands
the model, for each utterance, every layer's states from the cache that
:func:`fairseq_mtssl.upstream.features.extract_split` wrote (one forward per utterance, as s3prl
evaluates): ``net_input = {"states": (B, L, T, C), "padding_mask": (B, T) or None}``.
"""

import os
from typing import Dict, List, Sequence

import numpy as np
import torch
from fairseq.data import BaseWrapperDataset

from ..errors import MtsslError


class CachedStatesError(MtsslError, ValueError):
    """A feature cache that does not cover the audio dataset it should stand in for."""


class CachedStatesDataset(BaseWrapperDataset):
    """``audio``'s utterances as ``{"id", "states": (L, T, C) float32}`` from per-layer arrays.

    ``layers[k]`` is ``(frames of the split, C)`` (a memory map), utterance ``stems[i]`` its rows
    ``offsets[i]:offsets[i + 1]``; utterances are matched to ``audio`` by file stem, so an audio dataset
    that skipped some manifest lines (``min_sample_size``) still gets its own."""

    def __init__(self, audio, stems: Sequence[str], offsets: np.ndarray, layers: List[np.ndarray], where: str):
        super().__init__(audio)
        row = {s: i for i, s in enumerate(stems)}
        self.rows = []
        for i in range(len(audio)):
            stem = os.path.splitext(os.path.basename(self._fname(i)))[0]
            if stem not in row:
                raise CachedStatesError(f"{where}: no features of utterance {stem} (a cache of another manifest?)")
            self.rows.append(row[stem])
        self.offsets, self.layers = offsets, layers

    def _fname(self, i: int) -> str:
        fname = self.dataset.fnames[i]
        fname = fname.as_py() if hasattr(fname, "as_py") else fname  # a pyarrow scalar where pyarrow is installed
        return self.dataset.text_compressor.decompress(fname)

    def __getitem__(self, index: int) -> Dict:
        r = self.rows[index]
        start, end = self.offsets[r], self.offsets[r + 1]
        return {"id": index, "states": torch.from_numpy(np.stack([x[start:end] for x in self.layers]))}

    def collater(self, samples: List[Dict]) -> Dict:
        """``{"id": (B,), "net_input": {"states": (B, L, T, C) zero-padded, "padding_mask": (B, T) or None}}``."""
        if not samples:
            return {}
        lengths = torch.tensor([s["states"].size(1) for s in samples])
        first = samples[0]["states"]
        states = first.new_zeros(len(samples), first.size(0), int(lengths.max()), first.size(2))
        for i, s in enumerate(samples):
            states[i, :, : lengths[i]] = s["states"]
        mask = torch.arange(states.size(2))[None, :] >= lengths[:, None]
        return {
            "id": torch.tensor([s["id"] for s in samples]),
            "net_input": {"states": states, "padding_mask": mask if mask.any() else None},
        }
