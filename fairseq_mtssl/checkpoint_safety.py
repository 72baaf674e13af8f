"""Let ``torch.load(weights_only=True)`` (the default since torch 2.6) read fairseq checkpoints.

fairseq checkpoints pickle a handful of plain data classes besides tensors and builtins: ``argparse.Namespace``
(``args`` of pre-hydra checkpoints such as the official wav2vec 2.0 / HuBERT releases), the task's
``fairseq.data.dictionary.Dictionary`` objects (``task_state``, and ``checkpoint_last.pt`` of every
``hubert_pretraining`` run), and numpy scalars (values inside some ``args``). This module allowlists
exactly those classes with :func:`torch.serialization.add_safe_globals`; anything else (for example a
checkpoint that pickles a callable such as ``os.system``) is still refused by torch's safe unpickler.
"""

import argparse
import logging
from typing import List

import numpy as np
import torch

from .errors import CheckpointLoadError

logger = logging.getLogger(__name__)


def _numpy_scalar_classes() -> List[object]:
    """What pickling a numpy scalar (``np.float64(0.5)``, as in some ``args`` and meter values) references."""
    try:  # numpy >= 2
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    dtype_classes = [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return [scalar, np.dtype, *dtype_classes]


def safe_checkpoint_classes() -> List[object]:
    """Every global a fairseq checkpoint references that is plain data, never code."""
    from fairseq.data.dictionary import Dictionary

    return [argparse.Namespace, Dictionary, *_numpy_scalar_classes()]


_ALLOWED = False


def allow_fairseq_checkpoint_classes() -> None:
    """Register :func:`safe_checkpoint_classes` with torch's weights-only unpickler (idempotent)."""
    global _ALLOWED
    if _ALLOWED:
        return
    torch.serialization.add_safe_globals(safe_checkpoint_classes())
    _ALLOWED = True


def load_checkpoint_safely(path) -> dict:
    """``torch.load`` a checkpoint with ``weights_only=True``; name the file and the refused globals."""
    allow_fairseq_checkpoint_classes()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError ...
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        unsafe = []
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            pass
        extra = f"; it references globals that are not plain data: {unsafe}" if unsafe else ""
        raise CheckpointLoadError(f"{path}: not a loadable checkpoint ({detail}){extra}") from err


def model_name(state: dict) -> str:
    """The model name a checkpoint's state records: ``cfg.model._name`` (hydra), else ``args.arch``
    (pre-hydra releases); ``""`` when it records none."""
    cfg = state.get("cfg") or {}
    if cfg.get("model") is not None:
        return str(cfg["model"].get("_name") or "")
    args = state.get("args")
    return str(getattr(args, "arch", "") or "")
