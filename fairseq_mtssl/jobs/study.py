"""The study profile of the main job: each paper's claim tested over seeds on the embedded corpus.

    mtssl-main-job --profile study --out runs/study            # about 65-70 minutes on 2 cores
    mtssl-main-job --profile study --out runs/smoke --hours 0.03 --seeds 1 --updates 20 ...   # smoke size

Same data stages as the default profile (corpus, manifests, MFCC k-means labels, scene features, ABX items),
then, for every seed of ``--seeds`` (``common.seed`` of each training):

  MT4SSL (Ma et al.)      both targets / offline only / online only, ``--updates`` updates, a checkpoint every
                          ``--updates / --curve-points`` updates, the phone probe (layer ``--layer``, held-out
                          test speakers) on each: learning curves.
                          Claim: with both targets the model converges faster than with either alone
                          (metric: the mean probe accuracy over the curve's checkpoints, its area).
  VGS+SSL (Khorrami et al.)  VGS alone (does it ground?), simultaneous VGS+ and sequential W2V2 -> VGS
                          (20/70 : 50/70 of ``--vgs-updates``), the tiny config's batches (24 random
                          captions) and light heads (``--vgs-recipe``), object-region image features.
                          Claims: the sequential model retrieves better (mean of R@1/5/10 both ways, test);
                          VGS+ keeps more of the phonetic structure that the switch to VGS forgets (ABX across
                          speakers, best layer; the sequential run's ABX before the switch is in the tables).
  SCORE (Meghanani & Hain)   ``mtssl-score-evidence`` from the strongest seed-1 model of the MT4SSL runs
                          (chosen by *validation* probe accuracy), ``--seeds`` SCORE seeds.
                          Claims: SCORE narrows the perturbed-minus-clean gap (probe accuracy, ABX across);
                          it loses nothing on clean audio.
  SCORE, LASER, SPIN      ``mtssl-content-compare`` from the main job's HuBERT (``--updates``, seed 1): the three
                          methods at ``--content-updates`` updates each, ``--seeds`` seeds.
                          Claims: SPIN leaves less speaker information (speaker probe) and improves content
                          (probe, ABX); LASER's content beats SCORE's and narrows the perturbed-minus-clean gap.

``study.json`` / ``study.md`` hold every value, the tables and one verdict per claim (:mod:`.verdicts`:
reproduced in direction / contradicted / inconclusive, mean +- standard deviation over seeds), and the
verdicts are printed. Nothing is tuned on the test split.
"""

import json
import os
import platform
import time
from pathlib import Path
from typing import Dict, List

from ..atomic import atomic_write
from ..evaluation.abx import best_layer
from .content_compare import LABELS
from .main_job import MT4SSL_VARIANTS, MainJob
from .stages import StageFailed
from .verdicts import Claim, Spread

VGS_RECIPES = {
    # the authors' FaST-VGS+ heads and loss (dot product, margin InfoNCE), at the tiny config's widths
    "paper": ["model.vgs_arch=fast_vgs_plus", "criterion.vgs_loss=margin_infonce", "criterion.similarity=dot"],
    # the tiny config's light heads with a cosine, temperature InfoNCE (the CPU-scale default)
    "light": [],
}
STUDY_SCENARIOS = {"vgs_only": "VGS", "vgs_plus": "VGS+", "w2v2_then_vgs": "W2V2,VGS"}


class Study:
    def __init__(self, job: MainJob):
        self.job, self.args = job, job.args
        self.out = job.out
        self.pipeline = job.pipeline

    # -- MT4SSL learning curves -----------------------------------------------------------------
    def curve_updates(self) -> List[int]:
        n, points = self.args.updates, max(1, self.args.curve_points)
        return sorted({max(1, round(n * (i + 1) / points)) for i in range(points)})

    def mt4ssl(self, variant: str, seed: int):
        name = f"mt4ssl_{variant}_seed{seed}"

        def train():
            every = self.curve_updates()
            interval = every[0] if len(every) == 1 else every[1] - every[0]
            return self.job.train_arch(
                f"train_{name}",
                "mt4ssl",
                self.job.run_dir(name),
                seed,
                f"optimization.max_update={self.args.updates}",
                *MT4SSL_VARIANTS[variant],
                "checkpoint.keep_interval_updates=-1",  # keep every curve point
                save_interval=interval,
            )

        def curve():
            ckdir = self.job.run_dir(name) / "checkpoints"
            points = []
            for u in self.curve_updates():
                found = sorted(ckdir.glob(f"checkpoint_*_{u}.pt"))
                if not found:
                    raise StageFailed(f"{ckdir}: no checkpoint at {u} updates (checkpoint_<epoch>_{u}.pt)")
                ck = found[0]
                js = self.out / "eval" / name / f"probe_{u}.json"
                self.pipeline.run(
                    f"curve_{name}",
                    [
                        "mtssl-phone-probe",
                        ck,
                        *("--layer", self.args.layer, "--manifests", self.job.manifests),
                        *("--alignments", self.job.data / "corpus" / "alignments", "--json", js),
                    ],
                )
                probe = json.loads(js.read_text())
                points.append({"updates": u, "valid_acc": probe["valid_acc"], "test_acc": probe["test_acc"]})
            # the final model's ABX and QbE too (one evaluation, one feature pass): their run-to-run spread,
            # for the default report's metrics
            last, d = ckdir / "checkpoint_last.pt", self.out / "eval" / name
            self.pipeline.run(
                f"curve_{name}",
                ["mtssl-evaluate-upstream", last, "--data", self.job.data, "--out", d, "--layer", self.args.layer]
                + ["--items", self.job.items, "--pr-updates", 0, "--no-probe"],
            )
            layers, qbe_result = (
                json.loads((d / "abx.json").read_text())["layers"],
                json.loads((d / "qbe.json").read_text()),
            )
            best = best_layer(layers)
            final = {
                "abx_within_best": best["within"],
                "abx_across_best": best["across"],
                "qbe_map": qbe_result["map"],
                "qbe_mtwv": qbe_result["mtwv"],
            }
            return {"checkpoint": str(last), "curve": points, "final": final}

        return name, train, curve

    # -- VGS scenarios --------------------------------------------------------------------------
    def vgs(self, model: str, seed: int):
        name = f"{model}_seed{seed}"
        run = self.job.run_dir(name)

        def train():
            return self.job.vgs_scenario(
                f"train_{name}",
                STUDY_SCENARIOS[model],
                run,
                seed,
                self.args.vgs_updates,
                *([f"dataset.batch_size={self.args.vgs_batch_size}"] if self.args.vgs_batch_size else []),
                *VGS_RECIPES[self.args.vgs_recipe],
            )

        def evaluate():
            ck = self.pipeline.results[f"train_{name}"]["checkpoint"]
            d = self.out / "eval" / name
            checkpoints = {"final": ck}
            if model == "w2v2_then_vgs":  # the wav2vec 2.0 stage, before the switch
                checkpoints["before_switch"] = str(run / "stage1_w2v2" / "checkpoints" / "checkpoint_last.pt")
            result: Dict[str, object] = {}
            for which, path in checkpoints.items():
                abx = d / f"abx_{which}.json"
                self.pipeline.run(
                    f"eval_{name}",
                    ["mtssl-abx", path, "--manifest", self.job.manifests / "test.tsv", "--items", self.job.items]
                    + ["--json", abx],
                )
                layers = json.loads(abx.read_text())["layers"]
                result[f"abx_across_{which}"] = best_layer(layers)["across"]
            self.pipeline.run(
                f"eval_{name}", ["mtssl-vgs-retrieval", ck, "--split", "test", "--json", d / "retrieval.json"]
            )
            ret = json.loads((d / "retrieval.json").read_text())
            result["retrieval"] = {k: v for k, v in ret.items() if k.startswith(("s2i_", "i2s_"))}
            result["chance"] = ret["chance"]
            result["mean_recall"] = sum(result["retrieval"].values()) / len(result["retrieval"])
            return result

        return name, train, evaluate

    # -- SCORE ----------------------------------------------------------------------------------
    def score(self):
        """``mtssl-score-evidence`` from the seed-1 MT4SSL run with the best validation probe accuracy."""
        seed = self.args.seeds[0]
        candidates = {v: self.pipeline.results[f"curve_mt4ssl_{v}_seed{seed}"] for v in MT4SSL_VARIANTS}
        best = max(candidates, key=lambda v: candidates[v]["curve"][-1]["valid_acc"])
        out = self.out / "score_evidence"
        self.pipeline.run(
            "score_evidence",
            [
                "mtssl-score-evidence",
                candidates[best]["checkpoint"],
                *("--data", self.job.data, "--out", out, "--updates", self.args.score_updates),
                "--seeds",
                *self.args.seeds,
            ],
        )
        return {"start": f"mt4ssl_{best}_seed{seed}", "summary": json.loads((out / "summary.json").read_text())}

    # -- SCORE, LASER, SPIN -----------------------------------------------------------------------
    def content(self):
        """``mtssl-content-compare`` from the main job's HuBERT (seed 1): SCORE, LASER and SPIN at equal updates."""
        start = self.pipeline.results["train_hubert"]["checkpoint"]
        out = self.out / "content_compare"
        self.pipeline.run(
            "content_compare",
            [
                "mtssl-content-compare",
                start,
                *("--data", self.job.data, "--out", out, "--updates", self.args.content_updates),
                # its trainings and evaluations side by side as the study's own stages (--jobs)
                *("--jobs", self.args.jobs, "--seeds", *self.args.seeds),
            ],
        )
        return {"summary": json.loads((out / "summary.json").read_text()), "table": str(out / "summary.md")}

    # -- declaring and judging ------------------------------------------------------------------
    def declare(self) -> None:
        """Declaration order is scheduling priority: the longest chain first (seed-1 MT4SSL -> SCORE)."""
        self.job.declare_data()
        stages, first, parts = self.pipeline, self.args.seeds[0], self.parts
        for seed in self.args.seeds:
            if "mt4ssl" in parts:
                for variant in MT4SSL_VARIANTS:
                    name, train, curve = self.mt4ssl(variant, seed)
                    stages.add(f"train_{name}", train, after=["labels_mfcc"])
                    stages.add(f"curve_{name}", curve, after=[f"train_{name}", "abx_items"])
            if seed == first and "score" in parts:
                curves = [f"curve_mt4ssl_{v}_seed{seed}" for v in MT4SSL_VARIANTS]
                stages.add("score_evidence", self.score, after=curves)
            if seed == first and "content" in parts:
                stages.add("train_hubert", self.job.train_hubert, after=["labels_mfcc"])
                stages.add("content_compare", self.content, after=["train_hubert", "manifests"])
            if "vgs" in parts:
                for model in STUDY_SCENARIOS:
                    name, train, evaluate = self.vgs(model, seed)
                    stages.add(f"train_{name}", train, after=["image_features"])
                    stages.add(f"eval_{name}", evaluate, after=[f"train_{name}", "abx_items"])
        evaluations = [
            n for n in stages.specs if n.startswith(("curve_", "eval_", "score_evidence", "content_compare"))
        ]
        stages.add("verdicts", self.verdicts, after=evaluations)

    @property
    def parts(self) -> List[str]:
        parts = list(self.args.study_parts)
        if "score" in parts and "mt4ssl" not in parts:  # SCORE starts from the strongest MT4SSL run
            parts.append("mt4ssl")
        return parts

    def claims(self) -> List[Claim]:
        res, seeds = self.pipeline.results, self.args.seeds

        def area(variant):
            return [Spread.of([p["test_acc"] * 100 for p in res[f"curve_mt4ssl_{variant}_seed{s}"]["curve"]]).mean
                    for s in seeds]  # fmt: skip

        def vgs(model, key):
            return [res[f"eval_{model}_seed{s}"][key] for s in seeds]

        def mt4ssl():
            return Claim(
                "MT4SSL (Ma et al., Interspeech 2023)",
                "with both targets the model converges faster than with either alone",
                [
                    Claim.comparison(
                        "both", area("both"), alone, area(alone), "probe test accuracy, curve mean (%)", True
                    )
                    for alone in ("offline_only", "online_only")
                ],
            )

        def vgs_claims():
            retrieval = Claim(
                "VGS+SSL (Khorrami et al., EUSIPCO 2023)",
                "sequential W2V2 -> VGS retrieves better than simultaneous VGS+",
                [
                    Claim.comparison(
                        "W2V2 -> VGS",
                        vgs("w2v2_then_vgs", "mean_recall"),
                        "VGS+",
                        vgs("vgs_plus", "mean_recall"),
                        "mean of R@1/5/10 both ways, test (%)",
                        True,
                    )
                ],
            )
            forgetting = Claim(
                "VGS+SSL (Khorrami et al., EUSIPCO 2023)",
                "VGS+ keeps more phonetic structure than a sequential switch to VGS (forgets less)",
                [
                    Claim.comparison(
                        "VGS+",
                        vgs("vgs_plus", "abx_across_final"),
                        "W2V2 -> VGS",
                        vgs("w2v2_then_vgs", "abx_across_final"),
                        "ABX across speakers, best layer (%)",
                        False,
                    )
                ],
            )
            return [retrieval, forgetting]

        claims = ([mt4ssl()] if "mt4ssl" in self.parts else []) + (vgs_claims() if "vgs" in self.parts else [])
        if "content" in self.parts:
            claims += content_claims(res["content_compare"]["summary"])
        if "score" not in self.parts:
            return claims
        metrics = res["score_evidence"]["summary"]["metrics"]

        def value(key, v):  # gaps as magnitudes (SCORE should bring them towards 0), the probe in %
            return (abs(v) if key.endswith("_gap") else v) * (100 if key.startswith("probe") else 1)

        def runs(key):
            return [value(key, v) for v in metrics[key]["score_values"]]

        def start(key):
            return [value(key, metrics[key]["start"])]

        score_gap = Claim(
            "SCORE (Meghanani & Hain, ICASSP 2024)",
            "fine-tuning narrows the gap between perturbed and clean test audio",
            [
                Claim.comparison(
                    "SCORE", runs("probe_gap"), "start", start("probe_gap"), "probe acc. gap, magnitude (%)", False
                ),
                Claim.comparison(
                    "SCORE",
                    runs("abx_across_gap"),
                    "start",
                    start("abx_across_gap"),
                    "ABX across gap, magnitude (%)",
                    False,
                ),
            ],
        )
        score_clean = Claim(
            "SCORE (Meghanani & Hain, ICASSP 2024)",
            "without losing on clean audio",
            [
                Claim.comparison(
                    "SCORE", runs("probe_clean"), "start", start("probe_clean"), "probe acc., clean (%)", True, True
                ),
                Claim.comparison(
                    "SCORE",
                    runs("abx_across_clean"),
                    "start",
                    start("abx_across_clean"),
                    "ABX across, clean (%)",
                    False,
                    True,
                ),  # fmt: skip
            ],
        )
        return claims + [score_gap, score_clean]

    def verdicts(self) -> Dict:
        claims = [c.as_dict() for c in self.claims()]
        study = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
            f"{platform.python_implementation()} {platform.python_version()}",
            "seeds": list(self.args.seeds),
            "claims": claims,
            "mt4ssl_curves": {
                k[len("curve_") :]: v["curve"] for k, v in self.pipeline.results.items() if k.startswith("curve_")
            },
            "mt4ssl_final": {
                k[len("curve_") :]: dict(v["final"], probe_test_acc=100 * v["curve"][-1]["test_acc"])
                for k, v in self.pipeline.results.items()
                if k.startswith("curve_")
            },
            "vgs": {k[len("eval_") :]: v for k, v in self.pipeline.results.items() if k.startswith("eval_")},
            "score": self.pipeline.results.get("score_evidence"),
            "content": self.pipeline.results.get("content_compare"),
            "parts": self.parts,
        }
        with atomic_write(self.out / "study.json") as f:
            json.dump(study, f, indent=1)
        with atomic_write(self.out / "study.md") as f:
            f.write(study_markdown(study, self.args))
        for c in claims:
            print(f"{c['verdict'].upper():>24}: {c['paper']}: {c['claim']}", flush=True)
        return {"study": str(self.out / "study.md"), "verdicts": {c["claim"]: c["verdict"] for c in claims}}


def study_markdown(study: Dict, args) -> str:
    seeds = study["seeds"]
    lines = [
        "# Study: the papers' claims over seeds",
        "",
        f"{study['date']}, {study['machine']}; seeds {seeds}; "
        f"`mtssl-main-job --profile study --out {args.out} --seeds {' '.join(map(str, seeds))} "
        f"--updates {args.updates} --vgs-updates {args.vgs_updates} "
        f"--vgs-recipe {args.vgs_recipe} --score-updates {args.score_updates} "
        f"--study-parts {' '.join(study.get('parts', ['mt4ssl', 'vgs', 'score', 'content']))}`.",
        "Intervals: mean +- one standard deviation over seeds; overlapping intervals are inconclusive.",
        "",
        "## Verdicts",
        "",
        "| paper | claim | verdict | comparisons (a vs b: metric, a, b, verdict) |",
        "| --- | --- | --- | --- |",
    ]
    for c in study["claims"]:
        comps = "; ".join(
            f"{x['a']} vs {x['b']} ({x['metric']}): {x['a_spread']} vs {x['b_spread']}, {x['verdict']}"
            for x in c["comparisons"]
        )
        lines.append(f"| {c['paper']} | {c['claim']} | **{c['verdict']}** | {comps} |")
    curves = study["mt4ssl_curves"]
    points = sorted({p["updates"] for v in curves.values() for p in v})
    if curves:
        lines += ["", "## MT4SSL learning curves (phone probe, test accuracy %, mean +- std over seeds)", ""]
        lines += [
            "| variant | " + " | ".join(f"{u} updates" for u in points) + " |",
            "| --- |" + " --- |" * len(points),
        ]
    for variant in MT4SSL_VARIANTS if curves else []:
        cells = []
        for u in points:
            vals = [p["test_acc"] * 100 for s in seeds for p in curves.get(f"mt4ssl_{variant}_seed{s}", [])
                    if p["updates"] == u]  # fmt: skip
            cells.append(str(Spread.of(vals)) if vals else "-")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    finals = study.get("mt4ssl_final", {})
    if finals:
        keys = ["probe_test_acc", "abx_within_best", "abx_across_best", "qbe_map", "qbe_mtwv"]
        lines += ["", "## Run-to-run spread of the final MT4SSL models (mean +- std over seeds)", ""]
        lines += ["| variant | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
        for variant in MT4SSL_VARIANTS:
            rows = [finals[f"mt4ssl_{variant}_seed{s}"] for s in seeds if f"mt4ssl_{variant}_seed{s}" in finals]
            lines.append(f"| {variant} | " + " | ".join(str(Spread.of([r[k] for r in rows])) for k in keys) + " |")
    if study["vgs"]:
        lines += ["", "## VGS+SSL (test split; R@1 as a multiple of chance in brackets)", ""]
        lines += [
            "| scenario | seed | s->i R@1/5/10 | i->s R@1/5/10 | ABX across, best layer (%) | ABX before the switch |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
    chance = None
    for name, r in sorted(study["vgs"].items()):
        ret, chance = r["retrieval"], r.get("chance") or chance
        cells = []
        for d in ("s2i", "i2s"):
            fold = f" ({ret[f'{d}_r1'] / chance[f'{d}_r1']:.1f}x)" if chance else ""
            cells.append(" / ".join(f"{ret[f'{d}_r{k}']:.1f}" for k in (1, 5, 10)) + fold)
        before = r.get("abx_across_before_switch")
        lines.append(
            f"| {name.rsplit('_seed', 1)[0]} | {name.rsplit('_seed', 1)[1]} | {cells[0]} | {cells[1]} | "
            f"{r['abx_across_final']:.2f} | {'-' if before is None else f'{before:.2f}'} |"
        )
    if chance:
        s2i, i2s = (" / ".join(f"{chance[f'{d}_r{k}']:.1f}" for k in (1, 5, 10)) for d in ("s2i", "i2s"))
        lines.append(f"| chance (random ranking) | - | {s2i} | {i2s} | - | - |")
    content = study.get("content")
    if content:
        lines += ["", "## SCORE, LASER and SPIN from the main job's HuBERT (mtssl-content-compare)", ""]
        lines += [Path(content["table"]).read_text().strip()]
    score = study["score"]
    if not score:
        return "\n".join(lines) + "\n"
    lines += ["", f"## SCORE from {score['start']} ({len(seeds)} SCORE seeds)", ""]
    lines += ["| metric | start | SCORE mean +- std |", "| --- | --- | --- |"]
    for k, m in score["summary"]["metrics"].items():
        vals = m["score_values"]
        lines.append(f"| {k} | {m['start']:.4g} | {Spread.of(vals) if vals else '-'} |")
    return "\n".join(lines) + "\n"


def content_claims(summary: Dict) -> List[Claim]:
    """SPIN's and LASER's claims from a content comparison's ``summary.json`` (per method and metric the values
    over seeds; the start has one value). Gaps as magnitudes, the probes in %."""
    m = summary["metrics"]

    def vals(method, key):
        out = [v for v in m[method][key]["values"] if v is not None]
        return [(abs(v) if key.endswith("_gap") else v) * (100 if key.startswith(("probe", "speaker")) else 1)
                for v in out]  # fmt: skip

    def cmp(a, b, key, metric, higher, not_worse=False):
        return Claim.comparison(LABELS[a], vals(a, key), LABELS[b], vals(b, key), metric, higher, not_worse)

    spin_speaker = Claim(
        "SPIN (Chang, Liu & Glass, Interspeech 2023)",
        "speaker-invariant clustering leaves less speaker information in the fine-tuned layer",
        [
            cmp("spin", "start", "speaker_frame_acc", "frame-level speaker probe acc. (%)", False),
            cmp("spin", "score", "speaker_frame_acc", "frame-level speaker probe acc. (%)", False),
        ],
    )
    spin_content = Claim(
        "SPIN (Chang, Liu & Glass, Interspeech 2023)",
        "and improves content representations",
        [
            cmp("spin", "start", "probe_clean", "phone probe acc., clean (%)", True),
            cmp("spin", "start", "abx_across_clean", "ABX across, clean (%)", False),
        ],
    )
    laser = Claim(
        "LASER (Meghanani & Hain, Interspeech 2024)",
        "LASER's content representations beat SCORE's",
        [
            cmp("laser", "score", "probe_clean", "phone probe acc., clean (%)", True),
            cmp("laser", "score", "abx_across_clean", "ABX across, clean (%)", False),
        ],
    )
    laser_gap = Claim(
        "LASER (Meghanani & Hain, Interspeech 2024)",
        "and, like SCORE, narrows the perturbed-minus-clean gap",
        [
            cmp("laser", "start", "probe_gap", "probe acc. gap, magnitude (%)", False),
            cmp("laser", "start", "abx_across_gap", "ABX across gap, magnitude (%)", False),
        ],
    )
    return [spin_speaker, spin_content, laser, laser_gap]


def add_study_arguments(parser) -> None:
    g = parser.add_argument_group("study profile (--profile study)")
    g.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds of every condition")
    g.add_argument(
        "--study-parts",
        nargs="+",
        choices=["mt4ssl", "vgs", "score", "content"],
        default=["mt4ssl", "vgs", "score", "content"],
        help="which papers' claims to test (score needs the mt4ssl runs: it starts from the strongest; content: "
        "SCORE, LASER and SPIN from the main job's HuBERT, mtssl-content-compare)",
    )
    g.add_argument(
        "--content-updates", type=int, default=300, help="updates of every SCORE / LASER / SPIN run of the content part"
    )
    g.add_argument("--curve-points", type=int, default=3, help="MT4SSL checkpoints probed along each run")
    g.add_argument(
        "--vgs-updates",
        type=int,
        default=150,
        help="updates of each VGS scenario (both stages); at 25 captions a batch one update takes about 2.5 s here",
    )
    g.add_argument(
        "--vgs-batch-size",
        type=int,
        default=None,
        help="captions per VGS batch (default: the tiny config's 24, drawn at random every epoch)",
    )
    g.add_argument(
        "--vgs-recipe",
        choices=sorted(VGS_RECIPES),
        default="light",
        help="VGS heads and loss: light (the tiny config's heads, cosine InfoNCE) or paper (FaST-VGS+ heads, margin "
        "InfoNCE on dot products; at this width its speech-image loss stayed at chance, 8.4 = 2 (1 + ln(24 + 1/e)) "
        "for 25 captions, after 290 updates, at 0.27 updates/s)",
    )
