"""Training-step time of MT4SSL vs fairseq's data2vec and HuBERT on the same batch and model size.

    .venv/bin/python benchmarks/bench_mt4ssl_step.py [--layers 4 --dim 256 --batch 4 --seconds 2]

One step = forward, backward and the EMA teacher update (data2vec, MT4SSL). The three models are
timed in interleaved rounds (so machine noise hits all alike); medians and ratios are printed.
MT4SSL uses both targets (regression + one k-means label set), data2vec its regression only, HuBERT
its masked prediction of the same labels.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fairseq.data import Dictionary
from fairseq.data.data_utils import compute_mask_indices
from fairseq.examples.data2vec.models.data2vec_audio import Data2VecAudioConfig, Data2VecAudioModel
from fairseq.models.hubert import HubertConfig, HubertModel
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

from fairseq_mtssl.models.mt4ssl import MT4SSLConfig, MT4SSLModel
from fairseq_mtssl.models.weight_norm import detach_weight_norm_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ratios import record  # noqa: E402


def encoder_cfg(a):
    return dict(
        extractor_mode="layer_norm",
        conv_feature_layers=f"[({a.conv},10,5)] + [({a.conv},3,2)] * 4 + [({a.conv},2,2)] * 2",
        encoder_layers=a.layers,
        encoder_embed_dim=a.dim,
        encoder_ffn_embed_dim=4 * a.dim,
        encoder_attention_heads=4,
        conv_pos=64,
        conv_pos_groups=16,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        dropout_input=0.0,
        dropout_features=0.0,
        mask_prob=0.65,
        mask_length=10,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--conv", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--rounds", type=int, default=12)
    a = p.parse_args()
    torch.manual_seed(0)
    enc = encoder_cfg(a)
    d2v_extra = dict(
        average_top_k_layers=min(8, a.layers),
        instance_norm_target_layer=True,
        ema_anneal_end_step=1000,
        max_update=1000,
    )
    d2v = Data2VecAudioModel(Data2VecAudioConfig(**enc, **d2v_extra))
    mt = MT4SSLModel(MT4SSLConfig(**enc, **d2v_extra), [a.clusters + 4], [50.0], [1])
    mt.load_state_dict(d2v.state_dict(), strict=False)
    for m in (d2v, mt):
        detach_weight_norm_weights(m)
        m.set_num_updates(1)
    d = Dictionary()
    for i in range(a.clusters):
        d.add_symbol(str(i))
    hub = HubertModel(HubertConfig(**enc, label_rate=50), HubertPretrainingConfig(labels=["km"], label_rate=50), [d])

    samples = int(a.seconds * 16000)
    source = torch.randn(a.batch, samples)
    T = int(d2v._get_feat_extract_output_lengths(torch.tensor(samples)))
    np.random.seed(0)
    mask = torch.from_numpy(compute_mask_indices((a.batch, T), None, 0.65, 10, min_masks=2))
    labels = torch.randint(4, a.clusters + 4, (a.batch, T))

    def step_d2v():
        d2v.train()
        loss = d2v(source, None, mask_indices=mask)["losses"]["regression"]
        loss.backward()
        d2v.set_num_updates(2)

    def step_mt():
        mt.train()
        loss = sum(mt(source, None, target_list=[labels], mask_indices=mask)["losses"].values())
        loss.backward()
        mt.set_num_updates(2)

    def step_hubert():
        hub.train()
        out = hub(source, target_list=[labels], padding_mask=torch.zeros_like(source, dtype=torch.bool))
        logits, targets = hub.get_logits(out, True), hub.get_targets(out, True)
        loss = (
            sum(F.cross_entropy(lg, tg, reduction="sum") for lg, tg in zip(logits, targets)) + 10 * out["features_pen"]
        )
        loss.backward()

    steps = {"data2vec": step_d2v, "mt4ssl": step_mt, "hubert": step_hubert}
    times = {k: [] for k in steps}
    for f in steps.values():  # warm-up
        f()
    for _ in range(a.rounds):
        for name, f in steps.items():
            for m in (d2v, mt, hub):
                m.zero_grad(set_to_none=True)
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"batch {a.batch} x {a.seconds:g} s, {a.layers} layers x {a.dim}, conv {a.conv}, k={a.clusters}, "
        f"torch threads {torch.get_num_threads()}, {a.rounds} interleaved rounds"
    )
    print(f"{'model':<10} {'median step s':>14}")
    for k, v in med.items():
        print(f"{k:<10} {v:14.4f}")
    print(f"mt4ssl / data2vec = {med['mt4ssl'] / med['data2vec']:.3f}   (target <= 1.05)")
    print(f"mt4ssl / hubert   = {med['mt4ssl'] / med['hubert']:.3f}")
    record("mt4ssl_step", "MT4SSL step / data2vec step", med["mt4ssl"] / med["data2vec"], "<= 1.05")
    record("mt4ssl_step", "MT4SSL step / HuBERT step", med["mt4ssl"] / med["hubert"])


if __name__ == "__main__":
    main()
