"""Compiled soft-DTW recursions (numba): a parallel CPU kernel and a CUDA kernel, both with per-item lengths.

Same tables and conventions as the torch loop in :mod:`fairseq_mtssl.losses.soft_dtw` (which stays the
reference and the fallback). For item ``b`` with ``n = len_x[b]``, ``m = len_y[b]`` and 1-based cells:

    R[b, i, j] = D[b, i-1, j-1] + softmin_gamma(R[b, i-1, j-1], R[b, i-1, j], R[b, i, j-1])
    R[b, 0, 0] = 0,  R[b, i, 0] = R[b, 0, j] = inf

and the backward pass is Cuturi & Blondel's (2017, Algorithm 2) expected-alignment recursion

    E[i, j] = E[i+1, j] a + E[i, j+1] b + E[i+1, j+1] c,   E[n, m] = 1,
    a = exp((R[i+1, j] - R[i, j] - D[i+1, j]) / gamma)   (and b, c alike),

where a neighbour outside ``n x m`` contributes nothing. ``E[b] = d R[b, n, m] / d D[b]``; it is zero past
the item's lengths. ``R`` is kept in float64 whatever the dtype of ``D`` (its entries grow with the path
length, and the backward pass takes differences of them); ``E`` has the dtype of ``D``.

CPU (:func:`forward_cpu`, :func:`backward_cpu`): one item per task of a ``prange`` over the batch, each a
row-major sweep (contiguous memory, no barrier between cells), so a loaded machine slows it by no more than
the share of the cores it loses. The items are handed out largest first, one at a time.

CUDA (:func:`forward_cuda`, :func:`backward_cuda`): one block per item, its threads over the cells of an
anti-diagonal (a thread takes every ``blockDim``-th cell, so any length works), ``syncthreads`` between
diagonals: one launch for the whole recursion instead of one per diagonal. Tested without a GPU through
numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).

This module imports numba at import time; :mod:`..soft_dtw` imports it only when a numba backend is used.
"""

import logging
import math

import numba
import numpy as np
from numba import cuda, njit, prange

# fairseq's import sets the root logger to DEBUG; numba's compiler would then log every bytecode it reads
logging.getLogger("numba").setLevel(logging.WARNING)


@njit(parallel=True, cache=True, nogil=True)
def forward_cpu(D, len_x, len_y, order, gamma, R):
    """Fill ``R (B, N+2, M+2)`` float64 from ``D (B, N, M)``; ``order`` (B,) is the order items are taken."""
    inv = 1.0 / gamma
    for k in prange(order.shape[0]):
        b = order[k]
        n, m = len_x[b], len_y[b]
        R[b, 0, 0] = 0.0
        for j in range(1, m + 1):
            R[b, 0, j] = np.inf
        for i in range(1, n + 1):
            R[b, i, 0] = np.inf
            for j in range(1, m + 1):
                r0, r1, r2 = R[b, i - 1, j - 1], R[b, i - 1, j], R[b, i, j - 1]
                rmin = min(r0, min(r1, r2))
                s = math.exp((rmin - r0) * inv) + math.exp((rmin - r1) * inv) + math.exp((rmin - r2) * inv)
                R[b, i, j] = D[b, i - 1, j - 1] + rmin - gamma * math.log(s)


@njit(parallel=True, cache=True, nogil=True)
def backward_cpu(D, R, len_x, len_y, order, gamma, E):
    """Fill ``E (B, N, M)`` (zeros on entry) with ``d R[b, len_x[b], len_y[b]] / d D[b]``."""
    inv = 1.0 / gamma
    for k in prange(order.shape[0]):
        b = order[k]
        n, m = len_x[b], len_y[b]
        # last row: only the right neighbour (i, j+1) is inside
        E[b, n - 1, m - 1] = 1.0
        for j in range(m - 1, 0, -1):
            E[b, n - 1, j - 1] = E[b, n - 1, j] * math.exp((R[b, n, j + 1] - R[b, n, j] - D[b, n - 1, j]) * inv)
        for i in range(n - 1, 0, -1):
            # last column: only the lower neighbour (i+1, j)
            E[b, i - 1, m - 1] = E[b, i, m - 1] * math.exp((R[b, i + 1, m] - R[b, i, m] - D[b, i, m - 1]) * inv)
            for j in range(m - 1, 0, -1):
                r = R[b, i, j]
                a = math.exp((R[b, i + 1, j] - r - D[b, i, j - 1]) * inv)
                c = math.exp((R[b, i, j + 1] - r - D[b, i - 1, j]) * inv)
                d = math.exp((R[b, i + 1, j + 1] - r - D[b, i, j]) * inv)
                E[b, i - 1, j - 1] = E[b, i, j - 1] * a + E[b, i - 1, j] * c + E[b, i, j] * d


@cuda.jit
def forward_cuda(D, len_x, len_y, gamma, R):
    """Grid: one block per item (``B`` blocks); any block size (threads stride over a diagonal's cells)."""
    b = cuda.blockIdx.x
    t = cuda.threadIdx.x
    step = cuda.blockDim.x
    n, m = len_x[b], len_y[b]
    inv = 1.0 / gamma
    i = t
    while i <= n:
        R[b, i, 0] = math.inf
        i += step
    j = t
    while j <= m:
        R[b, 0, j] = math.inf
        j += step
    cuda.syncthreads()
    if t == 0:
        R[b, 0, 0] = 0.0
    cuda.syncthreads()
    for d in range(2, n + m + 1):
        i = max(1, d - m) + t
        last = min(n, d - 1)
        while i <= last:
            j = d - i
            r0, r1, r2 = R[b, i - 1, j - 1], R[b, i - 1, j], R[b, i, j - 1]
            rmin = min(r0, min(r1, r2))
            s = math.exp((rmin - r0) * inv) + math.exp((rmin - r1) * inv) + math.exp((rmin - r2) * inv)
            R[b, i, j] = D[b, i - 1, j - 1] + rmin - gamma * math.log(s)
            i += step
        cuda.syncthreads()


@cuda.jit
def backward_cuda(D, R, len_x, len_y, gamma, E):
    """Grid as :func:`forward_cuda`; ``E`` zeros on entry."""
    b = cuda.blockIdx.x
    t = cuda.threadIdx.x
    step = cuda.blockDim.x
    n, m = len_x[b], len_y[b]
    inv = 1.0 / gamma
    for d in range(n + m, 1, -1):
        i = max(1, d - m) + t
        last = min(n, d - 1)
        while i <= last:
            j = d - i
            if i == n and j == m:
                e = 1.0
            else:
                r = R[b, i, j]
                e = 0.0
                if i < n:
                    e += E[b, i, j - 1] * math.exp((R[b, i + 1, j] - r - D[b, i, j - 1]) * inv)
                if j < m:
                    e += E[b, i - 1, j] * math.exp((R[b, i, j + 1] - r - D[b, i - 1, j]) * inv)
                if i < n and j < m:
                    e += E[b, i, j] * math.exp((R[b, i + 1, j + 1] - r - D[b, i, j]) * inv)
            E[b, i - 1, j - 1] = e
            i += step
        cuda.syncthreads()


def cuda_block_size(len_x: np.ndarray, len_y: np.ndarray) -> int:
    """Threads per block: the longest diagonal (``min(n, m)``) rounded up to a warp, at most 1024."""
    longest = int(np.minimum(len_x, len_y).max())
    return int(min(1024, max(32, -(-longest // 32) * 32)))


def simulator_enabled() -> bool:
    return bool(numba.config.ENABLE_CUDASIM)
