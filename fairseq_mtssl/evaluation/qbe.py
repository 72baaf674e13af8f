"""Query-by-example spoken term detection on frozen features: SUPERB's QbE on the embedded corpus.

    mtssl-qbe CHECKPOINT --manifests data/manifests --alignments data/corpus/alignments \
        [--method superb | --method plugin --layer 6] [--queries-split valid --documents-split test] [--json qbe.json]

Queries are spoken words cut from one split by its word alignments; documents are the utterances of
another split (in the embedded corpus: other speakers).

- ``superb`` (default): s3prl's ``quesst14_dtw`` as :mod:`.quesst` implements it (standardised features,
  ``cosine_exp`` distances with row min-max, asymmetric open-begin/open-end subsequence DTW normalised by the
  query's length, queries under 5 frames at 0, per-query z-norm) on every layer; as QUESST has dev and eval
  queries over the same documents, the query words are split alternately into a dev and an eval half, the
  layer is chosen by MTWV on dev and reported on eval. MTWV as the QUESST 2014 scorer (``beta`` 12.49).
- ``plugin`` (this tool's former method): frame-wise angular distance, subsequence DTW with free start and
  end, the cheapest path's mean cost; z-normalised per query; one given layer; MTWV with NIST STD 2006's
  ``beta`` 999.9.

Both report MTWV and MAP (documents ranked per query).
"""

import argparse
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..atomic import report_result
from ..corpus.alignment import SILENCE, read_ctm
from ..errors import MtsslError, cli
from ..upstream.features import SplitFeatures, extract_split
from . import quesst
from .abx import angular_distances

logger = logging.getLogger(__name__)
NIST_BETA = 999.9  # NIST STD 2006's beta, of the plugin method (QUESST 2014's is quesst.BETA, 12.49)


class QbeError(MtsslError, ValueError):
    """Alignments that give no usable queries, or an unknown method."""


@dataclass(frozen=True)
class Query:
    utt: str
    start: float
    end: float
    word: str


# ----------------------------------------------------------------------------- matching


def subsequence_dtw(dist: torch.Tensor, len_q: torch.Tensor, len_d: torch.Tensor) -> torch.Tensor:
    """Best mean-cost path of each query ``dist (P, Q, D)`` through any stretch of its document:
    the path runs from query frame 0 (any document frame) to query frame ``len_q - 1`` (any
    document frame ``< len_d``) with steps right, down, diagonal. Anti-diagonal recursion, vectorised
    over pairs and cells. Returns ``(P,)``."""
    p, q, d = dist.shape
    cost = torch.full((p, q + 1, d + 1), float("inf"), dtype=dist.dtype, device=dist.device)
    steps = torch.zeros((p, q + 1, d + 1), dtype=dist.dtype, device=dist.device)
    cost[:, 0, :] = 0.0  # free start anywhere in the document
    for k in range(2, q + d + 1):
        i = torch.arange(max(1, k - d), min(q, k - 1) + 1, device=dist.device)
        j = k - i
        prev = torch.stack([cost[:, i - 1, j - 1], cost[:, i - 1, j], cost[:, i, j - 1]], -1)
        prev_steps = torch.stack([steps[:, i - 1, j - 1], steps[:, i - 1, j], steps[:, i, j - 1]], -1)
        best, arg = prev.min(-1)
        cost[:, i, j] = best + dist[:, i - 1, j - 1]
        steps[:, i, j] = prev_steps.gather(-1, arg[..., None])[..., 0] + 1
    idx = torch.arange(p, device=dist.device)
    last = (cost[idx, len_q] / steps[idx, len_q].clamp(min=1))[:, 1:]  # (P, D): path ends at document frame j
    last = last.masked_fill(torch.arange(d, device=dist.device)[None, :] >= len_d[:, None], float("inf"))
    return last.min(-1).values


def match_scores(queries: Sequence[torch.Tensor], documents: Sequence[torch.Tensor], chunk: int = 512) -> np.ndarray:
    """``(n_queries, n_docs)`` negative subsequence-DTW costs."""
    pairs = [(a, b) for a in range(len(queries)) for b in range(len(documents))]
    out = np.empty(len(pairs))
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        q = torch.nn.utils.rnn.pad_sequence([queries[a] for a, _ in part], batch_first=True)
        d = torch.nn.utils.rnn.pad_sequence([documents[b] for _, b in part], batch_first=True)
        lq = torch.tensor([len(queries[a]) for a, _ in part])
        ld = torch.tensor([len(documents[b]) for _, b in part])
        out[start : start + len(part)] = -subsequence_dtw(angular_distances(q, d), lq, ld).numpy()
    return out.reshape(len(queries), len(documents))


def znorm(scores: np.ndarray) -> np.ndarray:
    """Per-query z-normalisation over documents."""
    return (scores - scores.mean(1, keepdims=True)) / (scores.std(1, keepdims=True) + 1e-9)


# ----------------------------------------------------------------------------- metrics


def mtwv(scores: np.ndarray, truth: np.ndarray, beta: float = NIST_BETA) -> Tuple[float, float]:
    """Maximum term-weighted value and its threshold. ``scores``, ``truth`` ``(n_queries, n_docs)``;
    each query a term with at least one true document. ``TWV(t) = 1 - mean_q[P_miss(q, t) + beta P_FA(q, t)]``
    with detections ``score >= t``; thresholds range over every score (and above all, TWV 0)."""
    truth = truth.astype(bool)
    n_true = truth.sum(1)
    if (n_true == 0).any():
        raise ValueError("every query needs at least one true document")
    n_false = np.maximum(truth.shape[1] - n_true, 1)
    best, best_t = 0.0, float("inf")
    for t in np.unique(scores):
        hit = scores >= t
        p_miss = 1 - (hit & truth).sum(1) / n_true
        p_fa = (hit & ~truth).sum(1) / n_false
        twv = 1 - float(np.mean(p_miss + beta * p_fa))
        if twv > best:
            best, best_t = twv, float(t)
    return best, best_t


def mean_average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    aps = []
    for s, t in zip(scores, truth.astype(bool)):
        order = np.argsort(-s, kind="stable")
        rel = t[order]
        if rel.sum() == 0:
            continue
        precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        aps.append(float((precision * rel).sum() / rel.sum()))
    return float(np.mean(aps))


# ----------------------------------------------------------------------------- corpus


def select_queries(
    words_ctm, document_words: Dict[str, set], min_seconds: float = 0.25, per_word: int = 3
) -> List[Query]:
    """Spoken words (``min_seconds`` or longer, not silence or multi-word units) that occur in at least
    one document, ``per_word`` examples of each at most, in a deterministic order."""
    present = set().union(*document_words.values()) if document_words else set()
    by_word = defaultdict(list)
    for utt, segs in sorted(read_ctm(words_ctm).items()):
        for s in segs:
            if s.label != SILENCE and "+" not in s.label and s.end - s.start >= min_seconds and s.label in present:
                by_word[s.label].append(Query(utt, s.start, s.end, s.label))
    return [q for w in sorted(by_word) for q in by_word[w][:per_word]]


def corpus_queries(alignments, queries_split: str, documents_split: str) -> Tuple[List[Query], Dict[str, set]]:
    """The queries (:func:`select_queries`) of ``queries_split`` and the words of each document."""
    doc_words = {
        u: {s.label for s in segs} for u, segs in read_ctm(Path(alignments) / f"{documents_split}.words.ctm").items()
    }
    queries = select_queries(Path(alignments) / f"{queries_split}.words.ctm", doc_words)
    if not queries:
        raise QbeError(f"{alignments}: no query words from {queries_split} occur in {documents_split}")
    return queries, doc_words


def cut_query(features: np.ndarray, query: Query, frame_rate: float) -> np.ndarray:
    """The frames of ``features (T, C)`` that the query word spans (at least one)."""
    a = int(query.start * frame_rate)
    return np.ascontiguousarray(features[a : max(a + 1, int(query.end * frame_rate))], dtype=np.float32)


def dev_eval_queries(queries: Sequence[Query]) -> Tuple[List[Query], List[Query]]:
    """QUESST's two query sets over the same documents: the words alternately (in sorted order) dev, eval."""
    words = sorted({q.word for q in queries})
    dev = set(words[0::2])
    return [q for q in queries if q.word in dev], [q for q in queries if q.word not in dev]


def qbe_from_features(
    query_split: SplitFeatures,
    document_split: SplitFeatures,
    alignments,
    method: str = "superb",
    layer: Optional[int] = None,
    queries_split: str = "valid",
    documents_split: str = "test",
) -> Dict:
    """QbE of the words of ``query_split`` (the features of the queries' split) in the utterances of
    ``document_split``. ``superb``: s3prl's ``quesst14_dtw`` (:mod:`.quesst`) on every layer, the layer chosen
    by MTWV on the dev half of the query words and reported on the eval half; ``plugin``: this module's
    angular subsequence DTW at ``layer``, every query, MTWV with NIST's ``beta``."""
    queries, doc_words = corpus_queries(alignments, queries_split, documents_split)
    docs = list(document_split.utterances)
    rate = query_split.frame_rate

    def truth_of(qs):
        return np.array([[q.word in doc_words[u] for u in docs] for q in qs])

    def feats(k, qs):
        q_layer, d_layer = query_split.layer(k), document_split.layer(k)
        return [cut_query(q_layer[q.utt], q, rate) for q in qs], [np.asarray(d_layer[u]) for u in docs]

    if method == "plugin":
        qf, df = feats(layer, queries)
        scores = znorm(match_scores([torch.from_numpy(x) for x in qf], [torch.from_numpy(x) for x in df]))
        truth = truth_of(queries)
        value, threshold = mtwv(scores, truth, NIST_BETA)
        return {
            "method": "plugin",
            "layer": layer,
            "queries": len(queries),
            "documents": len(docs),
            "true_share": round(float(truth.mean()), 4),  # about the MAP of a random ranking
            "mtwv": round(value, 4),
            "threshold": round(threshold, 4),
            "map": round(mean_average_precision(scores, truth), 4),
        }
    if method != "superb":
        raise QbeError(f"unknown QbE method {method!r} (superb or plugin)")
    dev, ev = dev_eval_queries(queries)
    if not dev or not ev:
        raise QbeError(f"{alignments}: {len(queries)} queries cannot make a dev and an eval set")
    t_dev, t_eval = truth_of(dev), truth_of(ev)
    layers = sorted(set(query_split.layer_ids) & set(document_split.layer_ids))

    def eval_metric(scores):
        return {**quesst.mtwv(scores, t_eval), "map": mean_average_precision(scores, t_eval)}

    chosen = quesst.select_layer(
        _Lazy(lambda k: feats(k, dev), layers),
        _Lazy(lambda k: feats(k, ev), layers),
        lambda scores: quesst.mtwv(scores, t_dev),
        eval_metric,
    )
    return {
        "method": "superb",
        "layer": chosen["layer"],
        "dev_mtwv": {k: round(m["mtwv"], 4) for k, m in chosen["dev"].items()},
        "queries": {"dev": len(dev), "eval": len(ev)},
        "documents": len(docs),
        "true_share": round(float(t_eval.mean()), 4),
        "mtwv": round(chosen["eval"]["mtwv"], 4),
        "threshold": round(chosen["eval"]["threshold"], 4),
        "map": round(chosen["eval"]["map"], 4),
        "beta": quesst.BETA,
    }


class _Lazy(dict):
    """``{layer: make(layer)}`` made on first access (so only the chosen eval layer is cut)."""

    def __init__(self, make, keys):
        super().__init__({k: None for k in keys})
        self.make = make

    def __getitem__(self, k):
        if super().__getitem__(k) is None:
            self[k] = self.make(k)
        return super().__getitem__(k)


def run_qbe(
    checkpoint: str,
    layer: int,
    manifests,
    alignments,
    queries_split: str = "valid",
    documents_split: str = "test",
    method: str = "superb",
) -> Dict:
    from ..upstream.readers import open_reader

    reader = open_reader(checkpoint)
    layer_id = layer if reader.num_layers > 1 else 0  # single-layer features (MFCC): their one layer
    layers = None if method == "superb" else [layer_id]
    q, d = (extract_split(reader, Path(manifests) / f"{s}.tsv", layers) for s in (queries_split, documents_split))
    result = qbe_from_features(q, d, alignments, method, layer_id, queries_split, documents_split)
    return {"checkpoint": checkpoint, **result}


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="fairseq / plugin checkpoint, or 'mfcc'")
    p.add_argument("--layer", type=int, default=1, help="the layer of --method plugin (superb chooses on dev)")
    p.add_argument(
        "--method",
        choices=["superb", "plugin"],
        default="superb",
        help="superb: s3prl's quesst14_dtw, every layer, chosen on dev; plugin: angular DTW at --layer",
    )
    p.add_argument("--manifests", required=True)
    p.add_argument("--alignments", required=True, help="directory with {split}.words.ctm")
    p.add_argument("--queries-split", default="valid")
    p.add_argument("--documents-split", default="test")
    p.add_argument("--json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = run_qbe(a.checkpoint, a.layer, a.manifests, a.alignments, a.queries_split, a.documents_split, a.method)
    report_result(result, a.json)


if __name__ == "__main__":
    main()
