"""Export a SCORE-, LASER- or SPIN-fine-tuned student in its upstream's own fairseq format.

    mtssl-export-score runs/score/checkpoints/checkpoint_last.pt exported/score_student.pt [--start START.pt]

The student's weights go under the starting checkpoint's config and task state, so plain fairseq (no
``user_dir``) loads the result with ``checkpoint_utils``; what only the fine-tuning used is dropped: SCORE's
projection and frozen teacher, LASER's projection, SPIN's head and codebook. All three keep the upstream
under ``student.``, so one function reads them. By the start's model:

- ``hubert`` -> a fairseq HuBERT checkpoint (task ``hubert_pretraining`` with its dictionaries);
- ``wav2vec2``, ``data2vec_audio`` -> the same model and task as the start (a data2vec keeps the
  start's EMA teacher state ``_ema``, which fairseq's data2vec requires to load);
- the plugin's ``mt4ssl`` -> a plain ``data2vec_audio`` checkpoint (as ``mtssl-export-data2vec``; the
  offline heads dropped, the start's ``_ema`` kept).

``--start`` defaults to the ``model.upstream_path`` (``model.hubert_path`` for ``score_hubert``) that
the run started from. ``mtssl-export-hubert`` is the same command.
"""

import argparse
from pathlib import Path

from ..atomic import save_torch_atomic
from ..checkpoint_safety import load_checkpoint_safely, model_name
from ..errors import ExportError, cli
from .hubert_checkpoint import load_hubert, save_vanilla_hubert
from .mt4ssl_to_data2vec import data2vec_checkpoint


def _check_fits(student: dict, expected, what: str) -> None:
    missing, unexpected = sorted(set(expected) - set(student)), sorted(set(student) - set(expected))
    if missing or unexpected:
        raise ExportError(f"{what} (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _same_format(source: dict, student: dict, start) -> dict:
    """The start checkpoint (wav2vec 2.0 / data2vec) with the student's weights, no optimizer state."""
    weights = dict(student)
    if "_ema" in source["model"]:
        weights["_ema"] = source["model"]["_ema"]
    _check_fits(weights, source["model"], f"the SCORE student does not fit {start}")
    cfg = source.get("cfg")
    if cfg is not None:
        cfg = {**cfg, "common": {**(cfg.get("common") or {}), "user_dir": None}}
    return {
        **{k: v for k, v in source.items() if k not in ("model", "cfg", "last_optimizer_state")},
        "cfg": cfg,
        "model": weights,
        "optimizer_history": source.get("optimizer_history", [])[-1:],
        "extra_state": {},
        "last_optimizer_state": None,
    }


# models that keep the fine-tuned upstream under ``student.`` (beside parts the export drops)
STUDENT_MODELS = ("score", "score_hubert", "laser", "spin")


def export_score_student(score_checkpoint, out, start_path=None) -> str:
    """Write the student of ``score_checkpoint`` (a SCORE, LASER or SPIN checkpoint) to ``out``; returns the
    written model's name."""
    state = load_checkpoint_safely(score_checkpoint)
    model_cfg = (state.get("cfg") or {}).get("model") or {}
    if model_cfg.get("_name") not in STUDENT_MODELS:
        raise ExportError(
            f"{score_checkpoint}: model is {model_cfg.get('_name')!r}, not a SCORE (or LASER, SPIN) checkpoint"
        )
    start = start_path or model_cfg.get("upstream_path") or model_cfg.get("hubert_path")
    if not start or not Path(start).is_file():
        raise ExportError(f"{score_checkpoint}: its starting checkpoint {start!r} is not a file (give --start)")
    student = {k[len("student.") :]: v for k, v in state["model"].items() if k.startswith("student.")}
    source = load_checkpoint_safely(start)
    kind = model_name(source)
    if kind.startswith("hubert"):
        hubert, source_state = load_hubert(start)
        _check_fits(student, hubert.state_dict(), f"{score_checkpoint}: the student does not fit {start}")
        hubert.load_state_dict(student)
        save_vanilla_hubert(hubert, source_state, out)
        return "hubert"
    if kind in ("wav2vec2", "data2vec_audio"):
        result = _same_format(source, student, start)
    elif kind == "mt4ssl":
        weights = dict(student)
        if "_ema" in source["model"]:
            weights["_ema"] = source["model"]["_ema"]
        _check_fits(weights, source["model"], f"{score_checkpoint}: the student does not fit {start}")
        result = data2vec_checkpoint(source, start, weights=weights)
        kind = "data2vec_audio"
    else:
        raise ExportError(
            f"{start}: model {kind!r} has no export (hubert, wav2vec2, data2vec_audio or mt4ssl starts only)"
        )
    save_torch_atomic(result, out)
    return kind


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("--start", "--hubert", dest="start", help="the starting checkpoint (default: the run's own)")
    a = p.parse_args(argv)
    kind = export_score_student(a.checkpoint, a.output, a.start)
    print(f"{a.output}: {kind}")


if __name__ == "__main__":
    main()
