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

Backends (``backend=`` of either function, else the environment variable ``MTSSL_SOFT_DTW_BACKEND``,
else ``auto``):

- ``torch``: the anti-diagonal loop below, the reference; any device.
- ``numba``: compiled CPU kernels (:mod:`.soft_dtw_kernels`), parallel over the items of the batch.
- ``cuda``: numba CUDA kernels, one launch per pass for the whole batch (CUDA tensors; CPU tensors only under
  numba's CUDA simulator, for testing).
- ``auto``: ``cuda`` for CUDA tensors and ``numba`` for CPU tensors when numba imports (and, for CUDA, sees
  a GPU), else ``torch``, with one warning per process that says why and what it costs.

Both functions compute in float32 at least, with ``torch.autocast`` off inside (forward and backward): half or
bfloat16 inputs are cast to float32 and the values come back in float32 (or float64 for float64 inputs).

With a compiled backend the divergence also builds its three cost matrices per item at the item's own lengths
(no padding to the longest sequence) and differentiates them in closed form:
``d/dx_i sum_j E_ij |x_i - y_j|^2 = 2 (sum_j E_ij) x_i - 2 (E y)_i``.
"""

import contextlib
import functools
import logging
import os
from functools import lru_cache
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MtsslError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "numba", "cuda")
BACKEND_ENV = "MTSSL_SOFT_DTW_BACKEND"


class SoftDTWBackendError(MtsslError, ValueError):
    """A soft-DTW backend that does not exist or cannot run here."""


def _full_precision(device: torch.device):
    """A context with ``torch.autocast`` off for ``device``'s type (nothing where autocast does not exist): the
    recursion's exp, log and long sums, and the divergence's cost matrices, must not run in half precision."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _at_least_float32(*tensors: torch.Tensor):
    """The tensors in their promoted floating dtype, float32 at the least (half and bfloat16 become float32)."""
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    return tuple(t.to(dtype) for t in tensors)


def _without_autocast(backward):
    """Wraps an autograd ``backward(ctx, grad_out)`` so that it runs with autocast off: on the CPU the backward
    runs in the thread, and so under the autocast, of whoever called ``.backward()``."""

    @functools.wraps(backward)
    def wrapped(ctx, grad_out):
        with _full_precision(grad_out.device):
            return backward(ctx, grad_out)

    return wrapped


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
    @_without_autocast
    def backward(ctx, grad_out):
        D, R, len_x, len_y = ctx.saved_tensors
        with torch.no_grad():
            E = _backward_table(D, R, len_x, len_y, ctx.gamma)
        return grad_out[:, None, None] * E, None, None, None


@lru_cache(maxsize=None)
def _kernels():
    """The compiled kernels module, or None when numba does not import."""
    try:
        from . import soft_dtw_kernels
    except ImportError:
        return None
    return soft_dtw_kernels


@lru_cache(maxsize=None)
def _cuda_unavailable(device: torch.device) -> Optional[str]:
    """Why numba's CUDA kernels cannot run on ``device``, or None when they can: numba must import, see a GPU and
    compile and run the kernels there (it needs CUDA's NVVM). Checked once per device with a one-cell problem,
    so that ``auto`` falls back to the torch loop instead of failing."""
    k = _kernels()
    if k is None:
        return "numba does not import"
    try:
        if not k.cuda.is_available():
            return "numba sees no CUDA GPU"
        D = torch.ones(1, 1, 1, device=device, dtype=torch.float64)
        one = torch.ones(1, dtype=torch.int64)
        values, _ = _compiled_forward(D, one, one, 1.0, "cuda")
        if not bool(torch.isclose(values, torch.ones_like(values)).all()):
            return f"a one-cell test gave {values.tolist()} instead of [1.0]"
    except Exception as e:  # numba's CUDA driver or compiler missing or broken: the torch loop runs instead
        return f"{type(e).__name__}: {e}"
    return None


# The torch loop's cost against the compiled kernel: benchmarks/README.md, batch 8 x 300-600 frames, forward and
# backward of the divergence, 2 CPU threads: the numba kernel 0.287 s, the torch anti-diagonal loop 2.48 s (8.6x).
# Not measured on a GPU, where the loop's ~10 small kernel launches per diagonal weigh more (benchmarks/gpu_check.py
# prints the ratio there).
TORCH_LOOP_SLOWDOWN = 8.6
_FALLBACKS_LOGGED = set()  # kinds of kernel ("CUDA", "numba") whose fallback was logged by this process


def _log_fallback(kind: str, reason: str) -> None:
    """One warning per process and kind of kernel: ``auto`` runs the slow torch loop instead, and why."""
    if kind in _FALLBACKS_LOGGED:
        return
    _FALLBACKS_LOGGED.add(kind)
    logger.warning(
        f"soft-DTW: {kind} kernel unavailable ({reason}); using the torch anti-diagonal loop, "
        f"about {TORCH_LOOP_SLOWDOWN:.0f}x slower (benchmarks/README.md; set {BACKEND_ENV}=torch to silence this)"
    )


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend that runs for tensors on ``device``: ``torch``, ``numba`` or ``cuda``. When ``auto`` falls
    back to the torch loop because a compiled kernel cannot run, it logs why, once per process."""
    name = backend or os.environ.get(BACKEND_ENV) or "auto"
    if name not in BACKENDS:
        raise SoftDTWBackendError(
            f"soft-DTW backend {name!r} (from {BACKEND_ENV} or the config): choose one of {BACKENDS}"
        )
    if name == "auto":
        if device.type == "cpu":
            if _kernels() is None:
                _log_fallback("numba", "numba does not import")
                return "torch"
            return "numba"
        if device.type == "cuda":
            reason = _cuda_unavailable(device)
            if reason is not None:
                _log_fallback("CUDA", f"{reason}, on {device}")
                return "torch"
            return "cuda"
        return "torch"
    if name in ("numba", "cuda") and _kernels() is None:
        raise SoftDTWBackendError(f"soft-DTW backend {name!r} needs numba (pip install numba), which does not import")
    if name == "numba" and device.type != "cpu":
        raise SoftDTWBackendError(f"soft-DTW backend 'numba' runs on CPU tensors, got {device}")
    if name == "cuda" and not (device.type == "cuda" or (device.type == "cpu" and _kernels().simulator_enabled())):
        raise SoftDTWBackendError(f"soft-DTW backend 'cuda' needs CUDA tensors, got {device}")
    return name


def _as_kernel_array(t: torch.Tensor):
    """A tensor as the kernels take it: numpy on CPU, a CUDA array interface view on a GPU."""
    return _kernels().cuda.as_cuda_array(t) if t.is_cuda else t.numpy()


def _compiled_forward(D: torch.Tensor, len_x: torch.Tensor, len_y: torch.Tensor, gamma: float, backend: str):
    """``(values (B,), state)`` from the compiled kernels; ``D`` float32/64, contiguous; lengths int64 on CPU.

    ``state`` is what :func:`_compiled_backward` needs: the softmin weights ``(B, 3, N, M)`` (``numba``) or the
    table ``R (B, N+2, M+2)`` float64 (``cuda``)."""
    k = _kernels()
    B, N, M = D.shape
    if backend == "numba":
        lx, ly = len_x.numpy(), len_y.numpy()
        W = D.new_empty(B, 3, N, M)
        values = torch.empty(B, dtype=torch.float64)
        with _numba_threads(k):
            k.forward_cpu(D.numpy(), lx, ly, _largest_first(lx, ly), gamma, W.numpy(), values.numpy())
        return values.to(D.dtype), W
    R = torch.empty(B, N + 2, M + 2, dtype=torch.float64, device=D.device)
    lx, ly = len_x.to(D.device), len_y.to(D.device)
    args = (_as_kernel_array(D), _as_kernel_array(lx), _as_kernel_array(ly), gamma, _as_kernel_array(R))
    _launch_cuda(k, k.forward_cuda, args, len_x, len_y, D)
    return R[torch.arange(B, device=D.device), lx, ly].to(D.dtype), R


def _compiled_backward(D, state, len_x, len_y, gamma: float, backend: str, seeds: torch.Tensor) -> torch.Tensor:
    """``E = seeds[b] * d R[len_x, len_y] / d D`` ``(B, N, M)`` in the dtype of ``D``, zero past the lengths."""
    k = _kernels()
    E = torch.zeros_like(D)
    if backend == "numba":
        lx, ly = len_x.numpy(), len_y.numpy()
        seeds = seeds.detach().to(torch.float64).contiguous()
        with _numba_threads(k):
            k.backward_cpu(state.numpy(), lx, ly, _largest_first(lx, ly), seeds.numpy(), E.numpy())
        return E
    lx, ly = len_x.to(D.device), len_y.to(D.device)
    args = (
        _as_kernel_array(D), _as_kernel_array(state), _as_kernel_array(lx), _as_kernel_array(ly), gamma,
        _as_kernel_array(E),
    )  # fmt: skip
    _launch_cuda(k, k.backward_cuda, args, len_x, len_y, D)
    return E.mul_(seeds.to(E.dtype)[:, None, None])


def _launch_cuda(k, kernel, args, len_x: torch.Tensor, len_y: torch.Tensor, D: torch.Tensor) -> None:
    """Launch ``kernel`` on ``args``: one block per item (``len_x``, ``len_y`` (B,) int64 on CPU), as many threads
    as the longest diagonal needs and the compiled kernel allows on this GPU, on torch's stream for ``D``."""
    threads = k.cuda_block_size(len_x.numpy(), len_y.numpy(), k.kernel_thread_limit(kernel, args))
    kernel[len_x.size(0), threads, _cuda_stream(k, D)](*args)


class _numba_threads:
    """As many numba threads as torch uses (``torch.set_num_threads``), one item handed out at a time. The
    first parallel call starts numba's thread pool, which sets the OpenMP runtime's thread count to every
    core and so torch's too: torch's count is put back on the way out (a 1-thread training otherwise runs on
    every core from its first soft-DTW call on, 10x slower on a shared machine)."""

    def __init__(self, k):
        self.numba = k.numba

    def __enter__(self):
        self.torch_threads = torch.get_num_threads()
        self.numba.set_num_threads(max(1, min(self.torch_threads, self.numba.config.NUMBA_NUM_THREADS)))
        self.chunks = self.numba.parallel_chunksize(1)
        self.chunks.__enter__()

    def __exit__(self, *exc):
        self.chunks.__exit__(*exc)
        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)


def _cuda_stream(k, t: torch.Tensor):
    """torch's current stream for a CUDA tensor (so the kernels order with torch's work); 0 otherwise."""
    if t.is_cuda:
        return k.cuda.external_stream(torch.cuda.current_stream(t.device).cuda_stream)
    return 0


def _kernel_inputs(D: torch.Tensor, len_x: torch.Tensor, len_y: torch.Tensor):
    D = D.detach()
    if D.dtype not in (torch.float32, torch.float64):
        D = D.float()
    return D.contiguous(), len_x.detach().cpu().to(torch.int64).contiguous(), len_y.detach().cpu().to(torch.int64)


class CompiledSoftDTW(torch.autograd.Function):
    """:class:`SoftDTW` with the recursion and its backward in the compiled kernels (``numba`` or ``cuda``)."""

    @staticmethod
    def forward(ctx, D, len_x, len_y, gamma, backend):
        Dk, lx, ly = _kernel_inputs(D, len_x, len_y)
        values, state = _compiled_forward(Dk, lx, ly, gamma, backend)
        ctx.save_for_backward(Dk, state, lx, ly)
        ctx.gamma, ctx.backend, ctx.dtype = gamma, backend, D.dtype
        return values.to(D.dtype)

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_out):
        Dk, state, lx, ly = ctx.saved_tensors
        E = _compiled_backward(Dk, state, lx, ly, ctx.gamma, ctx.backend, grad_out)
        return E.to(ctx.dtype), None, None, None, None


def _lengths(x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    if lengths is None:
        return torch.full((x.size(0),), x.size(1), dtype=torch.long, device=x.device)
    return lengths.to(device=x.device, dtype=torch.long)


def _check_lengths(len_x: torch.Tensor, len_y: torch.Tensor, N: int, M: int) -> None:
    if int(len_x.min()) < 1 or int(len_y.min()) < 1:
        raise ValueError("every sequence needs at least one frame")
    if int(len_x.max()) > N or int(len_y.max()) > M:
        raise ValueError(f"lengths up to {int(len_x.max())} x {int(len_y.max())} for sequences of {N} x {M} frames")


def soft_dtw(
    D: torch.Tensor,
    len_x: Optional[torch.Tensor] = None,
    len_y: Optional[torch.Tensor] = None,
    gamma: float = 0.1,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Soft-DTW values ``(B,)`` of costs ``D (B, N, M)``; items use ``D[b, :len_x[b], :len_y[b]]``.

    Computed in float32 at least, with autocast off (half or bfloat16 costs are cast, the values are float32).
    ``backend``: see the module docstring (None: ``$MTSSL_SOFT_DTW_BACKEND``, else ``auto``).
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    len_x = _lengths(D, len_x)
    len_y = _lengths(D.transpose(1, 2), len_y)
    _check_lengths(len_x, len_y, D.size(1), D.size(2))
    name = resolve_backend(backend, D.device)
    (D,) = _at_least_float32(D)
    with _full_precision(D.device):
        if name == "torch":
            return SoftDTW.apply(D, len_x, len_y, float(gamma))
        return CompiledSoftDTW.apply(D, len_x, len_y, float(gamma), name)


def squared_euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise squared distances ``(B, N, M)`` of frames ``x (B, N, C)`` and ``y (B, M, C)``."""
    return (x.pow(2).sum(-1)[:, :, None] + y.pow(2).sum(-1)[:, None, :] - 2 * x @ y.transpose(1, 2)).clamp(min=0)


def _pair_costs(x: torch.Tensor, y: torch.Tensor, len_x: torch.Tensor, len_y: torch.Tensor) -> torch.Tensor:
    """Costs ``(3B, F, F)``, ``F = max(N, M)``: items ``x_b y_b``, then ``x_b x_b``, then ``y_b y_b``, each at
    its own lengths (entries past them are left unset: the kernels never read them)."""
    B = x.size(0)
    D = x.new_empty(3 * B, max(x.size(1), y.size(1)), max(x.size(1), y.size(1)))
    for b, (n, m) in enumerate(zip(len_x.tolist(), len_y.tolist())):
        xb, yb = x[b, :n], y[b, :m]
        nx, ny = xb.pow(2).sum(-1), yb.pow(2).sum(-1)
        for k, (p, q, np_, nq) in enumerate([(xb, yb, nx, ny), (xb, xb, nx, nx), (yb, yb, ny, ny)]):
            D[k * B + b, : p.size(0), : q.size(0)] = torch.addmm(np_[:, None] + nq[None, :], p, q.t(), alpha=-2).clamp_(
                min=0
            )
    return D


def _largest_first(*sizes: np.ndarray) -> np.ndarray:
    return np.argsort(-np.prod(np.stack(sizes), axis=0), kind="stable")


class CompiledSoftDTWDivergence(torch.autograd.Function):
    """``(3B,)`` soft-DTWs ``[sdtw(x_b, y_b)]_b ++ [sdtw(x_b, x_b)]_b ++ [sdtw(y_b, y_b)]_b`` of ``x (B, N, C)``
    and ``y (B, M, C)`` on squared Euclidean costs, with the compiled kernels; the backward pass goes from
    ``E`` to the frames in closed form (no graph through the cost matrices).

    ``numba``: one kernel builds each problem's costs and runs its recursion (items in parallel, largest
    first), one more runs the backward recursions and the frame gradients. ``cuda``: the costs by torch
    matmuls per item, the recursions by the CUDA kernels."""

    @staticmethod
    def forward(ctx, x, y, len_x, len_y, gamma, backend):
        x, y = x.detach().contiguous(), y.detach().contiguous()
        lx, ly = len_x.detach().cpu().to(torch.int64), len_y.detach().cpu().to(torch.int64)
        lens_l, lens_r = torch.cat([lx, lx, ly]), torch.cat([ly, lx, ly])
        if backend == "numba":
            k, frames = _kernels(), max(x.size(1), y.size(1))
            D = x.new_empty(3 * x.size(0), frames, frames)
            state = x.new_empty(3 * x.size(0), 3, frames, frames)
            values = torch.empty(3 * x.size(0), dtype=torch.float64)
            zero = x.numpy().dtype.type(0)
            with _numba_threads(k):
                k.divergence_forward_cpu(
                    x.numpy(), y.numpy(), lx.numpy(), ly.numpy(), _largest_first(lens_l.numpy(), lens_r.numpy()),
                    gamma, zero, D.numpy(), state.numpy(), values.numpy(),
                )  # fmt: skip
            values, D = values.to(x.dtype), None  # the backward pass needs the weights only
        else:
            D = _pair_costs(x, y, lx, ly)
            values, state = _compiled_forward(D, lens_l, lens_r, gamma, backend)
        ctx.save_for_backward(x, y, lx, ly, D, state)
        ctx.gamma, ctx.backend = gamma, backend
        return values

    @staticmethod
    @_without_autocast
    def backward(ctx, grad_out):
        x, y, lx, ly, D, state = ctx.saved_tensors
        B = x.size(0)
        lens_l, lens_r = torch.cat([lx, lx, ly]), torch.cat([ly, lx, ly])
        gx, gy = torch.zeros_like(x), torch.zeros_like(y)
        if ctx.backend == "numba":
            k = _kernels()
            E = x.new_zeros(state.shape[0], state.shape[2], state.shape[3])
            seeds = grad_out.detach().to(torch.float64).contiguous()
            zero = x.numpy().dtype.type(0)
            with _numba_threads(k):
                k.divergence_backward_cpu(
                    x.numpy(), y.numpy(), lx.numpy(), ly.numpy(), _largest_first(lens_l.numpy(), lens_r.numpy()),
                    _largest_first(lx.numpy(), ly.numpy()), seeds.numpy(), zero, state.numpy(), E.numpy(),
                    gx.numpy(), gy.numpy(),
                )  # fmt: skip
            return gx, gy, None, None, None, None
        E = _compiled_backward(D, state, lens_l, lens_r, ctx.gamma, ctx.backend, grad_out)
        for b, (n, m) in enumerate(zip(lx.tolist(), ly.tolist())):
            xb, yb = x[b, :n], y[b, :m]
            Gxy = E[b, :n, :m]
            Sxx = E[B + b, :n, :n]
            Sxx = Sxx + Sxx.t()
            Syy = E[2 * B + b, :m, :m]
            Syy = Syy + Syy.t()
            # d/dx_i sum_j G_ij |x_i - y_j|^2 = 2 (sum_j G_ij) x_i - 2 (G y)_i; a self-cost counts both sides
            gx[b, :n] = 2 * ((Gxy.sum(1) + Sxx.sum(1))[:, None] * xb - Gxy @ yb - Sxx @ xb)
            gy[b, :m] = 2 * ((Gxy.sum(0) + Syy.sum(1))[:, None] * yb - Gxy.t() @ xb - Syy @ yb)
        return gx, gy, None, None, None, None


def soft_dtw_divergence(
    x: torch.Tensor,
    y: torch.Tensor,
    len_x: Optional[torch.Tensor] = None,
    len_y: Optional[torch.Tensor] = None,
    gamma: float = 0.1,
    normalize: bool = True,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """SCORE's loss per item ``(B,)``: ``sdtw(x,y) - (sdtw(x,x) + sdtw(y,y)) / 2``, / ``(len_x + len_y)``.

    ``x (B, N, C)``, ``y (B, M, C)``. With the ``torch`` backend the three soft-DTWs run as one ``3B``
    batch (both sides padded to ``max(N, M)`` frames; per-item lengths keep the padding out), so the
    anti-diagonal loop runs once rather than three times. With a compiled backend see
    :class:`CompiledSoftDTWDivergence`. In float32 at least, autocast off (see the module docstring).
    ``backend``: see the module docstring.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    len_x, len_y = _lengths(x, len_x), _lengths(y, len_y)
    _check_lengths(len_x, len_y, x.size(1), y.size(1))
    name = resolve_backend(backend, x.device)
    x, y = _at_least_float32(x, y)
    with _full_precision(x.device):
        div = _divergence(x, y, len_x, len_y, float(gamma), name)
    return div / (len_x + len_y).to(div.dtype) if normalize else div


def _divergence(x: torch.Tensor, y: torch.Tensor, len_x: torch.Tensor, len_y: torch.Tensor, gamma: float, name: str):
    """Unnormalised divergences ``(B,)`` of ``x (B, N, C)``, ``y (B, M, C)`` (same dtype, float32/64) with backend
    ``name``."""
    b = x.size(0)
    if name != "torch":
        sdtw = CompiledSoftDTWDivergence.apply(x, y, len_x, len_y, gamma, name)
        return sdtw[:b] - 0.5 * (sdtw[b : 2 * b] + sdtw[2 * b :])
    frames = max(x.size(1), y.size(1))
    x = F.pad(x, (0, 0, 0, frames - x.size(1)))
    y = F.pad(y, (0, 0, 0, frames - y.size(1)))
    left, right = torch.cat([x, x, y]), torch.cat([y, x, y])
    sdtw = soft_dtw(
        squared_euclidean(left, right),
        torch.cat([len_x, len_x, len_y]),
        torch.cat([len_y, len_x, len_y]),
        gamma,
        backend="torch",
    )
    return sdtw[:b] - 0.5 * (sdtw[b : 2 * b] + sdtw[2 * b :])
