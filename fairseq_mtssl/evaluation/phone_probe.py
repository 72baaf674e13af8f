"""Frame-level linear phone probe: how linearly decodable are phones from a frozen layer?

    mtssl-phone-probe CHECKPOINT --layer 6 --manifests data/manifests --alignments data/corpus/alignments
    mtssl-phone-probe mfcc --manifests data/manifests --alignments data/corpus/alignments   # baseline

Each feature frame gets the phone (from ``{split}.phones.ctm``) at the centre of its receptive field
(``hop * t + window / 2`` samples). A softmax classifier on standardised features is fitted on the
train split (full batch, preconditioned L-BFGS, a little L2) and scored by frame accuracy on valid and
test (held-out speakers in the embedded corpus). A cheap proxy for SUPERB phone recognition, not a
replacement.
"""

import argparse
import logging
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..atomic import report_result
from ..corpus.alignment import AlignmentError, Segment, read_ctm
from ..errors import cli
from ..upstream.features import SplitFeatures, extract_split

logger = logging.getLogger(__name__)

L2 = 1e-4  # the probe's penalty on ||W||^2


def frame_phones(
    segments: Sequence[Segment], num_frames: int, hop: int, window: int, sample_rate: int = 16000
) -> List[str]:
    """The phone at the centre of each frame's receptive field."""
    centres = (np.arange(num_frames) * hop + window / 2) / sample_rate
    ends = np.array([s.end for s in segments])
    idx = np.minimum(np.searchsorted(ends, centres, side="right"), len(segments) - 1)
    return [segments[i].label for i in idx]


def probe_data(features: SplitFeatures, layer: int, ctm_path) -> Tuple[np.ndarray, List[str]]:
    """``(frames (N, C), the phone of each)`` of hidden state ``layer`` of a split's features."""
    segs = read_ctm(ctm_path)
    feats, labels = [], []
    for utt, f in features.layer(layer).items():
        if utt not in segs:
            raise AlignmentError(f"{ctm_path}: utterance {utt} of the manifest has no alignment")
        feats.append(f)
        labels += frame_phones(segs[utt], len(f), features.hop, features.window)
    return np.concatenate(feats).astype(np.float32), labels


def preconditioner(x: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """``P = (x^T x / N + eps I)^{-1/2}``, ``(C, C)``, symmetric, for frames ``x (N, C)``.

    Fitting ``W = V P`` over ``V`` minimises the same function of ``W`` with a data term about as well
    conditioned in every direction: a whitened linear probe without whitening the features. ``eps`` (against
    standardised features' unit variances) bounds ``P`` where the frames have (almost) no variance."""
    second_moment = (x.T @ x).double() / len(x)
    eigval, eigvec = torch.linalg.eigh(second_moment)
    return ((eigvec * (eigval.clamp_min(0) + eps).rsqrt()) @ eigvec.T).to(x.dtype)


def probe_objective(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2: float):
    """Mean cross-entropy of ``x (N, C) @ weight.T + bias`` against ``y (N,)``, + ``l2`` ||weight||^2."""
    return torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, weight, bias), y) + l2 * weight.pow(2).sum()


def fit_probe(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    l2: float = L2,
    max_iter: int = 100,
    seed: int = 0,
    precondition: bool = True,
) -> torch.nn.Linear:
    """The softmax classifier ``(C -> n_classes)`` minimising mean cross-entropy + ``l2`` ||W||^2 (the bias
    not penalised) on frames ``x (N, C)`` with classes ``y (N,)``: full-batch L-BFGS (strong Wolfe, history
    20) for ``max_iter`` iterations from a seeded init.

    ``precondition`` (the default) runs L-BFGS over ``V`` with ``W = V P`` (:func:`preconditioner`): the same
    objective, reached in about a third of the iterations on hidden states, whose dimensions are strongly
    correlated. ``precondition=False, max_iter=300`` is the plugin's former probe."""
    torch.manual_seed(seed)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    clf = torch.nn.Linear(X.shape[1], n_classes)
    P = preconditioner(X) if precondition else torch.eye(X.shape[1], dtype=X.dtype)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = probe_objective(clf.weight @ P, clf.bias, X, Y, l2)  # clf.weight is V until the fit ends
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        clf.weight.copy_(clf.weight @ P)
    return clf


def probe_from_features(
    features: Dict[str, SplitFeatures], layer: int, alignments, max_train_frames: int = 200_000, **fit_options
) -> Dict:
    """Fit on ``features["train"]``'s hidden state ``layer``, score on every split given; ``alignments`` the
    folder of the ``{split}.phones.ctm`` or ``{split: ctm path}``; ``fit_options`` go to :func:`fit_probe`.
    ``train_objective`` is the fitted probe's penalised training loss (lower: nearer the optimum)."""
    ctm = alignments if isinstance(alignments, dict) else {s: Path(alignments) / f"{s}.phones.ctm" for s in features}
    data = {s: probe_data(f, layer, ctm[s]) for s, f in features.items()}
    phones = sorted(set(data["train"][1]))
    index = {p: i for i, p in enumerate(phones)}
    x_tr, y_tr = data["train"][0], np.array([index[p] for p in data["train"][1]])
    if len(x_tr) > max_train_frames:
        keep = np.random.default_rng(0).choice(len(x_tr), max_train_frames, replace=False)
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-5
    x_tr = (x_tr - mean) / std
    clf = fit_probe(x_tr, y_tr, len(phones), **fit_options)
    with torch.no_grad():
        l2 = fit_options.get("l2", L2)
        objective = float(probe_objective(clf.weight, clf.bias, torch.from_numpy(x_tr), torch.from_numpy(y_tr), l2))
    result = {
        "layer": layer,
        "phones": len(phones),
        "train_frames": int(len(x_tr)),
        "train_objective": round(objective, 6),
    }
    for s in features:
        x, labels = data[s]
        y = np.array([index.get(p, -1) for p in labels])
        with torch.no_grad():
            pred = clf(torch.from_numpy((x - mean) / std)).argmax(1).numpy()
        result[f"{s}_acc"] = round(float(np.mean(pred == y)), 4)
        result[f"{s}_majority"] = round(float(np.mean(y == np.bincount(y_tr).argmax())), 4)
    return result


def run_probe(
    checkpoint: str,
    layer: int,
    manifests,
    alignments,
    splits=("train", "valid", "test"),
    max_train_frames: int = 200_000,
) -> Dict:
    from ..upstream.readers import open_reader

    reader = open_reader(checkpoint)
    layer_id = layer if reader.num_layers > 1 else 0  # single-layer features (MFCC): their one layer
    feats = {s: extract_split(reader, Path(manifests) / f"{s}.tsv", [layer_id]) for s in splits}
    return {
        "checkpoint": checkpoint,
        **probe_from_features(feats, layer_id, alignments, max_train_frames),
        "layer": layer,
    }


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="fairseq / plugin checkpoint, or 'mfcc' for the MFCC baseline")
    p.add_argument("--layer", type=int, default=1)
    p.add_argument("--manifests", required=True, help="directory with train/valid/test .tsv")
    p.add_argument("--alignments", required=True, help="directory with {split}.phones.ctm")
    p.add_argument("--json", help="write the result here too")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = run_probe(a.checkpoint, a.layer, a.manifests, a.alignments)
    report_result(result, a.json)


if __name__ == "__main__":
    main()
