"""The main job: embedded corpus -> manifests -> MFCC k-means labels -> tiny HuBERT iteration 1
-> iteration-2 labels from its layer features. Every stage is an ordinary command line (recorded in
``{out}/commands.sh`` so any stage can be repeated at scale on other data); a finished stage is
skipped on the next run and an interrupted training resumes from its ``checkpoint_last.pt``.

    mtssl-main-job --out runs/main
"""

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
HUBERT_CONFIG_DIR = REPO_DIR / "examples" / "hubert" / "config" / "pretrain"
SPLITS = ("train", "valid", "test")


class Stage:
    """A named step whose completion is recorded in ``{out}/stages/{name}.json``."""

    def __init__(self, job: "MainJob", name: str):
        self.job, self.name = job, name
        self.marker = job.out / "stages" / f"{name}.json"

    @property
    def done(self) -> bool:
        return self.marker.exists()

    def finish(self, **info) -> None:
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(self.marker)


class MainJob:
    def __init__(self, args):
        self.a = args
        self.out = Path(args.out).resolve()
        self.data = self.out / "data"
        self.bin = Path(sys.executable).parent
        self.summary: Dict[str, object] = {}

    def run(self, cmd: List[str], stage: str) -> None:
        """Run a console script of this venv, recording the command line."""
        self.out.mkdir(parents=True, exist_ok=True)
        line = " ".join(shlex.quote(str(c)) for c in cmd)
        with open(self.out / "commands.sh", "a") as f:
            f.write(f"# stage {stage}\n{line}\n")
        print(f"[{stage}] $ {line}", flush=True)
        exe = [str(self.bin / cmd[0])] + [str(c) for c in cmd[1:]]
        subprocess.run(exe, check=True, cwd=self.out)

    def stage(self, name: str, fn) -> None:
        st = Stage(self, name)
        if st.done and not self.a.force:
            print(f"[{name}] done earlier, skipped ({st.marker})", flush=True)
            self.summary[name] = json.loads(st.marker.read_text())
            return
        t0 = time.time()
        info = fn() or {}
        info["seconds"] = round(time.time() - t0, 1)
        st.finish(**info)
        self.summary[name] = info
        print(f"[{name}] finished in {info['seconds']} s", flush=True)

    # -- stages ---------------------------------------------------------------------------------
    def corpus(self):
        self.run(["mtssl-synth-corpus", "--out", self.data / "corpus", "--hours", self.a.hours, "--seed", self.a.seed], "corpus")
        return json.loads((self.data / "corpus" / "corpus.json").read_text())["utterances"]

    def manifests(self):
        self.run(["mtssl-manifest-corpus", self.data / "corpus", "--dest", self.data / "manifests"], "manifests")

    @property
    def mfcc_labels(self) -> Path:
        return self.data / "labels" / f"mfcc_km{self.a.clusters}"

    def labels_mfcc(self):
        feats, km = self.data / "features" / "mfcc", self.mfcc_labels / "kmeans.joblib"
        self.run(["mtssl-dump-features", self.data / "manifests" / "train.tsv", feats, "--feature", "mfcc"], "labels_mfcc")
        self.run(["mtssl-learn-kmeans", feats, "train", "1", km, "--n-clusters", self.a.clusters, "--percent", "-1"], "labels_mfcc")
        for split in SPLITS:
            self.run(["mtssl-apply-kmeans", km, self.mfcc_labels, "--manifest", self.data / "manifests" / f"{split}.tsv", "--feature", "mfcc"], "labels_mfcc")

    @property
    def hubert_dir(self) -> Path:
        return self.out / "hubert_iter1"

    def hubert_iter1(self):
        self.run(
            [
                "fairseq-hydra-train", "--config-dir", HUBERT_CONFIG_DIR, "--config-name", "hubert_tiny_cpu",
                f"common.user_dir={PACKAGE_DIR}", f"task.data={self.data / 'manifests'}", f"task.label_dir={self.mfcc_labels}",
                'task.labels=["km"]', "model.label_rate=100", f"optimization.max_update={self.a.updates}",
                f"hydra.run.dir={self.hubert_dir}",
            ],
            "hubert_iter1",
        )
        return training_summary(self.hubert_dir / "hydra_train.log")

    def labels_iter2(self):
        ckpt = self.hubert_dir / "checkpoints" / "checkpoint_last.pt"
        lab = self.data / "labels" / f"hubert_iter1_l{self.a.layer}_km{self.a.clusters}"
        feats = self.data / "features" / f"hubert_iter1_l{self.a.layer}"
        model_args = ["--feature", "model", "--checkpoint", ckpt, "--layer", self.a.layer]
        self.run(["mtssl-dump-features", self.data / "manifests" / "train.tsv", feats, *model_args], "labels_iter2")
        self.run(["mtssl-learn-kmeans", feats, "train", "1", lab / "kmeans.joblib", "--n-clusters", self.a.clusters], "labels_iter2")
        for split in SPLITS:
            self.run(["mtssl-apply-kmeans", lab / "kmeans.joblib", lab, "--manifest", self.data / "manifests" / f"{split}.tsv", *model_args], "labels_iter2")
        self.run(["mtssl-check-labels", self.data / "manifests" / "train.tsv", lab / "train.km", "--label-rate", "50"], "labels_iter2")
        return {"label_dir": str(lab)}

    def main(self) -> Dict[str, object]:
        t0 = time.time()
        self.stage("corpus", self.corpus)
        self.stage("manifests", self.manifests)
        self.stage("labels_mfcc", self.labels_mfcc)
        self.stage("hubert_iter1", self.hubert_iter1)
        self.stage("labels_iter2", self.labels_iter2)
        self.summary["total_seconds"] = round(time.time() - t0, 1)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1))
        return self.summary


_INNER = re.compile(r"\[train_inner\].*?num_updates=(\d+)")


def training_summary(log_path: Path) -> Dict[str, object]:
    """First and last logged training loss / masked accuracy of a fairseq-hydra-train log."""
    rows = []
    for line in Path(log_path).read_text().splitlines():
        if "[train_inner]" not in line:
            continue
        fields = dict(kv.split("=", 1) for kv in re.findall(r"(\w+=[-\d.e]+)", line))
        rows.append({k: float(v) for k, v in fields.items() if k in ("num_updates", "loss", "loss_m_0", "correct_m_0", "count_m_0")})
    if not rows:
        return {}
    # fairseq's hubert criterion already logs correct_m_0 as a fraction of the masked frames
    pick = lambda r: {"updates": int(r["num_updates"]), "loss": r["loss"], "masked_acc": r.get("correct_m_0")}  # noqa: E731
    return {"first": pick(rows[0]), "last": pick(rows[-1])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/main", help="run folder (data, models, commands.sh, summary.json)")
    p.add_argument("--hours", type=float, default=0.5, help="hours of training speech in the embedded corpus")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--clusters", type=int, default=50, help="k-means clusters for both label iterations")
    p.add_argument("--updates", type=int, default=600, help="HuBERT iteration-1 updates")
    p.add_argument("--layer", type=int, default=1, help="HuBERT layer for iteration-2 features")
    p.add_argument("--force", action="store_true", help="redo finished stages")
    summary = MainJob(p.parse_args(argv)).main()
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
