"""Every frozen-upstream evaluation of one checkpoint on the embedded corpus, in one command.

    mtssl-evaluate-upstream CHECKPOINT --data runs/main/data --out runs/eval/hubert [--layer 2] [--pr-updates 300]
        [--no-probe] [--retrieval] [--items runs/main/data/test.item]

Runs, each as the command a user would type (recorded in ``commands.sh`` of ``--out``, its output in
``logs/<step>.log``):
  ABX          mtssl-abx, every layer, triphone items of the test split (held-out speakers)
  phone probe  mtssl-phone-probe at ``--layer``
  QbE          mtssl-qbe at ``--layer``: valid-split words as queries, test utterances as documents
  PR           SUPERB-style phone recognition: fairseq-hydra-train superb/pr_tiny_cpu (packaged config) for
               ``--pr-updates`` updates, then mtssl-superb-eval on the test split (PER)
  retrieval    (``--retrieval``, VGS models) mtssl-vgs-retrieval on the test split, recall@1/5/10
and writes ``results.json``. A finished step leaves ``done/<step>.json`` and is not run again; an
interrupted PR training resumes from its ``checkpoint_last.pt``. ``CHECKPOINT`` ``mfcc`` evaluates
MFCC features (ABX, probe, QbE only).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Optional

from ..atomic import atomic_write
from ..config import config_dir
from ..errors import cli
from ..evaluation.abx import best_layer
from .commands import CommandRunner

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # common.user_dir


class UpstreamEvaluation:
    """The evaluation steps of one checkpoint, each a recorded command run once."""

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
    ):
        # absolute paths: the commands run in ``out``
        self.checkpoint = checkpoint if checkpoint == "mfcc" else str(Path(checkpoint).resolve())
        self.data, self.out = Path(data).resolve(), Path(out).resolve()
        self.layer, self.pr_updates, self.probe, self.retrieval = layer, pr_updates, probe, retrieval
        self.items = Path(items).resolve() if items else None
        self.out.mkdir(parents=True, exist_ok=True)
        self.commands = CommandRunner(self.out, bin_dir=Path(sys.executable).parent)

    def step(self, name: str, *cmd) -> None:
        self.commands.step(name, cmd, say=lambda msg: print(msg, flush=True))

    def read(self, name: str) -> dict:
        return json.loads((self.out / f"{name}.json").read_text())

    def evaluate(self) -> Dict:
        manifests, alignments, ck = self.data / "manifests", self.data / "corpus" / "alignments", self.checkpoint
        items = self.items or self.out / "test.item"
        if not items.exists():
            self.step(
                "abx_items",
                *("mtssl-abx-items", "--alignments", alignments / "test.phones.ctm"),
                *("--manifest", manifests / "test.tsv", "--out", items),
            )
        self.step(
            "abx",
            "mtssl-abx",
            ck,
            "--manifest",
            manifests / "test.tsv",
            "--items",
            items,
            "--json",
            self.out / "abx.json",
        )
        where = ("--layer", self.layer, "--manifests", manifests, "--alignments", alignments)
        if self.probe:
            self.step("phone_probe", "mtssl-phone-probe", ck, *where, "--json", self.out / "phone_probe.json")
        self.step("qbe", "mtssl-qbe", ck, *where, "--json", self.out / "qbe.json")
        results = {
            "checkpoint": str(ck),
            "layer": self.layer,
            "abx": self.read("abx")["layers"],
            "qbe": self.read("qbe"),
        }
        if self.probe:
            results["phone_probe"] = self.read("phone_probe")
        if ck != "mfcc" and self.pr_updates > 0:
            run = self.out / "superb_pr"
            self.step(
                "superb_pr_train",
                *("fairseq-hydra-train", "--config-dir", config_dir("superb"), "--config-name", "pr_tiny_cpu"),
                f"common.user_dir={PACKAGE_DIR}",
                f"task.data={manifests.resolve()}",
                f"model.upstream_path={Path(ck).resolve()}",
                f"optimization.max_update={self.pr_updates}",
                f"hydra.run.dir={run.resolve()}",
            )
            self.step(
                "superb_pr_eval",
                *("mtssl-superb-eval", run / "checkpoints" / "checkpoint_last.pt", "--split", "test"),
                *("--json", self.out / "superb_pr.json"),
            )
            results["superb_pr"] = self.read("superb_pr")
        if self.retrieval:
            self.step("retrieval", "mtssl-vgs-retrieval", ck, "--split", "test", "--json", self.out / "retrieval.json")
            results["retrieval"] = self.read("retrieval")
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
        "qbe_mtwv": results["qbe"]["mtwv"],
        "qbe_map": results["qbe"]["map"],
    }
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
    args = parser.parse_args(argv)
    evaluation = UpstreamEvaluation(
        args.checkpoint,
        Path(args.data),
        Path(args.out),
        args.layer,
        args.pr_updates,
        args.probe,
        args.retrieval,
        args.items,
    )
    print(json.dumps(summary_row(evaluation.evaluate())))


if __name__ == "__main__":
    main()
