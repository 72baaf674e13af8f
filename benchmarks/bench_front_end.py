"""The channels-last conv front end (fairseq_mtssl.upstream.frontend) against fairseq's own on CPU.

    .venv/bin/python benchmarks/bench_front_end.py [--rounds 3 --batch 24 --seconds 4 --threads 1]

The peer is fairseq's ``ConvFeatureExtractionModel`` in ``layer_norm`` mode, the front end of every tiny
config (``[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2``). Three figures, each a median time ratio
channels-last / fairseq over interleaved rounds on the same batch (default: the VGS configs' 24 captions
of 4 s, the main job's 1 thread per training):

- the front end alone, forward and backward;
- a whole wav2vec 2.0 training step (forward, fairseq's ``wav2vec`` criterion, backward, Adam) of the
  model in ``vgs_ssl_tiny_cpu.yaml`` (its wav2vec 2.0 part);
- the same model's forward without gradients (evaluation: every layer's hidden states).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from fairseq.criterions.wav2vec_criterion import Wav2vecCriterion
from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model
from omegaconf import OmegaConf

from fairseq_mtssl.config import config_dir
from fairseq_mtssl.upstream.frontend import ChannelsLastFrontEnd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ratios import record  # noqa: E402


def tiny_wav2vec2() -> Wav2Vec2Model:
    """The wav2vec 2.0 of vgs_ssl_tiny_cpu.yaml (its model section, VGS fields left out), fairseq's front end."""
    section = OmegaConf.load(Path(config_dir("vgs")) / "vgs_ssl_tiny_cpu.yaml")["model"]
    fields = set(Wav2Vec2Config.__dataclass_fields__)
    return Wav2Vec2Model(Wav2Vec2Config(**{k: v for k, v in section.items() if k in fields and k != "_name"}))


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    peer = tiny_wav2vec2()  # fairseq's front end
    torch.manual_seed(0)
    ours = tiny_wav2vec2()  # the same weights
    ours.feature_extractor = ChannelsLastFrontEnd(ours.feature_extractor)
    source = torch.randn(a.batch, int(a.seconds * 16000))
    padding = torch.zeros_like(source, dtype=torch.bool)
    padding[a.batch // 2 :, int(0.7 * source.size(1)) :] = True  # half the batch 30 % shorter, as in a real batch
    ids = torch.arange(a.batch)
    criterion = Wav2vecCriterion(None, infonce=True, loss_weights=[0.1, 10.0])
    optim = {id(m): torch.optim.Adam(m.parameters(), 1e-5) for m in (ours, peer)}

    def front_end(m):
        m.feature_extractor(source).pow(2).mean().backward()
        m.zero_grad(set_to_none=True)

    def step(m):
        m.train()
        loss, _, _ = criterion(m, {"net_input": {"source": source, "padding_mask": padding}, "id": ids})
        loss.backward()
        optim[id(m)].step()
        optim[id(m)].zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward(m):
        m.eval()
        m.extract_features(source, padding, mask=False)

    figures = {"front end fwd+bwd": front_end, "training step": step, "forward, no grad": forward}
    times = {(name, side): [] for name in figures for side in ("channels-last", "fairseq")}
    for fn in figures.values():  # warm-up: oneDNN kernels, allocator
        fn(ours), fn(peer)
    for _ in range(a.rounds):
        for name, fn in figures.items():
            times[(name, "channels-last")].append(timed(fn, ours))
            times[(name, "fairseq")].append(timed(fn, peer))
    print(f"batch {a.batch} x {a.seconds} s, {a.threads} thread(s), {a.rounds} interleaved rounds, medians:")
    for name in figures:
        mine, theirs = statistics.median(times[(name, "channels-last")]), statistics.median(times[(name, "fairseq")])
        ratio = mine / theirs
        print(f"  {name:<20} channels-last {mine:7.3f} s   fairseq {theirs:7.3f} s   ratio {ratio:.3f}")
        record(
            "front_end",
            f"channels-last / fairseq front end: {name}, tiny config, {a.batch} x {a.seconds:g} s",
            round(ratio, 3),
        )


if __name__ == "__main__":
    main()
