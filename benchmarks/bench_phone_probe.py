"""The phone probe's fit: preconditioned L-BFGS (100 iterations, the default) against the former plain one (300).

    .venv/bin/python benchmarks/bench_phone_probe.py runs/main [--layer 2] [--rounds 1] [--reference-iters 1000]

For every checkpoint a main job trained (``RUN/models/**/checkpoints/checkpoint_last.pt``) and MFCC, the
probe's splits are extracted once at ``--layer`` as ``mtssl-evaluate-upstream`` does; then both fits run on
the same frames, interleaved, with one intra-op thread. The peer is the plugin's former probe itself
(``fit_probe(precondition=False, max_iter=300)``, the code path it took before). Printed per checkpoint: fit
seconds, the penalised training loss each reached, and the valid / test accuracies; with
``--reference-iters N`` also a preconditioned fit of N iterations, the best optimum found, against which
both are measured. The ratio recorded is the median over checkpoints of new / former fit time
(target <= 0.5); the other figure is on how many checkpoints the new fit ends at a loss no higher than
the former's + 1e-5 (both are then at the optimum to that tolerance).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ratios import record  # noqa: E402

from fairseq_mtssl.evaluation.phone_probe import probe_from_features  # noqa: E402
from fairseq_mtssl.upstream.features import extract_split  # noqa: E402
from fairseq_mtssl.upstream.readers import open_reader  # noqa: E402

SPLITS = ("train", "valid", "test")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a main job's --out folder")
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--reference-iters", type=int, default=1000, help="0: no reference fit")
    args = p.parse_args()
    torch.set_num_threads(1)
    data = args.run / "data"
    sources = ["mfcc"] + [str(c) for c in sorted(args.run.glob("models/**/checkpoints/checkpoint_last.pt"))]
    variants = {"former": dict(precondition=False, max_iter=300), "new": {}}
    if args.reference_iters:
        variants["reference"] = dict(max_iter=args.reference_iters)
    ratios, no_higher = [], 0
    print(f"{'upstream':32s} {'variant':9s} {'fit s':>7s} {'objective':>10s} {'valid':>7s} {'test':>7s}")
    for source in sources:
        reader = open_reader(source)
        layer = args.layer if reader.num_layers > 1 else 0
        feats = {s: extract_split(reader, data / "manifests" / f"{s}.tsv", [layer]) for s in SPLITS}
        times = {v: [] for v in variants}
        results = {}
        for _ in range(args.rounds):
            for v, options in variants.items():
                start = time.perf_counter()
                results[v] = probe_from_features(feats, layer, data / "corpus" / "alignments", **options)
                times[v].append(time.perf_counter() - start)
        name = "mfcc" if source == "mfcc" else str(Path(source).parents[1].relative_to(args.run / "models"))
        best = min(r["train_objective"] for r in results.values())
        for v, r in results.items():
            print(
                f"{name:32s} {v:9s} {statistics.median(times[v]):7.2f} {r['train_objective']:10.6f} "
                f"{100 * r['valid_acc']:7.2f} {100 * r['test_acc']:7.2f}   (+{r['train_objective'] - best:.1e})",
                flush=True,
            )
        ratios.append(statistics.median(times["new"]) / statistics.median(times["former"]))
        no_higher += results["new"]["train_objective"] <= results["former"]["train_objective"] + 1e-5
    ratio = statistics.median(ratios)
    print(
        f"new / former fit time, median over {len(sources)} upstreams: {ratio:.3f} (range {min(ratios):.3f}-{max(ratios):.3f})"
    )
    print(f"new ends at a loss no higher than former's + 1e-5: {no_higher} of {len(sources)}")
    record("phone_probe", "phone probe fit: preconditioned 100 / plain 300 L-BFGS iterations", ratio, "<= 0.5")
    record("phone_probe", "upstreams (of all) where the new fit's loss is no higher (+ 1e-5)", no_higher)


if __name__ == "__main__":
    main()
