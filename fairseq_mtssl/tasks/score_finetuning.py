"""``score_finetuning``: pairs of an utterance and its perturbed copy, for SCORE.

Each item reads an utterance of ``{data}/{split}.tsv`` (checked against the manifest), crops it to
``max_sample_size`` at a random start, and makes a copy perturbed as in SCORE: speed 0.9 / 1.0 / 1.1,
then pitch +2 or -2 semitones (50/50; a phase vocoder as the authors' torchaudio ``PitchShift``, or
WSOLA with ``pitch_method=wsola``); additive noise and reverberation are available but off. The
pair comes in random order: ``source`` goes through the trainable student, ``target_source`` through
the frozen teacher. Every random choice is drawn from a generator seeded by (seed, epoch, index), so
each epoch perturbs an utterance anew and a resumed run sees the same pairs.

The epoch has to reach the DataLoader workers. fairseq's ``EpochBatchIterator`` keeps one DataLoader with
persistent workers across epochs when the task may reuse it, and each worker holds the copy of the
dataset made when it started: ``set_epoch`` in the main process would never reach it, and every epoch
would repeat epoch 1's perturbations. The dataset therefore says it cannot be reused across epochs
(``can_reuse_epoch_itr_across_epochs``, fairseq's ``EpochListening`` switch for datasets that rely on
``set_epoch``): fairseq's training loop then builds a new iterator, and new workers, each epoch after
``set_epoch``.
"""

import sys
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from fairseq.data import FairseqDataset
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from ..data import perturb
from ..data.audio import read_audio
from ..data.manifest import check_task_dirs, read_manifest
from ..upstream.frontend import use_channels_last_front_end


@dataclass
class ScoreFinetuningConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "directory with {split}.tsv manifests"})
    sample_rate: int = field(default=16000, metadata={"help": "audio sample rate (Hz)"})
    normalize: bool = field(default=False, metadata={"help": "layer-normalise waveforms (as the HuBERT was trained)"})
    max_sample_size: int = field(default=250000, metadata={"help": "crop originals to this many samples"})
    min_sample_size: int = field(default=8000, metadata={"help": "skip shorter utterances"})
    speed_factors: List[float] = field(
        default_factory=lambda: [0.9, 1.0, 1.1], metadata={"help": "speed perturbation factors, drawn uniformly"}
    )
    pitch_semitones: List[float] = field(
        default_factory=lambda: [2.0, -2.0], metadata={"help": "pitch shifts in semitones, drawn uniformly"}
    )
    pitch_method: ChoiceEnum(perturb.PITCH_METHODS) = field(
        default="phase_vocoder",
        metadata={"help": "time-stretch of the pitch shift: phase_vocoder (n_fft 512, hop 128; the authors') or wsola"},
    )
    noise_snr_db: Optional[float] = field(default=None, metadata={"help": "add white noise at this SNR (off in SCORE)"})
    reverb_rt60: Optional[float] = field(default=None, metadata={"help": "add synthetic reverberation (off in SCORE)"})
    seed: int = II("common.seed")


class PerturbedPairDataset(FairseqDataset):
    def __init__(self, manifest_path: str, cfg: ScoreFinetuningConfig, shuffle: bool = True):
        self.manifest = read_manifest(manifest_path)
        self.cfg = cfg
        self.keep = [i for i, e in enumerate(self.manifest.entries) if e.num_samples >= cfg.min_sample_size]
        if not self.keep:
            raise ValueError(f"{manifest_path}: no utterance has >= {cfg.min_sample_size} samples")
        self.sizes = np.array([min(self.manifest.entries[i].num_samples, cfg.max_sample_size) for i in self.keep])
        self.shuffle = shuffle
        self.epoch = 1

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        """False: the pairs depend on the epoch, which persistent DataLoader workers would not see."""
        return False

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.keep)

    def crop_and_generator(self, index: int):
        """``(waveform of item index, cropped to max_sample_size, generator)``: the generator is seeded by
        (seed, epoch, index), so a pair is the same on every rerun and new every epoch; it drew the crop."""
        i = self.keep[index]
        wav = read_audio(
            self.manifest.audio_path(i),
            self.manifest.where(i),
            self.manifest.entries[i].num_samples,
            self.cfg.sample_rate,
        )
        rng = np.random.default_rng([int(self.cfg.seed), int(self.epoch), int(index)])
        if len(wav) > self.cfg.max_sample_size:
            start = int(rng.integers(0, len(wav) - self.cfg.max_sample_size + 1))
            wav = wav[start : start + self.cfg.max_sample_size]
        return wav, rng

    def make_pair(self, index: int):
        """``(original crop, perturbed copy, description)`` for item ``index``."""
        wav, rng = self.crop_and_generator(index)
        factor = float(rng.choice(self.cfg.speed_factors))
        semitones = float(rng.choice(self.cfg.pitch_semitones))
        other = perturb.pitch_shift(
            perturb.speed(wav, factor), semitones, self.cfg.sample_rate, method=str(self.cfg.pitch_method)
        )
        if self.cfg.noise_snr_db is not None:
            other = perturb.add_noise(other, self.cfg.noise_snr_db, rng)
        if self.cfg.reverb_rt60 is not None:
            other = perturb.reverberate(other, self.cfg.reverb_rt60, rng, self.cfg.sample_rate)
        return wav, other, {"speed": factor, "semitones": semitones, "swap": bool(rng.random() < 0.5)}

    def _tensor(self, wav):
        x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
        return F.layer_norm(x, x.shape) if self.cfg.normalize else x

    def __getitem__(self, index):
        orig, other, how = self.make_pair(index)
        first, second = (other, orig) if how["swap"] else (orig, other)
        return {"id": index, "source": self._tensor(first), "target_source": self._tensor(second)}

    def collater(self, samples):
        if not samples:
            return {}
        return {
            "id": torch.LongTensor([s["id"] for s in samples]),
            "net_input": {
                "source": [s["source"] for s in samples],
                "target_source": [s["target_source"] for s in samples],
            },
            "nsentences": len(samples),
        }

    def num_tokens(self, index):
        return int(self.sizes[index])

    def size(self, index):
        return int(self.sizes[index])

    def ordered_indices(self):
        order = [np.random.permutation(len(self))] if self.shuffle else [np.arange(len(self))]
        order.append(self.sizes)
        return np.lexsort(order)[::-1]


@register_task("score_finetuning", dataclass=ScoreFinetuningConfig)
class ScoreFinetuningTask(FairseqTask):
    cfg: ScoreFinetuningConfig

    def __init__(self, cfg: ScoreFinetuningConfig):
        super().__init__(cfg)

    @classmethod
    def setup_task(cls, cfg: ScoreFinetuningConfig, **kwargs):
        if not kwargs.get("from_checkpoint"):  # rebuilt from a checkpoint (fine-tuning): its folders may be gone
            check_task_dirs(cfg, "data")
        return cls(cfg)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        use_channels_last_front_end(model)  # on CPU, the same conv front end computed channels-last
        return model

    def load_dataset(self, split: str, **kwargs):
        self.datasets[split] = PerturbedPairDataset(f"{self.cfg.data}/{split}.tsv", self.cfg, shuffle=split != "valid")

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None

    def max_positions(self):
        return (sys.maxsize, sys.maxsize)
