"""Compiled soft-DTW recursions (numba): a parallel CPU kernel and a CUDA kernel, both with per-item lengths.

Same tables and conventions as the torch loop in :mod:`fairseq_mtssl.losses.soft_dtw` (which stays the
reference and the fallback). For item ``b`` with ``n = len_x[b]``, ``m = len_y[b]`` and 1-based cells:

    R[b, i, j] = D[b, i-1, j-1] + softmin_gamma(R[b, i-1, j-1], R[b, i-1, j], R[b, i, j-1])
    R[b, 0, 0] = 0,  R[b, i, 0] = R[b, 0, j] = inf

and the backward pass is Cuturi & Blondel's (2017, Algorithm 2) expected-alignment recursion

    E[i, j] = E[i+1, j] a + E[i, j+1] b + E[i+1, j+1] c,   E[n, m] = 1,
    a = exp((R[i+1, j] - R[i, j] - D[i+1, j]) / gamma)   (and b, c alike),

where a neighbour outside ``n x m`` contributes nothing. ``E[b] = d R[b, n, m] / d D[b]``; it is zero past
the item's lengths. ``R`` is computed in float64 whatever the dtype of ``D`` (its entries grow with the path
length); ``E`` has the dtype of ``D``.

CPU (:func:`forward_cpu`, :func:`backward_cpu`, and the divergence's :func:`divergence_forward_cpu`,
:func:`divergence_backward_cpu`, which also build the cost matrices and the frame gradients): one item per
task of a ``prange`` over the batch (no barrier between cells), so a loaded machine slows it by about the
share of the cores it loses; the items are handed out largest first, one at a time. The forward pass keeps
the three softmin weights of every cell (``a``, ``b``, ``c`` above, as computed by the forward pass), so the
backward pass is multiply-adds only.

CUDA (:func:`forward_cuda`, :func:`backward_cuda`): one block per item, its threads over the cells of an
anti-diagonal (a thread takes every ``blockDim``-th cell, so a diagonal longer than the block is swept in
several strides), ``syncthreads`` between diagonals: one launch for the whole recursion instead of one per
diagonal. The block size (:func:`cuda_block_size`) is the longest diagonal capped by what the compiled
kernel allows (:func:`kernel_thread_limit`): float64 with exp and log takes more than the 64 registers a thread
that a 1024-thread block may use on many GPUs, and such a launch fails with ``CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES``.
Tested without a GPU through numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).

This module imports numba at import time; :mod:`..soft_dtw` imports it only when a numba backend is used.
"""

import logging
import math

import numba
import numpy as np
from numba import cuda, njit, prange

# fairseq's import sets the root logger to DEBUG; numba's compiler would then log every bytecode it reads
logging.getLogger("numba").setLevel(logging.WARNING)


@njit(inline="always")
def _softmin3(r0, r1, r2, gamma, inv):
    """``(softmin_gamma(r0, r1, r2), w0, w1, w2)``, ``w_k = d softmin / d r_k`` (they sum to 1). Sorted first,
    so that the smallest term is ``exp(0) = 1``: two exponentials and one log per cell."""
    lo, hi = min(r0, r1), max(r0, r1)
    a, b, c = min(lo, r2), max(lo, min(hi, r2)), max(hi, r2)  # a <= b <= c
    eb, ec = math.exp((a - b) * inv), math.exp((a - c) * inv)
    scale = 1.0 / (1.0 + eb + ec)
    w0 = (1.0 if r0 == a else (eb if r0 == b else ec)) * scale
    w1 = (1.0 if r1 == a else (eb if r1 == b else ec)) * scale
    w2 = (1.0 if r2 == a else (eb if r2 == b else ec)) * scale
    return a - gamma * math.log1p(eb + ec), w0, w1, w2


@njit(cache=True, nogil=True)
def _forward_one(D, n, m, gamma, W):
    """One item: returns ``R[n, m]`` for ``D (>=n, >=m)`` and fills ``W (3, >=n, >=m)`` with each cell's weights
    on its predecessors (diagonal, up, left), i.e. ``d R[i, j] / d R[pred]``, which the backward pass needs.

    Rows go in strips of four, swept skewed (cell ``(i + r, t - r)`` at step ``t``), so that four independent
    cells are in flight at once instead of one chain; only five rows of ``R`` are kept."""
    inv = 1.0 / gamma
    R = np.empty((5, m + 1))  # row 0: the row above the strip
    R[0, 0] = 0.0
    for j in range(1, m + 1):
        R[0, j] = np.inf
    done = 0
    while done < n:
        h = min(4, n - done)
        for r in range(1, h + 1):
            R[r, 0] = np.inf
        for t in range(1, m + h):
            for r in range(1, h + 1):
                j = t - r + 1
                if j >= 1 and j <= m:
                    soft, w0, w1, w2 = _softmin3(R[r - 1, j - 1], R[r - 1, j], R[r, j - 1], gamma, inv)
                    i = done + r - 1
                    R[r, j] = D[i, j - 1] + soft
                    W[0, i, j - 1] = w0
                    W[1, i, j - 1] = w1
                    W[2, i, j - 1] = w2
        for j in range(m + 1):
            R[0, j] = R[h, j]
        done += h
    return R[0, m]


@njit(cache=True, nogil=True)
def _backward_one(W, n, m, seed, E):
    """One item: ``E (>=n, >=m)`` = ``seed * d R[n, m] / d D``, Cuturi & Blondel's recursion with the weights
    that the forward pass kept (theirs, ``exp((R[q] - R[p] - D[q]) / gamma)``, is the same number)."""
    E[n - 1, m - 1] = seed
    for j in range(m - 2, -1, -1):  # last row: only the right neighbour is inside
        E[n - 1, j] = E[n - 1, j + 1] * W[2, n - 1, j + 1]
    for i in range(n - 2, -1, -1):
        E[i, m - 1] = E[i + 1, m - 1] * W[1, i + 1, m - 1]  # last column: only the lower neighbour
        for j in range(m - 2, -1, -1):
            E[i, j] = E[i + 1, j] * W[1, i + 1, j] + E[i, j + 1] * W[2, i, j + 1] + E[i + 1, j + 1] * W[0, i + 1, j + 1]


@njit(parallel=True, cache=True, nogil=True)
def forward_cpu(D, len_x, len_y, order, gamma, W, values):
    """``values (B,)`` float64 and weights ``W (B, 3, N, M)`` from ``D (B, N, M)``; ``order`` (B,): the order
    items are taken (largest first)."""
    for k in prange(order.shape[0]):
        b = order[k]
        values[b] = _forward_one(D[b], len_x[b], len_y[b], gamma, W[b])


@njit(parallel=True, cache=True, nogil=True)
def backward_cpu(W, len_x, len_y, order, seeds, E):
    """Fill ``E (B, N, M)`` (zeros on entry) with ``seeds[b] * d R[b, len_x[b], len_y[b]] / d D[b]``."""
    for k in prange(order.shape[0]):
        b = order[k]
        _backward_one(W[b], len_x[b], len_y[b], seeds[b], E[b])


# Products for the divergence's cost matrices. Reassociation lets LLVM vectorise the sums over the feature
# axis; these functions never see inf or nan from the recursion (only frames and E), so the other
# fast-math flags are left off. Four rows at a time share each load of the other operand's row.
_FASTMATH = {"reassoc", "contract"}


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _sq_norms(a, n, zero):
    out = np.empty(n, dtype=a.dtype)
    for i in range(n):
        s = zero
        for c in range(a.shape[1]):
            s += a[i, c] * a[i, c]
        out[i] = s
    return out


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _pair_costs_one(a, b, n, m, zero, D):
    """``D[i, j] = max(|a_i|^2 + |b_j|^2 - 2 a_i . b_j, 0)`` for ``i < n``, ``j < m``; ``a (>=n, C)``, ``b (>=m, C)``."""
    C = a.shape[1]
    na, nb = _sq_norms(a, n, zero), _sq_norms(b, m, zero)
    i = 0
    while i + 4 <= n:
        a0, a1, a2, a3 = a[i], a[i + 1], a[i + 2], a[i + 3]
        for j in range(m):
            bj = b[j]
            s0, s1, s2, s3 = zero, zero, zero, zero
            for c in range(C):
                v = bj[c]
                s0 += a0[c] * v
                s1 += a1[c] * v
                s2 += a2[c] * v
                s3 += a3[c] * v
            D[i, j] = max(na[i] + nb[j] - 2 * s0, zero)
            D[i + 1, j] = max(na[i + 1] + nb[j] - 2 * s1, zero)
            D[i + 2, j] = max(na[i + 2] + nb[j] - 2 * s2, zero)
            D[i + 3, j] = max(na[i + 3] + nb[j] - 2 * s3, zero)
        i += 4
    while i < n:
        ai = a[i]
        for j in range(m):
            bj = b[j]
            s = zero
            for c in range(C):
                s += ai[c] * bj[c]
            D[i, j] = max(na[i] + nb[j] - 2 * s, zero)
        i += 1


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _acc_product(A, n, m, V, scale, out):
    """``out[i] += scale * sum_{j < m} A[i, j] V[j]`` for ``i < n``; ``A (>=n, >=m)``, ``V (>=m, C)``."""
    C = V.shape[1]
    i = 0
    while i + 4 <= n:
        o0, o1, o2, o3 = out[i], out[i + 1], out[i + 2], out[i + 3]
        for j in range(m):
            g0, g1, g2, g3 = A[i, j] * scale, A[i + 1, j] * scale, A[i + 2, j] * scale, A[i + 3, j] * scale
            vj = V[j]
            for c in range(C):
                v = vj[c]
                o0[c] += g0 * v
                o1[c] += g1 * v
                o2[c] += g2 * v
                o3[c] += g3 * v
        i += 4
    while i < n:
        oi = out[i]
        for j in range(m):
            g = A[i, j] * scale
            vj = V[j]
            for c in range(C):
                oi[c] += g * vj[c]
        i += 1


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _frame_grad(G, n, m, V, W, S, zero, out):
    """``out[i] = 2 (sum_j G[i, j] + sum_k S[i, k]) V[i] - 2 (G W)[i] - 2 (S V)[i]`` for ``i < n``: the gradient of
    ``sum G_ij |v_i - w_j|^2 + sum S_ik |v_i - v_k|^2 / 2`` (``S`` symmetric) with respect to ``v_i``."""
    one = np.ones(1, dtype=V.dtype)[0]  # a literal 2 would make the products float64
    two = one + one
    _acc_product(G, n, m, W, -two, out)
    _acc_product(S, n, n, V, -two, out)
    for i in range(n):
        r = zero
        for j in range(m):
            r += G[i, j]
        for k in range(n):
            r += S[i, k]
        r *= two
        for c in range(V.shape[1]):
            out[i, c] += r * V[i, c]


@njit(parallel=True, cache=True, nogil=True)
def divergence_forward_cpu(x, y, len_x, len_y, order, gamma, zero, D, W, values):
    """The divergence's ``3B`` soft-DTWs of ``x (B, N, C)``, ``y (B, M, C)``: problem ``p`` is ``x_b y_b``
    (``p = b``), ``x_b x_b`` (``p = B + b``) or ``y_b y_b`` (``p = 2B + b``). Fills their costs ``D (3B, F, F)``
    (a workspace), weights ``W (3B, 3, F, F)`` and ``values (3B,)`` float64; ``order`` (3B,): problems, largest
    first."""
    B = x.shape[0]
    for k in prange(order.shape[0]):
        p = order[k]
        b, kind = p % B, p // B
        n = len_y[b] if kind == 2 else len_x[b]
        m = len_x[b] if kind == 1 else len_y[b]
        left = y[b] if kind == 2 else x[b]
        right = x[b] if kind == 1 else y[b]
        _pair_costs_one(left, right, n, m, zero, D[p])
        values[p] = _forward_one(D[p], n, m, gamma, W[p])


@njit(parallel=True, cache=True, nogil=True)
def divergence_backward_cpu(x, y, len_x, len_y, order, order_items, seeds, zero, W, E, gx, gy):
    """Gradients ``gx (B, N, C)``, ``gy (B, M, C)`` (zeros on entry) of ``sum_p seeds[p] * values[p]``; ``E``:
    a ``(3B, F, F)`` workspace (zeros on entry); ``order_items`` (B,): items, largest first."""
    B = x.shape[0]
    for k in prange(order.shape[0]):
        p = order[k]
        b, kind = p % B, p // B
        n = len_y[b] if kind == 2 else len_x[b]
        m = len_x[b] if kind == 1 else len_y[b]
        _backward_one(W[p], n, m, seeds[p], E[p])
    for k in prange(order_items.shape[0]):
        b = order_items[k]
        n, m = len_x[b], len_y[b]
        exy, exx, eyy = E[b], E[B + b], E[2 * B + b]
        sxx = np.empty((n, n), dtype=E.dtype)  # a self-cost |v_i - v_k|^2 counts for v_i on both sides
        for i in range(n):
            for j in range(n):
                sxx[i, j] = exx[i, j] + exx[j, i]
        syy = np.empty((m, m), dtype=E.dtype)
        for i in range(m):
            for j in range(m):
                syy[i, j] = eyy[i, j] + eyy[j, i]
        gt = np.empty((m, n), dtype=E.dtype)
        for i in range(n):
            for j in range(m):
                gt[j, i] = exy[i, j]
        _frame_grad(exy, n, m, x[b], y[b], sxx, zero, gx[b])
        _frame_grad(gt, m, n, y[b], x[b], syy, zero, gy[b])


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


WARP = 32
MAX_BLOCK = 1024  # CUDA's limit on threads per block, whatever the kernel


def kernel_thread_limit(kernel, args) -> int:
    """Most threads a block of ``kernel`` (a ``cuda.jit`` dispatcher) may have when launched with ``args`` on
    numba's current device: the limit of the code compiled for these argument types (``cuFuncGetAttribute``'s
    ``MAX_THREADS_PER_BLOCK``, which counts the registers a thread uses), compiling it now if need be (the
    launch then reuses it). ``MAX_BLOCK`` under the simulator, which has no registers."""
    if simulator_enabled():
        return MAX_BLOCK
    argtypes = tuple(kernel.typeof_pyval(a) for a in args)
    return int(kernel.compile(argtypes).max_threads_per_block)


def cuda_block_size(len_x: np.ndarray, len_y: np.ndarray, limit: int = MAX_BLOCK) -> int:
    """Threads per block: the longest diagonal (``min(n, m)`` over the items ``(B,)``) rounded up to a warp,
    capped by ``limit`` (:func:`kernel_thread_limit`) rounded down to a warp; the threads of a block smaller
    than a diagonal stride over its cells."""
    longest = int(np.minimum(len_x, len_y).max())
    cap = min(MAX_BLOCK, int(limit))
    cap = cap - cap % WARP if cap >= WARP else max(1, cap)
    return int(min(cap, max(WARP, -(-longest // WARP) * WARP)))


def simulator_enabled() -> bool:
    return bool(numba.config.ENABLE_CUDASIM)
