"""``superb_downstream`` task: fairseq's audio fine-tuning data (manifest + ``.phn`` / ``.ltr``
transcripts + ``dict.{labels}.txt``) for SUPERB-style downstream training on a frozen upstream.

Before fairseq reads a split, the transcripts are checked against the manifest and the dictionary:
one line per utterance and no unknown symbol, errors naming the file and line (fairseq would
assert on the count and silently map unknown symbols to ``<unk>``).
"""

import os
from dataclasses import dataclass

from fairseq.tasks import register_task
from fairseq.tasks.audio_finetuning import AudioFinetuningConfig, AudioFinetuningTask

from ..data.manifest import check_task_dirs
from ..errors import MtsslError


class TranscriptError(MtsslError, ValueError):
    pass


@dataclass
class SuperbDownstreamTaskConfig(AudioFinetuningConfig):
    pass


def check_transcripts(manifest_path: str, label_path: str, dictionary) -> None:
    if not os.path.isfile(label_path):
        raise TranscriptError(f"{label_path}: transcript file for {manifest_path} not found")
    with open(manifest_path, encoding="utf-8") as f:
        n_audio = sum(1 for line in f) - 1  # first line: root
    with open(label_path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) != n_audio:
        raise TranscriptError(f"{label_path}: {len(lines)} lines but {manifest_path} lists {n_audio} utterances")
    for lineno, line in enumerate(lines, start=1):
        if not line.split():
            raise TranscriptError(f"{label_path}:{lineno}: empty transcript")
        unknown = [s for s in line.split() if dictionary.index(s) == dictionary.unk()]
        if unknown:
            raise TranscriptError(f"{label_path}:{lineno}: symbols not in the dictionary: {unknown[:5]}")


@register_task("superb_downstream", dataclass=SuperbDownstreamTaskConfig)
class SuperbDownstreamTask(AudioFinetuningTask):
    cfg: SuperbDownstreamTaskConfig

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        if not kwargs.get("from_checkpoint"):  # rebuilt from a checkpoint (fine-tuning): its folders may be gone
            check_task_dirs(cfg, "data")
        return super().setup_task(cfg, **kwargs)

    def load_dataset(self, split: str, task_cfg=None, **kwargs):
        task_cfg = task_cfg or self.cfg
        check_transcripts(
            os.path.join(self.cfg.data, f"{split}.tsv"),
            os.path.join(self.cfg.data, f"{split}.{task_cfg.labels}"),
            self.target_dictionary,
        )
        super().load_dataset(split, task_cfg, **kwargs)
