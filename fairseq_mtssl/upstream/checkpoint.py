"""Read a speech model checkpoint without executing anything it pickles.

fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` calls ``torch.load`` without ``weights_only``, so
whether it refuses a checkpoint that pickles code depends on torch's default and on the environment
(``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns the refusal off). :func:`read_checkpoint` reads the file
with ``weights_only=True`` explicitly (:func:`~fairseq_mtssl.checkpoint_safety.load_checkpoint_safely`),
then applies fairseq's own upgrade of old checkpoints; :func:`load_speech_model` hands that state to
``load_model_ensemble_and_task``, so fairseq never opens the file itself.

A data2vec-audio (or the plugin's MT4SSL) checkpoint carries its EMA teacher (``_ema``), a second copy
of the model that only pre-training uses. A loaded model is an upstream (SCORE, SUPERB, features), so
the teacher is never built: its entries are left out of the state, and :func:`drop_ema_teachers` keeps
it from being built later (fairseq's trainer calls ``set_num_updates`` on every module of the model it
trains, which makes data2vec build one) and lets a state that still holds ``_ema`` load.
"""

import contextlib
from pathlib import Path
from typing import Optional, Tuple

import torch.nn as nn

from ..checkpoint_safety import load_checkpoint_safely
from ..errors import CheckpointLoadError
from .frontend import use_channels_last_front_end


def read_checkpoint(path) -> dict:
    """A fairseq checkpoint's state, read weights-only and upgraded as fairseq's loader does."""
    from fairseq import checkpoint_utils
    from omegaconf import OmegaConf

    if not Path(path).is_file():
        raise CheckpointLoadError(f"{path}: checkpoint not found")
    state = load_checkpoint_safely(path)
    if not isinstance(state, dict) or ("cfg" not in state and "args" not in state):
        raise CheckpointLoadError(f"{path}: not a fairseq checkpoint (no 'cfg' or 'args')")
    if state.get("cfg") is not None:
        state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
    return checkpoint_utils._upgrade_state_dict(state)


EMA_KEY = "_ema"  # data2vec's state_dict entry of its EMA teacher


def _no_ema_teacher() -> None:
    """An upstream's ``make_ema_teacher``: there is nothing to build (see :func:`drop_ema_teachers`)."""


def _ignore_ema_entry(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: an upstream without EMA teacher ignores the ``_ema`` a state may hold."""
    state_dict.pop(prefix + EMA_KEY, None)


def drop_ema_teachers(model: nn.Module) -> int:
    """Drop the EMA teacher of every data2vec-audio module inside ``model`` and keep it from coming back:
    ``make_ema_teacher`` does nothing on these instances (data2vec's ``set_num_updates`` calls it when it has
    none), and their ``load_state_dict`` ignores an ``_ema`` entry. Returns how many modules were changed."""
    from fairseq.examples.data2vec.models.data2vec_audio import Data2VecAudioModel

    found = [m for m in model.modules() if isinstance(m, Data2VecAudioModel)]
    for m in found:
        m.ema = None
        if vars(m).get("make_ema_teacher") is not _no_ema_teacher:  # once per module
            m.make_ema_teacher = _no_ema_teacher
            m.register_load_state_dict_pre_hook(_ignore_ema_entry)
    return len(found)


def without_ema_entries(weights: dict) -> dict:
    """A model state without data2vec's EMA teacher entries (``_ema``, ``<prefix>._ema``)."""
    return {k: v for k, v in weights.items() if k.rsplit(".", 1)[-1] != EMA_KEY}


@contextlib.contextmanager
def _no_ema_teachers_built():
    """While loading: fairseq's data2vec builds its EMA teacher (a deep copy of itself) when the loader
    calls ``set_num_updates``; an upstream has no use for it, so none is built (and torch >= 2.1's refusal
    to deep-copy weight-normed convolutions does not arise). Restored on exit."""
    from fairseq.examples.data2vec.models.data2vec_audio import Data2VecAudioModel

    original = Data2VecAudioModel.make_ema_teacher

    Data2VecAudioModel.make_ema_teacher = lambda self: None
    try:
        yield
    finally:
        Data2VecAudioModel.make_ema_teacher = original


def model_name(state: dict) -> str:
    """The name a checkpoint's model is registered under in fairseq (``cfg.model._name``, or an old
    checkpoint's ``args.arch``)."""
    cfg = state.get("cfg") or {}
    if cfg.get("model") is not None:
        return str(cfg["model"].get("_name") or "")
    return str(getattr(state.get("args"), "arch", "") or "")


def load_model_and_task(path, state: Optional[dict] = None):
    """``(model in eval mode, cfg, task)`` of a fairseq or plugin checkpoint, read safely (or from ``state``,
    :func:`read_checkpoint`'s); a data2vec-audio inside it has no EMA teacher (:func:`drop_ema_teachers`), and
    a ``layer_norm`` conv front end runs channels-last on CPU (:func:`~.frontend.use_channels_last_front_end`)."""
    from fairseq import checkpoint_utils

    import fairseq_mtssl  # noqa: F401  (registers the plugin's classes and the checkpoint allowlist)

    state = read_checkpoint(path) if state is None else state
    state["model"] = without_ema_entries(state["model"])
    with _no_ema_teachers_built():
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], state=state)
    drop_ema_teachers(models[0])
    use_channels_last_front_end(models[0])
    return models[0].eval(), cfg, task


def load_speech_model(path) -> Tuple[nn.Module, object]:
    """``(model in eval mode, task config)`` of a fairseq or plugin checkpoint, read safely."""
    model, _cfg, task = load_model_and_task(path)
    return model, task.cfg


def speech_encoder_of(model: nn.Module) -> nn.Module:
    """The fairseq HuBERT / wav2vec 2.0 / data2vec module inside a checkpoint's model."""
    from fairseq.examples.data2vec.models.data2vec_audio import Data2VecAudioModel
    from fairseq.models.hubert import HubertModel
    from fairseq.models.wav2vec import Wav2Vec2Model

    if hasattr(model, "speech_encoder"):  # plugin wrappers (SCORE's student, VGS+SSL's wav2vec 2.0)
        model = model.speech_encoder()
    if not isinstance(model, (HubertModel, Wav2Vec2Model, Data2VecAudioModel)):
        raise TypeError(f"{type(model).__name__} is not a HuBERT, wav2vec 2.0, data2vec or plugin speech model")
    return model


def load_upstream(path) -> Tuple[nn.Module, bool]:
    """``(frozen speech encoder in eval mode, whether its task normalised the waveform)``; ``"mfcc"``: the
    parameter-free MFCC upstream (:class:`~.mfcc.MfccUpstream`, no normalisation)."""
    from .mfcc import MfccUpstream

    if str(path) == "mfcc":
        return MfccUpstream().eval(), False
    model, task_cfg = load_speech_model(path)
    try:
        encoder = speech_encoder_of(model)
    except TypeError as err:
        raise CheckpointLoadError(f"{path}: {err}") from None
    return encoder.eval().requires_grad_(False), bool(getattr(task_cfg, "normalize", False))
