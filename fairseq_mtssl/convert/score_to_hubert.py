"""Export a SCORE-fine-tuned student as a vanilla fairseq HuBERT checkpoint.

    mtssl-export-hubert runs/score/checkpoints/checkpoint_last.pt exported/hubert_score.pt [--hubert START.pt]

The student's weights go under the starting HuBERT's config and task state (its dictionaries), so
fairseq's ``HubertModel`` (and tools built on it, such as s3prl's ``hubert_local`` upstream) load the
result with no plugin; the projection head and the frozen teacher are dropped. ``--hubert`` defaults
to the ``model.hubert_path`` the SCORE run started from.
"""

import argparse

from fairseq_mtssl.checkpoint_safety import load_checkpoint_safely

from .hubert_checkpoint import load_hubert, save_vanilla_hubert


class ExportError(ValueError):
    pass


def export_score_student(score_checkpoint, out, hubert_path=None) -> None:
    state = load_checkpoint_safely(score_checkpoint)
    model_cfg = (state.get("cfg") or {}).get("model") or {}
    if model_cfg.get("_name") not in ("score", "score_hubert"):
        raise ExportError(f"{score_checkpoint}: model is {model_cfg.get('_name')!r}, not a SCORE checkpoint")
    hubert_path = hubert_path or model_cfg.get("upstream_path") or model_cfg["hubert_path"]
    hubert, source_state = load_hubert(hubert_path)
    student = {k[len("student.") :]: v for k, v in state["model"].items() if k.startswith("student.")}
    missing, unexpected = hubert.load_state_dict(student, strict=False)
    if missing or unexpected:
        raise ExportError(
            f"{score_checkpoint}: student does not fit {hubert_path} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    save_vanilla_hubert(hubert, source_state, out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("--hubert", help="the starting HuBERT checkpoint (default: the run's model.hubert_path)")
    a = p.parse_args(argv)
    export_score_student(a.checkpoint, a.output, a.hubert)
    print(a.output)


if __name__ == "__main__":
    main()
