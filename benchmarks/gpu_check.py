"""What can only be checked on a GPU, in one command (a few minutes on one GPU; 8 at most):

    .venv/bin/python benchmarks/gpu_check.py [--out DIR] [--skip-train]

(a) soft-DTW: numba's CUDA kernels at 300, 1024 and 1300 frames (a batch of 4 ragged items, float32 costs,
    gamma 0.1) against the CPU reference (the numba CPU kernel, else the torch loop, in float64 on the same
    values): value and gradient error, the kernels' time (forward + backward, after a first call that
    compiles), the torch anti-diagonal loop's on the same GPU (what ``auto`` falls back to), and the block size
    each compiled kernel allows (registers a thread). 1024 frames and more took 1024-thread blocks before the
    block was sized from the compiled kernel.
(b) the VGS speech-image loss (``speech_image_loss``) on half CUDA inputs of 768 dims against float64 on the
    same (half-rounded) values, for FaST-VGS's dot-product margin InfoNCE and the cosine InfoNCE.
(c) 20 fp16 updates of each method's tiny config on cuda:0 with fairseq's default DDP backend (``c10d``), as
    ``fairseq-hydra-train`` runs them (``common.cpu=false common.fp16=true distributed_training.ddp_backend=c10d
    distributed_training.distributed_world_size=1 optimization.max_update=20``): HuBERT, MT4SSL, VGS+SSL, then
    SCORE and SUPERB PR on the HuBERT it just trained. The data is a tiny embedded corpus built first by the
    plugin's own tools (``mtssl-synth-corpus --hours 0.03``, manifests, scene features, MFCC k-means labels).
    Per method: finished (exit 0 and 20 updates logged), last logged loss finite, fp16 overflows, seconds.

Prints one table per part; writes it to ``{out}/gpu_check.md`` with the details in ``{out}/gpu_check.json``, the
commands to ``{out}/commands.sh`` and each training's output to ``{out}/train/<method>/``. Exit status 1 when a
check fails. Without a CUDA GPU (``torch.cuda.is_available()`` False) it prints one line and exits 0.
"""

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "fairseq_mtssl"  # common.user_dir
BIN = Path(sys.executable).parent
SKIP_MESSAGE = "gpu_check: skipped, no CUDA GPU here (torch.cuda.is_available() is False)"

SDTW_FRAMES = (300, 1024, 1300)
SDTW_VALUE_TOL, SDTW_GRAD_TOL = 1e-6, 1e-4  # float64 recursion on both sides; E in float32 on the GPU
VGS_DIM, VGS_BATCH = 768, 48
VGS_VALUE_TOL, VGS_GRAD_TOL = 1e-3, 1e-2
# (loss, similarity, input scale): unnormalised embeddings of norm ~ 14 (dot logits of a few units) and ~ 220
# (logits in the thousands, near half's range after the sums), then the cosine InfoNCE
VGS_CASES = (("margin_infonce", "dot", 0.5), ("margin_infonce", "dot", 8.0), ("infonce", "cosine", 1.0))

UPDATES = 20
TRAIN_OVERRIDES = (
    "common.cpu=false",
    "common.fp16=true",
    "distributed_training.ddp_backend=c10d",
    "distributed_training.distributed_world_size=1",
    f"optimization.max_update={UPDATES}",
    "common.log_interval=5",
)
TRAIN_TIMEOUT_S = 240
# method: (config folder under fairseq_mtssl/config, config name, needs the HuBERT checkpoint)
METHODS = {
    "hubert": ("hubert/pretrain", "hubert_tiny_cpu", False),
    "mt4ssl": ("mt4ssl/pretrain", "mt4ssl_tiny_cpu", False),
    "vgs": ("vgs", "vgs_ssl_tiny_cpu", False),
    "score": ("score", "score_tiny_cpu", True),
    "superb_pr": ("superb", "pr_tiny_cpu", True),
}
SPLITS = ("train", "valid", "test")


# ------------------------------------------------------------------------------------------- (a) soft-DTW
def _sdtw_problem(frames: int, batch: int = 4):
    """Costs ``D (B, F, F)`` float32 in [0, 2) and ragged lengths ``(B,)``; item 0 is ``F x F`` (the longest
    diagonal, ``F`` cells, sets the block size)."""
    g = torch.Generator().manual_seed(frames)
    lx = torch.tensor([frames, frames * 3 // 4, frames, frames // 2])[:batch]
    ly = torch.tensor([frames, frames, frames * 2 // 3, frames // 2 + 11])[:batch]
    return torch.rand(batch, frames, frames, generator=g) * 2, lx, ly


def _sdtw_run(D: torch.Tensor, lx, ly, backend: str, rounds: int = 1):
    """``(values (B,), dD (B, F, F), seconds)``: forward and backward of ``sum_b w_b sdtw_b``, the median time of
    ``rounds`` runs."""
    from fairseq_mtssl.losses.soft_dtw import soft_dtw

    w = torch.linspace(0.5, 2.0, D.size(0), dtype=D.dtype, device=D.device)
    times = []
    for _ in range(rounds):
        Dg = D.clone().requires_grad_(True)
        _sync(D.device)
        t0 = time.perf_counter()
        v = soft_dtw(Dg, lx, ly, 0.1, backend=backend)
        (v * w).sum().backward()
        _sync(D.device)
        times.append(time.perf_counter() - t0)
    return v.detach(), Dg.grad, sorted(times)[len(times) // 2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kernel_limits() -> str:
    """Registers a thread and the most threads a block of each compiled CUDA kernel (every signature so far)."""
    from fairseq_mtssl.losses import soft_dtw_kernels as k

    parts = []
    for name in ("forward_cuda", "backward_cuda"):
        for argtypes, compiled in getattr(k, name).overloads.items():
            dtype = getattr(argtypes[0], "dtype", "?")
            parts.append(
                f"{name}[{dtype}] {compiled.regs_per_thread} regs, <= {compiled.max_threads_per_block} threads"
            )
    return "; ".join(parts)


def check_soft_dtw(device: torch.device) -> List[Dict[str, object]]:
    """Part (a): one row per sequence length."""
    from fairseq_mtssl.losses import soft_dtw as sdtw

    reason = sdtw._cuda_unavailable(device)
    if reason is not None:
        return [{"frames": f, "ok": False, "error": f"CUDA kernel unavailable: {reason}"} for f in SDTW_FRAMES]
    cpu_backend = "numba" if sdtw._kernels() is not None else "torch"
    k = sdtw._kernels()
    rows = []
    for frames in SDTW_FRAMES:
        D, lx, ly = _sdtw_problem(frames)
        row: Dict[str, object] = {"frames": frames, "lengths": [lx.tolist(), ly.tolist()]}
        try:
            ref_v, ref_g, row["cpu_s"] = _sdtw_run(D.double(), lx, ly, cpu_backend)
            Dc = D.to(device)
            t0 = time.perf_counter()
            _sdtw_run(Dc, lx, ly, "cuda")  # compiles for these types on the first length
            row["first_call_s"] = time.perf_counter() - t0
            v, g, row["cuda_s"] = _sdtw_run(Dc, lx, ly, "cuda", rounds=3)
            _, _, row["torch_loop_cuda_s"] = _sdtw_run(Dc, lx, ly, "torch")
            row["block"] = k.cuda_block_size(lx.numpy(), ly.numpy(), _compiled_limit(k, Dc, lx, ly))
            row["value_rel_err"] = float(((v.double().cpu() - ref_v) / ref_v.abs()).abs().max())
            row["grad_rel_err"] = float((g.double().cpu() - ref_g).abs().max() / ref_g.abs().max())
            row["ok"] = bool(row["value_rel_err"] <= SDTW_VALUE_TOL and row["grad_rel_err"] <= SDTW_GRAD_TOL)
        except Exception as e:  # a launch that fails (out of resources, ...) is what this part looks for
            row.update(ok=False, error=f"{type(e).__name__}: {e}")
        rows.append(row)
    try:
        rows[-1]["kernels"] = _kernel_limits()
    except Exception as e:
        rows[-1]["kernels"] = f"unknown ({type(e).__name__}: {e})"
    return rows


def _compiled_limit(k, D: torch.Tensor, lx: torch.Tensor, ly: torch.Tensor) -> int:
    """The block limit of the forward kernel compiled for ``D``'s dtype, as :func:`soft_dtw._launch_cuda` asks it."""
    from fairseq_mtssl.losses import soft_dtw as sdtw

    B, N, M = D.shape
    R = torch.empty(B, N + 2, M + 2, dtype=torch.float64, device=D.device)
    lxd, lyd = lx.to(D.device), ly.to(D.device)
    args = tuple(sdtw._as_kernel_array(t) for t in (D, lxd, lyd))
    return k.kernel_thread_limit(k.forward_cuda, (*args, 0.1, sdtw._as_kernel_array(R)))


# --------------------------------------------------------------------------------- (b) speech-image loss
def _vgs_inputs(scale: float, seed: int = 0):
    """Paired embeddings ``speech, image (B, 768)``, entries ``scale * N(0, 1)``, each pair correlated by 0.05 (so
    that negatives still compete: a loss well above 0), two captions per image (``image_ids (B,)``)."""
    g = torch.Generator().manual_seed(seed)
    speech = torch.randn(VGS_BATCH, VGS_DIM, generator=g)
    image = 0.05 * speech + (1 - 0.05**2) ** 0.5 * torch.randn(VGS_BATCH, VGS_DIM, generator=g)
    return scale * speech, scale * image, torch.arange(VGS_BATCH) // 2


def _vgs_loss_and_grads(speech, image, ids, kind: str, similarity: str):
    from fairseq_mtssl.losses.speech_image import speech_image_loss

    s, i = speech.clone().requires_grad_(True), image.clone().requires_grad_(True)
    loss = speech_image_loss(s, i, ids, kind=kind, similarity=similarity, gather=False)
    loss.backward()
    return loss.detach(), torch.cat([s.grad, i.grad])


def check_speech_image(device: torch.device) -> List[Dict[str, object]]:
    """Part (b): one row per loss; the float64 reference runs on the same half-rounded values."""
    rows = []
    for kind, similarity, scale in VGS_CASES:
        speech, image, ids = _vgs_inputs(scale)
        speech, image, ids = speech.half().to(device), image.half().to(device), ids.to(device)
        norm = float(speech.float().norm(dim=1).mean())
        row: Dict[str, object] = {"loss": f"{kind}, {similarity}, norm ~ {norm:.0f}"}
        try:
            v16, g16 = _vgs_loss_and_grads(speech, image, ids, kind, similarity)
            v64, g64 = _vgs_loss_and_grads(speech.double(), image.double(), ids, kind, similarity)
            row["dtype"] = str(v16.dtype).replace("torch.", "")
            row["value"] = float(v16)
            row["finite"] = bool(torch.isfinite(v16).all() and torch.isfinite(g16).all())
            row["value_rel_err"] = float((v16.double() - v64).abs() / v64.abs().clamp(min=1e-12))
            row["grad_rel_err"] = float((g16.double() - g64).abs().max() / g64.abs().max())
            row["ok"] = bool(
                row["finite"] and row["value_rel_err"] <= VGS_VALUE_TOL and row["grad_rel_err"] <= VGS_GRAD_TOL
            )
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {e}")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ (c) fp16 training
class Commands:
    """Runs the plugin's and fairseq's console scripts of this environment, recording each in ``commands.sh``."""

    def __init__(self, out: Path):
        self.log = out / "commands.sh"
        self.log.write_text("#!/bin/sh\n# written by benchmarks/gpu_check.py\n")
        self.env = {k: v for k, v in os.environ.items() if k != "MTSSL_SOFT_DTW_BACKEND"}
        self.env["PYTHONUNBUFFERED"] = "1"

    def run(self, *args, timeout: float = 600, output: Optional[Path] = None) -> subprocess.CompletedProcess:
        exe = BIN / str(args[0])
        cmd = [str(exe) if exe.exists() else str(args[0]), *map(str, args[1:])]
        with open(self.log, "a") as f:
            f.write(shlex.join(cmd) + "\n")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        if output is not None:
            output.write_text(proc.stdout + proc.stderr)
        return proc

    def check(self, *args, timeout: float = 600) -> None:
        proc = self.run(*args, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def prepare_data(cmds: Commands, data: Path) -> Dict[str, Path]:
    """The tiny embedded corpus, its manifests with scene features, and MFCC k-means (k = 20) labels, as
    ``tests/conftest.py`` builds them; returns ``{"manifests": ..., "labels": ...}``."""
    corpus, manifests, feats, labels = data / "corpus", data / "manifests", data / "mfcc", data / "km"
    cmds.check("mtssl-synth-corpus", "--out", corpus, "--hours", "0.03", "--seed", "3")
    cmds.check("mtssl-manifest-corpus", corpus, "--dest", manifests)
    for split in SPLITS:
        cmds.check(
            "mtssl-image-features",
            "--images",
            manifests / f"{split}.images",
            "--root",
            corpus,
            "--out",
            manifests / split,
        )
    cmds.check("mtssl-dump-features", manifests / "train.tsv", feats, "--feature", "mfcc")
    cmds.check("mtssl-learn-kmeans", feats, "train", "1", data / "km.npy", "--n-clusters", "20")
    for split in SPLITS:
        cmds.check(
            "mtssl-apply-kmeans", data / "km.npy", labels, "--manifest", manifests / f"{split}.tsv", "--feature", "mfcc"
        )
    return {"manifests": manifests, "labels": labels}


def train_command(
    method: str,
    data: Dict[str, Path],
    run_dir: Path,
    upstream: Optional[Path] = None,
    overrides: Sequence[str] = TRAIN_OVERRIDES,
) -> List[str]:
    """The ``fairseq-hydra-train`` command of ``method``'s tiny config on ``data`` (:func:`prepare_data`)."""
    from fairseq_mtssl.config import config_dir

    folder, name, needs_upstream = METHODS[method]
    cmd = [
        "fairseq-hydra-train",
        "--config-dir",
        str(config_dir(folder)),
        "--config-name",
        name,
        f"common.user_dir={PACKAGE_DIR}",
        f"task.data={data['manifests']}",
        f"hydra.run.dir={run_dir}",
    ]
    labels = [f"task.label_dir={data['labels']}", 'task.labels=["km"]']
    if method == "hubert":
        cmd += [*labels, "model.label_rate=100"]
    elif method == "mt4ssl":
        cmd += [*labels, "task.label_rate=100"]
    if needs_upstream:
        if upstream is None:
            raise ValueError(f"{method} needs an upstream checkpoint")
        cmd.append(f"model.upstream_path={upstream}")
    return cmd + list(overrides)


_LOSS = re.compile(r"(?:^|[\s,|])loss[=\s]\s*([-+\w.]+)")


def last_loss(log_text: str) -> Optional[float]:
    """The last training loss a fairseq log reports (``[train_inner]`` ``loss=...`` or ``[train]`` ``| loss ...``;
    ``nan`` and ``inf`` included), or None."""
    found = None
    for line in log_text.splitlines():
        if "[train_inner]" in line or "[train]" in line:
            m = _LOSS.search(line.split(" - ", 1)[-1])
            if m:
                try:
                    found = float(m.group(1))
                except ValueError:
                    pass
    return found


def train(cmds: Commands, method: str, data: Dict[str, Path], out: Path, upstream: Optional[Path] = None):
    """One training of part (c); its row: finished, last loss (finite), fp16 overflows, seconds, checkpoint."""
    from fairseq_mtssl.jobs.training_log import latest_update

    run_dir = out / "train" / method
    run_dir.mkdir(parents=True, exist_ok=True)
    row: Dict[str, object] = {"method": method}
    t0 = time.perf_counter()
    try:
        proc = cmds.run(
            *train_command(method, data, run_dir, upstream), timeout=TRAIN_TIMEOUT_S, output=run_dir / "output.txt"
        )
        row["returncode"] = proc.returncode
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        row["returncode"] = f"timeout {TRAIN_TIMEOUT_S} s"
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    row["seconds"] = time.perf_counter() - t0
    log = run_dir / "hydra_train.log"
    log_text = log.read_text(errors="replace") if log.exists() else text
    row["updates"] = latest_update(log) if log.exists() else None
    row["finished"] = row["returncode"] == 0 and (row["updates"] or 0) >= UPDATES
    row["last_loss"] = last_loss(log_text)
    row["loss_finite"] = row["last_loss"] is not None and math.isfinite(row["last_loss"])
    row["fp16_overflows"] = log_text.count("gradient overflow detected")
    ckpt = run_dir / "checkpoints" / "checkpoint_last.pt"
    row["checkpoint"] = str(ckpt) if ckpt.exists() else None
    if not row["finished"]:
        row["error_tail"] = text[-1500:]
    row["ok"] = bool(row["finished"] and row["loss_finite"])
    return row


def check_training(out: Path) -> List[Dict[str, object]]:
    """Part (c): the data, then each method's 20 fp16 updates (SCORE and SUPERB PR on the HuBERT trained here)."""
    cmds = Commands(out)
    t0 = time.perf_counter()
    try:
        data = prepare_data(cmds, out / "data")
    except Exception as e:
        return [{"method": "data", "ok": False, "error": f"{type(e).__name__}: {e}"[-1500:]}]
    rows = [{"method": "data", "ok": True, "finished": True, "seconds": time.perf_counter() - t0}]
    upstream = None
    for method, (_, _, needs_upstream) in METHODS.items():
        if needs_upstream and upstream is None:
            rows.append({"method": method, "ok": False, "error": "no HuBERT checkpoint to start from"})
            continue
        row = train(cmds, method, data, out, upstream)
        if method == "hubert" and row["checkpoint"]:
            upstream = Path(row["checkpoint"])
        rows.append(row)
        print(f"  trained {method}: {'ok' if row['ok'] else 'FAILED'} in {row['seconds']:.0f} s", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ report
def _fmt(v, spec: str = ".2e") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def report(results: Dict[str, List[Dict[str, object]]]) -> str:
    parts = []
    if "soft_dtw" in results:
        rows = results["soft_dtw"]
        parts.append(
            "(a) soft-DTW CUDA kernels against the CPU reference (batch 4, float32 costs, forward + backward)\n\n"
            + _table(
                [
                    "frames",
                    "ok",
                    "value rel err",
                    "grad rel err",
                    "block",
                    "CUDA s",
                    "first call s",
                    "torch loop (CUDA) s",
                    "loop / kernel",
                    "CPU reference s",
                    "error",
                ],
                [
                    [
                        str(r["frames"]),
                        _fmt(r.get("ok")),
                        _fmt(r.get("value_rel_err")),
                        _fmt(r.get("grad_rel_err")),
                        _fmt(r.get("block")),
                        _fmt(r.get("cuda_s"), ".4f"),
                        _fmt(r.get("first_call_s"), ".2f"),
                        _fmt(r.get("torch_loop_cuda_s"), ".3f"),
                        _fmt(r["torch_loop_cuda_s"] / r["cuda_s"], ".1f")
                        if "cuda_s" in r and "torch_loop_cuda_s" in r
                        else "-",
                        _fmt(r.get("cpu_s"), ".3f"),
                        str(r.get("error", "")).replace("\n", " ")[:200],
                    ]
                    for r in rows
                ],
            )  # fmt: skip
            + (f"\n\ncompiled kernels: {rows[-1]['kernels']}" if rows and rows[-1].get("kernels") else "")
        )
    if "speech_image" in results:
        parts.append(
            f"(b) VGS speech-image loss, half CUDA inputs ({VGS_BATCH} x {VGS_DIM}) against float64\n\n"
            + _table(
                ["loss", "ok", "output dtype", "finite", "value", "value rel err", "grad rel err", "error"],
                [
                    [
                        str(r["loss"]),
                        _fmt(r.get("ok")),
                        _fmt(r.get("dtype")),
                        _fmt(r.get("finite")),
                        _fmt(r.get("value"), ".4f"),
                        _fmt(r.get("value_rel_err")),
                        _fmt(r.get("grad_rel_err")),
                        str(r.get("error", ""))[:200],
                    ]
                    for r in results["speech_image"]
                ],
            )  # fmt: skip
        )
    if "training" in results:
        parts.append(
            f"(c) {UPDATES} fp16 updates on cuda:0, ddp_backend=c10d (tiny configs, embedded corpus of 0.03 h)\n\n"
            + _table(
                ["method", "finished", "updates", "last loss", "loss finite", "fp16 overflows", "seconds", "error"],
                [
                    [
                        str(r["method"]),
                        _fmt(r.get("finished", False)),
                        _fmt(r.get("updates")),
                        _fmt(r.get("last_loss"), ".4g"),
                        _fmt(r.get("loss_finite")),
                        _fmt(r.get("fp16_overflows")),
                        _fmt(r.get("seconds"), ".1f"),
                        " ".join(str(r.get("error") or r.get("error_tail") or "").split())[-200:],
                    ]
                    for r in results["training"]
                ],
            )  # fmt: skip
        )
    return "\n\n".join(parts)


def machine() -> str:
    name = torch.cuda.get_device_name(0)
    cap = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        import numba

        nb = numba.__version__
    except ImportError:
        nb = "not installed"
    return f"{name} (compute {cap}), torch {torch.__version__} (CUDA {torch.version.cuda}), numba {nb}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "runs" / "gpu_check"), help="folder for the data, runs and tables")
    p.add_argument("--skip-train", action="store_true", help="parts (a) and (b) only, no data and no training")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(SKIP_MESSAGE, flush=True)
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    start = time.perf_counter()
    print(f"gpu_check on {machine()}; output in {out}", flush=True)
    results: Dict[str, List[Dict[str, object]]] = {}
    print("(a) soft-DTW kernels ...", flush=True)
    results["soft_dtw"] = check_soft_dtw(device)
    print("(b) speech-image loss ...", flush=True)
    results["speech_image"] = check_speech_image(device)
    if not args.skip_train:
        print("(c) fp16 training: data, then one method after another ...", flush=True)
        results["training"] = check_training(out)
    table = report(results)
    total = time.perf_counter() - start
    ok = all(r.get("ok") for rows in results.values() for r in rows)
    summary = f"gpu_check: {'all checks passed' if ok else 'SOME CHECKS FAILED'} in {total:.0f} s on {machine()}"
    print("\n" + table + "\n\n" + summary, flush=True)
    (out / "gpu_check.md").write_text(table + "\n\n" + summary + "\n")
    (out / "gpu_check.json").write_text(
        json.dumps({"machine": machine(), "seconds": total, "results": results}, indent=1, default=str)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
