"""fairseq's ``hubert_pretraining`` task with its inputs checked and every label set kept aligned.

Registered as ``hubert_pretraining_checked``:

- an empty or malformed manifest, a label file whose line count differs from the manifest's, or an
  utterance whose labels do not fit its length (more than ``label_tolerance_s`` apart, fairseq's
  0.1 s by default) raise an error naming the file and line, where fairseq's ``HubertDataset`` only
  logs a warning or fails with a bare assertion;
- ``label_rates`` gives each label set its own rate (e.g. MFCC k-means at 100 Hz next to HuBERT
  k-means at 50 Hz, as MT4SSL uses), where fairseq's task has one ``label_rate`` for all;
- fields a model derives from the task (``task_derived_config()``, e.g. MT4SSL's head sizes) are
  written into the saved model config, so fine-tuning can rebuild the model without the labels;
- random crops start on a multiple of the coarsest label hop, so the crop cuts every label set at a
  frame boundary and audio and labels stay exactly aligned (fairseq rounds the label start).
"""

import math
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
from fairseq.data.audio.hubert_dataset import HubertDataset
from fairseq.tasks import register_task
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig, HubertPretrainingTask, LabelEncoder
from omegaconf import OmegaConf, open_dict

from ..data.label_checks import check_frame_labels
from ..data.manifest import check_task_dirs, read_manifest
from ..upstream.frontend import use_channels_last_front_end


@dataclass
class CheckedHubertPretrainingConfig(HubertPretrainingConfig):
    label_tolerance_s: float = field(
        default=0.1,
        metadata={"help": "largest allowed |audio duration - labels / label_rate| in seconds; larger is an error"},
    )
    label_rates: Optional[List[float]] = field(
        default=None,
        metadata={"help": "one rate per entry of `labels` (labels per second); default: label_rate for every set"},
    )


class AlignedCropHubertDataset(HubertDataset):
    """``HubertDataset`` whose random crops start on a multiple of ``crop_hop`` samples."""

    def __init__(self, *args, crop_hop: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.crop_hop = max(1, crop_hop)

    def crop_to_max_size(self, wav, target_size):
        diff = len(wav) - target_size
        if diff <= 0:
            return wav, 0
        start = 0
        if self.random_crop:
            start = int(np.random.randint(0, diff // self.crop_hop + 1)) * self.crop_hop
        return wav[start : start + target_size], start


@register_task("hubert_pretraining_checked", dataclass=CheckedHubertPretrainingConfig)
class CheckedHubertPretrainingTask(HubertPretrainingTask):
    cfg: CheckedHubertPretrainingConfig

    @property
    def label_rates(self) -> List[float]:
        rates = self.cfg.label_rates
        if rates is None:
            return [float(self.cfg.label_rate)] * len(self.cfg.labels)
        if len(rates) != len(self.cfg.labels):
            raise ValueError(f"task.label_rates has {len(rates)} entries but task.labels has {len(self.cfg.labels)}")
        return [float(r) for r in rates]

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        if not kwargs.get("from_checkpoint"):  # rebuilt from a checkpoint (fine-tuning): its folders may be gone
            check_task_dirs(cfg, "data", "label_dir")
        return super().setup_task(cfg, **kwargs)

    def build_model(self, cfg, from_checkpoint=False):
        """Build as fairseq does, then record in ``cfg`` (the config the checkpoint saves) what the model
        took from the task, e.g. MT4SSL's head sizes, so rebuilding it later needs no label directory. On CPU
        the conv front end runs channels-last (the same function, upstream.frontend.ChannelsLastFrontEnd)."""
        model = super().build_model(cfg, from_checkpoint)
        use_channels_last_front_end(model)
        derived = getattr(model, "task_derived_config", None)
        if derived is not None and OmegaConf.is_config(cfg):
            with open_dict(cfg):
                for key, value in derived().items():
                    cfg[key] = value
        return model

    def check_split(self, split: str) -> None:
        manifest = f"{self.cfg.data}/{split}.tsv"
        read_manifest(manifest)
        for label, rate in zip(self.cfg.labels, self.label_rates):
            rate = rate if not self.cfg.fine_tuning else -1.0
            check_frame_labels(
                manifest,
                f"{self.get_label_dir()}/{split}.{label}",
                rate,
                self.cfg.sample_rate,
                self.cfg.label_tolerance_s,
                dict_path=f"{self.get_label_dir()}/dict.{label}.txt",
            )

    def load_dataset(self, split: str, **kwargs) -> None:
        self.check_split(split)
        dicts = [self.target_dictionary] if self.cfg.fine_tuning else self.dictionaries
        positive = [r for r in self.label_rates if r > 0]
        # the smallest hop (in samples) that is a whole number of frames of every label set
        hop = math.lcm(*[round(self.cfg.sample_rate / r) for r in positive]) if positive else 1
        self.datasets[split] = AlignedCropHubertDataset(
            f"{self.cfg.data}/{split}.tsv",
            sample_rate=self.cfg.sample_rate,
            label_paths=[f"{self.get_label_dir()}/{split}.{label}" for label in self.cfg.labels],
            label_rates=self.label_rates,
            pad_list=[d.pad() for d in dicts],
            eos_list=[d.eos() for d in dicts],
            label_processors=[LabelEncoder(d) for d in dicts],
            max_keep_sample_size=self.cfg.max_keep_size,
            min_keep_sample_size=self.cfg.min_sample_size,
            max_sample_size=self.cfg.max_sample_size,
            pad_audio=self.cfg.pad_audio,
            normalize=self.cfg.normalize,
            store_labels=False,
            random_crop=self.cfg.random_crop,
            single_target=self.cfg.single_target,
            crop_hop=hop,
        )
