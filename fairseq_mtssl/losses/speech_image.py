"""Contrastive speech-image losses, with negatives gathered across data-parallel workers.

Inputs: embeddings ``speech (B, E)`` and ``image (B, E)`` of paired items (row ``i`` of each is a
caption and its image) and ``image_ids (B,)``. Every query (a caption, or an image) is scored against
every candidate of the other modality in the (global) batch; other captions of the same image are
neither positive nor negative (FaST-VGS masks them). Per pair ``i`` the loss is the sum of the two
directions, image -> caption and caption -> image, each a cross-entropy over the candidates; the mean
over pairs therefore equals FaST-VGS's ``I2C_loss + C2I_loss`` (two batch means, summed).

- ``similarity``: ``dot`` (FaST-VGS: the plain dot product of the two CLS projections, unbounded) or
  ``cosine`` (both L2-normalised first, every score in [-1, 1]);
- ``kind``: ``margin_infonce`` (FaST-VGS / the EUSIPCO paper: ``margin`` subtracted from the positive's
  score, no temperature) or ``infonce`` (scores divided by ``temperature``, no margin).

With ``torch.distributed`` initialised and more than one worker, candidates come from every worker
(``torch.distributed.nn.functional.all_gather`` carries gradients back to their owner), so the sum
of the workers' losses, and of their gradients, equals one process on the joined batch. A worker may
hold no pair at all (speech without images, uneven splits): it still takes part in every collective,
forward and backward, with a 0-row batch, and its loss is a zero that depends on the gathered
candidates (so the backward of ``all_gather`` runs on every worker).

Precision: half (or bfloat16) embeddings are cast to float32 before anything else (L2 norm, dot
products, logits, cross-entropy), as fairseq's wav2vec criterion casts its logits: dot products of
768-d embeddings easily exceed float16's 65504. The loss is float32 (float64 inputs stay float64).
"""

from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOSSES = ("margin_infonce", "infonce")
SIMILARITIES = ("dot", "cosine")


def rank_and_world_size() -> Tuple[int, int]:
    """``(this worker's rank, number of workers)``; ``(0, 1)`` outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_batches(*tensors: torch.Tensor) -> Tuple[Tuple[torch.Tensor, ...], int]:
    """Concatenate each tensor's first dimension over workers (with gradients for float tensors);
    workers may hold different batch sizes. Returns the gathered tensors and this worker's offset."""
    rank, world = rank_and_world_size()
    if world == 1:
        return tensors, 0
    from torch.distributed.nn.functional import all_gather

    n = torch.tensor([tensors[0].size(0)], device=tensors[0].device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    most = max(max(sizes), 1)  # never an empty collective, even when every worker holds 0 rows
    out = []
    for t in tensors:
        padded = F.pad(t, (0, 0) * (t.dim() - 1) + (0, most - t.size(0)))
        if t.is_floating_point():
            parts = all_gather(padded)
        else:
            parts = [torch.zeros_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded)
        out.append(torch.cat([p[:s] for p, s in zip(parts, sizes)]))
    return tuple(out), sum(sizes[:rank])


def speech_image_loss(
    speech: torch.Tensor,
    image: torch.Tensor,
    image_ids: torch.Tensor,
    kind: str = "margin_infonce",
    margin: float = 1.0,
    temperature: float = 0.07,
    gather: bool = True,
    similarity: str = "dot",
) -> torch.Tensor:
    """Summed loss over this worker's ``B`` pairs (``B`` may be 0), ``loss_s2i + loss_i2s`` per pair (see the
    module doc), in float32 at least."""
    if kind not in LOSSES:
        raise ValueError(f"unknown speech-image loss {kind!r} (one of {', '.join(LOSSES)})")
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown speech-image similarity {similarity!r} (one of {', '.join(SIMILARITIES)})")
    dtype = torch.promote_types(speech.dtype, torch.float32)  # float16 / bfloat16 -> float32; float64 kept
    speech, image = speech.to(dtype), image.to(dtype)
    if similarity == "cosine":
        speech, image = F.normalize(speech, dim=-1), F.normalize(image, dim=-1)
    b = speech.size(0)
    if gather:
        (all_speech, all_image, all_ids), offset = gather_batches(speech, image, image_ids)
    else:
        all_speech, all_image, all_ids, offset = speech, image, image_ids, 0
    if len(all_ids) == 0:  # no pair on any worker (every worker knows it): nothing to score
        return (speech.sum() + image.sum()) * 0.0
    positive = torch.arange(b, device=speech.device) + offset
    # other captions of the same image are neither positives nor negatives
    same_image = image_ids[:, None] == all_ids[None, :]
    excluded = same_image & (torch.arange(len(all_ids), device=speech.device)[None, :] != positive[:, None])

    def directional(queries, candidates):
        logits = queries @ candidates.T
        if kind == "margin_infonce":
            logits = logits - margin * F.one_hot(positive, len(all_ids)).to(logits.dtype)
        else:
            logits = logits / temperature
        logits = logits.masked_fill(excluded, float("-inf"))
        return F.cross_entropy(logits, positive, reduction="sum")

    loss = directional(speech, all_image) + directional(image, all_speech)
    if b == 0:  # keep the gathered candidates in the graph: their all_gather's backward is a collective too
        loss = loss + (all_speech.sum() + all_image.sum()) * 0.0
    return loss
