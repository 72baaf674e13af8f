"""Read the audio of a manifest in order, in batches, with file reads overlapped by threads."""

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List, Sequence, Tuple

import numpy as np

from .audio import read_audio
from .manifest import Manifest


def shard_range(total: int, rank: int, nshard: int) -> Tuple[int, int]:
    """Contiguous ``[start, end)`` of shard ``rank`` out of ``nshard`` (fairseq's simple_kmeans convention)."""
    if not 0 <= rank < nshard:
        raise ValueError(f"rank {rank} is not in [0, {nshard})")
    return round(total / nshard * rank), round(total / nshard * (rank + 1))


def plan_batches(sizes: Sequence[int], max_batch_samples: int) -> List[List[int]]:
    """Group consecutive indices so that ``len(batch) * longest <= max_batch_samples`` (at least one each)."""
    batches, cur, longest = [], [], 0
    for i, n in enumerate(sizes):
        if cur and max(longest, n) * (len(cur) + 1) > max_batch_samples:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


def iter_audio_batches(
    manifest: Manifest, indices: Sequence[int], max_batch_samples: int, workers: int = 4
) -> Iterator[Tuple[List[int], List[np.ndarray]]]:
    """Yield ``(manifest indices, waveforms)`` in manifest order; checks each file against the manifest."""
    sizes = [manifest.entries[i].num_samples for i in indices]
    groups = [[indices[j] for j in b] for b in plan_batches(sizes, max_batch_samples)]

    def load(group):
        return group, [
            read_audio(manifest.audio_path(i), manifest.where(i), manifest.entries[i].num_samples) for i in group
        ]

    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending = []
        for group in groups:
            pending.append(pool.submit(load, group))
            if len(pending) > 2:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()
