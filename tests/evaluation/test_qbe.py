"""QbE: subsequence DTW against a row-by-row reference, MTWV and MAP on hand-made cases, the CLI."""

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

from fairseq_mtssl.evaluation.qbe import mean_average_precision, mtwv, subsequence_dtw


def reference_subsequence_dtw(dist: np.ndarray) -> float:
    """Plain row-by-row dynamic programme over (cost, path cells); free start and end in the document."""
    q, d = dist.shape
    prev = [(0.0, 0)] * (d + 1)  # row 0: start anywhere
    for i in range(1, q + 1):
        row = [(float("inf"), 0)]
        for j in range(1, d + 1):
            c, k = min((prev[j - 1], prev[j], row[j - 1]), key=lambda t: t[0])
            row.append((c + dist[i - 1, j - 1], k + 1))
        prev = row
    return min(c / k for c, k in prev[1:])


def test_subsequence_dtw_matches_reference_and_finds_an_exact_cut():
    rng = np.random.default_rng(0)
    mats = [rng.random((rng.integers(1, 6), rng.integers(3, 12))) for _ in range(30)]
    q, d = max(m.shape[0] for m in mats), max(m.shape[1] for m in mats)
    padded = torch.full((len(mats), q, d), 0.01, dtype=torch.float64)  # cheap padding must not be used
    for k, m in enumerate(mats):
        padded[k, : m.shape[0], : m.shape[1]] = torch.from_numpy(m)
    got = subsequence_dtw(padded, torch.tensor([m.shape[0] for m in mats]), torch.tensor([m.shape[1] for m in mats]))
    np.testing.assert_allclose(got.numpy(), [reference_subsequence_dtw(m) for m in mats], rtol=1e-12)

    doc = torch.randn(40, 16)
    query = doc[12:20].clone()
    from fairseq_mtssl.evaluation.abx import angular_distances

    dist = angular_distances(query, doc)[None]
    assert subsequence_dtw(dist, torch.tensor([8]), torch.tensor([40])).item() < 1e-3
    assert subsequence_dtw(dist, torch.tensor([8]), torch.tensor([12])).item() > 0.1  # the match is beyond len_d


def test_mtwv_and_map_on_hand_made_cases():
    truth = np.array([[1, 0, 0, 0], [0, 1, 1, 0]])
    perfect = np.array([[0.9, 0.1, 0.2, 0.3], [0.1, 0.8, 0.7, 0.2]])
    assert mtwv(perfect, truth)[0] == pytest.approx(1.0)
    assert mean_average_precision(perfect, truth) == pytest.approx(1.0)
    # query 2's second true document (0.15) ranks below a false one (0.3 of query 1, 0.2 of query 2)
    mixed = np.array([[0.9, 0.1, 0.2, 0.3], [0.1, 0.8, 0.15, 0.2]])
    # beta 1: threshold 0.8 -> q1 hit, q2 1 of 2: TWV = 1 - (0 + 0.5) / 2 = 0.75; threshold 0.15 -> q1 has
    # 2 false alarms of 3 (p_fa 2/3), q2 all hit but 1 false alarm of 2: 1 - (2/3 + 0 + 0.5) / 2 = 0.4167
    value, threshold = mtwv(mixed, truth, beta=1.0)
    assert value == pytest.approx(0.75) and threshold == pytest.approx(0.8)
    # AP q1 = 1; q2 ranking: 0.8 (true), 0.2 (false), 0.15 (true), 0.1 -> (1 + 2/3) / 2
    assert mean_average_precision(mixed, truth) == pytest.approx((1 + (1 + 2 / 3) / 2) / 2)
    with pytest.raises(ValueError, match="true document"):
        mtwv(mixed, np.array([[0, 0, 0, 0], [0, 1, 1, 0]]))


def test_qbe_cli_on_the_corpus(tiny_hubert_checkpoint, manifest_dir, corpus_dir, tmp_path):
    results = {}
    for name, ckpt, method in (
        ("mfcc", "mfcc", "plugin"),
        ("mfcc_superb", "mfcc", "superb"),
        ("hubert", tiny_hubert_checkpoint, "plugin"),
        ("hubert_superb", tiny_hubert_checkpoint, "superb"),
    ):
        run_cli(
            "mtssl-qbe", ckpt, "--method", method, "--layer", "2", "--manifests", manifest_dir,
            "--alignments", corpus_dir / "alignments", "--json", tmp_path / f"{name}.json",
        )  # fmt: skip
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for r in results.values():
        assert r["documents"] == 10 and 0.0 <= r["mtwv"] <= 1.0 and 0.0 < r["map"] <= 1.0
    assert results["mfcc"]["queries"] >= 5 and results["hubert"]["layer"] == 2
    assert set(results["hubert_superb"]["dev_mtwv"]) == {"0", "1", "2"}  # every layer tried (json keys)
    # MFCC features of the same words from other speakers rank documents far better than chance
    assert results["mfcc"]["map"] > results["mfcc"]["true_share"] + 0.15, results
    assert results["mfcc_superb"]["map"] > results["mfcc_superb"]["true_share"] + 0.1, results


def test_superb_qbe_chooses_the_layer_that_finds_the_words_on_dev(manifest_dir, corpus_dir):
    """Two "layers": MFCC, and noise. The dev half of the words picks the MFCC one, whichever slot it is in."""
    from fairseq_mtssl.evaluation.qbe import qbe_from_features
    from fairseq_mtssl.upstream.features import SplitFeatures, extract_split
    from fairseq_mtssl.upstream.readers import open_reader

    reader = open_reader("mfcc")
    splits = {s: extract_split(reader, manifest_dir / f"{s}.tsv") for s in ("valid", "test")}
    rng = np.random.default_rng(0)
    for good in (0, 1):
        two = {}
        for s, f in splits.items():
            noise = rng.normal(size=f.layers[0].shape).astype(np.float32)
            layers = [f.layers[0], noise] if good == 0 else [noise, f.layers[0]]
            two[s] = SplitFeatures(f.utterances, f.offsets, layers, [0, 1], f.frame_rate, f.hop, f.window)
        r = qbe_from_features(two["valid"], two["test"], corpus_dir / "alignments")
        assert r["layer"] == good and r["dev_mtwv"][good] >= r["dev_mtwv"][1 - good], r
        assert r["queries"]["dev"] > 0 and r["queries"]["eval"] > 0
