"""``mtssl-main-job``: the main job's command line, for its two profiles.

``--profile default`` runs :class:`.main_job.MainJob` (every model once, untrained baselines, a report);
``--profile study`` runs :class:`.study.Study` (the papers' claims over seeds, with verdicts).
"""

import argparse
import os
from typing import List, Optional

from ..errors import cli
from . import main_job
from .commands import MALLOC_TUNABLES
from .main_job import MODELS, MainJob
from .study import Study, add_study_arguments


@cli
def main(argv: Optional[List[str]] = None) -> None:
    cores = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=main_job.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/main")
    parser.add_argument("--hours", type=float, default=0.5, help="hours of training speech in the corpus")
    parser.add_argument("--seed", type=int, default=1, help="seed of the corpus and of every training")
    parser.add_argument("--clusters", type=int, default=50, help="k-means clusters of the offline labels")
    parser.add_argument(
        "--updates", type=int, default=300, help="pre-training updates of each model (HuBERT, MT4SSL, VGS)"
    )
    parser.add_argument("--score-updates", type=int, default=150, help="SCORE fine-tuning updates")
    parser.add_argument(
        "--pr-updates",
        type=int,
        default=0,
        help="SUPERB-style phone recognition (CTC head on the frozen model) for this many updates; 0: none. At 300 "
        "updates its PER sits at 95-98 %% for nearly every model, so the default budget uses the phone probe instead",
    )
    parser.add_argument(
        "--retrieval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="speech<->image retrieval (R@1/5/10 both ways, test split, chance beside it) of every VGS model",
    )
    parser.add_argument("--av-weight", type=float, default=0.5, help="VGS+: weight of the audio-visual loss (alpha)")
    parser.add_argument(
        "--layer", type=int, default=2, help="layer of the phone probe and QbE (ABX covers every layer)"
    )
    parser.add_argument(
        "--save-interval", type=int, default=50, help="checkpoint every N updates (what a kill -9 can lose)"
    )
    parser.add_argument(
        "--models", nargs="+", default=MODELS, choices=MODELS, help="which models to train and evaluate"
    )
    parser.add_argument("--iter2", action="store_true", help="also make HuBERT iteration-2 labels from the base model")
    parser.add_argument("--jobs", type=int, default=2, help="stages run side by side")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads per stage (default: cores / jobs)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="rerun finished stages (a training resumes from its own "
        "checkpoint_last.pt; delete models/<model> to train it from scratch)",
    )
    parser.add_argument(
        "--malloc-tunables",
        default=MALLOC_TUNABLES,
        help="GLIBC_TUNABLES for the commands, unless already set ('' for none): about half the memory per training "
        "for about 6%% more time (see fairseq_mtssl/jobs/commands.py)",
    )
    parser.add_argument(
        "--profile",
        choices=["default", "study"],
        default="default",
        help="default: every model once, with untrained baselines, and a report; study: the papers' claims over "
        "seeds, with verdicts (fairseq_mtssl/jobs/study.py)",
    )
    add_study_arguments(parser)
    args = parser.parse_args(argv)
    args.threads = args.threads or max(1, cores // args.jobs)
    job = MainJob(args)
    if args.profile == "study":
        Study(job).declare()
        job.execute()
    else:
        job.main()


if __name__ == "__main__":
    main()
