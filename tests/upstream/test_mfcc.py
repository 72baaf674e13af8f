"""MFCC + deltas against kaldi-native-fbank, an independent Kaldi implementation; MFCC as a SUPERB upstream."""

import kaldi_native_fbank as knf
import numpy as np
import pytest
import soundfile as sf
import torch

from fairseq_mtssl.data.manifest import read_manifest
from fairseq_mtssl.upstream.mfcc import FEATURE_DIM, batch_mfcc, num_frames


def _knf_mfcc(wav):
    opts = knf.MfccOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = 16000
    opts.use_energy = False
    m = knf.OnlineMfcc(opts)
    m.accept_waveform(16000, wav.tolist())
    m.input_finished()
    return np.stack([m.get_frame(i) for i in range(m.num_frames_ready)])


def _brute_deltas(x, n_win=2):
    """compute_deltas with replicate padding, written out frame by frame."""
    T = len(x)
    out = np.zeros_like(x)
    for t in range(T):
        acc = 0
        for n in range(1, n_win + 1):
            acc = acc + n * (x[min(t + n, T - 1)] - x[max(t - n, 0)])
        out[t] = acc / (2 * sum(n * n for n in range(1, n_win + 1)))
    return out


@pytest.fixture(scope="module")
def wavs(manifest_dir):
    m = read_manifest(manifest_dir / "valid.tsv")
    return [sf.read(m.audio_path(i), dtype="float32")[0] for i in range(4)]


def test_mfcc_matches_kaldi_native_fbank(wavs):
    ours = batch_mfcc(wavs, torch.float64)
    for wav, feats in zip(wavs, ours):
        ref = _knf_mfcc(wav)
        assert feats.shape == (len(ref), FEATURE_DIM) == (num_frames(len(wav)), 39)
        scale = np.abs(ref).max()
        assert np.abs(feats[:, :13] - ref).max() < 2e-5 * scale


def test_deltas_match_brute_force_and_knf(wavs):
    feats = batch_mfcc(wavs[:1], torch.float64)[0]
    base = feats[:, :13]
    d1 = _brute_deltas(base)
    np.testing.assert_allclose(feats[:, 13:26], d1, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(feats[:, 26:], _brute_deltas(d1), rtol=1e-9, atol=1e-9)
    knf_d = knf.compute_deltas(knf.DeltaOptions(), base.astype(np.float32))  # (T, 13*3) with order 2
    np.testing.assert_allclose(np.asarray(knf_d)[:, 13:26], d1, rtol=1e-4, atol=1e-3)


def test_batching_does_not_change_any_frame(wavs):
    batched = batch_mfcc(wavs)
    for wav, feats in zip(wavs, batched):
        single = batch_mfcc([wav])[0]
        np.testing.assert_array_equal(single.shape, feats.shape)
        np.testing.assert_allclose(single, feats, rtol=1e-5, atol=1e-4)


def test_too_short_audio_is_an_error():
    with pytest.raises(ValueError, match="fewer than one 400-sample frame"):
        batch_mfcc([np.zeros(300, dtype=np.float32)])


def test_mfcc_upstream_gives_each_utterances_own_frames_in_a_padded_batch_and_feeds_superb():
    """The SUPERB baseline upstream: one hidden state, each item's frames equal to its unpadded MFCC, the
    padding masked; the downstream model runs on it as on a speech model's states."""
    import torch

    from fairseq_mtssl.models.superb import SuperbDownstreamConfig, SuperbDownstreamModel
    from fairseq_mtssl.upstream.checkpoint import load_upstream

    upstream, normalize = load_upstream("mfcc")
    assert not normalize and not list(upstream.parameters())
    rng = np.random.default_rng(0)
    wavs = [rng.normal(size=n).astype(np.float32) * 0.1 for n in (16000, 9000)]
    source = torch.zeros(2, 16000)
    mask = torch.ones(2, 16000, dtype=torch.bool)
    for i, w in enumerate(wavs):
        source[i, : len(w)] = torch.from_numpy(w)
        mask[i, : len(w)] = False
    (states,), frame_mask = upstream.hidden_states(source, mask)
    alone = batch_mfcc(wavs)
    assert states.shape == (2, num_frames(16000), FEATURE_DIM)
    assert frame_mask[1].sum() == num_frames(16000) - num_frames(9000) and not frame_mask[0].any()
    for i, ref in enumerate(alone):
        np.testing.assert_allclose(states[i, : len(ref)].numpy(), ref, atol=1e-4)
    model = SuperbDownstreamModel(SuperbDownstreamConfig(upstream_path="mfcc"), upstream, 40).eval()
    out = model(source, mask)
    assert out["encoder_out"].shape == (num_frames(16000), 2, 40) and model.featurizer.weights.numel() == 1
