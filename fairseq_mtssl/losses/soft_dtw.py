"""Batched soft-DTW (Cuturi & Blondel, 2017) with per-item lengths and an analytic backward.

``soft_dtw(D, len_x, len_y, gamma)`` takes pairwise costs ``D (B, N, M)`` and returns ``(B,)`` values
``R[b, len_x[b], len_y[b]]`` of the recursion

    R[i, j] = D[i, j] + softmin_gamma(R[i-1, j-1], R[i-1, j], R[i, j-1]),  R[0, 0] = 0, R[i, 0] = R[0, j] = inf
    softmin_gamma(a) = -gamma * log(sum(exp(-a / gamma)))

computed one anti-diagonal at a time (every cell of a diagonal, every item of the batch, at once).
The backward pass is the paper's expected-alignment recursion, also by anti-diagonals, so no graph
is built through the O(N M) loop; memory is O(B N M). Entries of ``D`` past an item's lengths are
ignored and receive zero gradient.

``soft_dtw_divergence(x, y, ...)`` is SCORE's loss: ``sdtw(x, y) - (sdtw(x, x) + sdtw(y, y)) / 2`` on
squared Euclidean frame costs, divided by ``len_x + len_y``.
"""

from typing import Optional

import torch
import torch.nn.functional as F


def _diagonal_cells(d: int, n: int, m: int, device):
    """Cells ``(i, j)``, 1-based, with ``i + j = d``, ``1 <= i <= n``, ``1 <= j <= m``."""
    i = torch.arange(max(1, d - m), min(n, d - 1) + 1, device=device)
    return i, d - i


def _forward_table(D: torch.Tensor, gamma: float) -> torch.Tensor:
    """``R (B, N+2, M+2)`` with the recursion filled for 1 <= i <= N, 1 <= j <= M."""
    B, N, M = D.shape
    R = D.new_full((B, N + 2, M + 2), float("inf"))
    R[:, 0, 0] = 0.0
    for d in range(2, N + M + 1):
        i, j = _diagonal_cells(d, N, M, D.device)
        prev = torch.stack([R[:, i - 1, j - 1], R[:, i - 1, j], R[:, i, j - 1]], dim=0)  # (3, B, cells)
        softmin = -gamma * torch.logsumexp(-prev / gamma, dim=0)
        R[:, i, j] = D[:, i - 1, j - 1] + softmin
    return R


def _backward_table(
    D: torch.Tensor, R: torch.Tensor, len_x: torch.Tensor, len_y: torch.Tensor, gamma: float
) -> torch.Tensor:
    """``E = d R[len_x, len_y] / d D`` for every item, ``(B, N, M)``."""
    B, N, M = D.shape
    b = torch.arange(B, device=D.device)
    rows = torch.arange(N + 2, device=D.device)[None, :, None]
    cols = torch.arange(M + 2, device=D.device)[None, None, :]
    valid = (rows >= 1) & (rows <= len_x[:, None, None]) & (cols >= 1) & (cols <= len_y[:, None, None])
    R = torch.where(valid, R, torch.full_like(R, -float("inf")))
    R[b, len_x + 1, len_y + 1] = R[b, len_x, len_y]
    Dx = D.new_zeros(B, N + 2, M + 2)
    Dx[:, 1 : N + 1, 1 : M + 1] = D
    Dx = torch.where(valid, Dx, torch.zeros_like(Dx))
    E = D.new_zeros(B, N + 2, M + 2)
    E[b, len_x + 1, len_y + 1] = 1.0
    for d in range(N + M, 1, -1):
        i, j = _diagonal_cells(d, N, M, D.device)
        r = R[:, i, j]
        a = torch.exp((R[:, i + 1, j] - r - Dx[:, i + 1, j]) / gamma)
        bb = torch.exp((R[:, i, j + 1] - r - Dx[:, i, j + 1]) / gamma)
        c = torch.exp((R[:, i + 1, j + 1] - r - Dx[:, i + 1, j + 1]) / gamma)
        e = E[:, i + 1, j] * a + E[:, i, j + 1] * bb + E[:, i + 1, j + 1] * c
        E[:, i, j] = torch.where(valid[:, i, j], e, E[:, i, j])  # keeps the seeds of shorter items
    E = torch.where(valid, E, torch.zeros_like(E))  # drop the seeds
    return E[:, 1 : N + 1, 1 : M + 1]


class SoftDTW(torch.autograd.Function):
    @staticmethod
    def forward(ctx, D, len_x, len_y, gamma):
        with torch.no_grad():
            R = _forward_table(D, gamma)
        ctx.save_for_backward(D, R, len_x, len_y)
        ctx.gamma = gamma
        return R[torch.arange(D.size(0), device=D.device), len_x, len_y]

    @staticmethod
    def backward(ctx, grad_out):
        D, R, len_x, len_y = ctx.saved_tensors
        with torch.no_grad():
            E = _backward_table(D, R, len_x, len_y, ctx.gamma)
        return grad_out[:, None, None] * E, None, None, None


def _lengths(x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    if lengths is None:
        return torch.full((x.size(0),), x.size(1), dtype=torch.long, device=x.device)
    return lengths.to(device=x.device, dtype=torch.long)


def soft_dtw(
    D: torch.Tensor, len_x: Optional[torch.Tensor] = None, len_y: Optional[torch.Tensor] = None, gamma: float = 0.1
) -> torch.Tensor:
    """Soft-DTW values ``(B,)`` of costs ``D (B, N, M)``; items use ``D[b, :len_x[b], :len_y[b]]``."""
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    len_x = _lengths(D, len_x)
    len_y = _lengths(D.transpose(1, 2), len_y)
    if int(len_x.min()) < 1 or int(len_y.min()) < 1:
        raise ValueError("every sequence needs at least one frame")
    return SoftDTW.apply(D, len_x, len_y, float(gamma))


def squared_euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise squared distances ``(B, N, M)`` of frames ``x (B, N, C)`` and ``y (B, M, C)``."""
    return (x.pow(2).sum(-1)[:, :, None] + y.pow(2).sum(-1)[:, None, :] - 2 * x @ y.transpose(1, 2)).clamp(min=0)


def soft_dtw_divergence(
    x: torch.Tensor,
    y: torch.Tensor,
    len_x: Optional[torch.Tensor] = None,
    len_y: Optional[torch.Tensor] = None,
    gamma: float = 0.1,
    normalize: bool = True,
) -> torch.Tensor:
    """SCORE's loss per item ``(B,)``: ``sdtw(x,y) - (sdtw(x,x) + sdtw(y,y)) / 2``, / ``(len_x + len_y)``.

    ``x (B, N, C)``, ``y (B, M, C)``. The three soft-DTWs run as one ``3B`` batch (both sides padded
    to ``max(N, M)`` frames; per-item lengths keep the padding out), so the anti-diagonal loop runs
    once rather than three times.
    """
    len_x, len_y = _lengths(x, len_x), _lengths(y, len_y)
    b, frames = x.size(0), max(x.size(1), y.size(1))
    x = F.pad(x, (0, 0, 0, frames - x.size(1)))
    y = F.pad(y, (0, 0, 0, frames - y.size(1)))
    left, right = torch.cat([x, x, y]), torch.cat([y, x, y])
    sdtw = soft_dtw(
        squared_euclidean(left, right), torch.cat([len_x, len_x, len_y]), torch.cat([len_y, len_x, len_y]), gamma
    )
    xy, xx, yy = sdtw[:b], sdtw[b : 2 * b], sdtw[2 * b :]
    div = xy - 0.5 * (xx + yy)
    return div / (len_x + len_y).to(div.dtype) if normalize else div
