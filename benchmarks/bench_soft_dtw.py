"""SCORE's soft-DTW divergence, forward + backward: the plugin's compiled kernel against today's torch loop and
against the SCORE authors' own path, side by side and interleaved in one process; then the kernel on a quiet
machine against the same with busy-looping processes on the cores.

    .venv/bin/python benchmarks/bench_soft_dtw.py [--batch 8 --min-frames 300 --max-frames 600 --dim 256]

Variants, all on the same L2-normalised float32 frames ``x (B, N, 256)``, ``y (B, M, 256)`` with lengths drawn
uniformly in [min, max] (SCORE's projection size), gamma 0.1, each timed for the loss of the whole batch and
its gradient with respect to ``x`` and ``y``:

  kernel   soft_dtw_divergence(..., backend="numba"): costs, recursion and gradients in the compiled kernels
  loop     soft_dtw_divergence(..., backend="torch"): today's anti-diagonal loop (the reference)
  authors  the SCORE authors' path (peer_score_soft_dtw.py: Maghoumi's pytorch-softdtw-cuda CPU code in numba,
           three calls per pair as their normalize_sdtw, one pair at a time, as their training step runs)

Rounds go kernel, loop, kernel, authors, kernel (rotated each round), so a change of load on the machine
touches all of them; the figures are medians. The load test alternates the kernel quiet and with
``--load-procs`` busy-looping processes running (paused with SIGSTOP between, so they cost nothing while
quiet), for one busy process and for one per core. Both wall time (the target) and the process's CPU time are
printed: CPU seconds are what the machine's other users pay.
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numba
import torch
import torch.nn.functional as F

from fairseq_mtssl.losses.soft_dtw import soft_dtw_divergence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_score_soft_dtw import peer_loss_step  # noqa: E402
from ratios import record  # noqa: E402


def make_batch(batch: int, lo: int, hi: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lx = torch.randint(lo, hi + 1, (batch,), generator=g)
    ly = torch.randint(lo, hi + 1, (batch,), generator=g)
    x = F.normalize(torch.randn(batch, int(lx.max()), dim, generator=g), dim=-1)
    y = F.normalize(torch.randn(batch, int(ly.max()), dim, generator=g), dim=-1)
    return x, y, lx, ly


def ours(x, y, lx, ly, gamma, backend):
    """Loss per pair and the gradients ``(B,), (B, N, C), (B, M, C)``."""
    xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    div = soft_dtw_divergence(xg, yg, lx, ly, gamma, backend=backend)
    div.sum().backward()
    return div.detach(), xg.grad, yg.grad


def authors(x, y, lx, ly, gamma):
    xs = [x[b : b + 1, : lx[b]].clone().requires_grad_(True) for b in range(len(lx))]
    ys = [y[b : b + 1, : ly[b]].clone().requires_grad_(True) for b in range(len(ly))]
    losses = peer_loss_step(xs, ys, gamma)
    gx, gy = torch.zeros_like(x), torch.zeros_like(y)
    for b in range(len(lx)):
        gx[b, : lx[b]], gy[b, : ly[b]] = xs[b].grad[0], ys[b].grad[0]
    return torch.tensor(losses), gx, gy


def timed(fn):
    """``(wall seconds, process CPU seconds, result)``."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def rel_err(a, ref):
    return float((a - ref).abs().max() / ref.abs().max())


class Spinners:
    """``n`` busy-looping processes (pure Python ``while True``), paused until :meth:`run`."""

    def __init__(self, n: int):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
        self.pause()

    def run(self):
        for p in self.procs:
            os.kill(p.pid, signal.SIGCONT)
        time.sleep(0.3)  # let the scheduler place them

    def pause(self):
        for p in self.procs:
            os.kill(p.pid, signal.SIGSTOP)

    def close(self):
        for p in self.procs:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
            p.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--min-frames", type=int, default=300, help="shortest sequence (50 Hz frames)")
    p.add_argument("--max-frames", type=int, default=600, help="longest sequence")
    p.add_argument("--dim", type=int, default=256, help="frame dimension (SCORE's projection)")
    p.add_argument("--gamma", type=float, default=0.1, help="soft-DTW smoothing")
    p.add_argument("--threads", type=int, default=2, help="torch and numba threads")
    p.add_argument("--rounds", type=int, default=1, help="rounds of kernel, loop, kernel, authors, kernel")
    p.add_argument("--load-rounds", type=int, default=5, help="quiet/loaded pairs of kernel runs per load level")
    p.add_argument("--skip-peers", action="store_true", help="only the kernel and its load test (a smoke run)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    x, y, lx, ly = make_batch(a.batch, a.min_frames, a.max_frames, a.dim)
    cells = int((lx * ly + lx * lx + ly * ly).sum())
    print(
        f"batch {a.batch}, lengths {a.min_frames}-{a.max_frames} (x {lx.tolist()}, y {ly.tolist()}), dim {a.dim}, "
        f"gamma {a.gamma}, {a.threads} threads, {cells / 1e6:.1f} M recursion cells per step"
    )
    print(f"machine load average before: {os.getloadavg()[0]:.2f} on {len(os.sched_getaffinity(0))} cores")

    def run(name, batch):
        if name == "authors":
            return authors(*batch, a.gamma)
        return ours(*batch, a.gamma, "numba" if name == "kernel" else "torch")

    names = ["kernel"] + ([] if a.skip_peers else ["loop", "authors"])
    variants = {name: (lambda name=name: run(name, (x, y, lx, ly))) for name in names}
    # warm-up: numba compiles (or loads its cache) on a small batch; the kernel also runs the real one once
    small = make_batch(2, 20, 30, a.dim, seed=1)
    for name in names:
        run(name, small)
    variants["kernel"]()
    ref = ours(x.double(), y.double(), lx, ly, a.gamma, "numba")

    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    results = {}
    peers = [n for n in variants if n != "kernel"]
    for r in range(a.rounds):
        order = ["kernel"]
        for name in peers[r % max(len(peers), 1) :] + peers[: r % max(len(peers), 1)]:
            order += [name, "kernel"]
        for name in order:
            w, c, results[name] = timed(variants[name])
            wall[name].append(w)
            cpu[name].append(c)
            print(f"  round {r + 1}: {name:<8} {w:8.3f} s wall {c:8.3f} s CPU", flush=True)
    print("\nagreement with the kernel in float64 (max |diff| / max |ref|): loss, grad x, grad y")
    for name, res in results.items():
        errs = [rel_err(q.double(), e) for q, e in zip(res, ref)]
        print(f"  {name:<8} " + "  ".join(f"{e:.1e}" for e in errs))
        assert errs[0] < 1e-4, f"{name}: loss differs from the float64 kernel by {errs[0]:.1e}"
    med = {n: statistics.median(v) for n, v in wall.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
    print("\nforward + backward of the divergence, median wall (CPU) seconds")
    for n in variants:
        print(f"  {n:<8} {med[n]:8.3f} s ({med_cpu[n]:.3f} s CPU)   kernel speed-up {med[n] / med['kernel']:6.1f}x")
    if "authors" in med:
        record("soft_dtw", "divergence fwd+bwd speed-up over the SCORE authors' path (2 threads)", med["authors"] / med["kernel"], ">= 20")  # fmt: skip
        record("soft_dtw", "the same in CPU seconds", med_cpu["authors"] / med_cpu["kernel"])
    if "loop" in med:
        record("soft_dtw", "divergence fwd+bwd speed-up over the torch anti-diagonal loop", med["loop"] / med["kernel"], ">= 5")  # fmt: skip
        record("soft_dtw", "the same in CPU seconds", med_cpu["loop"] / med_cpu["kernel"])

    cores = len(os.sched_getaffinity(0))
    for procs in sorted({1, cores}):
        spin = Spinners(procs)
        quiet, loaded = [], []
        try:
            for _ in range(a.load_rounds):
                quiet.append(timed(variants["kernel"])[0])
                spin.run()
                loaded.append(timed(variants["kernel"])[0])
                spin.pause()
        finally:
            spin.close()
        ratio = statistics.median(loaded) / statistics.median(quiet)
        share = max(1.0, (min(a.threads, cores) + procs) / cores)
        print(
            f"\nkernel with {procs} busy-looping process(es) on {cores} cores: quiet {statistics.median(quiet):.3f} s, "
            f"loaded {statistics.median(loaded):.3f} s: {ratio:.2f}x slower "
            f"(a fair scheduler's share alone would make it {share:.2f}x)"
        )
        target = "<= 1.5" if procs == 1 else None
        record("soft_dtw", f"kernel loaded by {procs} busy process(es) / quiet ({cores} cores)", ratio, target)
    print(f"machine load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
