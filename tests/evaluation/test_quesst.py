"""QbE as s3prl's quesst14_dtw: scores against s3prl's own expert (dtw-python), the layout reader, the layer choice."""

import importlib
import sys
import types
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from fairseq_mtssl.errors import MtsslError
from fairseq_mtssl.evaluation.quesst import (
    QuesstLayoutError,
    minmax_rows,
    read_quesst,
    score_layer,
    select_layer,
    subsequence_dtw,
    write_stdlist,
)

# ----------------------------------------------------------------------------- a small QUESST-layout set

DOCS = [(f"quesst14_{k:05d}", "nnenglish") for k in range(1, 9)] + [
    ("quesst14_00009", "czech"),
    ("quesst14_00010", "czech"),
]
QUERIES = {
    "dev": [
        ("quesst14_dev_0001", "nnenglish", 8),
        ("quesst14_dev_0002", "basque", 7),
        ("quesst14_dev_0003", "nnenglish", 6),
        ("quesst14_dev_0004", "nnenglish", 3),  # under 5 frames: scores 0
        ("quesst14_dev_0005", "nnenglish", 10),
        ("quesst14_dev_0006", "nnenglish", 7),  # no occurrence: left out of TWV
    ],
    "eval": [
        ("quesst14_eval_0001", "nnenglish", 9),
        ("quesst14_eval_0002", "nnenglish", 6),
        ("quesst14_eval_0003", "czech", 8),
        ("quesst14_eval_0004", "nnenglish", 12),
    ],
}
TARGETS = {  # query -> documents it occurs in
    "dev": {
        "quesst14_dev_0001": ["quesst14_00001", "quesst14_00003"],
        "quesst14_dev_0002": ["quesst14_00009"],
        "quesst14_dev_0003": ["quesst14_00002"],
        "quesst14_dev_0004": ["quesst14_00004"],
        "quesst14_dev_0005": ["quesst14_00005"],
    },
    "eval": {
        "quesst14_eval_0001": ["quesst14_00002"],
        "quesst14_eval_0002": ["quesst14_00004", "quesst14_00005"],
        "quesst14_eval_0003": ["quesst14_00010"],
        "quesst14_eval_0004": ["quesst14_00001"],
    },
}
DOC_FRAMES = [22, 30, 18, 25, 27, 20, 24, 19, 23, 21]
LAYERS = (0, 1, 2)
NOISE = {0: None, 1: 1.5, 2: 0.2}  # how clearly a query's frames are planted in its documents, per layer
CHANNELS = 6


def write_layout(root):
    """quesst14Database/: the scoring lists and both ground-truth directories (no audio is needed)."""
    scoring = root / "scoring"
    scoring.mkdir(parents=True)
    (scoring / "language_key_utterances.lst").write_text(
        "".join(f"quesst14Database/Audio/{name}.wav {lang}\n" for name, lang in DOCS)
    )
    for split, queries in QUERIES.items():
        (scoring / f"language_key_{split}.lst").write_text(
            "".join(f"quesst14Database/{split}_queries/{name}.wav {lang}\n" for name, lang, _ in queries)
        )
        gt = scoring / f"groundtruth_quesst14_{split}"
        gt.mkdir()
        excerpts = "".join(
            f'  <excerpt audio_filename="Audio/{name}.wav" channel="1" tbeg="0.000" dur="3.000"/>\n' for name, _ in DOCS
        )
        (gt / "quesst14.ecf.xml").write_text(
            f'<ecf source_signal_duration="21.0" language="multiple" version="1">\n{excerpts}</ecf>\n'
        )
        terms = "".join(f'  <term termid="{name}"><termtext>{name}</termtext></term>\n' for name, _, _ in queries)
        (gt / f"quesst14_{split}.tlist.xml").write_text(
            f'<termlist ecf_filename="quesst14.ecf.xml" language="multiple" version="1">\n{terms}</termlist>\n'
        )
        lines = [f"LEXEME {doc} 1 0.50 0.40 {q} <NA> spkr <NA>\n" for q, docs in TARGETS[split].items() for doc in docs]
        (gt / f"quesst14_{split}.rttm").write_text(";; occurrences\n" + "".join(lines))
    return root


def make_features(seed=0):
    """layer -> utterance name -> (T, C) float32, with each query's frames planted (plus noise) in its documents."""
    rng = np.random.default_rng(seed)
    base = {name: rng.normal(size=(n, CHANNELS)) for (name, _), n in zip(DOCS, DOC_FRAMES)}
    for queries in QUERIES.values():
        base.update({name: rng.normal(size=(n, CHANNELS)) for name, _, n in queries})
    layers = {}
    for layer in LAYERS:
        feats = {k: v.copy() for k, v in base.items()}
        if NOISE[layer] is not None:
            for split in QUERIES:
                for q, docs in TARGETS[split].items():
                    for doc in docs:
                        at = rng.integers(0, len(feats[doc]) - len(feats[q]))
                        feats[doc][at : at + len(feats[q])] = feats[q] + NOISE[layer] * rng.normal(size=feats[q].shape)
        layers[layer] = {k: (v + 0.3 * layer).astype(np.float32) for k, v in feats.items()}
    return layers


@pytest.fixture(scope="module")
def quesst(tmp_path_factory):
    root = write_layout(tmp_path_factory.mktemp("quesst") / "quesst14Database")
    return root, {split: read_quesst(root, split) for split in QUERIES}, make_features()


def split_features(layer_feats, split):
    return [layer_feats[n] for n in split.query_names], [layer_feats[n] for n in split.document_names]


# ----------------------------------------------------------------------------- the reference: s3prl's expert


@pytest.fixture(scope="module")
def s3prl_expert():
    """s3prl's quesst14_dtw expert module. Its dataset module loads audio through torchaudio, which the
    expert's scoring functions never use: a stand-in replaces it for the import only."""
    pytest.importorskip("dtw", reason="dtw-python is the DTW of s3prl's expert (scripts/bootstrap_venv.sh)")
    pytest.importorskip("lxml")
    pytest.importorskip("s3prl")
    package = "s3prl.downstream.quesst14_dtw"
    names = (f"{package}.dataset", f"{package}.expert")
    saved = {name: sys.modules.pop(name, None) for name in names}
    stub = types.ModuleType(names[0])
    stub.QUESST14Dataset = object
    sys.modules[names[0]] = stub
    try:
        yield importlib.import_module(names[1])
    finally:
        for name in names:
            sys.modules.pop(name, None)
            if saved[name] is not None:
                sys.modules[name] = saved[name]


# DownstreamExpert.log_records' dtw-python arguments for dtwrc.subsequence: True
DTWRC = {
    "step_pattern": "asymmetric",
    "keep_internals": False,
    "distance_only": False,
    "open_begin": True,
    "open_end": True,
}


def s3prl_scores(expert, queries, documents):
    """DownstreamExpert.log_records' scores before they are written: torch float32 statistics over queries
    and documents, ``expert.match`` with ``expert.cosine_exp`` and min-max for each pair of a query of 5
    frames or more, 0 otherwise, then z-normalisation per query."""
    import torch

    feats = [torch.from_numpy(x) for x in [*queries, *documents]]
    allf = torch.cat(feats)
    mean, std = allf.mean(0), torch.clamp(allf.std(0), 1e-9)
    qs = [((x - mean) / std).numpy() for x in feats[: len(queries)]]
    ds = [((x - mean) / std).numpy() for x in feats[len(queries) :]]
    scores = np.zeros((len(qs), len(ds)))
    for i, q in enumerate(qs):
        if len(q) < 5:
            continue
        for j, d in enumerate(ds):
            scores[i, j] = expert.match(q, d, i, j, expert.cosine_exp, True, DTWRC)[2]
    return (scores - scores.mean(1, keepdims=True)) / np.clip(scores.std(1, keepdims=True), 1e-9, np.inf)


def test_scores_reproduce_s3prl_quesst14_dtw(quesst, s3prl_expert):
    """Within 1e-6 of s3prl on float32 features (what remains is s3prl's float32 statistics: torch's float32
    means are some ulps off, ours are float64), within 1e-9 when both sides get float64 features."""
    _, splits, layers = quesst
    worst, worst64 = 0.0, 0.0
    for layer in LAYERS:
        for split in splits.values():
            queries, documents = split_features(layers[layer], split)
            got = score_layer(queries, documents)
            ref = s3prl_scores(s3prl_expert, queries, documents)
            worst = max(worst, float(np.abs(got - ref).max()))
            q64, d64 = [x.astype(np.float64) for x in queries], [x.astype(np.float64) for x in documents]
            worst64 = max(worst64, float(np.abs(score_layer(q64, d64) - s3prl_scores(s3prl_expert, q64, d64)).max()))
            short = [len(q) < 5 for q in queries]
            assert any(short) == (split.split == "dev")
            assert (got[short] == 0).all()
            # documents laid side by side in small blocks: the same numbers as in one block
            np.testing.assert_allclose(score_layer(queries, documents, max_block_frames=20), got, rtol=0, atol=1e-12)
    print(f"max |score - s3prl| = {worst:.3g} (float32 features), {worst64:.3g} (float64)")
    assert worst < 1e-6
    assert worst64 < 1e-9


def test_pair_dtw_is_dtw_pythons_normalized_distance(s3prl_expert):
    from dtw import dtw

    rng = np.random.default_rng(1)
    for n, m in [(1, 1), (1, 4), (3, 1), (3, 2), (5, 9), (9, 5), (12, 40)]:
        dist = minmax_rows(rng.random((n, m)))
        expected = dtw(x=dist, **DTWRC).normalizedDistance
        assert subsequence_dtw(dist) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_stdlist_is_s3prls(quesst, s3prl_expert, tmp_path):
    """The whole of DownstreamExpert.log_records (its process pool included) writes the same stdlist."""
    import torch

    _, splits, layers = quesst
    split = splits["dev"]
    queries, documents = split_features(layers[2], split)
    config = {
        "max_workers": 1,
        "feature_normalization": True,
        "silence_frame": None,
        "datarc": {},
        "dtwrc": {"dist_method": "cosine_exp", "minmax_norm": True, "step_pattern": "asymmetric", "subsequence": True},
    }
    expert = s3prl_expert.DownstreamExpert(CHANNELS, config, str(tmp_path / "s3prl"))
    (tmp_path / "s3prl").mkdir()
    expert.test_dataset = types.SimpleNamespace(n_queries=len(queries))
    records = {
        "features": [torch.from_numpy(x) for x in [*queries, *documents]],
        "audio_names": split.query_names + split.document_names,
    }
    expert.log_records("dev", records)
    ours = write_stdlist(
        tmp_path / "ours" / "benchmark.stdlist.xml",
        score_layer(queries, documents),
        split.query_names,
        split.document_names,
    )

    def read(path):
        root = ET.parse(path).getroot()
        head = {k: root.get(k) for k in ("termlist_filename", "indexing_time", "language", "index_size", "system_id")}
        terms = {
            (tl.get("termid"), t.get("file")): (
                t.get("score"),
                t.get("decision"),
                t.get("channel"),
                t.get("tbeg"),
                t.get("dur"),
            )
            for tl in root.iter("detected_termlist")
            for t in tl.iter("term")
        }
        return head, terms

    theirs = read(tmp_path / "s3prl" / "benchmark.stdlist.xml")
    assert read(ours) == theirs
    assert len(theirs[1]) == len(queries) * len(documents)
    assert any(v[1] == "YES" for v in theirs[1].values())


# ----------------------------------------------------------------------------- the layout reader


def test_reader_on_the_written_set(quesst):
    root, splits, _ = quesst
    dev = splits["dev"]
    assert dev.query_names == [
        "quesst14_dev_0001",
        "quesst14_dev_0003",
        "quesst14_dev_0004",
        "quesst14_dev_0005",
        "quesst14_dev_0006",
    ]
    assert dev.document_names == [f"quesst14_{k:05d}" for k in range(1, 9)]
    assert dev.queries[0] == root / "dev_queries" / "quesst14_dev_0001.wav"
    assert dev.documents[0] == root / "Audio" / "quesst14_00001.wav"
    assert dev.truth.terms == tuple(name for name, _, _ in QUERIES["dev"])
    assert dev.truth.files == tuple(name for name, _ in DOCS)
    assert dev.truth.targets == frozenset((q, d) for q, docs in TARGETS["dev"].items() for d in docs)
    assert splits["eval"].query_names == ["quesst14_eval_0001", "quesst14_eval_0002", "quesst14_eval_0004"]
    everything = read_quesst(root, "eval", language=None)
    assert len(everything.queries) == 4 and len(everything.documents) == len(DOCS)
    m = dev.truth.matrix(dev.query_names, dev.document_names)
    assert m.shape == (5, 8) and m[0, 0] and m[0, 2] and not m[4].any()


def test_layout_errors_name_the_file_and_line(tmp_path):
    root = write_layout(tmp_path / "q")
    scoring = root / "scoring"

    def fails(match):
        with pytest.raises(QuesstLayoutError, match=match) as err:
            read_quesst(root, "dev")
        assert isinstance(err.value, MtsslError)

    lst = scoring / "language_key_dev.lst"
    text = lst.read_text()
    lst.unlink()
    fails(f"{lst}: cannot read \\(missing\\)")
    lines = text.splitlines(keepends=True)
    lst.write_text(lines[0] + lines[1] + "quesst14Database/dev_queries/x.wav nnenglish extra\n")
    fails(f"{lst}:3: expected")
    lst.write_text(text + "quesst14Database/dev_queries/quesst14_dev_0099.wav nnenglish\n")
    fails(f"{lst}:7: 'quesst14_dev_0099' is not a query of the term list")
    lst.write_text(text)

    rttm = scoring / "groundtruth_quesst14_dev" / "quesst14_dev.rttm"
    good = rttm.read_text()
    rttm.write_text(";; occurrences\nLEXEME quesst14_00001 1 0.50\n")
    fails(f"{rttm}:2: LEXEME line with 4 fields")
    rttm.write_text(good + "LEXEME quesst14_00099 1 0.50 0.40 quesst14_dev_0001 <NA> spkr <NA>\n")
    fails(f"{rttm}:\\d+: file 'quesst14_00099' is not in the ecf")
    rttm.write_text(good)

    tlist = scoring / "groundtruth_quesst14_dev" / "quesst14_dev.tlist.xml"
    good = tlist.read_text()
    tlist.write_text(good.replace("</termlist>", "<term termid='x'>\n</termlist>"))
    fails(f"{tlist}:\\d+: not well-formed XML")
    tlist.write_text(good.replace('termid="quesst14_dev_0003"', 'id="quesst14_dev_0003"'))
    fails(f"{tlist}:4: <term> without termid")
    tlist.unlink()
    fails("no \\*.tlist.xml file")


# ----------------------------------------------------------------------------- layers


def test_layer_chosen_on_dev_and_reported_on_eval(quesst, s3prl_expert):
    _, splits, layers = quesst
    dev, ev = splits["dev"], splits["eval"]
    asked = []

    class Lazy(dict):  # eval features: only the chosen layer is read
        def __getitem__(self, layer):
            asked.append(layer)
            return split_features(layers[layer], ev)

    result = select_layer(
        {layer: split_features(layers[layer], dev) for layer in LAYERS},
        Lazy.fromkeys(LAYERS),
        dev.metric(),
        ev.metric(),
    )
    # the same choice and numbers from s3prl's own scores
    ref_dev = {layer: dev.metric()(s3prl_scores(s3prl_expert, *split_features(layers[layer], dev))) for layer in LAYERS}
    assert result["dev"] == ref_dev
    best = max(LAYERS, key=lambda layer: ref_dev[layer]["mtwv"])
    assert result["layer"] == best == 2 and asked == [2]
    assert result["eval"] == ev.metric()(s3prl_scores(s3prl_expert, *split_features(layers[2], ev)))
    assert ref_dev[2]["mtwv"] > ref_dev[0]["mtwv"]
