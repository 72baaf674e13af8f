"""Does SCORE do what it is for? Robustness to speed/pitch perturbation, before and after, over seeds.

    mtssl-score-evidence START.pt --data runs/main/data --out runs/score_evidence \\
        [--seeds 1 2 3] [--updates 300] [--config score_tiny_cpu] [--layer L]
    (or: python -m fairseq_mtssl.jobs.score_evidence ...; examples/score/run_evidence.sh)

``START.pt`` is the starting model (a HuBERT, wav2vec 2.0 or MT4SSL checkpoint: the main job's
strongest small model, not only its HuBERT); ``--data`` the main job's data folder (``manifests/``
and ``corpus/alignments/``; the test split holds the held-out speakers). Steps, each skipped when its
output exists (so an interrupted run resumes), each command recorded in ``commands.sh``:

1. ``perturbed/``: the test split perturbed as SCORE perturbs its pairs (speed 0.9/1.0/1.1, then pitch
   +-2 semitones by the phase vocoder; one draw per utterance, ``--perturb-seed``), with its phone
   alignment rescaled by the speed factor; train/valid stay clean (the probe is fitted on clean audio).
2. SCORE fine-tuning of ``START.pt`` once per seed (``fairseq-hydra-train`` with ``--config``, chosen
   by the start's model when not given; ``common.seed`` = the seed; ``--updates`` updates).
3. For the start and every SCORE run, at layer ``L`` (default: the last layer, the one SCORE trains):
   (a) the soft-DTW divergence (gamma 0.1, L2-normalised frames, / (len_x + len_y)) between each clean
       test utterance and its perturbed copy, averaged;
   (b) ``mtssl-phone-probe`` (fitted on clean train) and ``mtssl-abx`` on the perturbed test audio;
   (c) the same on the clean test audio.
``results.json`` holds every value, ``summary.json`` / ``summary.md`` the start against the SCORE runs'
mean and standard deviation over seeds, and the perturbed-minus-clean gaps that SCORE should close.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..atomic import atomic_write
from ..config import config_dir
from ..errors import MtsslError, cli
from .commands import CommandRunner

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CONFIG_FOR = {"hubert": "score_tiny_cpu", "wav2vec2": "score_wav2vec2_tiny_cpu", "mt4ssl": "score_mt4ssl_tiny_cpu"}


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def perturb_split(manifest_path, ctm_path, out_dir, split: str = "test", seed: int = 0, sample_rate: int = 16000):
    """Write ``{out_dir}/{split}.tsv`` (+ ``.spk``), ``{out_dir}/wav/`` and ``{out_dir}/{split}.phones.ctm``:
    each utterance sped up by a factor drawn from 0.9/1.0/1.1 then pitch-shifted by +-2 semitones (the
    phase vocoder), its phone segments' times divided by the factor. Returns the draws per utterance."""
    import soundfile as sf

    from ..corpus.alignment import AlignmentError, Segment, format_ctm, read_ctm
    from ..data import perturb
    from ..data.audio import read_audio
    from ..data.manifest import read_manifest, write_lines, write_manifest

    manifest, segments = read_manifest(manifest_path), read_ctm(ctm_path)
    out_dir = Path(out_dir)
    (out_dir / "wav").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, ctm, draws = [], [], {}
    for i, entry in enumerate(manifest.entries):
        utt = Path(entry.path).stem
        if utt not in segments:
            raise AlignmentError(f"{manifest.where(i)}: utterance {utt} has no alignment in {ctm_path}")
        wav = read_audio(manifest.audio_path(i), manifest.where(i), entry.num_samples, sample_rate)
        factor, semitones = float(rng.choice([0.9, 1.0, 1.1])), float(rng.choice([2.0, -2.0]))
        out = perturb.pitch_shift(perturb.speed(wav, factor), semitones, sample_rate)
        sf.write(out_dir / "wav" / f"{utt}.wav", out, sample_rate, subtype="FLOAT")
        rows.append((f"wav/{utt}.wav", len(out)))
        end = len(out) / sample_rate
        segs = [Segment(min(s.start / factor, end), min(s.end / factor, end), s.label) for s in segments[utt]]
        segs[-1] = Segment(segs[-1].start, end, segs[-1].label)  # the last segment reaches the end, as before
        ctm += format_ctm(utt, segs)
        draws[utt] = {"speed": factor, "semitones": semitones}
    write_manifest(out_dir / f"{split}.tsv", out_dir, rows)
    spk = Path(manifest_path).with_suffix(".spk")
    if spk.is_file():
        (out_dir / f"{split}.spk").write_text(spk.read_text())
    write_lines(out_dir / f"{split}.phones.ctm", ctm)
    return draws


def mean_divergence(checkpoint: str, layer: int, clean_manifest, perturbed_manifest, gamma: float = 0.1) -> float:
    """Mean soft-DTW divergence (SCORE's, per pair / (len_x + len_y)) between the L2-normalised layer
    ``layer`` features of each clean utterance and its perturbed copy (manifests in the same order)."""
    import torch
    import torch.nn.functional as F

    from ..data.audio import read_audio
    from ..data.manifest import ManifestError, read_manifest
    from ..losses.soft_dtw import soft_dtw_divergence
    from ..upstream.readers import layer_reader

    reader = layer_reader(checkpoint, layer)
    clean, pert = read_manifest(clean_manifest), read_manifest(perturbed_manifest)
    if len(clean) != len(pert):
        raise ManifestError(f"{perturbed_manifest}: {len(pert)} utterances but {clean_manifest} has {len(clean)}")

    def feats(m, i):
        wav = read_audio(m.audio_path(i), m.where(i), m.entries[i].num_samples)
        return F.normalize(torch.from_numpy(reader([wav])[0]), dim=-1)

    values = []
    for i in range(len(clean)):
        x, y = feats(clean, i), feats(pert, i)
        values.append(float(soft_dtw_divergence(x[None], y[None], gamma=gamma)[0]))
    return float(np.mean(values))


class Evidence:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.data = Path(args.data).resolve()
        self.m, self.al = self.data / "manifests", self.data / "corpus" / "alignments"
        self.commands = CommandRunner(self.out, bin_dir=Path(sys.executable).parent)

    def run(self, name: str, cmd: Sequence, result: Path) -> None:
        """One recorded step (``commands.sh``, ``logs/<name>.log``, ``done/<name>.json``) writing ``result``."""
        self.commands.step(name, cmd, say=lambda msg: print(msg, flush=True))

    def perturbed_data(self) -> Path:
        """``perturbed/``: test perturbed; train/valid manifests and alignments as the clean ones."""
        d = self.out / "perturbed"
        if not (d / "draws.json").exists():
            draws = perturb_split(self.m / "test.tsv", self.al / "test.phones.ctm", d, seed=self.args.perturb_seed)
            for split in ("train", "valid"):
                for src in (self.m / f"{split}.tsv", self.al / f"{split}.phones.ctm"):
                    (d / src.name).write_text(src.read_text())
            with atomic_write(d / "draws.json") as f:
                json.dump(draws, f, indent=1)
        return d

    def score_run(self, seed: int, config: str) -> Path:
        run = self.out / f"score_seed{seed}"
        self.run(
            f"train_score_seed{seed}",
            [
                _bin("fairseq-hydra-train"),
                "--config-dir",
                config_dir("score"),
                "--config-name",
                config,
                f"common.user_dir={PACKAGE_DIR}",
                f"common.seed={seed}",
                f"task.data={self.m}",
                f"model.upstream_path={Path(self.args.start).resolve()}",
                f"optimization.max_update={self.args.updates}",
                f"hydra.run.dir={run}",
            ],
            run / "done",
        )
        (run / "done").touch()
        return run / "checkpoints" / "checkpoint_last.pt"

    def measure(self, name: str, ckpt: Path, layer: int, pert: Path) -> Dict:
        d = self.out / "eval" / name
        d.mkdir(parents=True, exist_ok=True)
        res: Dict[str, float] = {}
        div = d / "divergence.json"
        if not div.exists():
            value = mean_divergence(str(ckpt), layer, self.m / "test.tsv", pert / "test.tsv")
            with atomic_write(div) as f:
                json.dump({"checkpoint": str(ckpt), "layer": layer, "sdtw_divergence": value}, f)
        res["sdtw_divergence"] = json.loads(div.read_text())["sdtw_divergence"]
        for audio, manifests, align in (("clean", self.m, self.al), ("perturbed", pert, pert)):
            self.run(
                f"{name}_probe_{audio}",
                [
                    _bin("mtssl-phone-probe"),
                    ckpt,
                    "--layer",
                    layer,
                    "--manifests",
                    manifests,
                    "--alignments",
                    align,
                    "--json",
                    d / f"probe_{audio}.json",
                ],  # fmt: skip
                d / f"probe_{audio}.json",
            )
            res[f"probe_{audio}"] = json.loads((d / f"probe_{audio}.json").read_text())["test_acc"]
            items = self.out / f"test_{audio}.item"
            self.run(
                f"abx_items_{audio}",
                [
                    _bin("mtssl-abx-items"),
                    "--alignments",
                    align / "test.phones.ctm",
                    "--manifest",
                    manifests / "test.tsv",
                    "--out",
                    items,
                ],  # fmt: skip
                items,
            )
            self.run(
                f"{name}_abx_{audio}",
                [
                    _bin("mtssl-abx"),
                    ckpt,
                    "--manifest",
                    manifests / "test.tsv",
                    "--items",
                    items,
                    "--layers",
                    layer,
                    "--context",
                    self.args.abx_context,
                    "--json",
                    d / f"abx_{audio}.json",
                ],  # fmt: skip
                d / f"abx_{audio}.json",
            )
            row = json.loads((d / f"abx_{audio}.json").read_text())["layers"][0]
            res[f"abx_within_{audio}"], res[f"abx_across_{audio}"] = row["within"], row["across"]
        for k in ("probe", "abx_within", "abx_across"):
            res[f"{k}_gap"] = res[f"{k}_perturbed"] - res[f"{k}_clean"]
        return res

    def evaluate(self) -> Dict:
        from ..checkpoint_safety import load_checkpoint_safely, model_name

        kind = model_name(load_checkpoint_safely(self.args.start))
        kind = "hubert" if kind.startswith("hubert") else kind
        config = self.args.config or CONFIG_FOR.get(kind)
        if config is None:
            raise MtsslError(f"{self.args.start}: model {kind!r}; give --config (one of {sorted(CONFIG_FOR.values())})")
        layer = self.args.layer or _num_layers(self.args.start)
        pert = self.perturbed_data()
        results = {"start": str(self.args.start), "config": config, "layer": layer, "updates": self.args.updates}
        results["models"] = {"start": self.measure("start", Path(self.args.start), layer, pert)}
        for seed in self.args.seeds:
            results["models"][f"score_seed{seed}"] = self.measure(
                f"score_seed{seed}", self.score_run(seed, config), layer, pert
            )
        with atomic_write(self.out / "results.json") as f:
            json.dump(results, f, indent=1)
        summary = summarise(results)
        with atomic_write(self.out / "summary.json") as f:
            json.dump(summary, f, indent=1)
        (self.out / "summary.md").write_text(summary_markdown(summary))
        return summary


def _num_layers(checkpoint: str) -> int:
    from ..upstream import load_speech_model, speech_encoder_of

    model, _ = load_speech_model(checkpoint)
    return len(speech_encoder_of(model).encoder.layers)


def summarise(results: Dict) -> Dict:
    """Per metric: the start's value, the SCORE runs' mean, standard deviation (n - 1) and values."""
    start = results["models"]["start"]
    runs = [v for k, v in results["models"].items() if k != "start"]
    out = {"layer": results["layer"], "updates": results["updates"], "seeds": len(runs), "metrics": {}}
    for k, v in start.items():
        vals = [r[k] for r in runs]
        out["metrics"][k] = {
            "start": v,
            "score_mean": statistics.mean(vals) if vals else None,
            "score_std": statistics.stdev(vals) if len(vals) > 1 else None,
            "score_values": vals,
        }
    return out


def summary_markdown(summary: Dict) -> str:
    def fmt(x: Optional[float]) -> str:
        return "-" if x is None else f"{x:.4g}"

    lines = [
        f"Layer {summary['layer']}, {summary['updates']} SCORE updates, {summary['seeds']} seeds",
        "",
        "| metric | start | SCORE mean | SCORE std |",
        "|---|---|---|---|",
    ]
    for k, m in summary["metrics"].items():
        lines.append(f"| {k} | {fmt(m['start'])} | {fmt(m['score_mean'])} | {fmt(m['score_std'])} |")
    return "\n".join(lines) + "\n"


@cli
def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("start", help="the starting checkpoint (HuBERT, wav2vec 2.0 or MT4SSL)")
    p.add_argument("--data", required=True, help="the main job's data folder (manifests/, corpus/alignments/)")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--updates", type=int, default=300, help="SCORE updates per seed")
    p.add_argument("--config", help="SCORE config (default: by the start's model)")
    p.add_argument("--layer", type=int, help="layer measured (default: the last)")
    p.add_argument("--perturb-seed", type=int, default=0, help="seed of the test set's perturbation draws")
    p.add_argument("--abx-context", choices=["triphone", "none"], default="triphone")
    summary = Evidence(p.parse_args(argv)).evaluate()
    print(summary_markdown(summary))


if __name__ == "__main__":
    main()
