"""ABX: DTW and the error rate against brute-force references and a hand-computed example under
libri-light's definition; item frames; item files; per-layer features."""

import itertools
import json
import re
from collections import defaultdict

import numpy as np
import pytest
import torch
from builders import HAND_ACROSS, HAND_WITHIN, hand_example
from conftest import run_cli

from fairseq_mtssl.evaluation.abx import (
    AbxItem,
    abx_error,
    abx_scores,
    angular_distances,
    centre_span,
    dtw_path_mean,
    fastabx_span,
    libri_light_span,
    make_items,
    read_items,
    write_items,
)


def brute_dtw(dist: np.ndarray) -> float:
    """Cheapest monotone path by recursion, its mean cell cost. Between predecessors of equal cost the
    path takes the first of (diagonal, (i, j - 1), (i - 1, j)): libri-light's backtracking rule."""
    n, m = dist.shape
    best = {}

    def walk(i, j):  # (total cost, cells) of the cheapest path from (0, 0) to (i, j)
        if (i, j) in best:
            return best[(i, j)]
        if i == 0 and j == 0:
            r = (dist[0, 0], 1)
        else:
            options = [walk(a, b) for a, b in ((i - 1, j - 1), (i, j - 1), (i - 1, j)) if a >= 0 and b >= 0]
            c, k = min(options, key=lambda t: t[0])
            r = (c + dist[i, j], k + 1)
        best[(i, j)] = r
        return r

    c, k = walk(n - 1, m - 1)
    return c / k


def brute_abx(items, feats, mode, context="triphone"):
    """Every (A, B, X) triplet enumerated; libri-light's averaging written from its definition: a cell is
    (context, A/B speaker, X speaker, phone A, phone B); cells are pooled per (A/B speaker, A, B) (within:
    over contexts; across: over contexts and X speakers), then averaged over speakers, then phone pairs."""

    def d(i, j):
        a, b = feats[i].double().numpy(), feats[j].double().numpy()
        cos = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
        return brute_dtw(np.arccos(np.clip(cos, -1, 1)) / np.pi)

    cells = defaultdict(list)
    for a, b, x in itertools.permutations(range(len(items)), 3):
        A, B, X = items[a], items[b], items[x]
        if context == "triphone" and not (A.prev, A.next) == (B.prev, B.next) == (X.prev, X.next):
            continue
        if not A.phone == X.phone != B.phone:
            continue
        if A.speaker != B.speaker or (mode == "within") != (X.speaker == A.speaker):
            continue
        dax, dbx = d(a, x), d(b, x)
        cells[((A.prev, A.next) if context == "triphone" else (), A.speaker, X.speaker, A.phone, B.phone)].append(
            1 - (dax < dbx) - 0.5 * (dax == dbx)
        )
    by_speaker = defaultdict(list)
    for (ctx, sa, sx, pa, pb), errs in cells.items():
        by_speaker[(sa, pa, pb)].append(np.mean(errs))
    by_pair = defaultdict(list)
    for (sa, pa, pb), errs in by_speaker.items():
        by_pair[(pa, pb)].append(np.mean(errs))
    return float(np.mean([np.mean(v) for v in by_pair.values()]))


def test_dtw_matches_path_enumeration():
    rng = np.random.default_rng(0)
    mats = [rng.random((rng.integers(1, 7), rng.integers(1, 7))) for _ in range(40)]
    mats += [rng.integers(0, 3, (rng.integers(1, 7), rng.integers(1, 7))).astype(float) for _ in range(40)]  # ties
    n, m = max(x.shape[0] for x in mats), max(x.shape[1] for x in mats)
    padded = torch.full((len(mats), n, m), 9.0, dtype=torch.float64)
    for k, x in enumerate(mats):
        padded[k, : x.shape[0], : x.shape[1]] = torch.from_numpy(x)
    got = dtw_path_mean(padded, torch.tensor([x.shape[0] for x in mats]), torch.tensor([x.shape[1] for x in mats]))
    np.testing.assert_allclose(got.numpy(), [brute_dtw(x) for x in mats], rtol=1e-12)


def test_dtw_tie_rule_sets_the_path_length():
    # [[0, 0], [0, 1]]: the predecessors of (1, 1) all cost 0; the diagonal wins: 2 cells, 1 / 2 (else 1 / 3).
    # [[1, 5], [0, 0]]: diagonal (0, 0) = 1 and left (1, 0) = 1 + 0 tie below up (0, 1) = 6; the diagonal
    #   wins: (1 + 0) / 2 (the left step would give 1 / 3).
    # [[0, 0, 0, 9], [9, 1, 9, 1], [9, 9, 0, 0]]: cumulative costs row 0: 0 0 0 9; row 1: 9 1 9 1; row 2:
    #   18 10 1 1. At (2, 3): left (2, 2) = 1 and up (1, 3) = 1 tie below the diagonal (1, 2) = 9. The left
    #   step wins: (2,2) <- (1,1) <- (0,0), 4 cells, 1 / 4; the up step would give (1,3) <- (0,2) (0,1) (0,0),
    #   5 cells, 1 / 5.
    mats = [[[0, 0], [0, 1]], [[1, 5], [0, 0]], [[0, 0, 0, 9], [9, 1, 9, 1], [9, 9, 0, 0]]]
    expected = [1 / 2, 1 / 2, 1 / 4]
    for mat, want in zip(mats, expected):
        d = torch.tensor([mat], dtype=torch.float32)
        got = dtw_path_mean(d, torch.tensor([d.shape[1]]), torch.tensor([d.shape[2]]))
        assert float(got[0]) == pytest.approx(want)
        assert brute_dtw(np.array(mat, dtype=float)) == pytest.approx(want)


def test_libri_light_item_frames():
    # r = 10 frames/s: frame t is taken when its centre (t + 0.5) / 10 lies in [onset, offset - 0.1]
    assert libri_light_span(0.12, 0.38, 10, 100) == (1, 3)  # ceil(1.2 - 0.5) = 1, floor(3.8 - 0.5) = 3: frames 1, 2
    assert libri_light_span(0.12, 0.14, 10, 100) is None  # ceil(0.7) = 1 >= floor(0.9) = 0: dropped
    assert libri_light_span(0.0, 0.2, 10, 100) == (0, 1)  # ceil(-0.5) = 0, floor(1.5) = 1
    assert libri_light_span(0.0, 0.26, 50, 100) == (0, 12)  # floor(13 - 0.5) = 12
    assert libri_light_span(1.0, 3.0, 10, 15) == (10, 15)  # cut at the utterance's end (floor(29.5) = 29 > 15)
    assert libri_light_span(2.0, 3.0, 10, 15) is None  # starts past the end
    # float arithmetic, as libri-light: 100 * 0.145 = 14.499999999999998, floor(13.999...) = 13
    assert libri_light_span(0.0, 0.145, 100, 1000) == (0, 13)
    # fastabx's default: the same range with its end included, in decimal arithmetic (14.5 - 0.5 = 14, + 1)
    assert fastabx_span(0.0, 0.145, 100, 1000) == (0, 15)
    assert fastabx_span(0.12, 0.38, 10, 100) == (1, 4) and fastabx_span(0.12, 0.14, 10, 100) is None
    assert centre_span(0.12, 0.14, 10, 100) == (1, 2)  # the former rule: nearest frame (centre 0.1125)


def test_hand_computed_example_under_libri_light_rules(tmp_path):
    items, utts = hand_example()
    write_items(items, tmp_path / "hand.item")
    got = abx_scores(read_items(tmp_path / "hand.item"), utts, 10.0)
    assert got["within"] == pytest.approx(HAND_WITHIN, abs=1e-12)
    assert got["across"] == pytest.approx(HAND_ACROSS, abs=1e-12)
    assert (got["items"], got["dropped_items"]) == (11, 1)
    for name, u in utts.items():
        np.save(tmp_path / f"{name}.npy", u)
    out = run_cli("mtssl-abx", "--features", tmp_path, "--frame-rate", "10", "--items", tmp_path / "hand.item")
    assert out.stdout.splitlines()[1].split() == ["0", "37.50", "35.42", "11", "1"]


def test_features_dir_errors_name_the_file(tmp_path, capsys):
    from fairseq_mtssl.evaluation.abx import main

    items, utts = hand_example()
    write_items(items, tmp_path / "hand.item")
    for name, u in utts.items():
        np.save(tmp_path / f"{name}.npy", u)
    np.save(tmp_path / "u3.npy", utts["u3"][:, 0])  # 1-d
    (tmp_path / "u4.npy").unlink()
    args = ["--features", str(tmp_path), "--frame-rate", "10", "--items", str(tmp_path / "hand.item")]
    for fix, expected in ((None, r"u3\.npy: expected a float \(frames, dims\) array"),
                          ("u3", r"u4\.npy: no features for utterance u4")):  # fmt: skip
        if fix:
            np.save(tmp_path / f"{fix}.npy", utts[fix])
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and len(err.strip().splitlines()) == 1 and re.search(expected, err)


def _toy(seed, separable, speaker_weight=0.7, noise=0.3, keep=1.0):
    """Items over 3 phones, 2 contexts, 3 speakers; features a phone direction (plus a speaker one).
    ``keep`` < 1 drops items at random, so that cells have unequal counts."""
    rng = np.random.default_rng(seed)
    phones, contexts, speakers = ["a", "e", "o"], [("p", "t"), ("k", "s")], ["s1", "s2", "s3"]
    direction = {p: rng.standard_normal(8) for p in phones + speakers}
    items, feats = [], []
    for spk, (prev, nxt), ph in itertools.product(speakers, contexts, phones):
        for rep in range(2 if keep == 1.0 else 3):
            f = (direction[ph] if separable else 0) + speaker_weight * direction[spk]
            f = f + noise * rng.standard_normal((rng.integers(2, 6), 8))
            if rng.random() < keep:
                items.append(AbxItem(f"u{len(items)}", 0.0, 0.1, ph, prev, nxt, spk))
                feats.append(torch.from_numpy(f).float())
    return items, feats


@pytest.mark.parametrize("keep", [1.0, 0.6])
@pytest.mark.parametrize("context", ["triphone", "none"])
@pytest.mark.parametrize("mode", ["within", "across"])
def test_abx_error_matches_triplet_enumeration(mode, context, keep):
    items, feats = _toy(1, separable=True, keep=keep)
    g = torch.Generator().manual_seed(0)  # seeded: the global generator's state depends on the tests run before
    noisy = [f + torch.randn(f.shape, generator=g) * 1.5 for f in feats]  # errors neither 0 nor 50 %
    expected = brute_abx(items, noisy, mode, context)
    assert 0.02 < expected < 0.45
    assert abx_error(items, noisy, mode, context) == pytest.approx(expected, abs=1e-12)


def test_abx_separates_phones_and_not_noise():
    items, feats = _toy(2, separable=True, speaker_weight=0.2, noise=0.05)
    assert abx_error(items, feats, "within") < 0.05 and abx_error(items, feats, "across") < 0.05
    items, feats = _toy(3, separable=False)  # only speaker information: chance
    assert 0.3 < abx_error(items, feats, "within") < 0.7


def test_angular_distance_range():
    a = torch.randn(4, 3)
    d = angular_distances(a, torch.cat([a, -a]))
    torch.testing.assert_close(torch.diagonal(d[:, :4]), torch.zeros(4), atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.diagonal(d[:, 4:]), torch.ones(4), atol=1e-3, rtol=0)


def test_item_file_from_the_corpus_round_trips_and_bad_lines_are_named(corpus_dir, manifest_dir, tmp_path):
    out = tmp_path / "test.item"
    run_cli(
        "mtssl-abx-items",
        "--alignments",
        corpus_dir / "alignments/test.phones.ctm",
        "--manifest",
        manifest_dir / "test.tsv",
        "--out",
        out,
    )
    items = read_items(out)
    assert len(items) > 50 and all(it.phone != "sil" for it in items)
    assert len({it.speaker for it in items}) >= 2
    speakers = dict(
        zip(
            (manifest_dir / "test.tsv").read_text().split("\n")[1:], (manifest_dir / "test.spk").read_text().split("\n")
        )
    )
    by_utt = {line.split("\t")[0].rsplit("/", 1)[-1][:-4]: spk for line, spk in speakers.items() if line}
    assert all(by_utt[it.file] == it.speaker for it in items)
    write_items(items, tmp_path / "again.item")
    assert read_items(tmp_path / "again.item") == items
    lines = out.read_text().splitlines()
    lines[3] = lines[3].rsplit(" ", 1)[0]  # drop the speaker
    (tmp_path / "bad.item").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="bad.item:4"):
        read_items(tmp_path / "bad.item")


def test_make_items_skips_edges_and_silence(tmp_path):
    ctm = tmp_path / "x.ctm"
    ctm.write_text("u1 0.0 0.1 sil\nu1 0.1 0.2 a\nu1 0.2 0.3 sil\nu1 0.3 0.4 b\nu1 0.4 0.5 c\n")
    items = make_items(ctm, {"u1": "s"})
    assert [(i.prev, i.phone, i.next) for i in items] == [("sil", "a", "sil"), ("sil", "b", "c")]


def test_all_layers_equal_single_layer_reads_and_cli_table(tiny_hubert_checkpoint, manifest_dir, corpus_dir, tmp_path):
    import soundfile as sf

    from fairseq_mtssl.data.manifest import read_manifest
    from fairseq_mtssl.upstream.readers import layer_reader, open_reader

    manifest = read_manifest(manifest_dir / "test.tsv")
    wavs = [sf.read(manifest.audio_path(i), dtype="float32")[0] for i in range(3)]
    reader = open_reader(str(tiny_hubert_checkpoint))
    every = [reader.hidden_states(w) for w in wavs]
    assert len(every) == 3 and len(every[0]) == 3  # encoder input + 2 layers
    for layer in (1, 2):
        single = layer_reader(str(tiny_hubert_checkpoint), layer)(wavs)
        for u in range(3):
            np.testing.assert_allclose(every[u][layer], single[u], atol=1e-5)

    items = tmp_path / "test.item"
    run_cli(
        "mtssl-abx-items",
        "--alignments",
        corpus_dir / "alignments/test.phones.ctm",
        "--manifest",
        manifest_dir / "test.tsv",
        "--out",
        items,
    )
    out = run_cli(
        "mtssl-abx",
        tiny_hubert_checkpoint,
        "--manifest",
        manifest_dir / "test.tsv",
        "--items",
        items,
        "--context",
        "none",
        "--json",
        tmp_path / "abx.json",
    )
    rows = json.loads((tmp_path / "abx.json").read_text())["layers"]
    assert [r["layer"] for r in rows] == [0, 1, 2] and "within" in out.stdout
    assert all(0 <= r["within"] <= 100 and 0 <= r["across"] <= 100 for r in rows)
