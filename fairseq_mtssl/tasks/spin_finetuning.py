"""``spin_finetuning``: an utterance and its speaker-perturbed copy, for SPIN.

Each item reads an utterance of ``{data}/{split}.tsv``, crops it to ``max_sample_size`` at a random start
(the authors' ``random_crop_len``, 272000 samples), and makes a copy of the same length perturbed as
:func:`fairseq_mtssl.data.speaker_perturb.perturb_speaker` does (Praat "Change gender" with random
formant, pitch-median and pitch-range ratios, then a random 10-band equaliser). ``source`` is the
original and ``perturbed`` the copy; both go through the student. Every random choice comes from a
generator seeded by (seed, epoch, index), so each epoch perturbs an utterance anew and a resumed run sees
the same pairs; as for SCORE's pairs the dataset cannot be reused across epochs (persistent DataLoader
workers would never see the new epoch; see :mod:`.score_finetuning`).

Speakers: ``{split}.spk`` beside the manifest (one speaker per manifest line) when it exists, else the
authors' LibriSpeech rule (the file name before its first ``-``). Their pitch floor and ceiling come from
``speaker_info`` (a TSV or the authors' ``spk2info.dict``), else Praat's default 75-600 Hz.

After every optimizer step the task renormalises the model's codebook rows (SPIN's unit-norm
prototypes; the model also does it in ``set_num_updates``, before every forward). fairseq's ``fp16`` /
``bf16`` optimizers step fp32 master copies that a renormalisation of the model's weights would not
reach, so they are refused: use ``common.amp`` (what the authors' Lightning ``precision: 16`` is) or
``common.memory_efficient_fp16``.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import register_task
from omegaconf import II, MISSING

from ..data import speaker_perturb
from ..errors import MtsslError
from .score_finetuning import PerturbedPairDataset, ScoreFinetuningTask

logger = logging.getLogger(__name__)


@dataclass
class SpinFinetuningConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "directory with {split}.tsv manifests"})
    sample_rate: int = field(default=16000, metadata={"help": "audio sample rate (Hz)"})
    normalize: bool = field(
        default=False, metadata={"help": "layer-normalise each waveform (as the upstream was trained; HuBERT Base: no)"}
    )
    max_sample_size: int = field(
        default=272000,
        metadata={"help": "crop longer utterances to this many samples at a random start (authors: 272000)"},
    )
    min_sample_size: int = field(
        default=40000, metadata={"help": "skip utterances shorter than this many samples (authors: 40000)"}
    )
    speaker_info: Optional[str] = field(
        default=None,
        metadata={
            "help": "per-speaker pitch floor and ceiling for Praat: a TSV 'speaker<TAB>floor<TAB>ceiling' or the "
            "authors' spk2info.dict; unset: Praat's default 75-600 Hz for every speaker"
        },
    )
    eq_gain_db: float = field(
        default=speaker_perturb.EQ_GAIN_DB, metadata={"help": "gains of the random 10-band equaliser are U(-x, x) dB"}
    )
    seed: int = II("common.seed")


class SpeakerListError(MtsslError, ValueError):
    """A ``{split}.spk`` file that does not match its manifest."""


class SpeakerPerturbedPairDataset(PerturbedPairDataset):
    """SCORE's pair dataset (manifest, crops, sizes, per-(seed, epoch, index) generator, epoch handling) with
    SPIN's speaker perturbation in place of speed and pitch, and no random order (the original is view 1)."""

    def __init__(self, manifest_path: str, cfg: SpinFinetuningConfig, shuffle: bool = True, split_type: str = "train"):
        super().__init__(manifest_path, cfg, shuffle=shuffle)
        self.speakers = self._read_speakers(manifest_path)
        self.pitch_table = None
        if cfg.speaker_info:
            self.pitch_table = speaker_perturb.read_speaker_pitch_ranges(cfg.speaker_info, split_type)
            missing = sorted({self.speakers[i] for i in self.keep} - set(self.pitch_table))
            if missing:
                raise speaker_perturb.SpeakerInfoError(
                    f"{cfg.speaker_info}: no pitch range for {len(missing)} speaker(s) of {manifest_path}: "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
                )

    def _read_speakers(self, manifest_path: str) -> List[str]:
        spk_path = os.path.splitext(manifest_path)[0] + ".spk"
        entries = self.manifest.entries
        if not os.path.exists(spk_path):
            return [speaker_perturb.librispeech_speaker(e.path) for e in entries]
        with open(spk_path, encoding="utf-8") as f:
            speakers = f.read().splitlines()
        if len(speakers) != len(entries):
            raise SpeakerListError(
                f"{spk_path}: {len(speakers)} speakers for the {len(entries)} utterances of {manifest_path}"
            )
        return speakers

    def make_pair(self, index: int):
        """``(original crop, speaker-perturbed copy of the same length, what was drawn)`` for item ``index``."""
        i = self.keep[index]
        wav, rng = self.crop_and_generator(index)
        floor, ceiling = speaker_perturb.pitch_range(self.pitch_table, self.speakers[i])
        other, how = speaker_perturb.perturb_speaker(
            wav, self.cfg.sample_rate, rng, floor, ceiling, eq_gain_db=self.cfg.eq_gain_db
        )
        if not how["praat"]:
            logger.debug("Praat failed on %s (%s): clean copy", self.manifest.where(i), how.get("praat_error"))
        return wav, other, how

    def __getitem__(self, index):
        orig, other, _ = self.make_pair(index)
        return {"id": index, "source": self._tensor(orig), "perturbed": self._tensor(other)}

    def collater(self, samples):
        if not samples:
            return {}
        return {
            "id": torch.LongTensor([s["id"] for s in samples]),
            "net_input": {"source": [s["source"] for s in samples], "perturbed": [s["perturbed"] for s in samples]},
            "nsentences": len(samples),
        }


def unwrap_model(model):
    """The model inside fairseq's distributed wrappers (``.module`` chains)."""
    while hasattr(model, "module") and not hasattr(model, "normalize_codebook"):
        model = model.module
    return model


@register_task("spin_finetuning", dataclass=SpinFinetuningConfig)
class SpinFinetuningTask(ScoreFinetuningTask):
    cfg: SpinFinetuningConfig

    def load_dataset(self, split: str, **kwargs):
        speaker_perturb.require_parselmouth()  # one line naming the package, before any worker starts
        split_type = "train" if split.startswith("train") else "valid"
        self.datasets[split] = SpeakerPerturbedPairDataset(
            f"{self.cfg.data}/{split}.tsv", self.cfg, shuffle=split != "valid", split_type=split_type
        )

    def optimizer_step(self, optimizer, model, update_num):
        if hasattr(optimizer, "fp32_params"):
            raise MtsslError(
                "SPIN renormalises its codebook after every update, which fairseq's fp16/bf16 optimizer (fp32 master "
                "copies) would undo: use common.amp=true (the authors' mixed precision) or common.memory_efficient_fp16"
            )
        super().optimizer_step(optimizer, model, update_num)
        inner = unwrap_model(model)
        if hasattr(inner, "normalize_codebook"):
            inner.normalize_codebook()
