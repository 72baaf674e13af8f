"""Features once: the reader registry, one forward per utterance for every metric, the on-disk cache."""

import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from builders import random_hubert_checkpoint, random_vgs_checkpoint

from fairseq_mtssl.data.manifest import read_manifest
from fairseq_mtssl.upstream.features import FeatureCacheError, extract_split
from fairseq_mtssl.upstream.readers import READERS, FeatureSpecError, MfccReader, layer_reader, open_reader


@pytest.fixture(scope="module")
def hubert_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("hubert") / "hubert.pt"
    random_hubert_checkpoint(path, "default", layer_norm_first=False)  # a group-normed front end: padding matters
    return path


def _wavs(manifest_dir, split="test", n=None):
    m = read_manifest(manifest_dir / f"{split}.tsv")
    return [sf.read(m.audio_path(i), dtype="float32")[0] for i in range(n or len(m))]


def test_every_registered_model_has_a_reader_and_others_are_named(hubert_ckpt, tmp_path):
    assert {"hubert", "wav2vec2", "data2vec_audio", "mt4ssl", "wav2vec2_vgs", "score", "laser", "spin"} <= set(READERS)
    reader = open_reader(str(hubert_ckpt))
    assert (reader.num_layers, reader.frame_rate, reader.hop, reader.window, reader.dim) == (4, 50.0, 320, 400, 96)
    mfcc = open_reader("mfcc")
    assert isinstance(mfcc, MfccReader) and (mfcc.num_layers, mfcc.frame_rate, mfcc.hop, mfcc.window) == (
        1,
        100,
        160,
        400,
    )
    with pytest.raises(FeatureSpecError, match="layers 1..3"):
        reader.at_layer(4)
    state = torch.load(hubert_ckpt, weights_only=False)
    state["cfg"]["model"]["_name"] = "transformer_lm"
    torch.save(state, tmp_path / "lm.pt")
    with pytest.raises(Exception, match="lm.pt"):
        open_reader(str(tmp_path / "lm.pt"))


def test_one_pass_holds_every_layer_as_the_one_layer_reads_give_it(hubert_ckpt, manifest_dir):
    reader = open_reader(str(hubert_ckpt))
    feats = extract_split(reader, manifest_dir / "test.tsv")
    n = len(read_manifest(manifest_dir / "test.tsv"))
    assert reader.forwards == n and feats.num_layers == 4 and len(feats.utterances) == n
    wavs = _wavs(manifest_dir)
    for layer in (1, 3):
        single = layer_reader(str(hubert_ckpt), layer)(wavs)
        got = feats.layer(layer)
        for utt, ref in zip(feats.utterances, single):
            np.testing.assert_allclose(got[utt], ref, atol=1e-5)
    # the utterance's own unpadded forward (the reader pads to a length bucket)
    with torch.inference_mode():
        x = torch.from_numpy(wavs[0])[None]
        ref, _ = reader.encoder.extract_features(x, padding_mask=None, mask=False, output_layer=2)
    np.testing.assert_allclose(feats.by_utterance()[feats.utterances[0]][2], ref[0].numpy(), atol=2e-5, rtol=1e-4)


def test_the_disk_cache_is_written_all_or_nothing_reused_and_checked(hubert_ckpt, manifest_dir, tmp_path, monkeypatch):
    reader = open_reader(str(hubert_ckpt))
    cache = tmp_path / "cache" / "test"
    mem = extract_split(reader, manifest_dir / "test.tsv")
    # an interrupted pass leaves nothing behind
    calls = {"n": 0}
    original = reader.hidden_states

    def failing(wav):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(wav)

    monkeypatch.setattr(reader, "hidden_states", failing)
    with pytest.raises(KeyboardInterrupt):
        extract_split(reader, manifest_dir / "test.tsv", cache=cache)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(reader, "hidden_states", original)

    old = os.umask(0o027)
    try:
        disk = extract_split(reader, manifest_dir / "test.tsv", cache=cache)
    finally:
        os.umask(old)
    assert isinstance(disk.layers[0], np.memmap) and sorted(p.name for p in cache.iterdir()) == [
        "layer_0.npy", "layer_1.npy", "layer_2.npy", "layer_3.npy", "meta.json", "offsets.npy", "utterances.txt"
    ]  # fmt: skip
    assert all(p.stat().st_mode & 0o777 == 0o640 for p in cache.iterdir())  # readable as the umask allows
    for k in range(4):
        np.testing.assert_array_equal(disk.layers[k], mem.layers[k])
    before = reader.forwards
    again = extract_split(reader, manifest_dir / "test.tsv", cache=cache)
    assert reader.forwards == before and again.utterances == mem.utterances  # reused: no forward
    meta = json.loads((cache / "meta.json").read_text())
    meta["source"] = "/elsewhere.pt"
    (cache / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FeatureCacheError, match="meta.json"):
        extract_split(reader, manifest_dir / "test.tsv", cache=cache)
    with pytest.raises(FeatureCacheError, match="give a cache folder"):
        extract_split(reader, manifest_dir / "test.tsv", memory_limit=1000)


def test_mfcc_is_one_layer_that_serves_every_request(manifest_dir):
    feats = extract_split(open_reader("mfcc"), manifest_dir / "valid.tsv")
    wav = _wavs(manifest_dir, "valid", 1)[0]
    utt = feats.utterances[0]
    np.testing.assert_array_equal(feats.layer(0)[utt], MfccReader()([wav])[0])
    np.testing.assert_array_equal(feats.layer(6)[utt], feats.layer(0)[utt])


def test_vgs_reader_embeds_captions_from_the_same_forward_as_the_model_does(manifest_dir, tmp_path):
    model, _, ckpt = random_vgs_checkpoint(tmp_path)
    reader = open_reader(str(ckpt))
    feats = extract_split(reader, manifest_dir / "test.tsv", embeddings=True)
    assert reader.forwards == len(feats.utterances)  # one forward gives the states and the embedding
    for i, wav in enumerate(_wavs(manifest_dir, n=3)):
        x = torch.from_numpy(wav)
        x = torch.nn.functional.layer_norm(x, x.shape)[None] if reader.normalize else x[None]
        with torch.no_grad():
            ref = model.embed_speech(x)[0].numpy()
        np.testing.assert_allclose(feats.embeddings[i], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # the probe, QbE and ABX twice: a few minutes
def test_evaluate_upstream_loads_once_and_forwards_each_split_once(hubert_ckpt, manifest_dir, corpus_dir, tmp_path):
    """The in-process evaluation equals the separate tools' results and counts one load, one pass per split."""
    import shutil

    from fairseq_mtssl.evaluation import abx, phone_probe, qbe
    from fairseq_mtssl.jobs import evaluate_upstream
    from fairseq_mtssl.upstream import readers

    data = tmp_path / "data"
    (data / "corpus").mkdir(parents=True)
    shutil.copytree(manifest_dir, data / "manifests")
    (data / "corpus" / "alignments").symlink_to(corpus_dir / "alignments")
    loads = []
    original = readers.open_reader

    def counting(source, device="cpu"):
        loads.append(source)
        return original(source, device)

    evaluate_upstream.open_reader = counting
    try:
        ev = evaluate_upstream.UpstreamEvaluation(
            str(hubert_ckpt), data, tmp_path / "eval", 2, 0, speaker=True, abx_context="none"
        )
        res = ev.evaluate()
    finally:
        evaluate_upstream.open_reader = original
    sizes = {s: len(read_manifest(manifest_dir / f"{s}.tsv")) for s in ("train", "valid", "test")}
    assert len(loads) == 1 and res["upstream_loads"] == 1 and res["forwards"] == sizes
    al = corpus_dir / "alignments"
    feats, rate = abx.layer_features(str(hubert_ckpt), manifest_dir / "test.tsv")
    ref_abx = abx.abx_per_layer(abx.read_items(tmp_path / "eval" / "test.item"), feats, rate, context="none")
    assert res["abx"] == ref_abx
    ref_probe = phone_probe.run_probe(str(hubert_ckpt), 2, manifest_dir, al)
    assert res["phone_probe"]["test_acc"] == ref_probe["test_acc"]
    assert res["qbe"]["mtwv"] == qbe.run_qbe(str(hubert_ckpt), 2, manifest_dir, al)["mtwv"]
    assert 0 <= res["speaker_probe"]["test_acc"] <= 1
