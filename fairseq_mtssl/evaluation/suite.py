"""Every frozen-upstream evaluation of one checkpoint on the embedded corpus, in one command.

    mtssl-evaluate-upstream CHECKPOINT --data runs/main/data --out runs/eval/hubert [--layer 2] [--pr-updates 300]
        [--no-probe] [--retrieval] [--items runs/main/data/test.item]

Runs, each as the command a user would type (recorded in ``commands.sh`` of ``--out``):
  ABX          mtssl-abx, every layer, triphone items of the test split (held-out speakers)
  phone probe  mtssl-phone-probe at ``--layer``
  QbE          mtssl-qbe at ``--layer``: valid-split words as queries, test utterances as documents
  PR           SUPERB-style phone recognition: fairseq-hydra-train superb/pr_tiny_cpu (packaged config) for
               ``--pr-updates`` updates, then mtssl-superb-eval on the test split (PER)
  retrieval    (``--retrieval``, VGS models) mtssl-vgs-retrieval on the test split, recall@1/5/10
and writes ``results.json``. A finished step (its output present; for the PR training a ``done``
marker written after fairseq-hydra-train exits cleanly) is not run again; an interrupted PR training
resumes from its ``checkpoint_last.pt``. ``CHECKPOINT`` ``mfcc`` evaluates MFCC features (ABX, probe,
QbE only).
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from ..atomic import atomic_write
from ..child_process import child_kwargs
from ..config import config_dir

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


class Suite:
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
        self.checkpoint, self.data, self.out, self.layer, self.pr_updates = checkpoint, data, out, layer, pr_updates
        self.probe, self.retrieval, self.items = probe, retrieval, items
        out.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, cmd: List[str], result: Path) -> None:
        if result.exists():
            print(f"[{name}] done before: {result}", flush=True)
            return
        line = " ".join(shlex.quote(str(c)) for c in cmd)
        with open(self.out / "commands.sh", "a", encoding="utf-8") as f:
            f.write(f"# {name}\n{line}\n")
        print(f"[{name}] $ {line}", flush=True)
        start = time.time()
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **child_kwargs())
        (self.out / f"{name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(
                f"[{name}] failed ({proc.returncode}); log: {self.out / f'{name}.log'}\n{proc.stderr[-2000:]}"
            )
        print(f"[{name}] {time.time() - start:.1f} s", flush=True)

    def evaluate(self) -> Dict:
        m, a, ck = self.data / "manifests", self.data / "corpus" / "alignments", self.checkpoint
        items = self.items or self.out / "test.item"
        if not items.exists():
            self.run(
                "abx_items",
                [
                    _bin("mtssl-abx-items"),
                    "--alignments",
                    a / "test.phones.ctm",
                    "--manifest",
                    m / "test.tsv",
                    "--out",
                    items,
                ],
                items,
            )
        self.run(
            "abx",
            [_bin("mtssl-abx"), ck, "--manifest", m / "test.tsv", "--items", items, "--json", self.out / "abx.json"],
            self.out / "abx.json",
        )
        if self.probe:
            self.run(
                "phone_probe",
                [
                    _bin("mtssl-phone-probe"),
                    ck,
                    "--layer",
                    self.layer,
                    "--manifests",
                    m,
                    "--alignments",
                    a,
                    "--json",
                    self.out / "phone_probe.json",
                ],
                self.out / "phone_probe.json",
            )
        self.run(
            "qbe",
            [
                _bin("mtssl-qbe"),
                ck,
                "--layer",
                self.layer,
                "--manifests",
                m,
                "--alignments",
                a,
                "--json",
                self.out / "qbe.json",
            ],
            self.out / "qbe.json",
        )
        results = {
            "checkpoint": str(ck),
            "layer": self.layer,
            "abx": json.loads((self.out / "abx.json").read_text())["layers"],
            "qbe": json.loads((self.out / "qbe.json").read_text()),
        }
        if self.probe:
            results["phone_probe"] = json.loads((self.out / "phone_probe.json").read_text())
        if ck != "mfcc" and self.pr_updates > 0:
            run = self.out / "superb_pr"
            self.run(
                "superb_pr_train",
                [
                    _bin("fairseq-hydra-train"),
                    "--config-dir",
                    config_dir("superb"),
                    "--config-name",
                    "pr_tiny_cpu",
                    f"common.user_dir={PACKAGE_DIR}",
                    f"task.data={m.resolve()}",
                    f"model.upstream_path={Path(ck).resolve()}",
                    f"optimization.max_update={self.pr_updates}",
                    f"hydra.run.dir={run.resolve()}",
                ],
                run / "done",
            )
            (run / "done").touch()
            self.run(
                "superb_pr_eval",
                [
                    _bin("mtssl-superb-eval"),
                    run / "checkpoints" / "checkpoint_last.pt",
                    "--split",
                    "test",
                    "--json",
                    self.out / "superb_pr.json",
                ],
                self.out / "superb_pr.json",
            )
            results["superb_pr"] = json.loads((self.out / "superb_pr.json").read_text())
        if self.retrieval:
            self.run(
                "retrieval",
                [_bin("mtssl-vgs-retrieval"), ck, "--split", "test", "--json", self.out / "retrieval.json"],
                self.out / "retrieval.json",
            )
            results["retrieval"] = json.loads((self.out / "retrieval.json").read_text())
        with atomic_write(self.out / "results.json") as f:
            json.dump(results, f, indent=1)
        return results


def summary_row(results: Dict) -> Dict:
    """One table row: best-layer ABX, probe accuracy, QbE MTWV/MAP, PR PER."""
    abx = results["abx"]
    best = min(abx, key=lambda r: r["within"] + r["across"])
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="upstream checkpoint (fairseq or plugin), or 'mfcc'")
    p.add_argument("--data", required=True, help="a main-job data folder: corpus/ and manifests/")
    p.add_argument("--out", required=True)
    p.add_argument("--layer", type=int, default=2, help="layer for the probe and QbE (ABX covers every layer)")
    p.add_argument("--pr-updates", type=int, default=300, help="SUPERB PR training updates (0: skip PR)")
    p.add_argument("--no-probe", dest="probe", action="store_false", help="skip the frame-level phone probe")
    p.add_argument("--retrieval", action="store_true", help="speech<->image retrieval on the test split (VGS models)")
    p.add_argument(
        "--items", type=Path, help="an ABX item file to reuse (default: made from the test alignments in --out)"
    )
    a = p.parse_args(argv)
    results = Suite(
        a.checkpoint, Path(a.data), Path(a.out), a.layer, a.pr_updates, a.probe, a.retrieval, a.items
    ).evaluate()
    print(json.dumps(summary_row(results)))


if __name__ == "__main__":
    main()
