"""Let ``torch.load(weights_only=True)`` (the default since torch 2.6) read fairseq checkpoints.

fairseq checkpoints pickle a handful of plain data classes besides tensors: ``argparse.Namespace``
(``args`` of pre-hydra checkpoints such as the official HuBERT / wav2vec 2.0 releases), the task's
``fairseq.data.dictionary.Dictionary`` objects, the training meters saved in ``extra_state`` and
numpy scalars inside them, and, in some releases, omegaconf containers. This module allowlists
exactly those classes with :func:`torch.serialization.add_safe_globals`; anything else (for example a
checkpoint that pickles a callable such as ``os.system``) is still refused by torch's safe unpickler.
"""

import argparse
import collections
import logging
from typing import List

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _fairseq_classes() -> List[type]:
    from fairseq.data.dictionary import Dictionary
    from fairseq.logging import meters

    meter_classes = [
        getattr(meters, name)
        for name in ("AverageMeter", "SumMeter", "ConcatTensorMeter", "TimeMeter", "StopwatchMeter")
        if hasattr(meters, name)
    ]
    return [Dictionary, *meter_classes]


def _numpy_classes() -> List[object]:
    """numpy objects that appear in meters (``np.float64`` values) and in some ``args``."""
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    dtype_classes = [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return [scalar, _reconstruct, np.dtype, np.ndarray, *dtype_classes]


def _omegaconf_classes() -> List[type]:
    import typing

    from omegaconf import DictConfig, ListConfig
    from omegaconf import nodes
    from omegaconf.base import ContainerMetadata, Metadata

    node_classes = [
        getattr(nodes, n)
        for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode", "ValueNode")
        if hasattr(nodes, n)
    ]
    return [DictConfig, ListConfig, ContainerMetadata, Metadata, *node_classes, typing.Any, dict, list, int]


def safe_checkpoint_classes() -> List[object]:
    """Every global a fairseq checkpoint may reference that is plain data, never code."""
    return [
        argparse.Namespace,
        collections.OrderedDict,
        collections.defaultdict,
        *_fairseq_classes(),
        *_numpy_classes(),
        *_omegaconf_classes(),
    ]


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


class CheckpointLoadError(RuntimeError):
    """A checkpoint is corrupt, truncated, or pickles something other than data."""
