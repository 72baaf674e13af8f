"""LASER (Meghanani & Hain, Interspeech 2024): learning by aligning self-supervised representations of speech.

Registered as ``laser``. An utterance and its perturbed copy (the ``score_finetuning`` task's pairs) both go
through one trainable upstream (``upstream_path``: a fairseq HuBERT, wav2vec 2.0, data2vec-audio or the
plugin's MT4SSL checkpoint) in training mode, dropout on; there is no teacher. Both last-layer outputs go
through one projection ``Linear(dim -> proj_dim)`` and L2 normalisation, and the ``laser`` criterion
(:mod:`fairseq_mtssl.losses.laser`) aligns them with the soft-DTW divergence while a temporal regulariser
keeps each sequence's frames apart in time.

Everything but the teacher is SCORE's (:class:`fairseq_mtssl.models.score.ScoreModel`, subclassed here):
``trainable`` names what learns (negative layer indices count from the top), a dry forward and backward at
build time freezes (and logs) the named parameters the loss cannot reach, so fairseq's default c10d DDP runs
as it is; the frozen bottom runs without a graph where nothing below it trains; LayerDrop is ``layerdrop``.
The default set is the authors' (``runner_part_freeze.py`` on s3prl's ``hubert_base``, by position): the top
2 layers and ``encoder.layer_norm`` -- but not the front end's ``layer_norm``, which their code freezes by
name, unlike SCORE's -- plus ``mask_emb`` (and HuBERT's ``label_embs_concat``), unreachable, so left frozen.

The checkpoint holds ``student.*`` (the upstream) and ``proj.*``: the layout SCORE's export reads.
"""

import logging
from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn as nn
from fairseq.models import register_model

from .score import ContentFinetuneConfig, ScoreModel

logger = logging.getLogger(__name__)

# The authors' trainable set in names every supported upstream has (the paper config adds label_embs_concat).
LASER_TRAINABLE = ["encoder.layers.-2", "encoder.layers.-1", "encoder.layer_norm", "mask_emb"]


@dataclass
class LaserConfig(ContentFinetuneConfig):
    trainable: List[str] = field(
        default_factory=lambda: list(LASER_TRAINABLE),
        metadata={
            "help": "parameter names / prefixes of the upstream that train (encoder.layers.-1 = the top layer); "
            "default: the authors' set (top 2 layers, encoder.layer_norm, mask_emb; not the front end's "
            "layer_norm); named parameters that LASER's loss cannot reach (mask_emb) stay frozen and are logged"
        },
    )


@register_model("laser", dataclass=LaserConfig)
class LaserModel(ScoreModel):
    """SCORE's model without the teacher: both sides of a pair go through the trainable upstream."""

    method = "LASER"
    with_teacher = False  # ScoreModel.__init__ builds no teacher: self.teacher is None

    def train(self, mode: bool = True):
        return nn.Module.train(self, mode)

    def forward(self, source: List[torch.Tensor], target_source: List[torch.Tensor]) -> dict:
        """Both sides of each pair (lists of ``(T_i,)``) through the student, in one batch where the front end
        allows padding; projected, L2-normalised frames ``x``/``y (B, T, proj_dim)`` and frame lengths."""
        b = len(source)
        feats, lengths = self._encode(self.student, list(source) + list(target_source))
        len_x, len_y = lengths[:b], lengths[b:]
        z = self.project(feats)
        return {
            "x": z[:b, : int(len_x.max())],
            "len_x": len_x,
            "y": z[b:, : int(len_y.max())],
            "len_y": len_y,
        }
