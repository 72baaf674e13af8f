"""ABX speed: mtssl-abx against libri-light's own ABX (zerospeech-libriabx, CPU), same features and item file.

    .venv/bin/python benchmarks/bench_abx.py [--utts 300] [--dim 768] [--rounds 2]

Random features at 50 Hz (``--dim`` dims, a phone direction, a speaker direction and noise, as
``fairseq_mtssl.evaluation.libri_light_abx.random_item_set``), one ``{utt}.npy`` per utterance and one
``.item`` file of triphones, written once; every variant reads those files, in interleaved rounds:
  mtssl-abx           read_items + read_feature_dir + abx_scores: the ``mtssl-abx --features`` path
  libri-light         eval_ABX.ABX with --max_size_group / --max_x_across above every group, so that it
                      scores every triplet, as mtssl-abx does: the same scores
  libri-light-default eval_ABX.ABX at its defaults (10, 5): random subsets of the triplets (timed once;
                      its scores differ by the sampling)
It prints seconds per variant (fastest round), the ratio mtssl-abx / libri-light, and both variants' scores.
Threads: torch's setting (OMP_NUM_THREADS), the same for every variant.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fairseq_mtssl.evaluation.abx import abx_scores, read_feature_dir, read_items, write_items
from fairseq_mtssl.evaluation.libri_light_abx import libri_light_abx, random_item_set, unavailable_reason

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ratios import record  # noqa: E402


def run_mtssl(item_file, feature_dir, rate):
    items = read_items(item_file)
    feats = read_feature_dir(feature_dir, [it.file for it in items])
    s = abx_scores(items, {u: f[0] for u, f in feats.items()}, rate)
    return {"within": s["within"], "across": s["across"]}, s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utts", type=int, default=300, help="utterances (12 phones each, 10 items)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--phones", type=int, default=8)
    p.add_argument("--speakers", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-default", action="store_true", help="skip libri-light at its sampling defaults")
    a = p.parse_args()
    missing = unavailable_reason()
    if missing:
        print(f"libri-light's ABX cannot be imported: {missing}")
        return 1
    rate = 50.0
    with tempfile.TemporaryDirectory() as tmp:
        items, feats = random_item_set(
            a.utts, a.dim, rate, n_phones=a.phones, n_speakers=a.speakers, seed=0, phone_scale=0.15
        )
        item_file, feature_dir = Path(tmp) / "bench.item", Path(tmp) / "feats"
        write_items(items, item_file)
        feature_dir.mkdir()
        for utt, f in feats.items():
            np.save(feature_dir / f"{utt}.npy", f)
        frames = sum(len(f) for f in feats.values())
        print(
            f"{len(items)} items, {a.utts} utterances ({frames} frames, {frames / rate / 60:.1f} min at 50 Hz), "
            f"{a.dim} dims, {a.phones} phones, {a.speakers} speakers; torch threads {torch.get_num_threads()}"
        )
        times = {"mtssl-abx": [], "libri-light": []}
        scores = {}
        for r in range(a.rounds):
            variants = [("mtssl-abx", lambda: run_mtssl(item_file, feature_dir, rate))]
            variants.append(("libri-light", lambda: (libri_light_abx(item_file, feature_dir, rate), None)))
            for name, fn in variants if r % 2 == 0 else variants[::-1]:
                t = time.perf_counter()
                scores[name], extra = fn()
                times[name].append(time.perf_counter() - t)
                if extra:
                    scores["kept"] = (extra["items"], extra["dropped_items"])
                print(f"  round {r}: {name:12s} {times[name][-1]:7.2f} s", flush=True)
        if not a.no_default:
            t = time.perf_counter()
            scores["libri-light-default"] = libri_light_abx(
                item_file, feature_dir, rate, max_size_group=10, max_x_across=5
            )
            times["libri-light-default"] = [time.perf_counter() - t]
            print(f"  once:    libri-light-default {times['libri-light-default'][0]:7.2f} s", flush=True)
    best = {k: min(v) for k, v in times.items()}
    print(f"\nitems scored {scores['kept'][0]}, dropped (no frame) {scores['kept'][1]}")
    print(f"{'variant':20s} {'seconds':>8s} {'within %':>9s} {'across %':>9s}")
    for k in best:
        print(f"{k:20s} {best[k]:8.2f} {100 * scores[k]['within']:9.4f} {100 * scores[k]['across']:9.4f}")
    ratio = best["mtssl-abx"] / best["libri-light"]
    diff = max(abs(100 * scores["mtssl-abx"][m] - 100 * scores["libri-light"][m]) for m in ("within", "across"))
    print(f"\nmtssl-abx / libri-light (every triplet, same scores): {ratio:.3f} (target <= 0.2)")
    print(f"largest score difference: {diff:.2e} ABX points")
    record("abx", "mtssl-abx / libri-light ABX time (every triplet)", ratio, "<= 0.2")
    record("abx", "largest score difference from libri-light, ABX points", diff, "<= 0.001")
    if "libri-light-default" in best:
        print(
            f"mtssl-abx / libri-light at its sampling defaults: {best['mtssl-abx'] / best['libri-light-default']:.3f}"
        )
        record(
            "abx",
            "mtssl-abx / libri-light ABX time (its defaults, sampled)",
            best["mtssl-abx"] / best["libri-light-default"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
