"""fairseq's ``hubert_pretraining`` task with its inputs checked before any data is loaded.

Registered as ``hubert_pretraining_checked``: an empty or malformed manifest, a label file with a
line count different from the manifest's, or an utterance whose labels do not fit its length (more
than ``label_tolerance_s`` apart, fairseq's 0.1 s by default) raise an error naming the file and line,
where fairseq's ``HubertDataset`` only logs a warning or fails with a bare assertion.
"""

from dataclasses import dataclass, field

from fairseq.tasks import register_task
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig, HubertPretrainingTask

from ..data.label_checks import check_frame_labels
from ..data.manifest import read_manifest


@dataclass
class CheckedHubertPretrainingConfig(HubertPretrainingConfig):
    label_tolerance_s: float = field(
        default=0.1,
        metadata={"help": "largest allowed |audio duration - labels / label_rate| in seconds; larger is an error"},
    )


@register_task("hubert_pretraining_checked", dataclass=CheckedHubertPretrainingConfig)
class CheckedHubertPretrainingTask(HubertPretrainingTask):
    cfg: CheckedHubertPretrainingConfig

    def check_split(self, split: str) -> None:
        manifest = f"{self.cfg.data}/{split}.tsv"
        read_manifest(manifest)
        rate = self.cfg.label_rate if not self.cfg.fine_tuning else -1.0
        for label in self.cfg.labels:
            check_frame_labels(manifest, f"{self.get_label_dir()}/{split}.{label}", rate, self.cfg.sample_rate, self.cfg.label_tolerance_s)

    def load_dataset(self, split: str, **kwargs) -> None:
        self.check_split(split)
        super().load_dataset(split, **kwargs)
