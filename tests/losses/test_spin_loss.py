"""SPIN's loss: Sinkhorn-Knopp targets and the swapped prediction against references written from SwAV."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import PACKAGE_DIR

from fairseq_mtssl.losses.spin import sinkhorn, spin_loss, swapped_prediction_loss

# ---------------------------------------------------------------------------------------------------
# References written from SwAV (Caron et al. 2020, Algorithm 1 / main_swav.py), in float64


def swav_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int, local_b=None) -> torch.Tensor:
    """SwAV's ``distributed_sinkhorn`` on one worker, in the exponential form: Q = exp(s / eps)^T, Q /= sum;
    per iteration rows /= K x row sums, columns /= B x column sums; Q x B. ``local_b`` (one entry per
    column): the B each column's worker divides by (SPIN's authors use the local batch size)."""
    q = torch.exp(scores.double() / epsilon).t()
    k, b = q.shape
    cols_b = torch.full((b,), float(b), dtype=torch.float64) if local_b is None else torch.as_tensor(local_b).double()
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / cols_b
    return (q * cols_b).t()


def swav_loss(s1, s2, q1, q2, t):
    """SwAV's swapped prediction: -1/2 [mean_n sum_k q1 log softmax(s2 / t) + mean_n sum_k q2 log softmax(s1 / t)]."""
    p1, p2 = torch.softmax(s1 / t, -1), torch.softmax(s2 / t, -1)
    return -0.5 * ((q1 * torch.log(p2)).sum(-1).mean() + (q2 * torch.log(p1)).sum(-1).mean())


def swav_loss_grads(s1, s2, q1, q2, t):
    """The closed form of the loss's gradient (targets constant, each target row summing to 1):
    d/ds1 = (softmax(s1 / t) - q2) / (2 N t), d/ds2 = (softmax(s2 / t) - q1) / (2 N t)."""
    n = len(s1)
    return (torch.softmax(s1 / t, -1) - q2) / (2 * n * t), (torch.softmax(s2 / t, -1) - q1) / (2 * n * t)


def cosine_scores(n: int, k: int, d: int = 16, seed: int = 0, dtype=torch.float64):
    """Scores as SPIN's have them: unit-norm frames against unit-norm prototypes."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=-1)
    return (z @ c.t()).to(dtype)


# ---------------------------------------------------------------------------------------------------
# Sinkhorn


@pytest.mark.parametrize("epsilon,iterations", [(0.02, 3), (0.05, 1), (0.5, 10)])
def test_sinkhorn_equals_swav_and_has_its_marginals(epsilon, iterations):
    scores = cosine_scores(200, 32)
    ours = sinkhorn(scores.float(), epsilon, iterations)
    ref = swav_sinkhorn(scores.float(), epsilon, iterations)
    assert ours.dtype == torch.float32 and ours.shape == (200, 32) and not ours.requires_grad
    torch.testing.assert_close(ours.double(), ref, atol=1e-7, rtol=1e-4)
    # every frame's targets sum to 1 (the last normalisation); before it, each prototype row held exactly
    # 1/K of the mass, so the prototype sums are B/K up to what the last column step moved
    torch.testing.assert_close(ours.sum(1), torch.ones(200), atol=1e-5, rtol=0)
    q = torch.exp(scores / epsilon).t()
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(1, keepdim=True) / 32
        rows_before_last_column_step = q.sum(1)
        q = q / q.sum(0, keepdim=True) / 200
    torch.testing.assert_close(rows_before_last_column_step, torch.full((32,), 1 / 32, dtype=torch.float64))
    torch.testing.assert_close(q.sum(0), torch.full((200,), 1 / 200, dtype=torch.float64))


def test_sinkhorn_converges_to_both_marginals():
    """Many iterations: frames sum to 1 and every prototype holds B/K (the equipartition SwAV asks for)."""
    q = sinkhorn(cosine_scores(128, 16, seed=3).float(), epsilon=0.2, iterations=200)
    torch.testing.assert_close(q.sum(1), torch.ones(128), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.sum(0), torch.full((16,), 128 / 16), atol=1e-3, rtol=0)


def test_sinkhorn_on_half_inputs_is_finite_and_equals_float64():
    scores = cosine_scores(400, 256, seed=1, dtype=torch.float16)
    assert torch.isinf(torch.exp(scores[:5] / 0.02)).any()  # why it must not run in half precision
    q = sinkhorn(scores, 0.02, 3)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), swav_sinkhorn(scores.double(), 0.02, 3), atol=1e-6, rtol=1e-4)
    # a prototype far from every frame: the exponential form's row underflows to 0 in float32 (0/0 = NaN)
    far = scores.float().clone()
    far[:, 0] = -1.0
    far[:, 1:] = far[:, 1:].clamp(min=0.9)
    naive = torch.exp(far / 0.02).t()
    naive = naive / naive.sum()
    assert (naive[0] == 0).all()
    q = sinkhorn(far.half(), 0.02, 3)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), swav_sinkhorn(far.half().double(), 0.02, 3), atol=1e-6, rtol=1e-4)


_DIST_WORKER = textwrap.dedent(
    """
    import importlib.util, sys, torch, torch.distributed as dist
    rank, rdv, inp, out, module = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    spec = importlib.util.spec_from_file_location("spin_loss", module)  # the file alone: no fairseq import
    spin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spin)
    sinkhorn = spin.sinkhorn
    dist.init_process_group("gloo", init_method="file://" + rdv, rank=rank, world_size=2)
    torch.save(sinkhorn(torch.load(inp)[rank], 0.02, 3), out)
    dist.destroy_process_group()
    """
)


def test_sinkhorn_across_two_workers_all_reduces_the_sums(tmp_path):
    """Two gloo workers with 70 and 50 frames: the result is the one-worker algorithm on all 120 frames with
    the prototype sums taken over both and each column divided by its own worker's B (the authors')."""
    scores = cosine_scores(120, 24, seed=5).float()
    parts = [scores[:70], scores[70:]]
    torch.save(parts, tmp_path / "in.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [str(tmp_path / "rdv"), str(tmp_path / "in.pt")]
    module = str(PACKAGE_DIR / "losses/spin.py")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DIST_WORKER, str(r), *args, str(tmp_path / f"{r}.pt"), module],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(2)
    ]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    got = torch.cat([torch.load(tmp_path / f"{r}.pt") for r in range(2)])
    ref = swav_sinkhorn(scores, 0.02, 3, local_b=[70.0] * 70 + [50.0] * 50)
    torch.testing.assert_close(got.double(), ref, atol=1e-7, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Swapped prediction


def test_swapped_prediction_loss_and_gradients_match_swav():
    t = 0.1
    s1 = cosine_scores(60, 20, seed=7).requires_grad_()
    s2 = cosine_scores(60, 20, seed=8).requires_grad_()
    loss, stats = spin_loss(s1, s2, epsilon=0.05, iterations=3, temperature=t)
    q1, q2 = swav_sinkhorn(s1.detach(), 0.05, 3), swav_sinkhorn(s2.detach(), 0.05, 3)
    torch.testing.assert_close(loss, swav_loss(s1.detach(), s2.detach(), q1, q2, t), atol=1e-10, rtol=1e-9)
    g1, g2 = torch.autograd.grad(loss, [s1, s2])
    r1, r2 = swav_loss_grads(s1.detach(), s2.detach(), q1, q2, t)  # no gradient through the targets
    torch.testing.assert_close(g1, r1, atol=1e-12, rtol=1e-8)
    torch.testing.assert_close(g2, r2, atol=1e-12, rtol=1e-8)
    assert set(stats) == {"acc", "code_perplexity", "prob_perplexity"} and 0 <= stats["acc"] <= 1
    assert 1 <= stats["code_perplexity"] <= 20 and 1 <= stats["prob_perplexity"] <= 20


def test_swapped_prediction_gradcheck_in_float64():
    """With the targets fixed (they carry no gradient), the loss through L2-normalised frames and codebook."""
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(12, 6, dtype=torch.float64, generator=g, requires_grad=True)
    z2 = torch.randn(12, 6, dtype=torch.float64, generator=g, requires_grad=True)
    c = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    with torch.no_grad():
        q1 = sinkhorn(F.normalize(z1, dim=-1) @ c.t(), 0.05, 3)
        q2 = sinkhorn(F.normalize(z2, dim=-1) @ c.t(), 0.05, 3)
    assert q1.dtype == torch.float64

    def f(z1, z2, c):
        return swapped_prediction_loss(F.normalize(z1, dim=-1) @ c.t(), F.normalize(z2, dim=-1) @ c.t(), q1, q2, 0.1)

    assert torch.autograd.gradcheck(f, (z1, z2, c))
    assert torch.autograd.gradgradcheck(f, (z1, z2, c))
