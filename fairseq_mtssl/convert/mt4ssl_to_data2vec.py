"""Export an MT4SSL student (or a data2vec_audio trained with the plugin) as a plain fairseq ``data2vec_audio`` checkpoint.

    mtssl-export-data2vec runs/mt4ssl/checkpoints/checkpoint_best.pt exported/data2vec_student.pt

The result loads in vanilla fairseq (no ``user_dir``): model ``data2vec_audio`` under task
``audio_pretraining``, with the student's weights and the EMA teacher (``_ema``, which fairseq's
data2vec insists on when loading, as in data2vec's own checkpoints); the offline heads are dropped. Fine-tuning with ``wav2vec_ctc``
(``model.w2v_path=...``) or feature extraction then works as for any data2vec model.
"""

import argparse
from dataclasses import fields
from typing import Optional

from ..atomic import save_torch_atomic
from ..checkpoint_safety import load_checkpoint_safely
from ..errors import ExportError, cli


def data2vec_checkpoint(state: dict, src, weights: Optional[dict] = None) -> dict:
    """An MT4SSL checkpoint's ``state`` as a plain ``data2vec_audio`` checkpoint (a dict to save), with
    ``weights`` (a student state dict; default: the checkpoint's own) instead of its weights."""
    from fairseq.examples.data2vec.models.data2vec_audio import Data2VecAudioConfig

    cfg = state.get("cfg")
    model_cfg = (cfg or {}).get("model") or {}
    if model_cfg.get("_name") not in ("mt4ssl", "data2vec_audio"):  # data2vec_audio: rewritten without user_dir
        raise ExportError(f"{src}: model is {model_cfg.get('_name')!r}, not an MT4SSL or data2vec_audio checkpoint")
    keep = {f.name for f in fields(Data2VecAudioConfig)}
    new_model_cfg = {k: v for k, v in model_cfg.items() if k in keep}
    new_model_cfg["_name"] = "data2vec_audio"
    task = cfg["task"]
    new_task_cfg = {
        "_name": "audio_pretraining",
        "data": task.get("data"),
        "sample_rate": task.get("sample_rate", 16000),
        "normalize": task.get("normalize", False),
        "max_sample_size": task.get("max_sample_size"),
        "min_sample_size": task.get("min_sample_size"),
    }
    weights = state["model"] if weights is None else weights
    weights = {k: v for k, v in weights.items() if not k.startswith("offline_heads.")}
    if "_ema" not in weights:
        raise ExportError(
            f"{src}: no EMA teacher state (an offline-only run?); fairseq's data2vec requires one to load"
        )
    return {
        "cfg": {
            **{k: v for k, v in cfg.items() if k not in ("model", "task", "criterion")},
            "common": {**(cfg.get("common") or {}), "user_dir": None},
            "model": new_model_cfg,
            "task": new_task_cfg,
            "criterion": {"_name": "model"},
        },
        "model": weights,
        "args": None,
        "optimizer_history": state.get("optimizer_history", [])[-1:],  # metadata only; fairseq needs one entry
        "extra_state": {},
        "last_optimizer_state": None,
    }


def export_mt4ssl_student(src, dst) -> dict:
    out = data2vec_checkpoint(load_checkpoint_safely(src), src)
    save_torch_atomic(out, dst)
    return out


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("output")
    a = p.parse_args(argv)
    out = export_mt4ssl_student(a.checkpoint, a.output)
    print(f"{a.output}: data2vec_audio, {len(out['model'])} tensors")


if __name__ == "__main__":
    main()
