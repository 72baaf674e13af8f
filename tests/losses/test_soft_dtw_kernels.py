"""The compiled soft-DTW backends (numba CPU kernels, CUDA kernels under numba's simulator) against the torch loop."""

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import brute_soft_dtw

import fairseq_mtssl.losses.soft_dtw as sdtw_module
from fairseq_mtssl.losses.soft_dtw import (
    SoftDTWBackendError,
    resolve_backend,
    soft_dtw,
    soft_dtw_divergence,
)

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="the compiled backends need numba")
BACKENDS = [pytest.param("torch"), pytest.param("numba", marks=needs_numba)]


# The torch loop (backend "torch") is the reference: every compiled path is checked against it, in float64.

# lengths with N != M, items shorter than the padding, x longer than y in some items, a row count that is
# not a multiple of the kernel's 4-row strips, and one-frame sequences
RAGGED_X = [9, 4, 1, 13, 6]
RAGGED_Y = [13, 13, 7, 1, 5]


def _pairs(dtype=torch.float64, seed=4, dim=5):
    g = torch.Generator().manual_seed(seed)
    lx, ly = torch.tensor(RAGGED_X), torch.tensor(RAGGED_Y)
    x = torch.randn(len(lx), int(lx.max()), dim, generator=g, dtype=dtype)
    y = torch.randn(len(ly), int(ly.max()), dim, generator=g, dtype=dtype)
    return x, y, lx, ly


def _divergence_and_grads(x, y, lx, ly, gamma, backend, weights):
    xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    div = soft_dtw_divergence(xg, yg, lx, ly, gamma=gamma, backend=backend)
    (div * weights).sum().backward()  # unequal weights: each item's gradient seed is checked
    return div.detach(), xg.grad, yg.grad


@needs_numba
@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_numba_divergence_matches_the_torch_loop_in_float64(gamma):
    x, y, lx, ly = _pairs()
    w = torch.linspace(0.5, 2.0, len(lx), dtype=torch.float64)
    ref = _divergence_and_grads(x, y, lx, ly, gamma, "torch", w)
    got = _divergence_and_grads(x, y, lx, ly, gamma, "numba", w)
    for name, a, b in zip(["value", "grad x", "grad y"], got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
    # nothing flows into the padding
    for b in range(len(lx)):
        assert got[1][b, lx[b] :].abs().sum() == 0 and got[2][b, ly[b] :].abs().sum() == 0


@needs_numba
@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_numba_soft_dtw_matches_brute_force_with_ragged_lengths(gamma):
    torch.manual_seed(5)
    lx, ly = torch.tensor(RAGGED_X), torch.tensor(RAGGED_Y)
    D = torch.rand(len(lx), int(lx.max()), int(ly.max()), dtype=torch.float64) * 3
    D1 = D.clone().requires_grad_(True)
    ours = soft_dtw(D1, lx, ly, gamma, backend="numba")
    (ours * torch.arange(1.0, len(lx) + 1, dtype=torch.float64)).sum().backward()
    for b in range(len(lx)):
        Db = D[b, : lx[b], : ly[b]].clone().requires_grad_(True)
        ref = brute_soft_dtw(Db, gamma)
        ((b + 1) * ref).backward()
        torch.testing.assert_close(ours[b], ref)
        torch.testing.assert_close(D1.grad[b, : lx[b], : ly[b]], Db.grad)
        assert D1.grad[b, lx[b] :].abs().sum() == 0 and D1.grad[b, :, ly[b] :].abs().sum() == 0


@needs_numba
def test_numba_gradcheck_finite_differences():
    torch.manual_seed(6)
    D = (torch.rand(3, 6, 5, dtype=torch.float64) * 2).requires_grad_(True)
    lx, ly = torch.tensor([6, 3, 1]), torch.tensor([5, 4, 2])
    assert torch.autograd.gradcheck(lambda d: soft_dtw(d, lx, ly, 0.1, backend="numba"), (D,), eps=1e-6, atol=1e-6)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 6, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    y = torch.randn(3, 5, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: soft_dtw_divergence(a, b, lx, ly, gamma=0.1, backend="numba"), (x, y), eps=1e-6, atol=1e-6
    )


@needs_numba
def test_numba_float32_is_close_to_float64():
    x, y, lx, ly = _pairs(torch.float32, dim=16)
    w = torch.ones(len(lx))
    got = _divergence_and_grads(x, y, lx, ly, 0.1, "numba", w)
    ref = _divergence_and_grads(x.double(), y.double(), lx, ly, 0.1, "torch", w.double())
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


_CUDASIM = r"""
import json, sys
import numpy as np, torch
from fairseq_mtssl.losses import soft_dtw as S
from fairseq_mtssl.losses import soft_dtw_kernels as K
assert K.simulator_enabled()
lx, ly = torch.tensor(json.loads(sys.argv[1])), torch.tensor(json.loads(sys.argv[2]))
g = torch.Generator().manual_seed(8)
B, N, M = len(lx), int(lx.max()), int(ly.max())
D = torch.rand(B, N, M, generator=g, dtype=torch.float64) * 3
out = {}
# the kernels themselves, with 2 threads a block, so that threads stride over each diagonal's cells
R_ref = S._forward_table(D, 0.1)
E_ref = S._backward_table(D, R_ref, lx, ly, 0.1)
R = np.empty((B, N + 2, M + 2))
K.forward_cuda[B, 2](D.numpy(), lx.numpy(), ly.numpy(), 0.1, R)
E = np.zeros((B, N, M))
K.backward_cuda[B, 2](D.numpy(), R, lx.numpy(), ly.numpy(), 0.1, E)
b = np.arange(B)
out["values"] = float(np.abs(R[b, lx.numpy(), ly.numpy()] - R_ref[b, lx, ly].numpy()).max())
out["E"] = float(np.abs(E - E_ref.numpy()).max())
# the whole divergence through backend="cuda" (CPU tensors are allowed under the simulator)
x = torch.randn(B, N, 3, generator=g, dtype=torch.float64)
y = torch.randn(B, M, 3, generator=g, dtype=torch.float64)
w = torch.linspace(0.5, 2.0, B, dtype=torch.float64)
res = {}
for backend in ["torch", "cuda"]:
    xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    div = S.soft_dtw_divergence(xg, yg, lx, ly, gamma=0.1, backend=backend)
    (div * w).sum().backward()
    res[backend] = (div.detach(), xg.grad, yg.grad)
for name, a, c in zip(["div", "grad_x", "grad_y"], res["cuda"], res["torch"]):
    out[name] = float((a - c).abs().max())
print(json.dumps(out))
"""


@needs_numba
@pytest.mark.slow
def test_cuda_kernels_under_numbas_simulator_match_the_torch_loop():
    """The CUDA path without a GPU: numba's CUDA simulator runs the kernels' Python bodies, thread by thread."""
    lx, ly = [7, 3, 1, 6], [5, 6, 4, 1]  # small: the simulator runs a Python thread per CUDA thread
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", NUMBA_DISABLE_JIT="0")
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _CUDASIM, json.dumps(lx), json.dumps(ly)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(errors) == {"values", "E", "div", "grad_x", "grad_y"}
    assert max(errors.values()) < 1e-9, errors


_CUDASIM_SMALL_BLOCK = r"""
import json
import torch
from fairseq_mtssl.losses import soft_dtw as S
from fairseq_mtssl.losses import soft_dtw_kernels as K
assert K.simulator_enabled()
simulated_limit = K.kernel_thread_limit(K.forward_cuda, ())  # no registers in the simulator: CUDA's 1024
K.kernel_thread_limit = lambda kernel, args: 32  # a GPU whose compiled kernels allow 32 threads a block
lx, ly = torch.tensor([70, 41]), torch.tensor([66, 70])  # longest diagonals 66 and 41: 3 and 2 strides
g = torch.Generator().manual_seed(9)
D = torch.rand(2, 70, 70, generator=g, dtype=torch.float64) * 3
w = torch.tensor([1.0, 2.5], dtype=torch.float64)
res = {}
for backend in ["torch", "cuda"]:
    Dg = D.clone().requires_grad_(True)
    v = S.soft_dtw(Dg, lx, ly, 0.1, backend=backend)
    (v * w).sum().backward()
    res[backend] = (v.detach(), Dg.grad)
rel = lambda a, b: float(((a - b).abs() / b.abs().clamp(min=1e-12)).max())
print(json.dumps({
    "simulated_limit": simulated_limit,
    "blocks": [K.forward_cuda.block_dim[0], K.backward_cuda.block_dim[0]],
    "value": rel(res["cuda"][0], res["torch"][0]),
    "grad": float((res["cuda"][1] - res["torch"][1]).abs().max() / res["torch"][1].abs().max()),
}))
"""


def _run_under_cudasim(script: str, *args: str) -> dict:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", NUMBA_DISABLE_JIT="0")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_numba
@pytest.mark.slow
def test_cuda_kernels_with_a_block_smaller_than_the_sequence_match_the_torch_loop():
    """A GPU whose compiled kernels allow 32 threads a block (registers), 70-frame sequences: the block is
    capped at 32 threads, which stride over each diagonal, and the value and gradient equal the torch loop's."""
    got = _run_under_cudasim(_CUDASIM_SMALL_BLOCK)
    assert got["simulated_limit"] == 1024 and got["blocks"] == [32, 32], got
    assert got["value"] < 1e-12 and got["grad"] < 1e-12, got


@needs_numba
def test_cuda_block_size_is_capped_by_the_compiled_kernels_limit():
    k = sdtw_module._kernels()
    long, short = np.array([1300, 1100]), np.array([1300, 1500])
    assert k.cuda_block_size(long, short) == 1024  # the hardware's limit, whatever the kernel
    assert k.cuda_block_size(long, short, limit=640) == 640  # e.g. 96 registers a thread
    assert k.cuda_block_size(long, short, limit=700) == 672  # whole warps
    assert k.cuda_block_size(np.array([70]), np.array([66]), limit=1024) == 96  # the longest diagonal, in warps
    assert k.cuda_block_size(np.array([70]), np.array([66]), limit=32) == 32


@needs_numba
def test_auto_says_once_when_it_falls_back_to_the_torch_loop(monkeypatch, caplog):
    """No usable CUDA kernel (here: numba sees no GPU), then no numba at all: ``auto`` runs the torch loop
    and logs one warning per kind of kernel and process, with the reason and the cost."""
    monkeypatch.delenv(sdtw_module.BACKEND_ENV, raising=False)
    monkeypatch.setattr(sdtw_module, "_FALLBACKS_LOGGED", set())
    monkeypatch.setattr(sdtw_module._kernels().cuda, "is_available", lambda: False)
    gpu = torch.device("cuda", 0)
    sdtw_module._cuda_unavailable.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=sdtw_module.logger.name):
            assert resolve_backend("auto", gpu) == "torch"
            assert resolve_backend(None, gpu) == "torch"
            assert resolve_backend("torch", gpu) == "torch"  # asked for: nothing to say
            monkeypatch.setattr(sdtw_module, "_kernels", lambda: None)
            assert resolve_backend("auto", torch.device("cpu")) == "torch"
            assert resolve_backend("auto", torch.device("cpu")) == "torch"
    finally:
        sdtw_module._cuda_unavailable.cache_clear()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("soft-DTW:")]
    assert lines == [
        "soft-DTW: CUDA kernel unavailable (numba sees no CUDA GPU, on cuda:0); using the torch anti-diagonal "
        f"loop, about 9x slower (benchmarks/README.md; set {sdtw_module.BACKEND_ENV}=torch to silence this)",
        "soft-DTW: numba kernel unavailable (numba does not import); using the torch anti-diagonal loop, about 9x "
        f"slower (benchmarks/README.md; set {sdtw_module.BACKEND_ENV}=torch to silence this)",
    ], lines
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.getMessage().startswith("soft-DTW:"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_bfloat16_autocast_soft_dtw_stays_in_float32(backend):
    """Costs from a matmul under autocast are bfloat16: soft-DTW casts them to float32, runs with autocast off,
    returns float32 values equal to the float32 computation (1e-5 relative), and the gradient reaches them."""
    torch.manual_seed(10)
    x, y = torch.randn(3, 40, 16), torch.randn(3, 45, 16)
    lx, ly = torch.tensor([40, 25, 33]), torch.tensor([45, 45, 20])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        D = (x @ y.transpose(1, 2)).abs()  # costs from a matmul: what a caller under autocast hands over
        assert D.dtype == torch.bfloat16
        D = D.detach().requires_grad_(True)
        got = soft_dtw(D, lx, ly, 0.1, backend=backend)
        got.sum().backward()
    assert got.dtype == torch.float32
    D32 = D.detach().float().requires_grad_(True)
    ref = soft_dtw(D32, lx, ly, 0.1, backend=backend)
    ref.sum().backward()
    torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=0)
    assert D.grad is not None and D.grad.dtype == torch.bfloat16 and torch.isfinite(D.grad.float()).all()
    torch.testing.assert_close(D.grad, D32.grad.to(torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_bfloat16_autocast_the_divergence_stays_in_float32(backend):
    """The divergence builds its cost matrices inside: under autocast they too stay float32, so value and
    gradients equal the float32 computation (forward under the autocast, backward after it, as fairseq does)."""
    x, y, lx, ly = _pairs(torch.float32, dim=16)
    w = torch.linspace(0.5, 2.0, len(lx))
    ref = _divergence_and_grads(x, y, lx, ly, 0.1, backend, w)
    xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        div = soft_dtw_divergence(xg, yg, lx, ly, gamma=0.1, backend=backend)
    (div * w).sum().backward()
    got = (div.detach(), xg.grad, yg.grad)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=0)
    for a, b in zip(got[1:], ref[1:]):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # half inputs (a model's output under autocast): computed, and returned, in float32
    half = soft_dtw_divergence(x.bfloat16(), y.bfloat16(), lx, ly, gamma=0.1, backend=backend)
    assert half.dtype == torch.float32


@needs_numba
def test_score_criterion_passes_its_backend_through():
    from fairseq_mtssl.criterions.score_criterion import ScoreCriterion, ScoreCriterionConfig

    assert ScoreCriterionConfig().soft_dtw_backend is None
    x, y, lx, ly = _pairs(torch.float32, dim=8)
    out = {"student": x, "teacher": y, "student_lengths": lx, "teacher_lengths": ly}
    sample = {"net_input": {"source": [None] * len(lx)}}
    losses = {}
    for backend in ["torch", "numba"]:
        crit = ScoreCriterion(task=None, gamma=0.1, soft_dtw_backend=backend)
        losses[backend] = crit(lambda **_: out, sample)[0]
    torch.testing.assert_close(losses["numba"], losses["torch"], rtol=1e-4, atol=1e-5)
    with pytest.raises(SoftDTWBackendError):
        ScoreCriterion(task=None, soft_dtw_backend="gpu")(lambda **_: out, sample)


@pytest.mark.slow
def test_without_numba_the_torch_loop_runs():
    """numba made unimportable in a fresh interpreter: ``auto`` runs the torch loop, same values."""
    script = (
        "import sys; sys.modules['numba'] = None\n"
        "import torch\n"
        "from fairseq_mtssl.losses.soft_dtw import resolve_backend, soft_dtw_divergence\n"
        "assert resolve_backend(None, torch.device('cpu')) == 'torch'\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, y = torch.randn(2, 5, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, generator=g, dtype=torch.float64)\n"
        "print(soft_dtw_divergence(x, y, torch.tensor([5, 2]), torch.tensor([3, 4])).tolist())\n"
    )
    env = dict(os.environ)
    env.pop(sdtw_module.BACKEND_ENV, None)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(2, 5, 3, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 3, generator=g, dtype=torch.float64),
    )
    ref = soft_dtw_divergence(x, y, torch.tensor([5, 2]), torch.tensor([3, 4]), backend="torch")
    torch.testing.assert_close(got, ref)


def test_the_numba_kernels_leave_torchs_thread_count_alone():
    """numba's thread pool starts at the first parallel call and used to raise torch's intra-op threads to
    every core: a fresh process set to 1 thread must still run 1 after soft-DTW's numba kernels."""
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from fairseq_mtssl.losses.soft_dtw import soft_dtw_divergence\n"
        "x = torch.randn(2, 30, 8, requires_grad=True); y = torch.randn(2, 25, 8)\n"
        "soft_dtw_divergence(x, y, torch.tensor([30, 20]), torch.tensor([25, 25]), backend='numba').sum().backward()\n"
        "print(torch.get_num_threads())\n"
    )
    env = dict(os.environ, NUMBA_NUM_THREADS="2", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1"
