"""Query-by-example spoken term detection on frozen features (SUPERB's QbE task, QUESST-style scoring).

    mtssl-qbe CHECKPOINT --layer 6 --manifests data/manifests --alignments data/corpus/alignments \\
        [--queries-split valid --documents-split test] [--json qbe.json]

Queries are spoken words cut from one split by its word alignments; documents are the utterances of
another split (in the embedded corpus: other speakers). A query is scored against a document by
subsequence DTW: frame-wise angular distance, free start and end in the document, the cheapest
path's mean cost; the detection score is its negative, z-normalised over the documents of each query.
Reported: MTWV (maximum term-weighted value over one global threshold, ``beta`` 999.9 as in NIST STD
2006 and QUESST) and MAP (documents ranked per query).
"""

import argparse
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..atomic import report_result
from ..corpus.alignment import SILENCE, read_ctm
from ..errors import cli
from .abx import angular_distances

logger = logging.getLogger(__name__)
NIST_BETA = 999.9


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


def qbe_from_features(
    query_feats: Dict[str, np.ndarray],
    document_feats: Dict[str, np.ndarray],
    frame_rate: float,
    alignments,
    queries_split: str = "valid",
    documents_split: str = "test",
    beta: float = NIST_BETA,
) -> Dict:
    """QbE from ``{utterance: (T, C)}`` features of the query split and the document split."""
    doc_words = {
        u: {s.label for s in segs} for u, segs in read_ctm(Path(alignments) / f"{documents_split}.words.ctm").items()
    }
    queries = select_queries(Path(alignments) / f"{queries_split}.words.ctm", doc_words)
    if not queries:
        raise ValueError(f"no query words from {queries_split} occur in {documents_split}")
    docs = sorted(document_feats)
    q_tensors = []
    for q in queries:
        f = query_feats[q.utt]
        a, b = int(q.start * frame_rate), max(int(q.start * frame_rate) + 1, int(q.end * frame_rate))
        q_tensors.append(torch.from_numpy(np.ascontiguousarray(f[a:b], dtype=np.float32)))
    d_tensors = [torch.from_numpy(np.ascontiguousarray(document_feats[u], dtype=np.float32)) for u in docs]
    scores = znorm(match_scores(q_tensors, d_tensors))
    truth = np.array([[q.word in doc_words[u] for u in docs] for q in queries])
    value, threshold = mtwv(scores, truth, beta)
    return {
        "queries": len(queries),
        "documents": len(docs),
        "true_share": round(float(truth.mean()), 4),  # about the MAP of a random ranking
        "mtwv": round(value, 4),
        "threshold": round(threshold, 4),
        "map": round(mean_average_precision(scores, truth), 4),
    }


def run_qbe(
    checkpoint: str,
    layer: int,
    manifests,
    alignments,
    queries_split: str = "valid",
    documents_split: str = "test",
    beta: float = NIST_BETA,
) -> Dict:
    from ..upstream.readers import open_reader
    from .features import extract_split

    reader = open_reader(checkpoint)
    layer_id = layer if reader.num_layers > 1 else 0  # single-layer features (MFCC): their one layer
    q, d = (extract_split(reader, Path(manifests) / f"{s}.tsv", [layer_id]) for s in (queries_split, documents_split))
    result = qbe_from_features(
        q.layer(layer_id), d.layer(layer_id), reader.frame_rate, alignments, queries_split, documents_split, beta
    )
    return {"checkpoint": checkpoint, "layer": layer, **result}


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="fairseq / plugin checkpoint, or 'mfcc'")
    p.add_argument("--layer", type=int, default=1)
    p.add_argument("--manifests", required=True)
    p.add_argument("--alignments", required=True, help="directory with {split}.words.ctm")
    p.add_argument("--queries-split", default="valid")
    p.add_argument("--documents-split", default="test")
    p.add_argument("--beta", type=float, default=NIST_BETA)
    p.add_argument("--json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = run_qbe(a.checkpoint, a.layer, a.manifests, a.alignments, a.queries_split, a.documents_split, a.beta)
    report_result(result, a.json)


if __name__ == "__main__":
    main()
