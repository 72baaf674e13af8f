"""A fairseq HuBERT checkpoint as a ``HubertModel``: what ``score_hubert`` builds its student from, and
what the converters (:mod:`fairseq_mtssl.convert.hubert_checkpoint`) export from.

:func:`load_hubert` reads an official or self-trained fairseq HuBERT checkpoint (``args`` Namespace or
``cfg``) with torch's weights-only loader (the plugin allowlists the plain-data classes it holds; a
checkpoint that pickles code is refused) and builds fairseq's ``HubertModel``.
"""

from pathlib import Path
from typing import Tuple

import torch

from ..checkpoint_safety import model_name
from ..errors import MtsslError
from ..upstream.checkpoint import read_checkpoint


class NotAHubertCheckpoint(MtsslError, ValueError):
    """The checkpoint holds another model than fairseq's HuBERT."""


def load_hubert(path) -> Tuple[torch.nn.Module, dict]:
    """``(fairseq HubertModel in eval mode, the checkpoint's state dict)``; clear errors otherwise."""
    from fairseq import checkpoint_utils
    from fairseq.models.hubert import HubertModel

    import fairseq_mtssl  # noqa: F401

    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    state = read_checkpoint(path)  # weights-only, plus fairseq's args -> cfg upgrade; names the file on refusal
    name = model_name(state)
    if not name.startswith("hubert"):
        raise NotAHubertCheckpoint(f"{path}: model is {name or 'unknown'!r}, not a fairseq HuBERT checkpoint")
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    model = models[0]
    if not isinstance(model, HubertModel):
        raise NotAHubertCheckpoint(f"{path}: built {type(model).__name__}, not HubertModel")
    return model.eval(), state
