"""SCORE building blocks: perturbation speed (x real time, one core) and soft-DTW forward+backward.

    .venv/bin/python benchmarks/bench_score_parts.py [--frames 150 --batch 8 --dim 256]

Soft-DTW variants on the same costs, measured side by side:
  analytic     fairseq_mtssl.losses.soft_dtw, backend "torch" (anti-diagonal forward, analytic backward);
               the compiled backends and the SCORE authors' path are in bench_soft_dtw.py
  autograd     the same anti-diagonal forward, differentiated by autograd through the loop
  plain        the cell-by-cell recursion differentiated by autograd (one item, timed and scaled)
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fairseq_mtssl.data.perturb import add_noise, pitch_shift, reverberate, speed
from fairseq_mtssl.losses.soft_dtw import _forward_table, soft_dtw, squared_euclidean

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ratios import record  # noqa: E402


def timed(fn, repeat=5):
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def plain_soft_dtw(D, gamma):
    n, m = D.shape
    inf = torch.tensor(float("inf"), dtype=D.dtype)
    R = [[inf] * (m + 1) for _ in range(n + 1)]
    R[0][0] = torch.tensor(0.0, dtype=D.dtype)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            R[i][j] = D[i - 1, j - 1] - gamma * torch.logsumexp(
                -torch.stack([R[i - 1][j - 1], R[i - 1][j], R[i][j - 1]]) / gamma, 0
            )
    return R[n][m]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=150, help="frames per sequence (50 Hz: 3 s)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--gamma", type=float, default=0.1)
    a = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(16000 * 10)).astype(np.float32)
    print("perturbation (10 s of audio, one core)      x real time")
    for name, fn in [
        ("speed 1.1", lambda: speed(wav, 1.1)),
        ("speed 0.9", lambda: speed(wav, 0.9)),
        ("pitch +2", lambda: pitch_shift(wav, 2)),
        ("pitch -2", lambda: pitch_shift(wav, -2)),
        ("noise 10 dB", lambda: add_noise(wav, 10, rng)),
        ("reverb 0.3 s", lambda: reverberate(wav, 0.3, rng)),
    ]:
        x_real_time = 10.0 / timed(fn)
        print(f"  {name:<14} {x_real_time:10.0f}")
        record("score_parts", f"perturbation {name}, x real time (one core)", x_real_time, ">= 50")

    torch.set_num_threads(torch.get_num_threads())
    x = torch.randn(a.batch, a.frames, a.dim)
    y = torch.randn(a.batch, int(a.frames * 1.1), a.dim)
    D0 = squared_euclidean(torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1))

    def analytic():
        D = D0.clone().requires_grad_(True)
        soft_dtw(D, gamma=a.gamma, backend="torch").sum().backward()

    def autograd():
        D = D0.clone().requires_grad_(True)
        R = _forward_table(D, a.gamma)
        R[:, a.frames, D.size(2)].sum().backward()

    t_an, t_ag = timed(analytic, 3), timed(autograd, 3)
    n_small = 30
    Ds = D0[0, :n_small, :n_small].clone().requires_grad_(True)
    t_plain_small = timed(lambda: plain_soft_dtw(Ds, a.gamma).backward(), 1)
    t_plain = t_plain_small * (a.frames * D0.size(2) / n_small**2) * a.batch  # the loop is O(N M) per item
    print(f"\nsoft-DTW forward+backward, batch {a.batch}, {a.frames} x {D0.size(2)} frames")
    print(f"  analytic   {t_an:8.3f} s")
    print(f"  autograd   {t_ag:8.3f} s   analytic speed-up {t_ag / t_an:6.1f}x")
    print(
        f"  plain      {t_plain:8.3f} s   analytic speed-up {t_plain / t_an:6.1f}x   (scaled from {n_small}x{n_small}, one item)"
    )
    record(
        "score_parts", "soft-DTW fwd+bwd speed-up over autograd through the plain recursion", t_plain / t_an, ">= 20"
    )


if __name__ == "__main__":
    main()
