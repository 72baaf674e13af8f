"""Where a SUPERB-style downstream training step spends its time: the frozen upstream or the head.

    .venv/bin/python benchmarks/bench_superb_step.py [--batch 4 --seconds 4]

HuBERT Base architecture (random weights; speed does not depend on them) as the frozen upstream.
For the PR head (linear) and the ASR head (BiLSTM 2 x 1024): one training step (upstream hidden
states under no_grad, weighted sum, head, CTC, backward) against the upstream forward alone, in
interleaved rounds; medians.
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

from fairseq_mtssl.models.superb import SuperbDownstreamConfig, SuperbDownstreamModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ratios import record  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    d = Dictionary()
    upstream = HubertModel(HubertConfig(label_rate=50), HubertPretrainingConfig(labels=["km"], label_rate=50), [d])
    source = torch.randn(a.batch, int(a.seconds * 16000))
    targets = torch.randint(1, 40, (a.batch, int(a.seconds * 12)))
    models = {
        name: SuperbDownstreamModel(SuperbDownstreamConfig(upstream_path="-", downstream=kind), upstream, 42).train()
        for name, kind in (("PR (linear)", "linear"), ("ASR (BiLSTM)", "bilstm"))
    }

    def upstream_only():
        models["PR (linear)"].upstream_states(source, None)

    def step(model):
        out = model(source, None)
        logp = F.log_softmax(out["encoder_out"], -1)
        lengths = torch.full((a.batch,), logp.size(0), dtype=torch.long)
        F.ctc_loss(logp, targets, lengths, torch.full((a.batch,), targets.size(1), dtype=torch.long)).backward()
        model.zero_grad(set_to_none=True)

    runs = {"upstream forward": upstream_only, **{k: (lambda m=m: step(m)) for k, m in models.items()}}
    times = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for _ in range(a.rounds):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"HuBERT Base upstream, batch {a.batch} x {a.seconds:.1f} s, {torch.get_num_threads()} threads, median of {a.rounds}"
    )
    for k, v in med.items():
        share = f"   upstream share {med['upstream forward'] / v:.2f}" if k != "upstream forward" else ""
        print(f"  {k:<18} {v:8.3f} s{share}")
        if k != "upstream forward":
            record("superb_step", f"{k} step: upstream forward share", med["upstream forward"] / v, ">= 0.5")


if __name__ == "__main__":
    main()
