"""Export any model the plugin trains into the formats its users load: one command, the architecture detected.

    mtssl-export CHECKPOINT OUT_DIR [--formats fairseq transformers s3prl] [--hubert START.pt] [--no-verify]

| checkpoint model                      | fairseq.pt (plain, no user_dir)  | transformers/         | s3prl.pt        |
|---------------------------------------|----------------------------------|-----------------------|-----------------|
| ``hubert`` (plugin task or fairseq's) | ``hubert``                       | ``HubertModel``       | hubert_local    |
| ``score_hubert`` (SCORE)              | ``hubert`` (the student)         | ``HubertModel``       | hubert_local    |
| ``score``, ``laser`` (any upstream)   | the upstream's (the student)     | the upstream's        | the upstream's  |
| ``spin`` (any upstream)               | the upstream's (the student)     | the upstream's        | the upstream's  |
| ``wav2vec2``                          | ``wav2vec2``                     | ``Wav2Vec2Model``     | wav2vec2_local  |
| ``wav2vec2_vgs`` (VGS+SSL)            | ``wav2vec2`` (+ ``vgs_heads.pt``) | ``Wav2Vec2Model``     | wav2vec2_local  |
| ``mt4ssl``, ``data2vec_audio``        | ``data2vec_audio``               | ``Data2VecAudioModel`` (``pos_conv_depth > 1``) or ``Wav2Vec2Model`` (1) | data2vec_local |

``fairseq.pt`` is always written (the other formats are made from it). ``transformers/`` is a
``save_pretrained`` directory (``AutoModel.from_pretrained`` picks the class) with the feature extractor
that prepares raw audio as the model was trained (``AutoFeatureExtractor``: ``do_normalize`` from the
task's ``normalize``); ``s3prl.pt`` is in the
layout s3prl's ``*_local`` upstreams load with no fairseq (``hubert_local`` and ``wav2vec2_local``
also read ``fairseq.pt`` with ``fairseq=True``). ``vgs_heads.pt`` keeps a VGS+SSL model's audio and
image heads for retrieval (:func:`fairseq_mtssl.convert.wav2vec2_trunk.load_vgs_export`).
``export.json`` lists what was written, the transformers class, its feature extractor's settings and the largest hidden-state
difference between fairseq and transformers on a test waveform (the export fails above 1e-4).
"""

import argparse
import json
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from ..atomic import atomic_write
from ..checkpoint_safety import load_checkpoint_safely, model_name
from ..errors import ExportError, cli

FORMATS = ("fairseq", "transformers", "s3prl")
# checkpoint model name -> plain fairseq model it exports to
ARCHITECTURES = {
    "hubert": "hubert",
    "score_hubert": "hubert",
    "score": "its upstream's",  # SCORE on any upstream: the student leaves in its start's own format
    "laser": "its upstream's",  # LASER: SCORE's layout (student + projection), no teacher
    "spin": "its upstream's",  # SPIN: student + head + codebook; the head and codebook are dropped
    "wav2vec2": "wav2vec2",
    "wav2vec2_vgs": "wav2vec2",
    "data2vec_audio": "data2vec_audio",
    "mt4ssl": "data2vec_audio",
}


class UnknownArchitecture(ExportError):
    pass


def detect(checkpoint) -> str:
    """The checkpoint's model name, one of :data:`ARCHITECTURES` (a ``hubert*`` name reads as ``hubert``)."""
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
    name = model_name(load_checkpoint_safely(checkpoint))
    if name.startswith("hubert"):
        return "hubert"
    if name not in ARCHITECTURES:
        raise UnknownArchitecture(
            f"{checkpoint}: model {name or 'unknown'!r} has no export; known: {', '.join(sorted(ARCHITECTURES))}"
        )
    return name


def export_fairseq(checkpoint, out, hubert_path: Optional[str] = None, heads_out=None) -> Tuple[str, str]:
    """Write the plain fairseq checkpoint ``out``; returns ``(source architecture, written model)``."""
    arch = detect(checkpoint)
    written = ARCHITECTURES[arch]
    if arch == "hubert":
        from .hubert_checkpoint import load_hubert, save_vanilla_hubert

        model, state = load_hubert(checkpoint)
        save_vanilla_hubert(model, state, out)
    elif arch in ("score_hubert", "score", "laser", "spin"):
        from .score_export import export_score_student

        written = export_score_student(checkpoint, out, hubert_path)
    elif arch in ("wav2vec2", "wav2vec2_vgs"):
        from .wav2vec2_trunk import export_wav2vec2_trunk

        export_wav2vec2_trunk(checkpoint, out, heads_out)
    else:
        from .mt4ssl_to_data2vec import export_mt4ssl_student

        export_mt4ssl_student(checkpoint, out)
    return arch, written


def export_all(
    checkpoint,
    out_dir,
    formats: Sequence[str] = FORMATS,
    hubert_path: Optional[str] = None,
    verify: bool = True,
) -> Dict[str, object]:
    """Write the requested formats under ``out_dir`` and ``out_dir/export.json``; returns its content."""
    from .to_s3prl import export_s3prl
    from .to_transformers import export_transformers

    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ExportError(f"unknown formats {sorted(unknown)}; choose from {FORMATS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = out_dir / "fairseq.pt"
    arch, written = export_fairseq(checkpoint, plain, hubert_path, heads_out=out_dir / "vgs_heads.pt")
    info: Dict[str, object] = {
        "source": str(checkpoint),
        "architecture": arch,
        "fairseq": {"path": plain.name, "model": written},
    }
    if arch == "wav2vec2_vgs":
        info["vgs_heads"] = "vgs_heads.pt"
    if "transformers" in formats:
        hf = export_transformers(plain, out_dir / "transformers", verify=verify, source=checkpoint)
        info["transformers"] = {"path": "transformers", **hf}
    if "s3prl" in formats:
        info["s3prl"] = {"path": "s3prl.pt", "upstream": export_s3prl(plain, out_dir / "s3prl.pt")}
    with atomic_write(out_dir / "export.json") as f:
        json.dump(info, f, indent=1)
    return info


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint of any model in the table above")
    p.add_argument("output_dir")
    p.add_argument(
        "--formats", nargs="+", default=list(FORMATS), choices=FORMATS, help="fairseq.pt is written in any case"
    )
    p.add_argument(
        "--hubert", help="SCORE, LASER, SPIN only: the starting checkpoint (default: the run's model.upstream_path)"
    )
    p.add_argument("--no-verify", action="store_true", help="skip the fairseq/transformers hidden-state check")
    a = p.parse_args(argv)
    print(json.dumps(export_all(a.checkpoint, a.output_dir, a.formats, a.hubert, not a.no_verify)))


@cli
def transformers_main(argv=None) -> None:
    """``mtssl-export-transformers CHECKPOINT OUT_DIR``: only the transformers directory (any architecture)."""
    from .to_transformers import export_transformers

    p = argparse.ArgumentParser(description="Export any plugin or fairseq checkpoint as a transformers directory.")
    p.add_argument("checkpoint")
    p.add_argument("output_dir")
    p.add_argument("--hubert", help="SCORE, LASER, SPIN only: the starting checkpoint")
    a = p.parse_args(argv)
    parent = Path(a.output_dir).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        plain = Path(tmp) / "fairseq.pt"
        export_fairseq(a.checkpoint, plain, a.hubert)
        print(json.dumps(export_transformers(plain, a.output_dir, source=a.checkpoint)))


if __name__ == "__main__":
    main()
