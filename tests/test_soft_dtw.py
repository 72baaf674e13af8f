"""Soft-DTW against a brute-force recursion (value and autograd gradient) and finite differences."""

import pytest
import torch

from fairseq_mtssl.losses.soft_dtw import soft_dtw, soft_dtw_divergence, squared_euclidean


def brute_soft_dtw(D: torch.Tensor, gamma: float) -> torch.Tensor:
    """The recursion cell by cell, differentiable by autograd (one item)."""
    n, m = D.shape
    inf = torch.tensor(float("inf"), dtype=D.dtype)
    R = [[inf] * (m + 1) for _ in range(n + 1)]
    R[0][0] = torch.tensor(0.0, dtype=D.dtype)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            prev = torch.stack([R[i - 1][j - 1], R[i - 1][j], R[i][j - 1]])
            R[i][j] = D[i - 1, j - 1] - gamma * torch.logsumexp(-prev / gamma, 0)
    return R[n][m]


@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_value_and_gradient_match_brute_force_with_ragged_lengths(gamma):
    torch.manual_seed(0)
    D = torch.rand(3, 7, 9, dtype=torch.float64) * 3
    len_x, len_y = torch.tensor([7, 4, 6]), torch.tensor([9, 9, 3])
    D1 = D.clone().requires_grad_(True)
    ours = soft_dtw(D1, len_x, len_y, gamma)
    ours.sum().backward()
    for b in range(3):
        Db = D[b, : len_x[b], : len_y[b]].clone().requires_grad_(True)
        ref = brute_soft_dtw(Db, gamma)
        ref.backward()
        torch.testing.assert_close(ours[b], ref)
        torch.testing.assert_close(D1.grad[b, : len_x[b], : len_y[b]], Db.grad)
        assert D1.grad[b, len_x[b] :].abs().sum() == 0 and D1.grad[b, :, len_y[b] :].abs().sum() == 0


def test_gradcheck_finite_differences():
    torch.manual_seed(1)
    D = (torch.rand(2, 5, 6, dtype=torch.float64) * 2).requires_grad_(True)
    len_x, len_y = torch.tensor([5, 3]), torch.tensor([6, 4])
    assert torch.autograd.gradcheck(lambda d: soft_dtw(d, len_x, len_y, 0.5), (D,), eps=1e-6, atol=1e-6)


def test_divergence_is_zero_on_itself_and_gradient_flows_to_features():
    torch.manual_seed(2)
    x = torch.randn(2, 12, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 10, 4, dtype=torch.float64, requires_grad=True)
    same = soft_dtw_divergence(x, x.detach().clone(), gamma=0.1)
    torch.testing.assert_close(same, torch.zeros(2, dtype=torch.float64), atol=1e-10, rtol=0)
    lx, ly = torch.tensor([12, 7]), torch.tensor([10, 10])
    assert torch.autograd.gradcheck(
        lambda a, b: soft_dtw_divergence(a, b, lx, ly, gamma=0.3), (x, y), eps=1e-6, atol=1e-5
    )
    # normalisation by the summed lengths
    raw = soft_dtw_divergence(x, y, lx, ly, gamma=0.3, normalize=False)
    torch.testing.assert_close(soft_dtw_divergence(x, y, lx, ly, gamma=0.3), raw / (lx + ly))


def test_squared_euclidean_matches_cdist():
    x, y = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(squared_euclidean(x, y), torch.cdist(x, y) ** 2)


def test_divergence_equals_three_separate_soft_dtws_per_item():
    """The one-batch divergence (both sides padded to a common length) against the definition, item by item."""
    torch.manual_seed(3)
    x, y = torch.randn(3, 9, 5, dtype=torch.float64), torch.randn(3, 13, 5, dtype=torch.float64)
    lx, ly = torch.tensor([9, 4, 7]), torch.tensor([13, 13, 6])
    got = soft_dtw_divergence(x, y, lx, ly, gamma=0.2, normalize=False)
    for b in range(3):
        xb, yb = x[b : b + 1, : lx[b]], y[b : b + 1, : ly[b]]
        sd = lambda p, q: soft_dtw(squared_euclidean(p, q), gamma=0.2)[0]  # noqa: E731
        torch.testing.assert_close(got[b], sd(xb, yb) - 0.5 * (sd(xb, xb) + sd(yb, yb)))
