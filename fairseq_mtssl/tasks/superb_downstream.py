"""``superb_downstream`` task: fairseq's audio fine-tuning data (manifest + ``.phn`` / ``.ltr``
transcripts + ``dict.{labels}.txt``) for SUPERB-style downstream training on a frozen upstream.

Before fairseq reads a split, the transcripts are checked against the manifest and the dictionary:
one line per utterance and no unknown symbol, errors naming the file and line (fairseq would
assert on the count and silently map unknown symbols to ``<unk>``).

With ``task.features=DIR`` the model reads the frozen upstream's hidden states of each split from the
feature cache ``DIR/{split}`` (``mtssl-cache-features``) instead of forwarding the upstream at every step:
the batches are the audio path's, the states those of one forward per utterance.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fairseq.tasks import register_task
from fairseq.tasks.audio_finetuning import AudioFinetuningConfig, AudioFinetuningTask

from ..data.cached_states import CachedStatesDataset
from ..data.manifest import check_task_dirs
from ..errors import MtsslError
from ..upstream.features import FeatureCacheError, open_cache


class TranscriptError(MtsslError, ValueError):
    pass


@dataclass
class SuperbDownstreamTaskConfig(AudioFinetuningConfig):
    features: Optional[str] = field(
        default=None,
        metadata={
            "help": "a folder of the upstream's feature caches, one per split (DIR/{split}, every layer, "
            "mtssl-cache-features): the downstream reads the frozen upstream's hidden states from it instead "
            "of forwarding the upstream at every step; null: from the audio"
        },
    )


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
        if self.cfg.features:
            self._read_states_from_cache(split)

    def _read_states_from_cache(self, split: str) -> None:
        """Swap the audio under the split's targets for the cached hidden states of the same utterances."""
        if self.cfg.max_sample_size is not None:
            raise FeatureCacheError(
                f"task.features={self.cfg.features}: the cache holds whole utterances, task.max_sample_size "
                f"({self.cfg.max_sample_size}) would crop the audio: set it to null"
            )
        cache = Path(self.cfg.features) / split
        features = open_cache(cache)
        manifest = Path(self.cfg.data, f"{split}.tsv").resolve()
        if features.meta["manifest"] != str(manifest):
            raise FeatureCacheError(f"{cache}/meta.json: features of {features.meta['manifest']}, not of {manifest}")
        targets = self.datasets[split]
        targets.dataset = CachedStatesDataset(
            targets.dataset, features.utterances, features.offsets, features.layers, str(cache)
        )
