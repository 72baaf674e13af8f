"""k-means sampling and assignment from a dump read it in chunks from the file, never all of it through the mapping."""

import numpy as np
import pytest
from builders import random_hubert_checkpoint
from npy_append_array import NpyAppendArray

from fairseq_mtssl.kmeans import dump_features
from fairseq_mtssl.kmeans.apply_kmeans import apply_to_dumped
from fairseq_mtssl.kmeans.centroids import save_centroids
from fairseq_mtssl.kmeans.dump_features import load_features, read_rows, row_chunks, shard_paths
from fairseq_mtssl.kmeans.learn_kmeans import sample_frames


def _rss_file_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


def _dump(folder, lengths, dim, seed=0):
    """A dump as mtssl-dump-features writes it (appended per batch), with its .len; returns the frames."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((sum(lengths), dim)).astype(np.float32)
    npy, lens = shard_paths(folder, "train", 0, 1)
    folder.mkdir(parents=True, exist_ok=True)
    with NpyAppendArray(str(npy)) as out:
        for s in range(0, len(feats), 50_000):
            out.append(feats[s : s + 50_000])
    lens.write_text("".join(f"{n}\n" for n in lengths))
    return feats


def _reference_sample(arrays, percent, seed):
    """The sampling written from its definition: per shard a sorted uniform choice, rows gathered, stacked."""
    rng = np.random.default_rng(seed)
    parts = []
    for arr in arrays:
        full = np.array(arr)
        if 0 < percent < 1:
            parts.append(full[np.sort(rng.choice(len(full), size=max(1, int(len(full) * percent)), replace=False))])
        else:
            parts.append(full)
    return np.concatenate(parts)


@pytest.mark.parametrize("percent", [0.1, 0.5, -1])
def test_sample_equals_the_definition_across_chunks_and_shards(tmp_path, monkeypatch, percent):
    monkeypatch.setattr(dump_features, "READ_CHUNK_BYTES", 7 * 13 * 4)  # 7 rows of 13 dims a read
    shards = []
    for i, n in enumerate((101, 57)):
        a = np.random.default_rng(i).standard_normal((n, 13)).astype(np.float32)
        np.save(tmp_path / f"s{i}.npy", a)
        shards.append(np.load(tmp_path / f"s{i}.npy", mmap_mode="r"))
    got = sample_frames(shards, percent, seed=3)
    np.testing.assert_array_equal(got, _reference_sample(shards, percent, seed=3))
    assert got.dtype == np.float32


def test_read_rows_of_a_view_or_an_array_is_a_plain_slice(tmp_path):
    a = np.arange(60, dtype=np.float32).reshape(20, 3)
    np.save(tmp_path / "a.npy", a)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    np.testing.assert_array_equal(read_rows(mapped, 4, 9), a[4:9])
    np.testing.assert_array_equal(read_rows(mapped[5:], 0, 3), a[5:8])  # a view: its offset is not the file's
    np.testing.assert_array_equal(read_rows(a, 18, 25), a[18:])
    assert read_rows(mapped, 7, 7).shape == (0, 3)


def test_utterance_chunks_cover_every_utterance_once(monkeypatch):
    monkeypatch.setattr(dump_features, "READ_CHUNK_BYTES", 10 * 4)  # 10 one-dim rows a read
    lengths = [3, 4, 25, 1, 1, 9, 2]
    pieces = row_chunks(np.zeros((sum(lengths), 1), np.float32), lengths)
    assert [i for a, b in pieces for i in range(a, b)] == list(range(len(lengths)))
    bounds = np.cumsum([0, *lengths])
    for a, b in pieces:  # within the budget, unless one utterance alone is longer
        assert b - a == 1 or bounds[b] - bounds[a] <= 10


def test_sampling_and_assigning_a_dump_do_not_map_all_of_it(tmp_path):
    lengths = [400] * 1100  # 440,000 frames x 39 dims: a 65 MB dump
    feats = _dump(tmp_path / "feats", lengths, 39)
    dump_mb = feats.nbytes / 2**20
    ((arr, lens),) = load_features(tmp_path / "feats", "train", 1)

    before = _rss_file_mb()
    sample = sample_frames([arr], 0.1, seed=0)
    grown = _rss_file_mb() - before
    assert len(sample) == 44_000
    assert grown < 0.25 * dump_mb, f"sampling 10% mapped {grown:.0f} MB of a {dump_mb:.0f} MB dump"

    rng = np.random.default_rng(1)
    centroids = rng.standard_normal((8, 39))
    save_centroids(tmp_path / "km.npy", centroids, {"feature": "mfcc", "dim": 39})
    (tmp_path / "feats" / "train_0_1.spec.json").write_text('{"feature": "mfcc", "dim": 39}')
    before = _rss_file_mb()
    out = apply_to_dumped(tmp_path / "km.npy", tmp_path / "lab", "train", tmp_path / "feats")
    grown = _rss_file_mb() - before
    assert grown < 0.25 * dump_mb, f"assigning mapped {grown:.0f} MB of a {dump_mb:.0f} MB dump"
    del arr

    lines = out.read_text().splitlines()
    assert [len(x.split()) for x in lines] == lengths
    labels = np.array(" ".join(lines).split(), dtype=int)
    for s in range(0, len(feats), 20_000):  # brute force, nearest centroid by the definition
        x = feats[s : s + 20_000, None, :].astype(np.float64)
        np.testing.assert_array_equal(labels[s : s + 20_000], ((x - centroids[None]) ** 2).sum(-1).argmin(1))


def test_length_buckets_pad_at_most_an_eighth_and_give_eight_shapes_an_octave():
    from fairseq_mtssl.upstream import bucket_length

    lengths = np.arange(16, 1 << 20, 37)
    padded = np.array([bucket_length(int(n)) for n in lengths])
    assert (padded >= lengths).all() and (padded <= lengths * 1.125).all()
    assert (np.diff(padded) >= 0).all()  # longer never pads shorter
    for lo in (1 << 10, 1 << 14, 1 << 18):  # each octave (lo, 2 lo]: exactly 8 shapes, whatever the corpus
        assert len({bucket_length(n) for n in range(lo + 1, 2 * lo + 1)}) == 8
    assert bucket_length(16000) == 16384 and bucket_length(bucket_length(16001)) == bucket_length(16001)


@pytest.mark.parametrize("extractor_mode", ["default", "layer_norm"])
def test_padded_reader_gives_the_unpadded_forward_also_for_a_group_normed_front_end(tmp_path, extractor_mode):
    """The reader pads each utterance to its length bucket (bounded shapes, flat memory); a group-normed front
    end then normalises over the utterance's own frames, so every frame equals fairseq's unpadded forward."""
    import torch

    from fairseq_mtssl import upstream
    from fairseq_mtssl.upstream.readers import open_reader

    ckpt = tmp_path / "hubert.pt"
    random_hubert_checkpoint(ckpt, extractor_mode, layer_norm_first=False)
    model_reader = open_reader(str(ckpt))
    reader = model_reader.at_layer(2)
    assert reader.batchable == (extractor_mode == "layer_norm")
    rng = np.random.default_rng(0)
    wavs = [rng.standard_normal(n).astype(np.float32) for n in (8300, 16500, 33000)]
    assert all(upstream.bucket_length(len(w)) > len(w) + 400 for w in wavs)  # padded by more than a frame
    every = [model_reader.hidden_states(w) for w in wavs]
    for wav, feats, layers in zip(wavs, reader(wavs), every):
        with torch.inference_mode():
            alone, _ = model_reader.encoder.extract_features(
                torch.from_numpy(wav)[None], padding_mask=None, mask=False, output_layer=2
            )
        assert feats.shape == (reader.num_frames(len(wav)), reader.dim) == tuple(alone.shape[1:])
        np.testing.assert_allclose(feats, alone[0].numpy(), atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(layers[2], feats, atol=1e-6)
    # the swap is undone: the model's own group norm is back
    assert not any(isinstance(m, upstream.frontend.ValidFramesGroupNorm) for m in model_reader.encoder.modules())
