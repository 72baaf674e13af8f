"""Read a speech model checkpoint without executing anything it pickles.

fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` calls ``torch.load`` without ``weights_only``, so
whether it refuses a checkpoint that pickles code depends on torch's default and on the environment
(``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns the refusal off). :func:`read_checkpoint` reads the file
with ``weights_only=True`` explicitly (:func:`~fairseq_mtssl.checkpoint_safety.load_checkpoint_safely`),
then applies fairseq's own upgrade of old checkpoints; :func:`load_speech_model` hands that state to
``load_model_ensemble_and_task``, so fairseq never opens the file itself.
"""

import contextlib
from pathlib import Path
from typing import Tuple

import torch.nn as nn

from ..checkpoint_safety import load_checkpoint_safely
from ..errors import CheckpointLoadError


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


@contextlib.contextmanager
def _copyable_ema_teachers():
    """While loading: fairseq's data2vec deep-copies itself into its EMA teacher (``set_num_updates`` at
    load), which torch >= 2.1 refuses for weight-normed convolutions; detach their weights first, as
    MT4SSL does for itself (:mod:`fairseq_mtssl.models.weight_norm`). Restored on exit."""
    from fairseq.examples.data2vec.models.data2vec_audio import Data2VecAudioModel

    from ..models.weight_norm import detach_weight_norm_weights

    original = Data2VecAudioModel.make_ema_teacher

    def make_ema_teacher(self):
        detach_weight_norm_weights(self)
        original(self)

    Data2VecAudioModel.make_ema_teacher = make_ema_teacher
    try:
        yield
    finally:
        Data2VecAudioModel.make_ema_teacher = original


def load_model_and_task(path):
    """``(model in eval mode, cfg, task)`` of a fairseq or plugin checkpoint, read safely."""
    from fairseq import checkpoint_utils

    import fairseq_mtssl  # noqa: F401  (registers the plugin's classes and the checkpoint allowlist)

    state = read_checkpoint(path)
    with _copyable_ema_teachers():
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], state=state)
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
    """``(frozen speech encoder in eval mode, whether its task normalised the waveform)``."""
    model, task_cfg = load_speech_model(path)
    try:
        encoder = speech_encoder_of(model)
    except TypeError as err:
        raise CheckpointLoadError(f"{path}: {err}") from None
    return encoder.eval().requires_grad_(False), bool(getattr(task_cfg, "normalize", False))
