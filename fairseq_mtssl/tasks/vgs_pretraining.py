"""``vgs_ssl_pretraining`` task: wav2vec 2.0 audio pre-training data, each caption paired with its
image's precomputed region features, optionally mixed with speech that has no image.

Data (SpokenCOCO-style manifests, as ``mtssl-manifest-spokencoco`` / ``mtssl-manifest-corpus`` write):
``{split}.tsv`` audio, ``{split}.img`` one image index per utterance into ``{split}.images``, and the
features ``{image_features}/{split}.npy`` + ``.idx`` (``mtssl-image-features``). ``audio_only_manifest``
(e.g. a LibriSpeech ``train.tsv``) adds utterances without images to the training split: the
wav2vec 2.0 loss sees them, the speech-image loss skips them.

A caption whose image has no feature row, an ``.img`` line count that does not match the manifest,
or an index outside ``.images`` is an error naming the file and line.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from fairseq.data import BaseWrapperDataset, ConcatDataset, FileAudioDataset
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.audio_pretraining import AudioPretrainingConfig, AudioPretrainingTask

from ..data.image_features import ImageFeatureError, ImageFeatureStore
from ..data.manifest import check_task_dirs
from ..upstream.frontend import use_channels_last_front_end

CROP = ChoiceEnum(["random", "start"])
logger = logging.getLogger(__name__)


class StartCropAudioDataset(FileAudioDataset):
    """``FileAudioDataset`` that keeps the first ``target_size`` samples of a longer utterance (FaST-VGS's
    ``audio_feat_len``); with ``normalize`` the kept part is normalised again, so it has zero mean and
    unit variance as the authors' cut-then-normalise gives (a normalisation of a normalised, cut
    waveform equals that of the raw cut one)."""

    def crop_to_max_size(self, t, target_size, dim=0):
        if t.size(dim) <= target_size:
            return t
        t = t.narrow(dim, 0, target_size)
        return F.layer_norm(t, t.shape) if self.normalize and dim == 0 else t


@dataclass
class VgsSslPretrainingConfig(AudioPretrainingConfig):
    image_features: Optional[str] = field(
        default=None, metadata={"help": "directory of {split}.npy/.idx image features (default: data)"}
    )
    audio_only_manifest: Optional[str] = field(
        default=None, metadata={"help": "manifest of speech without images, added to the train split"}
    )
    train_subset: str = field(default="train", metadata={"help": "the split audio-only speech is mixed into"})
    crop: CROP = field(
        default="random",
        metadata={
            "help": "captions longer than max_sample_size: random (fairseq) crop, or the start (FaST-VGS: the first "
            "8 s in training, re-normalised after the cut when normalize is on)"
        },
    )
    max_sample_size_valid: Optional[int] = field(
        default=None, metadata={"help": "max_sample_size of the other splits (FaST-VGS: 10 s); default max_sample_size"}
    )
    pad_to_max_sample_size: bool = field(
        default=False,
        metadata={
            "help": "zero-pad every caption of a batch to max_sample_size (FaST-VGS pads each training caption to "
            "8 s), with its padding mask, instead of to the batch's longest. Not the same result with a group-norm "
            "front end (extractor_mode: default), whose first GroupNorm normalises over the padded frames too"
        },
    )
    random_batches: bool = field(
        default=False,
        metadata={
            "help": "training batches of captions drawn at random, anew every epoch (FaST-VGS: a shuffled DataLoader "
            "of 64 captions), instead of fairseq's length-sorted batches, whose members are the same every epoch "
            "(each caption then meets the same few negatives). Set dataset.batch_size for a fixed caption count"
        },
    )


def read_image_ids(data: str, split: str, n_audio: int) -> List[str]:
    """The image name of each utterance of ``split`` (``.img`` indices into ``.images``)."""
    img_path, images_path = os.path.join(data, f"{split}.img"), os.path.join(data, f"{split}.images")
    for p in (img_path, images_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: needed to pair {split} captions with images")
    with open(images_path, encoding="utf-8") as f:
        images = f.read().splitlines()
    with open(img_path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) != n_audio:
        raise ImageFeatureError(f"{img_path}: {len(lines)} lines but {split}.tsv lists {n_audio} utterances")
    names = []
    for lineno, line in enumerate(lines, start=1):
        try:
            k = int(line)
        except ValueError:
            raise ImageFeatureError(f"{img_path}:{lineno}: expected an image index, got {line!r}") from None
        if not 0 <= k < len(images):
            raise ImageFeatureError(
                f"{img_path}:{lineno}: image index {k} outside {images_path} ({len(images)} images)"
            )
        names.append(images[k])
    return names


def pad_waveforms(net_input: dict, length: int) -> None:
    """Zero-pad ``source (B, T)`` to ``(B, length)`` in place of ``net_input``, ``padding_mask`` True beyond
    ``T`` (created all False when the batch had none)."""
    source = net_input["source"]
    extra = length - source.size(1)
    if extra <= 0:
        return
    mask = net_input.get("padding_mask")
    if mask is None:
        mask = torch.zeros_like(source, dtype=torch.bool)
    net_input["source"] = F.pad(source, (0, extra))
    net_input["padding_mask"] = F.pad(mask, (0, extra), value=True)


class RandomOrderDataset(BaseWrapperDataset):
    """Orders its items at random instead of by length, so fairseq's ``batch_by_size`` makes random batches.
    fairseq calls ``ordered_indices`` under ``numpy_seed(seed + epoch)`` and, with the audio tasks'
    ``rebuild_batches``, once per epoch: batches are new every epoch and the same on every rerun."""

    def ordered_indices(self):
        return np.random.permutation(len(self))


class ImagePairedAudioDataset(BaseWrapperDataset):
    """Adds ``image_feats (B, R, D)``, ``image_padding_mask (B, R)`` to ``net_input`` and
    ``image_ids (B,)`` (-1: no image) to each batch of a wav2vec 2.0 audio dataset."""

    def __init__(
        self,
        dataset,
        image_names: Optional[List[str]],
        store: Optional[ImageFeatureStore],
        dim: int,
        pad_to: Optional[int] = None,
    ):
        super().__init__(dataset)
        self.names, self.store, self.dim, self.pad_to = image_names, store, dim, pad_to
        self.ids = None
        if image_names is not None:
            vocab = {n: i for i, n in enumerate(sorted(set(image_names)))}
            self.ids = [vocab[n] for n in image_names]

    def __getitem__(self, index):
        item = self.dataset[index]
        if self.names is not None:
            item["image"] = torch.from_numpy(self.store[self.names[index]])
            item["image_id"] = self.ids[index]
        return item

    def collater(self, samples):
        batch = self.dataset.collater(samples)
        if not batch:
            return batch
        if self.pad_to:
            pad_waveforms(batch["net_input"], self.pad_to)
        kept = [s for s in samples if s["source"] is not None]
        regions = max([len(s["image"]) for s in kept if "image" in s], default=1)
        feats = torch.zeros(len(kept), regions, self.dim)
        mask = torch.ones(len(kept), regions, dtype=torch.bool)
        ids = torch.full((len(kept),), -1, dtype=torch.long)
        for i, s in enumerate(kept):
            if "image" in s:
                feats[i, : len(s["image"])] = s["image"]
                mask[i, : len(s["image"])] = False
                ids[i] = s["image_id"]
        batch["net_input"]["image_feats"] = feats
        batch["net_input"]["image_padding_mask"] = mask
        batch["image_ids"] = ids
        return batch


@register_task("vgs_ssl_pretraining", dataclass=VgsSslPretrainingConfig)
class VgsSslPretrainingTask(AudioPretrainingTask):
    cfg: VgsSslPretrainingConfig

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        if not kwargs.get("from_checkpoint"):  # rebuilt from a checkpoint (fine-tuning): its folders may be gone
            check_task_dirs(cfg, "data", "image_features")
        return super().setup_task(cfg, **kwargs)

    def __init__(self, cfg: VgsSslPretrainingConfig):
        super().__init__(cfg)
        self.image_feature_dim = None

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        use_channels_last_front_end(model)  # on CPU, the same conv front end computed channels-last
        self._model = model  # build_criterion freezes what its av_weight leaves unreached
        return model

    def build_criterion(self, cfg, from_checkpoint=False):
        """fairseq builds the criterion after the model and before the trainer wraps it in DDP: the parameters
        the loss cannot reach at ``criterion.av_weight`` (the heads at 0, the SSL-only parts at 1) are frozen
        here, with one line, so torch DDP (c10d) accepts every scenario and its stages."""
        criterion = super().build_criterion(cfg, from_checkpoint)
        model, av_weight = getattr(self, "_model", None), getattr(criterion, "av_weight", None)
        if model is not None and av_weight is not None and hasattr(model, "freeze_unreached"):
            frozen = model.freeze_unreached(av_weight)
            if frozen:
                groups = sorted({".".join(n.split(".")[: 4 if ".layers." in n else 2]) for n in frozen})
                logger.info(f"av_weight={av_weight}: {', '.join(groups)} take no part in the loss: left frozen")
        return criterion

    def _store(self, split: str) -> ImageFeatureStore:
        store = ImageFeatureStore(os.path.join(self.cfg.image_features or self.cfg.data, split))
        if self.image_feature_dim is not None and store.dim != self.image_feature_dim:
            raise ImageFeatureError(
                f"{store.prefix}.npy: {store.dim}-dim features, other splits have {self.image_feature_dim}"
            )
        self.image_feature_dim = store.dim
        return store

    def _audio(self, manifest: str, train: bool = True) -> FileAudioDataset:
        c = self.cfg
        cls = StartCropAudioDataset if c.crop == "start" else FileAudioDataset
        return cls(
            manifest_path=manifest,
            sample_rate=c.sample_rate,
            max_sample_size=c.max_sample_size if train or not c.max_sample_size_valid else c.max_sample_size_valid,
            min_sample_size=c.min_sample_size,
            pad=c.enable_padding,
            normalize=c.normalize,
            num_buckets=0,
            compute_mask=False,
        )

    def load_dataset(self, split: str, task_cfg=None, **kwargs):
        manifest = os.path.join(self.cfg.data, f"{split}.tsv")
        audio = self._audio(manifest, train=split == self.cfg.train_subset)
        with open(manifest, encoding="utf-8") as f:
            n_lines = sum(1 for _ in f) - 1
        names = read_image_ids(self.cfg.data, split, n_lines)
        store = self._store(split)
        for lineno, name in enumerate(names, start=1):
            if name not in store:
                raise ImageFeatureError(
                    f"{os.path.join(self.cfg.data, split)}.img:{lineno}: image {name} has no feature row in {store.prefix}.idx"
                )
        skipped = set(audio.skipped_indices)  # lines FileAudioDataset dropped (shorter than min_sample_size)
        names = [n for i, n in enumerate(names) if i not in skipped]
        pad_to = audio.max_sample_size if self.cfg.pad_to_max_sample_size else None
        dataset = ImagePairedAudioDataset(audio, names, store, store.dim, pad_to)
        if self.cfg.audio_only_manifest and split == self.cfg.train_subset:
            speech = ImagePairedAudioDataset(self._audio(self.cfg.audio_only_manifest), None, None, store.dim, pad_to)
            dataset = ConcatDataset(
                [dataset, speech]
            )  # collates with the first dataset's collater, which knows both kinds
        if self.cfg.random_batches and split == self.cfg.train_subset:
            dataset = RandomOrderDataset(dataset)
        self.datasets[split] = dataset
