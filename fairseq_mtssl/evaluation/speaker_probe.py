"""Linear speaker probes: how much speaker identity does a frozen layer still carry?

    python -m fairseq_mtssl.evaluation.speaker_probe CHECKPOINT --layer 2 --manifest data/manifests/test.tsv \\
        [--test-fraction 0.5] [--json speaker_probe.json]

Each utterance of the manifest is encoded and its layer-``L`` frames are mean-pooled into one vector; the
speakers come from ``{split}.spk`` beside the manifest (one per line). Within every speaker, some utterances
(a seeded draw; at least one) are held out for testing and the rest train; a speaker with one utterance only
trains. A softmax classifier on standardised vectors (L2-penalised multinomial logistic regression, full-batch
L-BFGS: :func:`fairseq_mtssl.evaluation.phone_probe.fit_probe`) predicts the speaker; the accuracy on the
held-out utterances is the score, beside chance (the most frequent training speaker's share of the test set).
The frame-level probe (:func:`frame_speaker_probe`) does the same on single frames (``frame_test_acc``): with
a few distinct voices the pooled probe is perfect for every model, the frame-level one is not. Run on held-out
speakers (the test split), they ask what a speaker-invariance method such as SPIN should lower while content
stays.
"""

import argparse
import logging
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..atomic import report_result
from ..errors import MtsslError, cli
from .phone_probe import L2, fit_probe

logger = logging.getLogger(__name__)

# L-BFGS iterations: a few dozen utterances per speaker are (nearly) separable, so the optimum lies far out and
# 100 iterations stop short of it (one test utterance in 65 differed on the main job's untrained HuBERT);
# 300 reach it (as 3000 do) and cost well under a second.
ITERATIONS = 300


class SpeakerProbeError(MtsslError, ValueError):
    """Too few utterances or speakers for a speaker probe, or a speaker list that does not fit."""


def split_by_speaker(speakers: Sequence[str], test_fraction: float = 0.5, seed: int = 0) -> Tuple[List[int], List[int]]:
    """``(train indices, test indices)``: of each speaker's ``n`` utterances, ``clip(round(n x test_fraction),
    1, n - 1)`` drawn at random (``seed``) are held out; a speaker with one utterance only trains."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    by_speaker: Dict[str, List[int]] = {}
    for i, s in enumerate(speakers):
        by_speaker.setdefault(s, []).append(i)
    train, test = [], []
    for spk in sorted(by_speaker):
        idx = list(rng.permutation(by_speaker[spk]))
        n_test = 0 if len(idx) < 2 else min(max(1, round(len(idx) * test_fraction)), len(idx) - 1)
        test += [int(i) for i in idx[:n_test]]
        train += [int(i) for i in idx[n_test:]]
    return sorted(train), sorted(test)


def fit_predict(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int, l2: float = L2
) -> np.ndarray:
    """Class probabilities ``(len(x_test), n_classes)`` of the linear softmax probe fitted on standardised
    training vectors: it minimises mean cross-entropy + ``l2`` x ||W||^2 (the bias is not penalised), which
    is scikit-learn's multinomial ``LogisticRegression(C=1 / (2 l2 N))`` on the same standardised data."""
    x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x, y = ((x_train - mean) / std).astype(np.float32), np.asarray(y_train, np.int64)
    clf = fit_probe(x, y, n_classes, l2=l2, max_iter=ITERATIONS)
    with torch.no_grad():
        logits = clf(torch.from_numpy(((x_test - mean) / std).astype(np.float32)))
    return torch.softmax(logits, -1).numpy()


def speaker_probe(
    features: np.ndarray, speakers: Sequence[str], test_fraction: float = 0.5, seed: int = 0, l2: float = L2
) -> Dict:
    """Fit and score the probe on utterance vectors ``features (N, C)`` of ``speakers`` (one per row)."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) != len(speakers):
        raise SpeakerProbeError(
            f"expected one feature vector per speaker label, got {features.shape} for {len(speakers)}"
        )
    train, test = split_by_speaker(speakers, test_fraction, seed)
    names = sorted({speakers[i] for i in train})
    if len(names) < 2 or not test:
        raise SpeakerProbeError(
            f"a speaker probe needs 2 or more speakers and a speaker with 2 or more utterances; got "
            f"{len(set(speakers))} speakers, {len(speakers)} utterances"
        )
    index = {s: i for i, s in enumerate(names)}
    y_train = np.array([index[speakers[i]] for i in train])
    y_test = np.array([index[speakers[i]] for i in test])
    probs = fit_predict(features[train], y_train, features[test], len(names), l2=l2)
    return {
        "test_acc": round(float(np.mean(probs.argmax(1) == y_test)), 4),
        "chance": round(float(np.mean(y_test == np.bincount(y_train).argmax())), 4),
        "speakers": len(names),
        "train_utterances": len(train),
        "test_utterances": len(test),
    }


def frame_speaker_probe(
    features: Sequence[np.ndarray],
    speakers: Sequence[str],
    test_fraction: float = 0.5,
    seed: int = 0,
    l2: float = L2,
    max_train_frames: int = 50_000,
) -> Dict:
    """The probe on single frames: utterances ``features[i] (T_i, C)`` split by speaker as
    :func:`speaker_probe` splits them, every frame of a training utterance a training example (at most
    ``max_train_frames``, a seeded draw), every frame of a held-out utterance scored. Harder than the pooled
    probe, so it still separates models where a few distinct voices make the pooled one perfect."""
    if len(features) != len(speakers):
        raise SpeakerProbeError(f"{len(features)} utterances of features for {len(speakers)} speaker labels")
    train, test = split_by_speaker(speakers, test_fraction, seed)
    names = sorted({speakers[i] for i in train})
    if len(names) < 2 or not test:
        raise SpeakerProbeError(f"a speaker probe needs 2 or more speakers; got {len(set(speakers))}")
    index = {s: i for i, s in enumerate(names)}

    def frames(indices):
        x = np.concatenate([np.asarray(features[i], np.float32) for i in indices])
        y = np.concatenate([np.full(len(features[i]), index[speakers[i]]) for i in indices])
        return x, y

    (x_tr, y_tr), (x_te, y_te) = frames(train), frames(test)
    if len(x_tr) > max_train_frames:
        keep = np.random.default_rng(seed).choice(len(x_tr), max_train_frames, replace=False)
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    probs = fit_predict(x_tr, y_tr, x_te, len(names), l2=l2)
    return {
        "frame_test_acc": round(float(np.mean(probs.argmax(1) == y_te)), 4),
        "frame_chance": round(float(np.mean(y_te == np.bincount(y_tr).argmax())), 4),
        "train_frames": int(len(x_tr)),
        "test_frames": int(len(x_te)),
    }


def read_speakers(manifest_path) -> List[str]:
    """The speakers of ``{split}.spk`` beside the manifest, one per manifest line."""
    from ..data.manifest import read_manifest

    n = len(read_manifest(manifest_path))
    spk = Path(manifest_path).with_suffix(".spk")
    if not spk.is_file():
        raise SpeakerProbeError(f"{spk}: speaker file (one speaker per line of {manifest_path}) not found")
    speakers = spk.read_text(encoding="utf-8").splitlines()
    if len(speakers) != n or any(not s.strip() for s in speakers):
        raise SpeakerProbeError(f"{spk}: {len(speakers)} lines for the {n} utterances of {manifest_path}")
    return [s.strip() for s in speakers]


def pooled(features: Dict[str, np.ndarray]) -> np.ndarray:
    """``(N, C)``: each utterance's frames ``(T, C)`` mean-pooled, in the mapping's (manifest) order."""
    return np.stack([np.asarray(f, np.float64).mean(0) for f in features.values()])


def run_speaker_probe(checkpoint: str, layer: int, manifest_path, test_fraction: float = 0.5, seed: int = 0) -> Dict:
    from ..upstream.features import extract_split
    from ..upstream.readers import open_reader

    speakers = read_speakers(manifest_path)
    feats = extract_split(open_reader(checkpoint), manifest_path, [layer]).layer(layer)
    result = speaker_probe(pooled(feats), speakers, test_fraction, seed)
    result.update(frame_speaker_probe(list(feats.values()), speakers, test_fraction, seed))
    return {"checkpoint": str(checkpoint), "layer": layer, "manifest": str(manifest_path), **result}


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="fairseq / plugin checkpoint")
    p.add_argument("--layer", type=int, required=True, help="layer whose frames are mean-pooled (1: the first layer)")
    p.add_argument("--manifest", required=True, help="{split}.tsv with {split}.spk beside it (e.g. the test split)")
    p.add_argument("--test-fraction", type=float, default=0.5, help="share of each speaker's utterances held out")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test draw")
    p.add_argument("--json", help="write the result here too")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    report_result(run_speaker_probe(a.checkpoint, a.layer, a.manifest, a.test_fraction, a.seed), a.json)


if __name__ == "__main__":
    main()
