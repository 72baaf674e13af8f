"""Every frozen-upstream evaluation of one checkpoint on the embedded corpus, in one process.

    mtssl-evaluate-upstream CHECKPOINT --data runs/main/data --out runs/eval/hubert [--layer 2] [--pr-updates 300]
        [--no-probe] [--retrieval] [--speaker-probe] [--items runs/main/data/test.item]
        [--manifests DIR --alignments DIR]   # another copy of the splits (e.g. perturbed audio)

The checkpoint is loaded once (:func:`~fairseq_mtssl.upstream.readers.open_reader`) and every split it needs
is forwarded once, every layer kept (:func:`~fairseq_mtssl.upstream.features.extract_split`); then, from
those features:
  ABX           every layer, triphone items of the test split (held-out speakers)       -> abx.json
  phone probe   at ``--layer``, fitted on train, scored on valid and test               -> phone_probe.json
  QbE           valid-split words as queries, test utterances as documents: s3prl's quesst14_dtw on every
                layer, chosen on half of the words, reported on the other (``--qbe-method plugin``: the
                former angular DTW at ``--layer``)                                       -> qbe.json
  speaker probe (``--speaker-probe``) at ``--layer``, mean-pooled test utterances        -> speaker_probe.json
  retrieval     (``--retrieval``, VGS models) the test captions' embeddings from the same forwards, recall@1/5/10
                                                                                       -> retrieval.json
  PR            SUPERB-style phone recognition, a training: fairseq-hydra-train superb/pr_tiny_cpu (packaged
                config) for ``--pr-updates`` updates, then mtssl-superb-eval of the checkpoint best on dev
                (``checkpoint_best.pt``, by UER) on the test split (PER; ``mtssl-superb`` sweeps the lr), each a
                recorded command (``commands.sh``, ``logs/<step>.log``)            -> superb_pr.json
and ``results.json`` with all of them, ``upstream_loads`` and the ``forwards`` of each split (how many
utterances went through the model). A metric whose file exists is not computed again (and its split not
forwarded for it); an interrupted PR training resumes from its ``checkpoint_last.pt``. ``CHECKPOINT``
``mfcc`` evaluates MFCC features (ABX, probe, QbE, speaker probe).
"""

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, Optional

from ..atomic import atomic_write
from ..config import config_dir
from ..errors import cli
from ..evaluation.abx import abx_per_layer, best_layer, read_items
from ..evaluation.phone_probe import probe_from_features
from ..evaluation.qbe import qbe_from_features
from ..evaluation.retrieval import retrieval_from_features
from ..evaluation.speaker_probe import frame_speaker_probe, pooled, read_speakers, speaker_probe
from ..upstream.features import SplitFeatures, extract_split
from ..upstream.readers import MFCC, open_reader
from .commands import CommandRunner

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # common.user_dir
PERTURBED = "test_perturbed"  # the split name of --perturbed's test.tsv
logger = logging.getLogger(__name__)


class UpstreamEvaluation:
    """The evaluations of one checkpoint from one feature pass (and the PR training, a recorded command)."""

    def __init__(
        self,
        checkpoint: str,
        data: Path,
        out: Path,
        layer: int,
        pr_updates: int,
        probe: bool = True,
        retrieval: bool = False,
        items: Optional[Path] = None,
        speaker: bool = False,
        manifests: Optional[Path] = None,
        alignments: Optional[Path] = None,
        abx_context: str = "triphone",
        qbe_method: str = "superb",
        qbe: bool = True,
        perturbed: Optional[Path] = None,
        perturbed_items: Optional[Path] = None,
    ):
        self.checkpoint = checkpoint if checkpoint == MFCC else str(Path(checkpoint).resolve())
        self.data, self.out = Path(data).resolve(), Path(out).resolve()
        self.manifests = Path(manifests).resolve() if manifests else self.data / "manifests"
        self.alignments = Path(alignments).resolve() if alignments else self.data / "corpus" / "alignments"
        self.layer, self.pr_updates, self.probe, self.retrieval = layer, pr_updates, probe, retrieval
        self.speaker, self.abx_context, self.qbe_method = speaker, abx_context, qbe_method
        self.items = Path(items).resolve() if items else None
        self.qbe = qbe
        self.perturbed = Path(perturbed).resolve() if perturbed else None
        self.perturbed_items = Path(perturbed_items).resolve() if perturbed_items else None
        self.out.mkdir(parents=True, exist_ok=True)
        self.commands = CommandRunner(self.out, bin_dir=Path(sys.executable).parent)
        self.reader = None
        self.features: Dict[str, SplitFeatures] = {}
        self.forwards: Dict[str, int] = {}

    def step(self, name: str, *cmd) -> None:
        self.commands.step(name, cmd, say=lambda msg: print(msg, flush=True))

    def read(self, name: str) -> dict:
        return json.loads((self.out / f"{name}.json").read_text())

    def write(self, name: str, result: Dict) -> None:
        with atomic_write(self.out / f"{name}.json") as f:
            json.dump(result, f, indent=1)

    def split(self, name: str, embeddings: bool = False) -> SplitFeatures:
        """Every layer of split ``name``: forwarded the first time it is asked for, then kept."""
        if self.reader is None:
            self.reader = open_reader(self.checkpoint)
        have = self.features.get(name)
        if have is None or (embeddings and have.embeddings is None):
            before = self.reader_forwards()
            self.features[name] = extract_split(self.reader, self.manifest(name), embeddings=embeddings)
            self.forwards[name] = self.forwards.get(name, 0) + self.reader_forwards() - before
        return self.features[name]

    def manifest(self, split: str) -> Path:
        """``test_perturbed``: the perturbed copy's ``test.tsv``; others in ``--manifests``."""
        return self.perturbed / "test.tsv" if split == PERTURBED else self.manifests / f"{split}.tsv"

    def ctm(self, split: str) -> Path:
        return self.perturbed / "test.phones.ctm" if split == PERTURBED else self.alignments / f"{split}.phones.ctm"

    def reader_forwards(self) -> int:
        return getattr(self.reader, "forwards", 0)

    def layer_id(self) -> int:
        """``--layer`` as a hidden-state index: single-layer features (MFCC) have only layer 0."""
        return self.layer if self.reader.num_layers > 1 else 0

    def metric(self, name: str, compute) -> dict:
        if not (self.out / f"{name}.json").exists():
            self.write(name, {"checkpoint": self.checkpoint, **compute()})
            print(f"{self.out.name}: {name} done", flush=True)
        return self.read(name)

    def abx(self, split: str = "test", items: Optional[Path] = None) -> Dict:
        items = items or self.out / f"{split}.item"
        if not items.exists():
            self.step(
                f"abx_items_{split}",
                *("mtssl-abx-items", "--alignments", self.ctm(split), "--manifest", self.manifest(split)),
                *("--out", items),
            )
        test = self.split(split, embeddings=self.retrieval and split == "test")
        rows = abx_per_layer(read_items(items), test.by_utterance(), test.frame_rate, context=self.abx_context)
        return {"items": str(items), "context": self.abx_context, "item_frames": "libri-light", "layers": rows}

    def evaluate(self) -> Dict:
        ck = self.checkpoint
        results = {
            "checkpoint": str(ck),
            "layer": self.layer,
            "abx": self.metric("abx", lambda: self.abx("test", self.items))["layers"],
        }
        if self.perturbed:
            results["abx_perturbed"] = self.metric("abx_perturbed", lambda: self.abx(PERTURBED, self.perturbed_items))[
                "layers"
            ]
        if self.probe:
            splits = ("train", "valid", "test") + ((PERTURBED,) if self.perturbed else ())
            results["phone_probe"] = self.metric(
                "phone_probe",
                lambda: {
                    **probe_from_features(
                        {s: self.split(s) for s in splits}, self.layer_id(), {s: self.ctm(s) for s in splits}
                    ),
                    "layer": self.layer,
                },
            )
        if self.qbe:
            results["qbe"] = self.metric(
                "qbe",
                lambda: qbe_from_features(
                    self.split("valid"), self.split("test"), self.alignments, self.qbe_method, self.layer_id()
                ),
            )
        if self.speaker:
            manifest = self.manifests / "test.tsv"
            results["speaker_probe"] = self.metric(
                "speaker_probe",
                lambda: {
                    "layer": self.layer,
                    "manifest": str(manifest),
                    **speaker_probe(pooled(self.split("test").layer(self.layer_id())), read_speakers(manifest)),
                    **frame_speaker_probe(
                        list(self.split("test").layer(self.layer_id()).values()), read_speakers(manifest)
                    ),
                },
            )
        if self.retrieval:  # the caption embeddings come from the test split's forwards (ABX's)

            def retrieval() -> Dict:
                test = self.split("test", embeddings=True)
                return retrieval_from_features(self.reader, test, self.manifests)

            results["retrieval"] = self.metric("retrieval", retrieval)
        self.features.clear()  # the PR training below is another process; free the memory first
        if ck != MFCC and self.pr_updates > 0:
            run = self.out / "superb_pr"
            self.step(
                "superb_pr_train",
                *("fairseq-hydra-train", "--config-dir", config_dir("superb"), "--config-name", "pr_tiny_cpu"),
                f"common.user_dir={PACKAGE_DIR}",
                f"task.data={self.manifests}",
                f"model.upstream_path={Path(ck).resolve()}",
                f"optimization.max_update={self.pr_updates}",
                f"hydra.run.dir={run.resolve()}",
            )
            self.step(
                "superb_pr_eval",
                # the checkpoint best on dev (the config's best_checkpoint_metric: uer), as SUPERB selects
                *("mtssl-superb-eval", run / "checkpoints" / "checkpoint_best.pt", "--split", "test"),
                *("--json", self.out / "superb_pr.json"),
            )
            results["superb_pr"] = self.read("superb_pr")
        results["upstream_loads"] = 0 if self.reader is None else 1
        results["forwards"] = dict(self.forwards)
        with atomic_write(self.out / "results.json") as f:
            json.dump(results, f, indent=1)
        return results


def summary_row(results: Dict) -> Dict:
    """One table row: best-layer ABX, probe accuracy, QbE MTWV/MAP, PR PER."""
    abx = results["abx"]
    best = best_layer(abx)
    row = {
        "abx_within_best": best["within"],
        "abx_across_best": best["across"],
        "abx_best_layer": best["layer"],
    }
    if "qbe" in results:
        row.update(qbe_mtwv=results["qbe"]["mtwv"], qbe_map=results["qbe"]["map"])
    if "phone_probe" in results:
        row["probe_test_acc"] = results["phone_probe"].get("test_acc")
    if "superb_pr" in results:
        row["pr_per"] = results["superb_pr"]["per"]
    if "retrieval" in results:
        row.update({k: v for k, v in results["retrieval"].items() if k.startswith(("s2i_", "i2s_"))})
    return row


@cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="upstream checkpoint (fairseq or plugin), or 'mfcc'")
    parser.add_argument("--data", required=True, help="a main-job data folder: corpus/ and manifests/")
    parser.add_argument("--out", required=True)
    parser.add_argument("--layer", type=int, default=2, help="layer for the probe and QbE (ABX covers every layer)")
    parser.add_argument("--pr-updates", type=int, default=300, help="SUPERB PR training updates (0: skip PR)")
    parser.add_argument("--no-probe", dest="probe", action="store_false", help="skip the frame-level phone probe")
    parser.add_argument(
        "--retrieval", action="store_true", help="speech<->image retrieval on the test split (VGS models)"
    )
    parser.add_argument(
        "--items", type=Path, help="an ABX item file to reuse (default: made from the test alignments in --out)"
    )
    parser.add_argument("--speaker-probe", action="store_true", help="the speaker probe on the test split too")
    parser.add_argument("--manifests", type=Path, help="the splits' manifests (default: DATA/manifests)")
    parser.add_argument("--alignments", type=Path, help="the splits' .ctm alignments (default: DATA/corpus/alignments)")
    parser.add_argument("--abx-context", choices=["triphone", "none"], default="triphone")
    parser.add_argument("--qbe-method", choices=["superb", "plugin"], default="superb", help="see mtssl-qbe")
    parser.add_argument("--no-qbe", dest="qbe", action="store_false", help="skip QbE")
    parser.add_argument(
        "--perturbed",
        type=Path,
        help="a perturbed copy of the test split (test.tsv, test.spk, test.phones.ctm): ABX on it "
        "(abx_perturbed.json) and the phone probe scored on it (test_perturbed_acc)",
    )
    parser.add_argument("--perturbed-items", type=Path, help="the ABX item file of --perturbed to reuse")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    evaluation = UpstreamEvaluation(
        args.checkpoint,
        Path(args.data),
        Path(args.out),
        args.layer,
        args.pr_updates,
        args.probe,
        args.retrieval,
        args.items,
        args.speaker_probe,
        args.manifests,
        args.alignments,
        args.abx_context,
        args.qbe_method,
        args.qbe,
        args.perturbed,
        args.perturbed_items,
    )
    print(json.dumps(summary_row(evaluation.evaluate())))


if __name__ == "__main__":
    main()
