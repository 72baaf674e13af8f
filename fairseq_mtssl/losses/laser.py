"""LASER's loss (Meghanani & Hain, Interspeech 2024): soft-DTW divergence plus a temporal regulariser.

Per pair of projected, L2-normalised frame sequences ``x (n, C)`` and ``y (m, C)``::

    L = D(x, y) + alpha * (I(x) + I(y))
    D(x, y) = sdtw(x, y) - (sdtw(x, x) + sdtw(y, y)) / 2      (squared Euclidean costs, NOT divided by length)
    I(x) = 1/n^2 sum_ij [ b_ij W_ij max(0, margin - d_ij) + (1 - b_ij) d_ij / W_ij ]
    d_ij = ||x_i - x_j||,  W_ij = (i - j)^2 + 1,  b_ij = [|i - j| > sigma]

``I`` is the inverse-difference-moment regulariser of LAV (Haresh et al., CVPR 2021) as the authors' code
computes it (``IDMContrastiveLoss``): frames far apart in time (``|i - j| > sigma``) are pushed at least
``margin`` apart, with a weight growing as the squared time gap; frames within ``sigma`` are pulled together.
``D`` is :func:`fairseq_mtssl.losses.soft_dtw.soft_dtw_divergence` with ``normalize=False`` (SCORE divides it
by ``n + m``; LASER's code does not).

Precision: the weights ``W_ij`` reach ``(n - 1)^2 + 1`` (1.4e6 for a 24 s utterance at 50 Hz), beyond half
precision's range, and ``d_ij`` of nearly equal frames loses every digit to cancellation when it comes from a
float32 Gram matrix. The regulariser therefore runs with autocast off, in float64 by default (``dtype=``;
never below float32), and returns float32 (float64 for float64 inputs). ``d_ii`` is exactly 0 and every
``d_ij = 0`` has gradient 0 (the subgradient that finite differences see).
"""

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .soft_dtw import soft_dtw_divergence


def _autocast_off(device: torch.device):
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _lengths(x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    if lengths is None:
        return torch.full((x.size(0),), x.size(1), dtype=torch.long, device=x.device)
    lengths = lengths.to(device=x.device, dtype=torch.long)
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > x.size(1)):
        raise ValueError(f"lengths {lengths.tolist()} for sequences of {x.size(1)} frames")
    return lengths


def idm_regulariser(
    x: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    sigma: int = 0,
    margin: float = 1.1,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``I(x)`` per item ``(B,)`` of frames ``x (B, N, C)``; item ``b`` uses ``x[b, :lengths[b]]``.

    Computed in ``dtype`` (float64 by default; float32 at the least, or the input's float64) with autocast
    off; the value is float32, or float64 for float64 inputs."""
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, frames, dim), got {tuple(x.shape)}")
    lengths = _lengths(x, lengths)
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    work = torch.promote_types(torch.promote_types(dtype, torch.float32), out_dtype)
    B, N, _ = x.shape
    with _autocast_off(x.device):
        xw = x.to(work)
        idx = torch.arange(N, device=x.device)
        valid = idx[None, :] < lengths[:, None]  # (B, N)
        xw = xw.masked_fill(~valid[:, :, None], 0.0)
        sq_norm = xw.pow(2).sum(-1)
        sq = sq_norm[:, :, None] + sq_norm[:, None, :] - 2.0 * (xw @ xw.transpose(1, 2))
        sq = sq.clamp(min=0.0).masked_fill(torch.eye(N, dtype=torch.bool, device=x.device), 0.0)
        positive = sq > 0
        d = torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
        gap = (idx[:, None] - idx[None, :]).to(work)
        w = gap.square() + 1.0
        far = gap.abs() > sigma
        term = torch.where(far, w * F.relu(margin - d), d / w)
        term = term.masked_fill(~(valid[:, :, None] & valid[:, None, :]), 0.0)
        n = lengths.to(work)
        return (term.sum((1, 2)) / n.square()).to(out_dtype)


def laser_divergence(
    x: torch.Tensor,
    y: torch.Tensor,
    len_x: Optional[torch.Tensor] = None,
    len_y: Optional[torch.Tensor] = None,
    gamma: float = 0.1,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``D(x, y)`` per item ``(B,)``: the soft-DTW divergence on squared Euclidean costs, not divided by length
    (in float32 at least, autocast off; see :mod:`.soft_dtw` for ``backend``)."""
    return soft_dtw_divergence(x, y, len_x, len_y, gamma, normalize=False, backend=backend)


def laser_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    len_x: Optional[torch.Tensor] = None,
    len_y: Optional[torch.Tensor] = None,
    gamma: float = 0.1,
    sigma: int = 0,
    margin: float = 1.1,
    alpha: float = 0.4,
    *,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, divergence, regulariser)`` per item ``(B,)``: ``loss = D(x, y) + alpha * (I(x) + I(y))``;
    ``regulariser`` is ``I(x) + I(y)`` (unweighted, the authors' logged ``loss2``)."""
    div = laser_divergence(x, y, len_x, len_y, gamma, backend=backend)
    reg = idm_regulariser(x, len_x, sigma, margin) + idm_regulariser(y, len_y, sigma, margin)
    reg = reg.to(div.dtype)
    return div + alpha * reg, div, reg
