"""VGS+SSL training step against a plain wav2vec 2.0 step on the same audio; retrieval at SpokenCOCO size.

    .venv/bin/python benchmarks/bench_vgs.py [--preset base --batch 2 --seconds 4 --arch fast_vgs_plus]

Step = forward, loss, backward, with fairseq's ``wav2vec`` criterion (InfoNCE + diversity) on fairseq's
plain ``Wav2Vec2Model`` (the peer, same configuration) and the plugin's ``vgs_ssl`` (av_weight 0.5: the
same wav2vec 2.0 loss plus the speech-image loss from layer ``vgs_layer`` of the same masked forward) on
``wav2vec2_vgs`` with the ``--arch`` heads (``fast_vgs_plus``: the CLS token inside wav2vec 2.0 too);
one fixed mask for both; interleaved rounds, medians. Retrieval: recall@1/5/10 both ways for 25,000 captions x 5,000 images (random
768-dim embeddings), timed.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from fairseq.criterions.wav2vec_criterion import Wav2vecCriterion
from fairseq.data.data_utils import compute_mask_indices
from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Model

from fairseq_mtssl.criterions.vgs_criterion import VgsSslCriterion
from fairseq_mtssl.evaluation.retrieval import recall_at_k
from fairseq_mtssl.models.wav2vec2_vgs import Wav2Vec2VgsConfig, Wav2Vec2VgsModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ratios import record  # noqa: E402

PRESETS = {
    "base": dict(
        encoder_layers=12,
        encoder_embed_dim=768,
        vgs_layer=8,
        vgs_dim=768,
        audio_downsample=4,
        image_layers=6,
        image_dim=2052,
        regions=36,
    ),  # fast_vgs_plus: the paper's heads (widths 128/256/512/768, 12 heads, FFN 3072)
    "small": dict(
        encoder_layers=4,
        encoder_embed_dim=256,
        encoder_ffn_embed_dim=1024,
        encoder_attention_heads=4,
        vgs_layer=3,
        vgs_dim=256,
        vgs_heads=4,
        vgs_ffn_dim=1024,
        audio_widths=[64, 128, 192, 256],
        audio_downsample=2,
        image_layers=2,
        image_dim=68,
        regions=16,
        conv_feature_layers="[(128,10,5)] + [(128,3,2)] * 4 + [(128,2,2)] * 2",
        extractor_mode="layer_norm",
    ),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="base")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--arch", choices=["fast_vgs_plus", "light"], default="fast_vgs_plus")
    a = p.parse_args()
    torch.manual_seed(0)
    preset = dict(PRESETS[a.preset])
    regions = preset.pop("regions")
    cfg = Wav2Vec2VgsConfig(
        **preset, vgs_arch=a.arch, quantize_targets=True, final_dim=256, encoder_layerdrop=0.0, feature_grad_mult=0.1
    )
    model = Wav2Vec2VgsModel(cfg).train()
    plain = Wav2Vec2Model(cfg).train()  # the peer: fairseq's wav2vec 2.0, no CLS token, no heads
    task = SimpleNamespace()
    w2v_crit = Wav2vecCriterion(task, infonce=True, loss_weights=[0.1, 10], log_keys=[])
    vgs_crit = VgsSslCriterion(task, infonce=True, loss_weights=[0.1, 10], log_keys=[], av_weight=0.5)
    source = torch.randn(a.batch, int(a.seconds * 16000))
    frames = int(plain._get_feat_extract_output_lengths(torch.tensor(source.size(1))))
    mask = torch.from_numpy(compute_mask_indices((a.batch, frames), None, 0.65, 10, min_masks=2))
    w2v_sample = {"id": torch.arange(a.batch), "net_input": {"source": source, "mask_indices": mask}}
    vgs_sample = {
        "id": torch.arange(a.batch),
        "image_ids": torch.arange(a.batch),
        "net_input": {
            "source": source,
            "mask_indices": mask,
            "image_feats": torch.randn(a.batch, regions, cfg.image_dim),
            "image_padding_mask": torch.zeros(a.batch, regions, dtype=torch.bool),
        },
    }

    def step(crit, net, sample):
        loss, _, _ = crit(net, sample)
        loss.backward()
        net.zero_grad(set_to_none=True)

    runs = {
        "wav2vec 2.0": lambda: step(w2v_crit, plain, w2v_sample),
        "VGS+SSL": lambda: step(vgs_crit, model, vgs_sample),
    }
    times = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(a.rounds):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"wav2vec 2.0 {a.preset} (+ {a.arch} VGS heads), batch {a.batch} x {a.seconds:.1f} s, {torch.get_num_threads()} threads, median of {a.rounds}"
    )
    for k, v in med.items():
        print(f"  {k:<12} {v:8.3f} s")
    print(f"  VGS+SSL step / wav2vec 2.0 step   {med['VGS+SSL'] / med['wav2vec 2.0']:.3f}   (target <= 1.2)")
    record("vgs", "VGS+SSL step / wav2vec 2.0 step", med["VGS+SSL"] / med["wav2vec 2.0"], "<= 1.2")

    speech = torch.nn.functional.normalize(torch.randn(25000, 768), dim=1)
    images = torch.nn.functional.normalize(torch.randn(5000, 768), dim=1)
    t = time.perf_counter()
    recall_at_k(speech, images, torch.arange(25000) % 5000)
    seconds = time.perf_counter() - t
    print(f"retrieval recall@1/5/10 both ways, 25,000 captions x 5,000 images: {seconds:.2f} s")
    record("vgs", "retrieval 25k captions x 5k images, seconds", seconds, "<= 10")


if __name__ == "__main__":
    main()
