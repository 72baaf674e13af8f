"""A SCORE training step against a full HuBERT fine-tuning step, and soft-DTW's share of it.

    .venv/bin/python benchmarks/bench_score_step.py [--preset base --batch 2 --seconds 3]

Same HuBERT (``--preset base``: HuBERT Base's architecture, 12 x 768, group-normed front end),
same audio, timed in interleaved rounds; medians and ratios are printed.
  score      the authors' trainable set (top 2 layers, encoder.layer_norm and the front end's
             layer_norm, so the graph runs through every layer; conv front end without a graph):
             student forward, frozen teacher forward on the perturbed copy (its length the mean over
             the paper's speed factors 0.9/1.0/1.1), projection 768 -> 256, soft-DTW divergence, backward
  score-top2 the same with only the top 2 layers trainable (the bottom runs without a graph)
  finetune   HuBERT CTC fine-tuning as fairseq's recipes run it: masked forward, every transformer
             layer trainable (front end frozen, feature_grad_mult 0), linear head, CTC, backward
  soft-DTW   the divergence forward+backward alone, on the step's projections
Wall and process-CPU medians are both printed (CPU time is less swayed by other load).

Measured on the quiet 2-core machine (2026-12-02; benchmarks/README.md): SCORE / fine-tune 1.073 at
``--batch 1 --seconds 12`` (the paper config's one whole utterance), 1.243 at the default 2 x 3 s, with
0.98-0.99 of the fine-tuning step's FLOPs (torch's ``FlopCounterMode``, printed too); top 2 layers only
0.91-0.96; soft-DTW share 0.3-1.3 %.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from fairseq.data import Dictionary
from fairseq.models.hubert import HubertConfig, HubertModel
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig
from torch.utils.flop_counter import FlopCounterMode

from fairseq_mtssl.losses.soft_dtw import soft_dtw_divergence
from fairseq_mtssl.models.score import AUTHORS_TRAINABLE, ScoreConfig, ScoreModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ratios import record  # noqa: E402

PRESETS = {
    "base": dict(
        extractor_mode="default",
        encoder_layers=12,
        encoder_embed_dim=768,
        encoder_ffn_embed_dim=3072,
        encoder_attention_heads=12,
        conv_pos=128,
        conv_pos_groups=16,
    ),
    "small": dict(
        extractor_mode="layer_norm",
        encoder_layers=4,
        encoder_embed_dim=256,
        encoder_ffn_embed_dim=1024,
        encoder_attention_heads=4,
        conv_pos=64,
        conv_pos_groups=16,
        conv_feature_layers="[(128,10,5)] + [(128,3,2)] * 4 + [(128,2,2)] * 2",
    ),
}


def hubert(preset: str, **extra) -> HubertModel:
    d = Dictionary()
    for i in range(100):
        d.add_symbol(str(i))
    cfg = HubertConfig(**PRESETS[preset], label_rate=50, **extra)
    return HubertModel(cfg, HubertPretrainingConfig(labels=["km"], label_rate=50), [d])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="base")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)

    def score_model(trainable):
        cfg = ScoreConfig(upstream_path="(built in the benchmark)", trainable=trainable, proj_dim=256)
        return ScoreModel(cfg, hubert(a.preset)).train()

    variants = {
        "score": score_model(AUTHORS_TRAINABLE + ["label_embs_concat"]),
        "score-top2": score_model(["encoder.layers.-2", "encoder.layers.-1"]),
    }
    ft = hubert(a.preset, feature_grad_mult=0.0, mask_prob=0.65, mask_length=10).train()
    head = torch.nn.Linear(ft.encoder.embedding_dim, 32)
    ft_params = [q for q in ft.parameters() if q.requires_grad] + list(head.parameters())

    n = int(a.seconds * 16000)
    source = [torch.randn(n) for _ in range(a.batch)]
    mean_stretch = sum(1 / f for f in (0.9, 1.0, 1.1)) / 3  # speed f makes the copy 1/f as long
    perturbed = [torch.randn(int(n * mean_stretch)) for _ in range(a.batch)]
    ft_source = torch.randn(a.batch, n)
    targets = torch.randint(1, 32, (a.batch, int(a.seconds * 12)))  # ~12 characters per second
    held = {}

    def step_score(model):
        params = [q for q in model.parameters() if q.requires_grad]
        out = model(source, perturbed)
        held["out"] = {k: v.detach() for k, v in out.items()}
        loss = soft_dtw_divergence(
            out["student"], out["teacher"], out["student_lengths"], out["teacher_lengths"], 0.1
        ).sum()
        loss.backward()
        for q in params:
            q.grad = None

    def step_finetune():
        x, padding = ft.extract_features(ft_source, padding_mask=None, mask=True)
        logp = F.log_softmax(head(x), -1).transpose(0, 1)
        lengths = torch.full((a.batch,), logp.size(0), dtype=torch.long)
        loss = F.ctc_loss(logp, targets, lengths, torch.full((a.batch,), targets.size(1), dtype=torch.long))
        loss.backward()
        for q in ft_params:
            q.grad = None

    def step_sdtw():
        o = held["out"]
        x = o["student"].clone().requires_grad_(True)
        soft_dtw_divergence(x, o["teacher"], o["student_lengths"], o["teacher_lengths"], 0.1).sum().backward()

    steps = {name: (lambda m=m: step_score(m)) for name, m in variants.items()}
    steps.update({"finetune": step_finetune, "soft-DTW": step_sdtw})  # soft-DTW on the last score-top2 step
    flops = {}
    for name in ("score", "score-top2", "finetune"):  # what any implementation of the same step must compute
        with FlopCounterMode(display=False) as counter:
            steps[name]()
        flops[name] = counter.get_total_flops()
    times = {name: [] for name in steps}
    cpu = {name: [] for name in steps}  # process CPU time: less swayed than wall time on a shared machine
    for fn in steps.values():  # warm-up
        fn()
    for _ in range(a.rounds):
        for name, fn in steps.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(
        f"HuBERT {a.preset}, batch {a.batch} x {a.seconds:.1f} s, {torch.get_num_threads()} threads, median of {a.rounds} rounds"
    )
    print(f"  {'':<10} {'wall':>8}   {'CPU':>8}")
    for k, v in med.items():
        print(f"  {k:<10} {v:8.3f} s {med_cpu[k]:8.3f} s")
    print(f"  SCORE step / full fine-tune step   {med['score'] / med['finetune']:.3f}   (target <= 1)")
    print(
        f"    in FLOPs (torch's FlopCounterMode: matmuls and convolutions, forward + backward) "
        f"{flops['score'] / flops['finetune']:.3f}, top 2 only {flops['score-top2'] / flops['finetune']:.3f}"
    )
    print(f"    top 2 layers only                {med['score-top2'] / med['finetune']:.3f}")
    print(
        f"  the same in CPU time               {med_cpu['score'] / med_cpu['finetune']:.3f}, top 2 only "
        f"{med_cpu['score-top2'] / med_cpu['finetune']:.3f}"
    )
    print(f"  soft-DTW share of a SCORE step     {med['soft-DTW'] / med['score']:.3f}   (target <= 0.15)")
    record(
        "score_step",
        "SCORE step (authors' trainable set) / full HuBERT fine-tune step",
        med["score"] / med["finetune"],
        "<= 1",
    )
    record("score_step", "the same in FLOPs (forward + backward)", flops["score"] / flops["finetune"])
    record(
        "score_step", "SCORE step (top 2 layers only) / full HuBERT fine-tune step", med["score-top2"] / med["finetune"]
    )
    record("score_step", "soft-DTW share of a SCORE step", med["soft-DTW"] / med["score"], "<= 0.15")


if __name__ == "__main__":
    main()
