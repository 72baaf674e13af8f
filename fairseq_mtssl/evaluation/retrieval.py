"""Speech <-> image retrieval recall@1/5/10 of a ``wav2vec2_vgs`` checkpoint (SpokenCOCO protocol).

    mtssl-vgs-retrieval RUN/checkpoints/checkpoint_best.pt --split test [--json retrieval.json]

Every caption of the split is embedded (unmasked forward) and every distinct image once, scored by
the similarity the checkpoint's criterion trained with (``dot``, or ``cosine``: L2-normalised).
speech -> image: a caption's query succeeds at k when its image is among the k most similar images;
image -> speech: an image succeeds at k when any of its captions (5 per image in SpokenCOCO) is
among the k most similar captions. Similarities are computed in blocks, so 25k captions x 5k images
take seconds and little memory.
"""

import argparse
import math
import os
from typing import Dict, Sequence

import numpy as np
import torch

from ..atomic import report_result
from ..errors import cli

KS = (1, 5, 10)


def recall_at_k(
    speech: torch.Tensor, images: torch.Tensor, caption_image: torch.Tensor, ks: Sequence[int] = KS, block: int = 1024
) -> Dict[str, float]:
    """``speech (N, E)``, ``images (M, E)``, ``caption_image (N,)`` the image index of each caption."""
    n, m = len(speech), len(images)
    s2i_rank = torch.empty(n, dtype=torch.long)
    for a in range(0, n, block):
        sims = speech[a : a + block] @ images.T  # (b, M)
        true = sims.gather(1, caption_image[a : a + block, None])
        s2i_rank[a : a + block] = (sims > true).sum(1)
    i2s_rank = torch.full((m,), n, dtype=torch.long)
    for a in range(0, m, block):
        sims = images[a : a + block] @ speech.T  # (b, N)
        own = caption_image[None, :] == torch.arange(a, min(a + block, m))[:, None]  # (b, N): the image's captions
        best_own = sims.masked_fill(~own, float("-inf")).max(1, keepdim=True).values
        i2s_rank[a : a + block] = (sims > best_own).sum(1)
    out = {}
    for k in ks:
        out[f"s2i_r{k}"] = round(100.0 * float((s2i_rank < k).float().mean()), 2)
        out[f"i2s_r{k}"] = round(100.0 * float((i2s_rank < k).float().mean()), 2)
    return out


def chance_recall(caption_image: torch.Tensor, n_images: int, ks: Sequence[int] = KS) -> Dict[str, float]:
    """Recall@k (%) of a scorer that ranks at random: speech -> image ``k / M``; image -> speech the chance
    that one of the image's ``c`` captions is among ``k`` of the ``N`` drawn without replacement,
    ``1 - C(N - c, k) / C(N, k)``, averaged over images. ``caption_image (N,)`` as in :func:`recall_at_k`."""
    n = len(caption_image)
    counts = torch.bincount(caption_image, minlength=n_images).tolist()
    out = {}
    for k in ks:
        out[f"s2i_r{k}"] = round(100.0 * min(k, n_images) / n_images, 2)
        miss = [math.comb(n - c, k) / math.comb(n, k) if k <= n else 0.0 for c in counts]
        out[f"i2s_r{k}"] = round(100.0 * (1.0 - sum(miss) / n_images), 2)
    return out


def image_embeddings(reader, manifests, split: str, captions: int):
    """``(image embeddings (M, E), caption -> image index (N,))`` of a split's ``{split}.images``, each distinct
    image embedded once from its region features (``task.image_features`` of the checkpoint, else beside the
    manifests)."""
    from ..data.image_features import ImageFeatureStore
    from ..tasks.vgs_pretraining import read_image_ids

    names = read_image_ids(str(manifests), split, captions)
    store = ImageFeatureStore(os.path.join(reader.task_cfg.image_features or str(manifests), split))
    unique = sorted(set(names))
    index = {name: i for i, name in enumerate(unique)}
    return torch.from_numpy(reader.image_embeddings([store[u] for u in unique])), torch.tensor(
        [index[n] for n in names]
    )


def retrieval_from_features(reader, features, manifests, split: str = "test") -> Dict:
    """Recall@1/5/10 both ways (and chance) from the caption embeddings of ``features`` (a split's
    :class:`~.features.SplitFeatures` extracted with ``embeddings=True``), scored as the model trained."""
    speech = torch.from_numpy(np.asarray(features.embeddings))
    images, caption_image = image_embeddings(reader, manifests, split, len(speech))
    # score as the model was trained: checkpoints from before the criterion's similarity field normalised inside
    if str(reader.cfg.criterion.get("similarity", "cosine")) == "cosine":
        speech, images = torch.nn.functional.normalize(speech, dim=1), torch.nn.functional.normalize(images, dim=1)
    return {
        "split": split,
        "captions": len(speech),
        "images": len(images),
        **recall_at_k(speech, images, caption_image),
        "chance": chance_recall(caption_image, len(images)),
    }


def retrieval_of_checkpoint(checkpoint: str, split: str = "test") -> Dict:
    """:func:`retrieval_from_features` of a checkpoint's ``split`` in its own task's data folder."""
    from ..upstream.features import extract_split
    from ..upstream.readers import open_reader

    reader = open_reader(checkpoint)
    manifests = reader.task_cfg.data
    feats = extract_split(reader, os.path.join(manifests, f"{split}.tsv"), layers=[0], embeddings=True)
    return retrieval_from_features(reader, feats, manifests, split)


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test")
    p.add_argument("--json")
    a = p.parse_args(argv)
    report_result({"checkpoint": a.checkpoint, **retrieval_of_checkpoint(a.checkpoint, a.split)}, a.json)


if __name__ == "__main__":
    main()
