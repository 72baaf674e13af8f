"""SCORE, LASER and SPIN training steps side by side: one upstream, one batch, interleaved rounds.

    .venv/bin/python benchmarks/bench_content_step.py [--preset base --batch 2 --seconds 3 --rounds 5 --threads 2]
    .venv/bin/python benchmarks/bench_content_step.py --preset tiny --batch 1 --seconds 1 --rounds 1   # smoke size

Each method wraps its own copy of the same HuBERT (``--preset base``: HuBERT Base's architecture built from
fairseq's ``HubertConfig``, 12 x 768, group-normed front end, random weights; every copy built from the same
seed, so the weights are equal; ``small`` and ``tiny`` are smaller, layer-normed front ends), with the
methods' own models and criteria as the paper configs set them, and the same utterances:
  score   the authors' trainable set (top 2 layers, both LayerNorms; final_proj, mask_emb and
          label_embs_concat named but left frozen), frozen teacher on the perturbed copy, projection
          768 -> 256, soft-DTW divergence / (len_x + len_y)
  laser   LASER's trainable set (top 2 layers, encoder.layer_norm), no teacher: both sides through the
          student, projection 768 -> 256, soft-DTW divergence + 0.4 x the temporal regulariser (sigma 0,
          margin 1.1)
  spin    SPIN: top 2 layers trainable, the rest under no_grad, both views through the student, head
          768 -> 256, 256 unit-norm prototypes, Sinkhorn (epsilon 0.02, 3 iterations), swapped prediction
          at temperature 0.1
A step is what fairseq's ``train_step`` runs, without the optimizer: ``set_num_updates`` (SPIN's codebook
renormalisation), the criterion's forward (model and loss) and the backward, gradients then dropped. The
perturbed copy of SCORE's and LASER's pairs is as long as the mean over the speed factors 0.9/1.0/1.1 makes it
(as ``bench_score_step.py``); SPIN's speaker-perturbed copy keeps the utterance's length. The perturbations
themselves (data loading) are not timed. ``--threads`` sets torch's intra-op threads and numba's (the
soft-DTW kernels'). Wall and process-CPU medians are printed, and FLOPs from torch's
``FlopCounterMode`` (matmuls and convolutions, forward + backward; Sinkhorn's and soft-DTW's elementwise
work is not counted), with the ratios LASER / SCORE and SPIN / SCORE.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from fairseq.data import Dictionary
from fairseq.models.hubert import HubertConfig, HubertModel
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
from torch.utils.flop_counter import FlopCounterMode

from fairseq_mtssl.criterions.laser_criterion import LaserCriterion
from fairseq_mtssl.criterions.score_criterion import ScoreCriterion
from fairseq_mtssl.criterions.spin_criterion import SpinCriterion
from fairseq_mtssl.models.laser import LASER_TRAINABLE, LaserConfig, LaserModel
from fairseq_mtssl.models.score import AUTHORS_TRAINABLE, ScoreConfig, ScoreModel
from fairseq_mtssl.models.spin import SpinConfig, SpinModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_score_step import PRESETS as SCORE_PRESETS  # noqa: E402
from ratios import record  # noqa: E402

PRESETS = {
    **SCORE_PRESETS,
    "tiny": dict(  # hubert_tiny_cpu's architecture
        extractor_mode="layer_norm",
        encoder_layers=2,
        encoder_embed_dim=128,
        encoder_ffn_embed_dim=256,
        encoder_attention_heads=4,
        conv_pos=32,
        conv_pos_groups=16,
        conv_feature_layers="[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2",
    ),
}
METHODS = ("score", "laser", "spin")


def hubert(preset: str) -> HubertModel:
    """A fresh HuBERT of ``preset`` from seed 0 (every call gives the same weights), as bench_score_step's."""
    d = Dictionary()
    for i in range(100):
        d.add_symbol(str(i))
    torch.manual_seed(0)
    return HubertModel(
        HubertConfig(**PRESETS[preset], label_rate=50), HubertPretrainingConfig(labels=["km"], label_rate=50), [d]
    )


def build(preset: str, proj_dim: int = 256, clusters: int = 256):
    """``{method: (model in train mode, criterion)}``, each model on its own copy of the same upstream."""
    where = "(built in the benchmark)"
    score = ScoreModel(
        ScoreConfig(upstream_path=where, trainable=AUTHORS_TRAINABLE + ["label_embs_concat"], proj_dim=proj_dim),
        hubert(preset),
    )
    laser = LaserModel(
        LaserConfig(upstream_path=where, trainable=LASER_TRAINABLE + ["label_embs_concat"], proj_dim=proj_dim),
        hubert(preset),
    )
    spin = SpinModel(
        SpinConfig(upstream_path=where, trainable_layers=2, proj_dim=proj_dim, num_clusters=clusters), hubert(preset)
    )
    return {
        "score": (score.train(), ScoreCriterion(None, gamma=0.1)),
        "laser": (laser.train(), LaserCriterion(None, gamma=0.1, sigma=0, margin=1.1, alpha=0.4)),
        "spin": (spin.train(), SpinCriterion(None, epsilon=0.02, sinkhorn_iters=3, temperature=0.1)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="base")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    a = p.parse_args(argv)
    # numba's OpenMP pool, started by the first soft-DTW call, sets OpenMP's thread count to NUMBA_NUM_THREADS
    # (default: every core), which torch reads: give it the same count, and set torch's again after warm-up
    os.environ["NUMBA_NUM_THREADS"] = str(a.threads)
    torch.set_num_threads(a.threads)
    methods = build(a.preset)
    students = [m.student.state_dict() for m, _ in methods.values()]
    assert all(torch.equal(v, s[k]) for s in students[1:] for k, v in students[0].items()), "upstreams differ"

    g = torch.Generator().manual_seed(1)
    n = int(a.seconds * 16000)
    source = [torch.randn(n, generator=g) for _ in range(a.batch)]
    mean_stretch = sum(1 / f for f in (0.9, 1.0, 1.1)) / 3  # speed f makes the copy 1/f as long
    speed_copy = [torch.randn(int(n * mean_stretch), generator=g) for _ in range(a.batch)]
    speaker_copy = [torch.randn(n, generator=g) for _ in range(a.batch)]
    samples = {
        "score": {"net_input": {"source": source, "target_source": speed_copy}},
        "laser": {"net_input": {"source": source, "target_source": speed_copy}},
        "spin": {"net_input": {"source": source, "perturbed": speaker_copy}},
    }
    updates = {name: 0 for name in METHODS}

    def step(name: str) -> None:
        model, criterion = methods[name]
        updates[name] += 1
        model.set_num_updates(updates[name])  # what fairseq's train_step calls first (SPIN: unit-norm codebook)
        loss, _, _ = criterion(model, samples[name])
        loss.backward()
        for q in model.parameters():
            q.grad = None

    flops = {}
    for name in METHODS:  # what any implementation of the same step must compute (also warms up)
        with FlopCounterMode(display=False) as counter:
            step(name)
        flops[name] = counter.get_total_flops()
    for name in METHODS:  # warm-up outside the flop counter
        step(name)
    torch.set_num_threads(a.threads)
    times = {name: [] for name in METHODS}
    cpu = {name: [] for name in METHODS}  # process CPU time: less swayed than wall time on a shared machine
    for r in range(a.rounds):
        order = METHODS[r % 3 :] + METHODS[: r % 3]  # interleaved, each method first in turn
        for name in order:
            t, c = time.perf_counter(), time.process_time()
            step(name)
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    assert torch.get_num_threads() == a.threads, f"torch runs {torch.get_num_threads()} threads, not {a.threads}"
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    trainable = {k: sum(q.numel() for q in m.parameters() if q.requires_grad) for k, (m, _) in methods.items()}
    print(
        f"HuBERT {a.preset}, batch {a.batch} x {a.seconds:.1f} s, {torch.get_num_threads()} threads, "
        f"median of {a.rounds} interleaved rounds"
    )
    print(f"  {'':<6} {'wall':>8}   {'CPU':>8}   {'GFLOPs':>9}   trainable parameters")
    for k in METHODS:
        print(f"  {k:<6} {med[k]:8.3f} s {med_cpu[k]:8.3f} s {flops[k] / 1e9:9.2f}   {trainable[k]:,}")
    for other in ("laser", "spin"):
        label = other.upper()
        wall, cpu_ratio = med[other] / med["score"], med_cpu[other] / med_cpu["score"]
        flop_ratio = flops[other] / flops["score"]
        print(f"  {label} step / SCORE step   wall {wall:.3f}   CPU {cpu_ratio:.3f}   FLOPs {flop_ratio:.3f}")
        size = f"{a.preset}, {a.batch} x {a.seconds:g} s"
        record("content_step", f"{label} step / SCORE step, {size}", wall)
        record("content_step", f"the same in FLOPs, {size}", flop_ratio)


if __name__ == "__main__":
    main()
