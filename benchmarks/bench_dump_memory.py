"""Peak memory of a model-feature dump as it reads more audio: the reader against the paths it replaced.

    .venv/bin/python benchmarks/bench_dump_memory.py [--hours 1.5] [--work DIR]

A tiny HuBERT (``hubert_tiny_cpu``'s architecture, random weights) with each front end, ``layer_norm``
and the group-normed ``default`` (HuBERT Base's), reads utterances of random lengths (1-15 s, white
noise; the lengths, not the content, decide the shapes), layer 2, one thread, each variant in a fresh
process with the jobs' malloc tunables:

  reader     what ``mtssl-dump-features`` runs now (:meth:`fairseq_mtssl.upstream.readers.ModelReader.at_layer`):
             one utterance at a time, zero-padded to its length bucket (8 per octave), a group norm over
             the utterance's own frames
  batched    before, for a ``layer_norm`` front end: consecutive utterances up to 1.6 M samples, padded
             to the longest
  unpadded   before, for a group-normed front end: one utterance at a time at its own length

Peak RSS (``ru_maxrss``) is sampled every 10 utterances; CPU seconds cover the forwards. oneDNN builds
and keeps buffers for every input shape it meets, so memory grows with the number of distinct shapes:
with one per utterance length it grows with the corpus; with buckets it levels off.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import save_random_hubert  # noqa: E402
from ratios import record  # noqa: E402

from fairseq_mtssl.jobs.commands import MALLOC_TUNABLES  # noqa: E402

VARIANTS = {"layer_norm": ("reader", "batched"), "default": ("reader", "unpadded")}


def lengths(hours: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    out, total = [], 0
    while total < hours * 3600 * 16000:
        out.append(int(rng.uniform(1.0, 15.0) * 16000))
        total += out[-1]
    return out


def child(variant: str, ckpt: str, hours: float) -> None:
    import torch

    from fairseq_mtssl import upstream
    from fairseq_mtssl.data.batches import plan_batches
    from fairseq_mtssl.upstream.readers import open_reader

    torch.set_num_threads(1)
    model_reader = open_reader(ckpt)
    reader = model_reader.at_layer(2)
    sizes = lengths(hours)
    groups = plan_batches(sizes, 1_600_000) if variant == "batched" else [[i] for i in range(len(sizes))]
    rng = np.random.default_rng(1)
    trace, done, cpu = [], 0, 0.0
    for group in groups:
        wavs = [0.1 * rng.standard_normal(sizes[i]).astype(np.float32) for i in group]
        start = time.process_time()
        if variant == "reader":
            reader(wavs)
        else:  # the earlier paths: one padded batch, or one utterance at its own length
            with torch.inference_mode():
                source, _, lens = upstream.batch_waveforms(wavs, model_reader.normalize)
                mask = upstream.sample_padding_mask(model_reader.encoder, lens) if len(wavs) > 1 else None
                upstream.layers.run_encoder(model_reader.encoder, source, mask, 2)
        cpu += time.process_time() - start
        before, done = done, done + len(group)
        if before // 10 != done // 10 or done == len(sizes):
            trace.append((done, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    print(json.dumps({"variant": variant, "utterances": len(sizes), "cpu_s": cpu, "trace": trace}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hours", type=float, default=1.5, help="audio each variant reads")
    p.add_argument("--work", type=Path, help="keep the checkpoints here")
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp())
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)
    print(f"{a.hours:g} h of audio per variant, utterances of 1-15 s, layer 2 of a tiny HuBERT, one thread")
    for mode, variants in VARIANTS.items():
        ckpt = work / f"hubert_tiny_{mode}.pt"
        if not ckpt.exists():
            save_random_hubert(ckpt, "hubert_tiny_cpu", extractor_mode=mode)
        for variant in variants:
            cmd = [sys.executable, __file__, "--child", variant, str(ckpt), str(a.hours)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rss = [m for _, m in r["trace"]]
            quarter = rss[len(rss) // 4]  # after a quarter of the audio, against the end
            print(
                f"  {mode:<10} {variant:<9} {r['cpu_s']:7.1f} s CPU   peak RSS MB at 1/4, 1/2, end of the audio: "
                f"{quarter:6.0f} {rss[len(rss) // 2]:6.0f} {rss[-1]:6.0f}   (growth over the last 3/4: {rss[-1] - quarter:+.0f} MB)",
                flush=True,
            )
            figure = f"{mode} front end, {variant}: peak RSS at the end / after a quarter of the audio"
            record("dump_memory", figure, rss[-1] / quarter, "<= 1.05" if variant == "reader" else None)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        main()
