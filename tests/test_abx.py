"""ABX: DTW and the error rate against brute-force references; item files; per-layer features."""

import itertools
import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from conftest import run_cli

from fairseq_mtssl.evaluation.abx import (
    AbxItem,
    abx_error,
    angular_distances,
    dtw_path_mean,
    make_items,
    read_items,
    write_items,
)


def brute_dtw(dist: np.ndarray) -> float:
    """Enumerate every monotone path by recursion; the cheapest one's mean cell cost (shortest on ties)."""
    n, m = dist.shape
    best = {}

    def walk(i, j):  # (total cost, cells) of the cheapest path from (0, 0) to (i, j)
        if (i, j) in best:
            return best[(i, j)]
        if i == 0 and j == 0:
            r = (dist[0, 0], 1)
        else:
            options = [walk(a, b) for a, b in ((i - 1, j - 1), (i - 1, j), (i, j - 1)) if a >= 0 and b >= 0]
            c, k = min(options, key=lambda t: t[0])
            r = (c + dist[i, j], k + 1)
        best[(i, j)] = r
        return r

    c, k = walk(n - 1, m - 1)
    return c / k


def brute_abx(items, feats, mode, context="triphone"):
    def d(i, j):
        a, b = feats[i].numpy(), feats[j].numpy()
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
        by_speaker[(sa, sx, pa, pb)].append(np.mean(errs))
    by_pair = defaultdict(list)
    for (sa, sx, pa, pb), errs in by_speaker.items():
        by_pair[(pa, pb)].append(np.mean(errs))
    return float(np.mean([np.mean(v) for v in by_pair.values()]))


def test_dtw_matches_path_enumeration():
    rng = np.random.default_rng(0)
    mats = [rng.random((rng.integers(1, 7), rng.integers(1, 7))) for _ in range(40)]
    n, m = max(x.shape[0] for x in mats), max(x.shape[1] for x in mats)
    padded = torch.full((len(mats), n, m), 9.0, dtype=torch.float64)
    for k, x in enumerate(mats):
        padded[k, : x.shape[0], : x.shape[1]] = torch.from_numpy(x)
    got = dtw_path_mean(padded, torch.tensor([x.shape[0] for x in mats]), torch.tensor([x.shape[1] for x in mats]))
    np.testing.assert_allclose(got.numpy(), [brute_dtw(x) for x in mats], rtol=1e-12)


def _toy(seed, separable, speaker_weight=0.7, noise=0.3):
    """Items over 3 phones, 2 contexts, 3 speakers; features a phone direction (plus a speaker one)."""
    rng = np.random.default_rng(seed)
    phones, contexts, speakers = ["a", "e", "o"], [("p", "t"), ("k", "s")], ["s1", "s2", "s3"]
    direction = {p: rng.standard_normal(8) for p in phones + speakers}
    items, feats = [], []
    for spk, (prev, nxt), ph in itertools.product(speakers, contexts, phones):
        for rep in range(2):
            items.append(AbxItem(f"u{len(items)}", 0.0, 0.1, ph, prev, nxt, spk))
            base = (direction[ph] if separable else 0) + speaker_weight * direction[spk]
            feats.append(torch.from_numpy(base + noise * rng.standard_normal((rng.integers(2, 6), 8))).float())
    return items, feats


@pytest.mark.parametrize("context", ["triphone", "none"])
@pytest.mark.parametrize("mode", ["within", "across"])
def test_abx_error_matches_triplet_enumeration(mode, context):
    items, feats = _toy(1, separable=True)
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
    from fairseq_mtssl.kmeans.features import ModelLayerReader

    manifest = read_manifest(manifest_dir / "test.tsv")
    wavs = [sf.read(manifest.audio_path(i), dtype="float32")[0] for i in range(3)]
    reader = ModelLayerReader(str(tiny_hubert_checkpoint), 1)
    every = reader.all_layers(wavs)
    assert len(every) == 3 and len(every[0]) == 3  # encoder input + 2 layers
    for layer in (1, 2):
        single = ModelLayerReader(str(tiny_hubert_checkpoint), layer)(wavs)
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
