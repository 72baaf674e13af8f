"""BENCHMARK PEER ONLY (never imported by the plugin): the SCORE authors' soft-DTW loss path, re-implemented
from its algorithm so that ``bench_soft_dtw.py`` can time it side by side with the plugin.

What the authors run (github Trikaldarshi/SCORE_Finetuning, read at its newest snapshot):
``content_preserving_hubert/expert.py`` builds ``SoftDTW(use_cuda=False, gamma=0.1)`` from its copy of Mehran
Maghoumi's pytorch-softdtw-cuda (``content_preserving_hubert/soft_dtw_cuda.py``, CPU part after Kanru Hua's
pytorch-softdtw), and trains on ``normalize_sdtw(x, y) = sdtw(x, y) - (sdtw(x, x) + sdtw(y, y)) / 2``: three
separate calls, on L2-normalised projections, ``.mean() / (N + M)``, one pair per step (their comment: "tested
only for batch size 1"). The parts that set its cost, kept here as they are there:

- costs: the ``(B, N, M, C)`` difference tensor by broadcasting, squared and summed over ``C``, differentiated by
  autograd (no ``x @ y.T`` expansion);
- forward: a numba ``@jit(nopython=True, parallel=True)`` function, ``prange`` over the batch (one item here,
  so one thread), a column-major sweep (``j`` outer, ``i`` inner) over a float64 table ``(B, N+2, M+2)``
  started at ``inf``; the table comes back as a float32 torch tensor, which the backward pass reads;
- backward: the same numba structure: ``D`` and ``E`` padded into float64 ``(B, N+2, M+2)`` tables, ``R``'s last
  row and column set to ``-inf`` and its corner to ``R[N, M]``, a reverse column-major sweep turning ``inf``
  cells into ``-inf``, then Cuturi & Blondel's recursion; the gradient is ``grad_output * E``.

Their ``bandwidth`` (Sakoe-Chiba pruning) is off in SCORE (``None``) and is left out.
"""

import numpy as np
import torch
from numba import jit, prange


@jit(nopython=True, parallel=True)
def _peer_forward(D, gamma):
    B, N, M = D.shape
    R = np.full((B, N + 2, M + 2), np.inf)
    for b in prange(B):
        R[b, 0, 0] = 0.0
        for j in range(1, M + 1):
            for i in range(1, N + 1):
                a0 = -R[b, i - 1, j - 1] / gamma
                a1 = -R[b, i - 1, j] / gamma
                a2 = -R[b, i, j - 1] / gamma
                top = max(max(a0, a1), a2)
                total = np.exp(a0 - top) + np.exp(a1 - top) + np.exp(a2 - top)
                R[b, i, j] = D[b, i - 1, j - 1] - gamma * (np.log(total) + top)
    return R


@jit(nopython=True, parallel=True)
def _peer_backward(D_in, R, gamma):
    B, N, M = D_in.shape
    D = np.zeros((B, N + 2, M + 2))
    E = np.zeros((B, N + 2, M + 2))
    D[:, 1 : N + 1, 1 : M + 1] = D_in
    E[:, -1, -1] = 1.0
    R[:, :, -1] = -np.inf
    R[:, -1, :] = -np.inf
    R[:, -1, -1] = R[:, -2, -2]
    for b in prange(B):
        for j in range(M, 0, -1):
            for i in range(N, 0, -1):
                if np.isinf(R[b, i, j]):
                    R[b, i, j] = -np.inf
                wa = np.exp((R[b, i + 1, j] - R[b, i, j] - D[b, i + 1, j]) / gamma)
                wb = np.exp((R[b, i, j + 1] - R[b, i, j] - D[b, i, j + 1]) / gamma)
                wc = np.exp((R[b, i + 1, j + 1] - R[b, i, j] - D[b, i + 1, j + 1]) / gamma)
                E[b, i, j] = E[b, i + 1, j] * wa + E[b, i, j + 1] * wb + E[b, i + 1, j + 1] * wc
    return E[:, 1 : N + 1, 1 : M + 1]


class _PeerSoftDTW(torch.autograd.Function):
    @staticmethod
    def forward(ctx, D, gamma):
        R = torch.Tensor(_peer_forward(D.detach().cpu().numpy(), gamma)).to(D.dtype)  # float32, as theirs
        ctx.save_for_backward(D, R)
        ctx.gamma = gamma
        return R[:, -2, -2]

    @staticmethod
    def backward(ctx, grad_output):
        D, R = ctx.saved_tensors
        E = torch.Tensor(_peer_backward(D.detach().cpu().numpy(), R.detach().cpu().numpy(), ctx.gamma))
        return grad_output.view(-1, 1, 1).expand_as(E) * E.to(grad_output.dtype), None


def peer_sdtw(x: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """``(B,)`` soft-DTW of ``x (B, N, C)``, ``y (B, M, C)`` on broadcast squared differences."""
    n, m = x.size(1), y.size(1)
    diff = x.unsqueeze(2).expand(-1, n, m, x.size(2)) - y.unsqueeze(1).expand(-1, n, m, y.size(2))
    return _PeerSoftDTW.apply(diff.pow(2).sum(3), gamma)


def peer_normalize_sdtw(x: torch.Tensor, y: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """The authors' ``normalize_sdtw``: three calls."""
    return peer_sdtw(x, y, gamma) - 0.5 * (peer_sdtw(x, x, gamma) + peer_sdtw(y, y, gamma))


def peer_loss_step(xs, ys, gamma: float = 0.1) -> list:
    """Forward + backward of the loss one pair at a time (``xs``, ``ys``: leaf tensors ``(1, n, C)``), as the
    authors' training step; returns each pair's ``normalize_sdtw / (n + m)``."""
    out = []
    for x, y in zip(xs, ys):
        loss = peer_normalize_sdtw(x, y, gamma).mean() / (x.size(1) + y.size(1))
        loss.backward()
        out.append(float(loss.detach()))
    return out
