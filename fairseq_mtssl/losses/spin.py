"""SPIN's loss (Chang, Liu & Glass, Interspeech 2023): Sinkhorn-Knopp soft targets and swapped prediction.

Frame ``n`` of view ``v`` has a unit-norm projection ``z`` and scores ``s[n, k] = <z, c_k>`` against the
K unit-norm rows of the codebook (cosine similarities). As in SwAV (Caron et al., 2020), each view's
soft targets come from its own scores by Sinkhorn-Knopp, without gradient, and each view predicts the
other's targets:

    q_v = sinkhorn(s_v, epsilon, iterations)                     (no gradient)
    p_v = softmax(s_v / temperature)
    loss = -1/2 [ mean_n sum_k q_1 log p_2 + mean_n sum_k q_2 log p_1 ]

:func:`sinkhorn` is SwAV's ``distributed_sinkhorn`` as the SPIN authors run it (``src/nn/swav_vq_dis.py``
of github.com/vectominist/spin): ``Q = exp(s / epsilon)^T`` (K x B) divided by its total, then per
iteration every prototype row divided by ``K`` x its sum (sums all-reduced across workers when
``torch.distributed`` is initialised) and every frame column by ``B`` x its sum; finally ``Q x B``, so
that each frame's targets sum to 1 (and, up to that last column normalisation, each prototype holds
``B / K`` of the mass). ``B`` is the *local* number of frames, as in the authors' code (SwAV's own code
multiplies it by the world size; with equal local batches the two coincide, since a factor common to
every entry cancels in the next normalisation).

It runs in float32 for any lower input precision (``exp(1 / 0.02)`` overflows half precision; float64
stays float64) and in the log domain: the same normalisations applied to ``log Q`` with logsumexp, which
equals the algorithm above in exact arithmetic and never overflows or divides zero by zero (in the
exponential form a prototype whose scores all lie ~2 below the batch's best underflows to an all-zero
row: 0 / 0 = NaN).
"""

import math
from typing import Dict, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float32 for half, bfloat16 and float32 input; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _global_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``log(sum(exp(x)))`` over ``dim`` and over all workers (each worker holds a slice along ``dim``),
    keepdim; on one worker plain ``logsumexp``. Two all-reduces (max, then sum of the shifted exps)."""
    if not _distributed():
        return torch.logsumexp(x, dim=dim, keepdim=True)
    if x.size(dim) > 0:
        m = x.amax(dim=dim, keepdim=True)
    else:  # this worker has no frames: it contributes exp(-inf) = 0
        shape = list(x.shape)
        shape[dim] = 1
        m = x.new_full(shape, -math.inf)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim=dim, keepdim=True)
    dist.all_reduce(s)
    return m + torch.log(s)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.02, iterations: int = 3) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp soft assignment of ``scores`` ``(B, K)``: ``(B, K)`` targets, each row summing to 1,
    in float32 (float64 for float64 scores); no gradient. See the module docstring for the algorithm."""
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn expects (frames, prototypes) scores, got shape {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"sinkhorn epsilon must be > 0, got {epsilon}")
    b, k = scores.shape
    log_q = _at_least_float32(scores.detach()).t() / epsilon  # (K, B): Q = exp(log_q)
    # Q /= Q.sum(): every worker's frames (global row sums, then over the K rows every worker shares)
    log_q = log_q - torch.logsumexp(_global_logsumexp(log_q, 1), dim=0, keepdim=True)
    for _ in range(iterations):
        log_q = log_q - _global_logsumexp(log_q, 1) - math.log(k)  # each prototype's row: 1 / K
        if b:
            log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(b)  # each frame's column: 1 / B
    return torch.exp(log_q + math.log(max(b, 1))).t()


def swapped_prediction_loss(
    scores_1: torch.Tensor, scores_2: torch.Tensor, targets_1: torch.Tensor, targets_2: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``-1/2 (mean_n sum_k q_1 log softmax(s_2 / T) + mean_n sum_k q_2 log softmax(s_1 / T))``, in float32 at least;
    the targets ``q`` are constants (no gradient flows into them). float64 input stays float64."""
    log_p1 = F.log_softmax(_at_least_float32(scores_1) / temperature, dim=-1)
    log_p2 = F.log_softmax(_at_least_float32(scores_2) / temperature, dim=-1)
    q1, q2 = (_at_least_float32(q.detach()).to(log_p1.dtype) for q in (targets_1, targets_2))
    return -0.5 * ((q1 * log_p2).sum(-1).mean() + (q2 * log_p1).sum(-1).mean())


def spin_loss(
    scores_1: torch.Tensor,
    scores_2: torch.Tensor,
    epsilon: float = 0.02,
    iterations: int = 3,
    temperature: float = 0.1,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """SPIN's loss of two views' codebook scores ``(N, K)`` (frame ``n`` of view 1 and of view 2 are the
    same moment of the utterance and its perturbed copy) and the authors' statistics: ``acc`` (how often a
    view's best code is the other view's best target), ``code_perplexity`` (of both views' best codes) and
    ``prob_perplexity`` (of the mean softmax), all without gradient."""
    if scores_1.shape != scores_2.shape:
        raise ValueError(f"the two views' scores differ in shape: {tuple(scores_1.shape)} vs {tuple(scores_2.shape)}")
    q1 = sinkhorn(scores_1, epsilon, iterations)
    q2 = sinkhorn(scores_2, epsilon, iterations)
    loss = swapped_prediction_loss(scores_1, scores_2, q1, q2, temperature)
    with torch.no_grad():
        logits = _at_least_float32(torch.cat([scores_1, scores_2]).detach()) / temperature
        hard = F.one_hot(logits.argmax(-1), logits.size(-1)).float().mean(0)
        soft = logits.softmax(-1).mean(0)
        acc_1 = (scores_1.argmax(-1) == q2.argmax(-1)).float().mean()
        acc_2 = (scores_2.argmax(-1) == q1.argmax(-1)).float().mean()
        stats = {
            "acc": float((acc_1 + acc_2) / 2),
            "code_perplexity": float(torch.exp(-(hard * torch.log(hard + 1e-7)).sum())),
            "prob_perplexity": float(torch.exp(-(soft * torch.log(soft + 1e-7)).sum())),
        }
    return loss, stats
