"""Query-by-example spoken term detection as SUPERB's QbE task (s3prl's ``quesst14_dtw``) and its scoring.

Scores, per layer (s3prl ``quesst14_dtw`` with its shipped config):

1. every feature dimension standardised over all frames of the split's queries and documents (mean and
   unbiased standard deviation, the latter clipped at 1e-9);
2. for each query-document pair the local distance ``exp(cosine distance) - 1`` (``cosine_exp``), each row
   (query frame) min-max normalised over the document's frames (range clipped at 1e-9);
3. subsequence DTW with dtw-python's ``asymmetric`` step pattern, open begin and open end: the path takes
   one step per query frame, from document frame ``j``, ``j-1`` or ``j-2`` to ``j``, starting and ending
   anywhere in the document; its cost is the sum of its local distances divided by the query's length
   (dtw-python's ``normalizedDistance``) and the score is ``-cost``;
4. a query shorter than 5 frames scores 0 against every document;
5. each query's scores z-normalised over the documents (population standard deviation clipped at 1e-9).

Every layer is scored, the layer is chosen on dev by MTWV and reported on eval (:func:`select_layer`).

MTWV and ATWV as the QUESST 2014 scorer (``scoring/score-TWV-Cnxe.sh``, which runs the task's
MediaEvalQUESST jar) computes them: a trial is a (query, test file) pair; every query of the split's
``*.tlist.xml`` against every file of ``*.ecf.xml``, targets from ``*.rttm``; queries with no target are
left out ("removing unseen models"); trials the system did not score take the default score (s3prl's
recipe passes -10) and decision NO.
``TWV(theta) = 1 - mean_q [P_miss(q, theta) + beta P_fa(q, theta)]`` over queries, ``P_fa`` over the
files that do not hold the query, ``beta = C_fa / C_miss * (1 - P_target) / P_target`` with the
QUESST values ``P_target = 0.0008``, ``C_miss = 100``, ``C_fa = 1`` (``beta = 12.49``; the scoring
package's README shows the script handing the jar their effective prior, ``0.0741289``). MTWV is the maximum over one global threshold (a trial is
detected when its score is at least the threshold; the point with no detection, TWV 0, included); ATWV
uses the system's YES/NO decisions (s3prl: YES when the z-normalised score is above 2). As s3prl writes
them to ``benchmark.stdlist.xml``, scores reach the scorer rounded to 4 decimals.

The QUESST 2014 layout (``quesst14Database``), as s3prl reads it: ``scoring/language_key_utterances.lst``
(documents) and ``scoring/language_key_{dev,eval}.lst`` (queries), lines ``<top>/<path>.wav <language>``
with paths relative to the database's parent (s3prl keeps ``nnenglish``); the ground truth in
``scoring/groundtruth_quesst14_{dev,eval}/``. Utterance names are the file names without extension.
"""

import math
import xml.etree.ElementTree as ET
import xml.parsers.expat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import MtsslError

# QUESST 2014 application parameters of TWV and the effective prior the scoring script passes on.
P_TARGET = 0.0008
C_MISS = 100.0
C_FA = 1.0
BETA = C_FA / C_MISS * (1.0 - P_TARGET) / P_TARGET  # 12.49
EFFECTIVE_PRIOR = P_TARGET * C_MISS / (P_TARGET * C_MISS + (1.0 - P_TARGET) * C_FA)  # 0.0741289...

# s3prl quesst14_dtw and its SUPERB scoring command.
MIN_QUERY_FRAMES = 5
YES_THRESHOLD = 2.0
DEFAULT_SCORE = -10.0
STDLIST_DECIMALS = 4
LANGUAGE = "nnenglish"
SPLITS = ("dev", "eval")
DISTANCES = ("cosine_exp", "cosine_neg_log", "cosine", "euclidean", "cityblock")

PathLike = Union[str, Path]
Features = Sequence[np.ndarray]


class QuesstLayoutError(MtsslError, ValueError):
    """A QUESST 2014 list or ground-truth file is missing or malformed; the message names the file (and line)."""


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class GroundTruth:
    """The scorer's trials: every ``term`` (query id, tlist order) against every ``file`` (ecf order);
    ``targets`` the (term, file) pairs the rttm has an occurrence for."""

    terms: Tuple[str, ...]
    files: Tuple[str, ...]
    targets: FrozenSet[Tuple[str, str]]

    def matrix(self, terms: Optional[Sequence[str]] = None, files: Optional[Sequence[str]] = None) -> np.ndarray:
        """``(len(terms), len(files))`` bool: which trials are targets (default: all terms and files)."""
        terms = self.terms if terms is None else terms
        files = self.files if files is None else files
        col = {f: j for j, f in enumerate(files)}
        out = np.zeros((len(terms), len(files)), dtype=bool)
        row = {t: i for i, t in enumerate(terms)}
        for t, f in self.targets:
            if t in row and f in col:
                out[row[t], col[f]] = True
        return out


@dataclass(frozen=True)
class QuesstSplit:
    """One split as s3prl evaluates it: the language's queries, the language's documents, the split's truth."""

    split: str
    queries: Tuple[Path, ...]
    documents: Tuple[Path, ...]
    truth: GroundTruth

    @property
    def query_names(self) -> List[str]:
        return [utterance_id(str(p)) for p in self.queries]

    @property
    def document_names(self) -> List[str]:
        return [utterance_id(str(p)) for p in self.documents]

    def metric(self, **options) -> Callable[[np.ndarray], Dict]:
        """:func:`evaluate_quesst` for this split's ``(n_queries, n_documents)`` score matrices."""
        names, docs = self.query_names, self.document_names
        return lambda scores: evaluate_quesst(scores, names, docs, self.truth, **options)


def utterance_id(path: str) -> str:
    """``.../quesst14_00001.wav`` -> ``quesst14_00001`` (file name without an audio extension)."""
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = name.rpartition(".")
    return stem if dot and ext.lower() in ("wav", "sph", "flac", "mp3") else name


def _read_lines(path: Path) -> Iterator[Tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        why = "missing" if isinstance(err, FileNotFoundError) else getattr(err, "strerror", None) or str(err)
        raise QuesstLayoutError(f"{path}: cannot read ({why})") from err
    for n, line in enumerate(text.splitlines(), 1):
        yield n, line


def read_language_key(path: PathLike, language: Optional[str] = LANGUAGE) -> List[Tuple[str, int]]:
    """Entries of a ``language_key_*.lst`` (``<path> <language>`` per line) in ``language`` (all when None):
    ``(path without its first component, line number)``, in file order, as s3prl resolves them."""
    path = Path(path)
    out = []
    for n, line in _read_lines(path):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise QuesstLayoutError(f"{path}:{n}: expected '<audio path> <language>', got {line.strip()!r}")
        audio, lang = fields
        if language is None or lang == language:
            out.append((audio.split("/", 1)[1] if "/" in audio else audio, n))
    return out


def _xml_elements(path: Path, tag: str) -> List[Tuple[Dict[str, str], int]]:
    """Attributes and line of every ``<tag>`` element of an XML file."""
    try:
        data = path.read_bytes()
    except OSError as err:
        why = "missing" if isinstance(err, FileNotFoundError) else err.strerror or type(err).__name__
        raise QuesstLayoutError(f"{path}: cannot read ({why})") from err
    parser = xml.parsers.expat.ParserCreate()
    found: List[Tuple[Dict[str, str], int]] = []

    def start(name, attrs):
        if name == tag:
            found.append((attrs, parser.CurrentLineNumber))

    parser.StartElementHandler = start
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as err:
        raise QuesstLayoutError(f"{path}:{err.lineno}: not well-formed XML ({xml.parsers.expat.ErrorString(err.code)})")
    if not found:
        raise QuesstLayoutError(f"{path}: no <{tag}> element")
    return found


def _required(path: Path, attrs: Dict[str, str], line: int, tag: str, name: str) -> str:
    value = attrs.get(name, "").strip()
    if not value:
        raise QuesstLayoutError(f"{path}:{line}: <{tag}> without {name}")
    return value


def read_ecf(path: PathLike) -> Tuple[str, ...]:
    """Test files of an ``*.ecf.xml`` (``<excerpt audio_filename=...>``), first-seen order, as utterance ids."""
    path = Path(path)
    ids = [utterance_id(_required(path, a, n, "excerpt", "audio_filename")) for a, n in _xml_elements(path, "excerpt")]
    return tuple(dict.fromkeys(ids))


def read_tlist(path: PathLike) -> Tuple[str, ...]:
    """Query ids of a ``*.tlist.xml`` (``<term termid=...>``), in order."""
    path = Path(path)
    return tuple(dict.fromkeys(_required(path, a, n, "term", "termid") for a, n in _xml_elements(path, "term")))


def read_rttm(path: PathLike, terms: Sequence[str], files: Sequence[str]) -> FrozenSet[Tuple[str, str]]:
    """(term, file) pairs of an rttm's ``LEXEME`` lines (NIST fields: type file channel tbeg tdur ortho ...,
    the query id as ``ortho``); other record types and ``;;`` comments are skipped."""
    path = Path(path)
    known_terms, known_files = set(terms), set(files)
    out = set()
    for n, line in _read_lines(path):
        fields = line.split()
        if not fields or fields[0] != "LEXEME":
            continue
        if len(fields) < 6:
            raise QuesstLayoutError(
                f"{path}:{n}: LEXEME line with {len(fields)} fields, expected 'LEXEME file channel tbeg tdur query ...'"
            )
        file, term = utterance_id(fields[1]), fields[5]
        if term not in known_terms:
            raise QuesstLayoutError(f"{path}:{n}: query {term!r} is not in the term list")
        if file not in known_files:
            raise QuesstLayoutError(f"{path}:{n}: file {file!r} is not in the ecf")
        out.add((term, file))
    return frozenset(out)


def _one(directory: Path, suffix: str) -> Path:
    found = sorted(directory.glob(f"*{suffix}"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise QuesstLayoutError(f"{directory}: {what} *{suffix} file{'s' if found else ''}, expected exactly one")
    return found[0]


def read_groundtruth(directory: PathLike) -> GroundTruth:
    """A ``groundtruth_quesst14_<split>`` directory: its one ``*.ecf.xml``, ``*.tlist.xml`` and ``*.rttm``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise QuesstLayoutError(f"{directory}: missing ground-truth directory")
    files = read_ecf(_one(directory, ".ecf.xml"))
    terms = read_tlist(_one(directory, ".tlist.xml"))
    return GroundTruth(terms, files, read_rttm(_one(directory, ".rttm"), terms, files))


def read_quesst(root: PathLike, split: str, language: Optional[str] = LANGUAGE) -> QuesstSplit:
    """The ``split`` ("dev" or "eval") of a QUESST 2014 database at ``root``, as s3prl's quesst14_dtw reads
    it: the split's queries and all documents in ``language`` (``nnenglish``; None: every language),
    audio paths under ``root``, and the split's ground truth. Every query must be a term of the tlist and
    every document a file of the ecf."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    scoring = root / "scoring"
    truth = read_groundtruth(scoring / f"groundtruth_quesst14_{split}")

    def entries(lst: Path, known: Sequence[str], what: str) -> Tuple[Path, ...]:
        known = set(known)
        out = []
        for rel, n in read_language_key(lst, language):
            if utterance_id(rel) not in known:
                raise QuesstLayoutError(f"{lst}:{n}: {utterance_id(rel)!r} is not {what}")
            out.append(root / rel)
        return tuple(out)

    queries = entries(scoring / f"language_key_{split}.lst", truth.terms, "a query of the term list")
    documents = entries(scoring / "language_key_utterances.lst", truth.files, "a file of the ecf")
    return QuesstSplit(split, queries, documents, truth)


# ----------------------------------------------------------------------------- scores


def standardise(queries: Features, documents: Features) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Every dimension to zero mean and unit (unbiased) standard deviation over all frames of ``queries``
    and ``documents`` (each ``(T, C)``); the deviation is clipped at 1e-9. Statistics in float64 (two
    passes, one utterance at a time), outputs in each input's float dtype (float32 stays float32)."""
    utts = [*queries, *documents]
    n = sum(len(x) for x in utts)
    if n < 2:
        raise ValueError("standardisation needs at least two frames")
    mean = sum(np.asarray(x, np.float64).sum(0) for x in utts) / n
    var = sum(((np.asarray(x, np.float64) - mean) ** 2).sum(0) for x in utts) / (n - 1)
    std = np.maximum(np.sqrt(var), 1e-9)

    def norm(x):  # in the input's precision, as s3prl does in torch
        dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
        return (np.asarray(x, dtype) - mean.astype(dtype)) / std.astype(dtype)

    return [norm(x) for x in queries], [norm(x) for x in documents]


def _prepare(frames: np.ndarray, distance: str) -> np.ndarray:
    """``frames (M, C)`` in float64, rows scaled to unit length for the cosine distances (a zero row stays)."""
    x = np.asarray(frames, np.float64)
    if not distance.startswith("cosine"):
        return x
    norm = np.linalg.norm(x, axis=1)
    norm[norm == 0] = 1.0
    return x / norm[:, None]


def _distances(query: np.ndarray, frames: np.ndarray, distance: str) -> np.ndarray:
    """:func:`local_distances` of operands already through :func:`_prepare`."""
    if not distance.startswith("cosine"):
        from scipy.spatial.distance import cdist

        return cdist(query, frames, distance)
    dist = np.clip(1.0 - query @ frames.T, 0.0, 2.0)
    if distance == "cosine_exp":
        return np.exp(dist) - 1
    if distance == "cosine_neg_log":
        return -1 * np.log(1 - dist)
    return dist


def local_distances(query: np.ndarray, frames: np.ndarray, distance: str = "cosine_exp") -> np.ndarray:
    """``(N, M)`` distances between ``query (N, C)`` and ``frames (M, C)`` frames, in float64:
    ``cosine`` (1 - cosine similarity, in [0, 2]; a zero frame counts as orthogonal), ``cosine_exp``
    (``exp(cosine) - 1``), ``cosine_neg_log`` (``-log(1 - cosine)``), ``euclidean``, ``cityblock``."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    return _distances(_prepare(query, distance), _prepare(frames, distance), distance)


def minmax_rows(dist: np.ndarray) -> np.ndarray:
    """Each row of ``dist (N, M)`` mapped to [0, 1] by its minimum and maximum (range clipped at 1e-9)."""
    lo, hi = dist.min(1, keepdims=True), dist.max(1, keepdims=True)
    return (dist - lo) / np.clip(hi - lo, 1e-9, np.inf)


def subsequence_dtw_last_row(dist: np.ndarray) -> np.ndarray:
    """Accumulated cost of the cheapest path ending at each document frame, ``(M,)``, for local distances
    ``dist (N, M)`` (query frames x document frames): dtw-python's ``asymmetric`` step pattern (one step per
    query frame, from document frame ``j``, ``j-1`` or ``j-2`` to ``j``) with open begin (any start in the
    first row). Columns of +inf separate documents laid side by side: two of them keep paths apart."""
    g = np.array(dist[0], dtype=np.float64)
    for i in range(1, len(dist)):
        best = g.copy()
        np.minimum(best[1:], g[:-1], out=best[1:])
        np.minimum(best[2:], g[:-2], out=best[2:])
        g = dist[i] + best
    return g


def subsequence_dtw(dist: np.ndarray) -> float:
    """dtw-python's ``normalizedDistance`` of the asymmetric open-begin open-end alignment of ``dist (N, M)``:
    the cheapest path's cost divided by the query length ``N``."""
    return float(subsequence_dtw_last_row(dist).min() / len(dist))


def _blocks(documents: Features, max_frames: int) -> Iterator[Tuple[int, int]]:
    """``[a, b)`` runs of documents with at most ``max_frames`` frames in all (at least one document each)."""
    a, total = 0, 0
    for b, d in enumerate(documents):
        if b > a and total + len(d) > max_frames:
            yield a, b
            a, total = b, 0
        total += len(d)
    if a < len(documents):
        yield a, len(documents)


def match_scores(
    queries: Features,
    documents: Features,
    distance: str = "cosine_exp",
    minmax: bool = True,
    min_query_frames: int = MIN_QUERY_FRAMES,
    max_block_frames: int = 16384,
) -> np.ndarray:
    """``(n_queries, n_documents)`` scores ``-normalizedDistance`` of every pair (steps 2-4 of the module
    doc); queries shorter than ``min_query_frames`` score 0. Documents are laid side by side in blocks of
    at most ``max_block_frames`` frames, with two +inf columns between them, so one pass of the
    recursion per query row serves a whole block; the result is the same as pair by pair."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    out = np.zeros((len(queries), len(documents)))
    blocks = []
    for a, b in _blocks(documents, max_block_frames):
        lengths = np.array([len(d) for d in documents[a:b]])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        columns = np.arange(lengths.sum()) + 2 * np.repeat(np.arange(b - a), lengths)  # frame -> column
        frames = _prepare(np.concatenate(documents[a:b]), distance)
        blocks.append((a, b, frames, lengths, starts, columns, starts + 2 * np.arange(b - a)))
    for i, query in enumerate(queries):
        if len(query) < min_query_frames:
            continue
        query = _prepare(query, distance)
        for a, b, frames, lengths, starts, columns, col_starts in blocks:
            dist = _distances(query, frames, distance)
            if minmax:
                lo = np.repeat(np.minimum.reduceat(dist, starts, axis=1), lengths, axis=1)
                hi = np.repeat(np.maximum.reduceat(dist, starts, axis=1), lengths, axis=1)
                dist = (dist - lo) / np.clip(hi - lo, 1e-9, np.inf)
            laid = np.full((len(query), columns[-1] + 1), np.inf)
            laid[:, columns] = dist
            last = subsequence_dtw_last_row(laid)
            out[i, a:b] = -(np.minimum.reduceat(last, col_starts) / len(query))
    return out


def znorm_rows(scores: np.ndarray) -> np.ndarray:
    """Each row (query) z-normalised over its documents; population deviation clipped at 1e-9."""
    mean, std = scores.mean(1, keepdims=True), scores.std(1, keepdims=True)
    return (scores - mean) / np.clip(std, 1e-9, np.inf)


def _check_features(queries: Features, documents: Features) -> None:
    dims = {x.shape[1] for x in [*queries, *documents] if np.ndim(x) == 2}
    for what, utts in (("query", queries), ("document", documents)):
        for k, x in enumerate(utts):
            if np.ndim(x) != 2:
                raise ValueError(f"{what} {k}: features must be (T, C), got shape {np.shape(x)}")
    if len(dims) > 1:
        raise ValueError(f"features of different widths: {sorted(dims)}")
    if not documents:
        raise ValueError("no documents")
    empty = [k for k, d in enumerate(documents) if len(d) == 0]
    if empty:
        raise ValueError(f"documents without frames: {empty[:5]}")


def score_layer(
    queries: Features,
    documents: Features,
    *,
    distance: str = "cosine_exp",
    feature_normalization: bool = True,
    minmax: bool = True,
    min_query_frames: int = MIN_QUERY_FRAMES,
    znorm: bool = True,
    max_block_frames: int = 16384,
) -> np.ndarray:
    """s3prl quesst14_dtw's scores of one layer: ``queries`` and ``documents`` lists of ``(T, C)`` feature
    arrays (the split's queries, the documents), returns ``(n_queries, n_documents)`` float64 (higher: more
    likely to hold the query). The defaults are s3prl's config; see the module doc for the steps."""
    _check_features(queries, documents)
    if feature_normalization and distance == "cosine_neg_log":
        raise ValueError("feature normalisation cannot be used with cosine_neg_log (as in s3prl)")
    if feature_normalization:
        queries, documents = standardise(queries, documents)
    scores = match_scores(queries, documents, distance, minmax, min_query_frames, max_block_frames)
    return znorm_rows(scores) if znorm else scores


# ----------------------------------------------------------------------------- TWV


def _trials(scores: np.ndarray, truth: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    scores, truth = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=bool)
    if scores.ndim != 2 or scores.shape != truth.shape:
        raise ValueError(f"scores {scores.shape} and truth {truth.shape} must be the same (n_queries, n_docs)")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    keep = truth.any(1)
    if not keep.any():
        raise ValueError("no query has a target trial")
    return scores[keep], truth[keep]


def twv(detected: np.ndarray, truth: np.ndarray, beta: float = BETA) -> Dict[str, float]:
    """Term-weighted value of decisions ``detected (n_queries, n_docs)`` against ``truth`` (same shape), over
    the queries with at least one target: ``1 - mean_q[P_miss(q) + beta P_fa(q)]``, ``P_fa(q)`` over the
    documents that do not hold ``q``. Returns twv, p_miss, p_fa (averaged over queries), terms."""
    detected, truth = _trials(np.asarray(detected, dtype=np.float64), truth)
    detected = detected.astype(bool)
    n_true, n_false = truth.sum(1), truth.shape[1] - truth.sum(1)
    p_miss = 1.0 - (detected & truth).sum(1) / n_true
    p_fa = (detected & ~truth).sum(1) / np.maximum(n_false, 1)
    return {
        "twv": float(1.0 - np.mean(p_miss + beta * p_fa)),
        "p_miss": float(p_miss.mean()),
        "p_fa": float(p_fa.mean()),
        "terms": int(len(truth)),
    }


def mtwv(scores: np.ndarray, truth: np.ndarray, beta: float = BETA) -> Dict[str, float]:
    """Maximum TWV over one global threshold: a trial is detected when ``score >= threshold``; every score
    is tried as the threshold, and no detection at all (TWV 0, threshold +inf). ``scores``, ``truth``
    ``(n_queries, n_docs)``; queries without a target are left out, as the QUESST scorer does. Returns
    mtwv, threshold, p_miss, p_fa at it, terms, beta."""
    s, t = _trials(scores, truth)
    n_terms, n_true = len(t), t.sum(1, keepdims=True)
    n_false = np.maximum(t.shape[1] - n_true, 1)
    # TWV(theta) = sum of the weights of the detected trials: +1/(T n_true) a hit, -beta/(T n_false) a false alarm
    weight = np.where(t, 1.0 / (n_terms * n_true), -beta / (n_terms * n_false)).ravel()
    flat = s.ravel()
    order = np.argsort(-flat, kind="stable")
    ranked, gain = flat[order], np.cumsum(weight[order])
    ends = np.append(ranked[1:] != ranked[:-1], True)  # last trial of each group of equal scores
    k = int(np.argmax(gain[ends]))
    threshold = float(ranked[ends][k]) if gain[ends][k] > 0 else math.inf
    at = twv(s >= threshold, t, beta)
    return {
        "mtwv": at["twv"],
        "threshold": threshold,
        "p_miss": at["p_miss"],
        "p_fa": at["p_fa"],
        "terms": n_terms,
        "beta": beta,
    }


# ----------------------------------------------------------------------------- QUESST scoring


def stdlist_scores(scores: np.ndarray, decimals: int = STDLIST_DECIMALS) -> np.ndarray:
    """``scores`` as the scorer reads them from s3prl's stdlist (``f"{score:.4f}"``)."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.array([float(f"{v:.{decimals}f}") for v in scores.ravel()]).reshape(scores.shape)


def official_trials(
    scores: np.ndarray,
    query_names: Sequence[str],
    document_names: Sequence[str],
    truth: GroundTruth,
    default_score: float = DEFAULT_SCORE,
    decisions: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scorer's full trial set (every term x every file of ``truth``) from a system's
    ``(n_queries, n_documents)`` scores: unscored trials get ``default_score`` and decision NO. Returns
    scores, targets and decisions, each ``(len(truth.terms), len(truth.files))``."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(query_names), len(document_names)):
        raise ValueError(
            f"scores {scores.shape} do not match {len(query_names)} queries x {len(document_names)} documents"
        )
    term_row = {t: i for i, t in enumerate(truth.terms)}
    file_col = {f: j for j, f in enumerate(truth.files)}
    unknown = [q for q in query_names if q not in term_row] + [d for d in document_names if d not in file_col]
    if unknown:
        raise QuesstLayoutError(f"not in the ground truth's term list or ecf: {unknown[:5]}")
    rows = np.array([term_row[q] for q in query_names], dtype=int)
    cols = np.array([file_col[d] for d in document_names], dtype=int)
    full = np.full((len(truth.terms), len(truth.files)), float(default_score))
    full[np.ix_(rows, cols)] = scores
    full_decisions = np.zeros(full.shape, dtype=bool)
    if decisions is not None:
        full_decisions[np.ix_(rows, cols)] = np.asarray(decisions, dtype=bool)
    return full, truth.matrix(), full_decisions


def evaluate_quesst(
    scores: np.ndarray,
    query_names: Sequence[str],
    document_names: Sequence[str],
    truth: GroundTruth,
    *,
    default_score: float = DEFAULT_SCORE,
    yes_threshold: float = YES_THRESHOLD,
    decimals: Optional[int] = STDLIST_DECIMALS,
    beta: float = BETA,
) -> Dict[str, float]:
    """MTWV (with its threshold) and ATWV of s3prl-style scores as the QUESST scorer computes them from
    s3prl's stdlist: YES where the score is above ``yes_threshold``, scores rounded to ``decimals`` (None:
    as they are), every other trial of ``truth`` at ``default_score`` and NO."""
    scores = np.asarray(scores, dtype=np.float64)
    listed = stdlist_scores(scores, decimals) if decimals is not None else scores
    full, targets, decided = official_trials(
        listed, query_names, document_names, truth, default_score, scores > yes_threshold
    )
    out = mtwv(full, targets, beta)
    out["atwv"] = twv(decided, targets, beta)["twv"]
    return out


def write_stdlist(
    path: PathLike,
    scores: np.ndarray,
    query_names: Sequence[str],
    document_names: Sequence[str],
    yes_threshold: float = YES_THRESHOLD,
) -> Path:
    """``benchmark.stdlist.xml`` as s3prl writes it (one ``<term>`` per query-document pair, score with 4
    decimals, YES above ``yes_threshold``), for the official ``score-TWV-Cnxe.sh``."""
    path = Path(path)
    root = ET.Element(
        "stdlist",
        termlist_filename="benchmark.stdlist.xml",
        indexing_time="1.00",
        language="english",
        index_size="1",
        system_id="benchmark",
    )
    for q, row in zip(query_names, np.asarray(scores, dtype=np.float64)):
        terms = ET.SubElement(root, "detected_termlist", termid=q, term_search_time="1.0", oov_term_count="1")
        for d, v in zip(document_names, row):
            ET.SubElement(
                terms,
                "term",
                file=d,
                channel="1",
                tbeg="0.000",
                dur="0.00",
                score=f"{v:.4f}",
                decision="YES" if v > yes_threshold else "NO",
            )
    ET.indent(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="UTF-8", xml_declaration=True)
    return path


# ----------------------------------------------------------------------------- layers


def select_layer(
    dev_features: Mapping[int, Tuple[Features, Features]],
    eval_features: Mapping[int, Tuple[Features, Features]],
    dev_metric: Callable[[np.ndarray], Dict],
    eval_metric: Callable[[np.ndarray], Dict],
    *,
    key: str = "mtwv",
    **score_options,
) -> Dict:
    """SUPERB's protocol: every layer of ``dev_features`` (``layer -> (queries, documents)`` feature
    lists) scored by :func:`score_layer` and measured by ``dev_metric`` (a score matrix -> dict with
    ``key``); the layer with the highest ``dev_metric[key]`` (ties: the lowest layer) is scored on
    ``eval_features`` and measured by ``eval_metric``. Only the chosen layer of ``eval_features`` is read,
    so a lazy mapping extracts one eval layer. Returns ``{"layer", "dev": {layer: metrics}, "eval": metrics}``."""
    if not dev_features:
        raise ValueError("no layers")
    per_layer = {
        layer: dev_metric(score_layer(*dev_features[layer], **score_options)) for layer in sorted(dev_features)
    }
    best = max(sorted(per_layer), key=lambda layer: (per_layer[layer][key], -layer))
    if best not in eval_features:
        raise ValueError(f"layer {best} was chosen on dev but eval has no features for it")
    return {"layer": best, "dev": per_layer, "eval": eval_metric(score_layer(*eval_features[best], **score_options))}
