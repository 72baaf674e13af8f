"""Label preparation speed: batched MFCC + k-means assignment vs straightforward per-utterance loops.

    .venv/bin/python benchmarks/bench_labels.py [--corpus runs/main/data/corpus] [--clusters 100]

All variants use the same centroids on the same utterances, measured side by side in one run:
  loop-knf    per utterance: read, kaldi-native-fbank MFCC (frame by frame), deltas, assign
              (HuBERT's simple_kmeans recipe with torchaudio replaced by kaldi-native-fbank)
  loop-same   per utterance: read, this package's MFCC on a batch of one, assign
  batched     mtssl-apply-kmeans --manifest: threaded reads, batched MFCC, one assignment per batch
It prints frames per second, the speed-up of `batched` over each loop, and label agreement.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
import soundfile as sf
import torch

from fairseq_mtssl.corpus.synth import ensure_corpus
from fairseq_mtssl.data.manifest import read_manifest
from fairseq_mtssl.kmeans.apply_kmeans import CentroidAssigner, apply_to_audio
from fairseq_mtssl.kmeans.centroids import save_centroids
from fairseq_mtssl.upstream.readers import MfccReader
from fairseq_mtssl.kmeans.learn_kmeans import fairseq_minibatch_kmeans
from fairseq_mtssl.upstream.mfcc import batch_mfcc, deltas
from fairseq_mtssl.prep.corpus_manifest import build_corpus_manifests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ratios import record  # noqa: E402


def knf_features(wav: np.ndarray) -> np.ndarray:
    opts = knf.MfccOptions()
    opts.frame_opts.dither = 0.0
    opts.use_energy = False
    m = knf.OnlineMfcc(opts)
    m.accept_waveform(16000, wav.tolist())
    m.input_finished()
    base = torch.from_numpy(np.stack([m.get_frame(i) for i in range(m.num_frames_ready)]))[None]
    n = torch.tensor([base.shape[1]])
    d1 = deltas(base, n)
    return torch.cat([base, d1, deltas(d1, n)], -1)[0].numpy()


def loop(manifest, assigner, features):
    lines, frames = [], 0
    for i in range(len(manifest)):
        wav, _ = sf.read(manifest.audio_path(i), dtype="float32")
        feats = features(wav)
        frames += len(feats)
        lines.append(" ".join(map(str, assigner(feats))))
    return lines, frames


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=None, help="embedded corpus dir (built in a temp dir if absent)")
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--split", default="train")
    a = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(a.corpus) if a.corpus else Path(tmp) / "corpus"
        ensure_corpus(corpus, hours=0.5, seed=1) if not (corpus / "corpus.json").exists() else None
        build_corpus_manifests(corpus, Path(tmp) / "m")
        manifest_path = Path(tmp) / "m" / f"{a.split}.tsv"
        manifest = read_manifest(manifest_path)
        sample = batch_mfcc(
            [sf.read(manifest.audio_path(i), dtype="float32")[0] for i in range(min(200, len(manifest)))]
        )
        km = fairseq_minibatch_kmeans(a.clusters, n_init=3).fit(np.concatenate(sample))
        km_path = Path(tmp) / "km.npy"
        save_centroids(km_path, km.cluster_centers_, MfccReader().spec())
        assigner = CentroidAssigner(km.cluster_centers_)

        results = {}
        t = time.perf_counter()
        results["loop-knf"] = (*loop(manifest, assigner, knf_features), time.perf_counter() - t)
        t = time.perf_counter()
        results["loop-same"] = (*loop(manifest, assigner, lambda w: batch_mfcc([w])[0]), time.perf_counter() - t)
        t = time.perf_counter()
        out = apply_to_audio(km_path, Path(tmp) / "lab", manifest_path, MfccReader())
        elapsed = time.perf_counter() - t
        lines = out.read_text().splitlines()
        results["batched"] = (lines, sum(len(x.split()) for x in lines), elapsed)

        batched_labels = np.array(" ".join(lines).split(), dtype=int)
        print(
            f"{len(manifest)} utterances, {results['batched'][1]} frames, k={a.clusters}, torch threads={torch.get_num_threads()}"
        )
        print(
            f"{'variant':<10} {'seconds':>8} {'frames/s':>10} {'batched speed-up':>17} {'labels equal to batched':>24}"
        )
        for name, (lab, frames, secs) in results.items():
            other = np.array(" ".join(lab).split(), dtype=int)
            agree = np.mean(other == batched_labels) if len(other) == len(batched_labels) else float("nan")
            print(f"{name:<10} {secs:8.2f} {frames / secs:10.0f} {secs / results['batched'][2]:16.2f}x {agree:24.6f}")
        record(
            "labels", "batched speed-up over the knf per-utterance loop", results["loop-knf"][2] / results["batched"][2]
        )


if __name__ == "__main__":
    main()
