"""Soft-DTW against a brute-force recursion (value and autograd gradient) and finite differences; its backend choice."""

import importlib.util

import pytest
import torch
from builders import brute_soft_dtw

import fairseq_mtssl.losses.soft_dtw as sdtw_module
from fairseq_mtssl.losses.soft_dtw import (
    SoftDTWBackendError,
    resolve_backend,
    soft_dtw,
    soft_dtw_divergence,
    squared_euclidean,
)

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="the compiled backends need numba")
BACKENDS = [pytest.param("torch"), pytest.param("numba", marks=needs_numba)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_value_and_gradient_match_brute_force_with_ragged_lengths(gamma, backend):
    torch.manual_seed(0)
    D = torch.rand(3, 7, 9, dtype=torch.float64) * 3
    len_x, len_y = torch.tensor([7, 4, 6]), torch.tensor([9, 9, 3])
    D1 = D.clone().requires_grad_(True)
    ours = soft_dtw(D1, len_x, len_y, gamma, backend=backend)
    ours.sum().backward()
    for b in range(3):
        Db = D[b, : len_x[b], : len_y[b]].clone().requires_grad_(True)
        ref = brute_soft_dtw(Db, gamma)
        ref.backward()
        torch.testing.assert_close(ours[b], ref)
        torch.testing.assert_close(D1.grad[b, : len_x[b], : len_y[b]], Db.grad)
        assert D1.grad[b, len_x[b] :].abs().sum() == 0 and D1.grad[b, :, len_y[b] :].abs().sum() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_finite_differences(backend):
    torch.manual_seed(1)
    D = (torch.rand(2, 5, 6, dtype=torch.float64) * 2).requires_grad_(True)
    len_x, len_y = torch.tensor([5, 3]), torch.tensor([6, 4])
    assert torch.autograd.gradcheck(
        lambda d: soft_dtw(d, len_x, len_y, 0.5, backend=backend), (D,), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_is_zero_on_itself_and_gradient_flows_to_features(backend):
    torch.manual_seed(2)
    x = torch.randn(2, 12, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 10, 4, dtype=torch.float64, requires_grad=True)
    same = soft_dtw_divergence(x, x.detach().clone(), gamma=0.1, backend=backend)
    torch.testing.assert_close(same, torch.zeros(2, dtype=torch.float64), atol=1e-10, rtol=0)
    lx, ly = torch.tensor([12, 7]), torch.tensor([10, 10])
    assert torch.autograd.gradcheck(
        lambda a, b: soft_dtw_divergence(a, b, lx, ly, gamma=0.3, backend=backend), (x, y), eps=1e-6, atol=1e-5
    )
    # normalisation by the summed lengths
    raw = soft_dtw_divergence(x, y, lx, ly, gamma=0.3, normalize=False, backend=backend)
    torch.testing.assert_close(soft_dtw_divergence(x, y, lx, ly, gamma=0.3, backend=backend), raw / (lx + ly))


def test_squared_euclidean_matches_cdist():
    x, y = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(squared_euclidean(x, y), torch.cdist(x, y) ** 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_equals_three_separate_soft_dtws_per_item(backend):
    """The one-batch divergence against the definition, item by item (soft-DTW of the torch loop)."""
    torch.manual_seed(3)
    x, y = torch.randn(3, 9, 5, dtype=torch.float64), torch.randn(3, 13, 5, dtype=torch.float64)
    lx, ly = torch.tensor([9, 4, 7]), torch.tensor([13, 13, 6])
    got = soft_dtw_divergence(x, y, lx, ly, gamma=0.2, normalize=False, backend=backend)
    for b in range(3):
        xb, yb = x[b : b + 1, : lx[b]], y[b : b + 1, : ly[b]]
        sd = lambda p, q: soft_dtw(squared_euclidean(p, q), gamma=0.2, backend="torch")[0]  # noqa: E731
        torch.testing.assert_close(got[b], sd(xb, yb) - 0.5 * (sd(xb, xb) + sd(yb, yb)))


@needs_numba
def test_backend_resolution_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(sdtw_module.BACKEND_ENV, raising=False)
    assert resolve_backend(None, cpu) == "numba"
    assert resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv(sdtw_module.BACKEND_ENV, "torch")
    assert resolve_backend(None, cpu) == "torch"
    assert resolve_backend("numba", cpu) == "numba"  # an explicit choice wins over the environment
    monkeypatch.setenv(sdtw_module.BACKEND_ENV, "fast")
    with pytest.raises(SoftDTWBackendError, match="MTSSL_SOFT_DTW_BACKEND"):
        soft_dtw(torch.rand(1, 2, 2))
    monkeypatch.delenv(sdtw_module.BACKEND_ENV)
    with pytest.raises(SoftDTWBackendError, match="CUDA tensors"):
        resolve_backend("cuda", cpu)
    # a GPU that numba cannot run its kernels on (here: torch has no CUDA at all): auto keeps the torch loop
    k = sdtw_module._kernels()
    monkeypatch.setattr(k.cuda, "is_available", lambda: True)
    sdtw_module._cuda_unavailable.cache_clear()
    try:
        assert resolve_backend("auto", torch.device("cuda", 0)) == ("cuda" if torch.cuda.is_available() else "torch")
    finally:
        sdtw_module._cuda_unavailable.cache_clear()
    # without numba: auto falls back to the torch loop, an explicit numba says what is missing
    monkeypatch.setattr(sdtw_module, "_kernels", lambda: None)
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(SoftDTWBackendError, match="needs numba"):
        resolve_backend("numba", cpu)


def test_lengths_past_the_padding_are_an_error():
    with pytest.raises(ValueError, match="lengths up to 5"):
        soft_dtw_divergence(torch.rand(1, 4, 3), torch.rand(1, 4, 3), torch.tensor([5]), torch.tensor([4]))
