"""The plugin's hidden-state list (``fairseq_mtssl.upstream.hidden_states``, what the SUPERB downstream's
weighted sum, the probes and the k-means readers take) is s3prl's list, for post-LN (Base) and pre-LN
(Large / XLS-R style, ``layer_norm_first``) fairseq HuBERT and wav2vec 2.0 models.

s3prl runs in a fresh interpreter without the plugin imported, through its own upstream classes
(``hubert_local`` / ``wav2vec2_local`` with ``fairseq=True``: the checkpoint converted to s3prl's
fairseq-free copy of the model, the path a SUPERB user takes), on one utterance and on a padded batch of two.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
from builders import random_hubert_checkpoint, random_wav2vec2_checkpoint

pytestmark = pytest.mark.slow  # s3prl loaded in its own interpreter for each model

_S3PRL = """
import sys, types, argparse, numpy as np, torch
# s3prl 0.4.18's upstream/utils imports torchaudio at module level for a helper these experts never call;
# this environment has no torchaudio (none builds for torch 2.13)
sys.modules["torchaudio"] = types.ModuleType("torchaudio")
from fairseq.data.dictionary import Dictionary
torch.serialization.add_safe_globals([Dictionary, argparse.Namespace])
if sys.argv[1] == "hubert":
    from s3prl.upstream.hubert.hubconf import hubert_local as local
else:
    from s3prl.upstream.wav2vec2.hubconf import wav2vec2_local as local
upstream = local(sys.argv[2], fairseq=True).eval()
assert "fairseq_mtssl" not in sys.modules
wavs = np.load(sys.argv[3])
n = [int(x) for x in sys.argv[4].split(",")]
with torch.no_grad():
    single = upstream([torch.from_numpy(wavs[0, : n[0]])])["hidden_states"]
    batch = upstream([torch.from_numpy(w[:k]) for w, k in zip(wavs, n)])["hidden_states"]
np.save(sys.argv[5], torch.stack([h[0] for h in single]).numpy())
np.save(sys.argv[6], torch.stack(list(batch)).numpy())
"""


@pytest.mark.parametrize("family", ["hubert", "wav2vec2"])
@pytest.mark.parametrize(
    "extractor_mode,layer_norm_first",
    [("default", False), ("layer_norm", True)],
    ids=["group-norm-post-ln(base)", "layer-norm-pre-ln(large)"],
)
def test_plugin_hidden_states_are_s3prls(family, extractor_mode, layer_norm_first, tmp_path):
    from fairseq_mtssl.upstream import batch_waveforms, hidden_states, load_upstream
    from fairseq_mtssl.upstream.layers import run_encoder

    ckpt = tmp_path / f"{family}.pt"
    build = random_hubert_checkpoint if family == "hubert" else random_wav2vec2_checkpoint
    build(ckpt, extractor_mode, layer_norm_first, normalize=layer_norm_first)
    rng = np.random.default_rng(0)
    lengths = [16000, 11520]
    wavs = np.zeros((2, max(lengths)), dtype=np.float32)
    for i, n in enumerate(lengths):
        wavs[i, :n] = rng.standard_normal(n).astype(np.float32) * 0.1
    np.save(tmp_path / "x.npy", wavs)
    proc = subprocess.run(
        [sys.executable, "-c", _S3PRL, family, ckpt, tmp_path / "x.npy", ",".join(map(str, lengths)),
         tmp_path / "single.npy", tmp_path / "batch.npy"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs_single, theirs_batch = np.load(tmp_path / "single.npy"), np.load(tmp_path / "batch.npy")

    encoder, normalize = load_upstream(str(ckpt))
    assert normalize == layer_norm_first
    with torch.no_grad():
        source, _, _ = batch_waveforms([wavs[0]], normalize)
        ours, _ = hidden_states(encoder, source, None)
        raw_last, _ = run_encoder(encoder, source, None, len(encoder.encoder.layers))
        # the padded batch as s3prl builds it: each waveform normalised alone, zero-padded, sample mask
        each = [torch.from_numpy(w[:n]) for w, n in zip(wavs, lengths)]
        if normalize:
            each = [torch.nn.functional.layer_norm(w, w.shape) for w in each]
        padded = torch.nn.utils.rnn.pad_sequence(each, batch_first=True)
        mask = torch.arange(padded.size(1))[None] >= torch.tensor(lengths)[:, None]
        ours_batch, _ = hidden_states(encoder, padded, mask)
    ours_single = torch.stack([h[0] for h in ours]).numpy()
    assert ours_single.shape == theirs_single.shape == (4, 49, 96)  # L + 1 states, 1 s at 50 Hz
    np.testing.assert_allclose(ours_single, theirs_single, atol=2e-5, rtol=0)
    np.testing.assert_allclose(torch.stack(ours_batch).numpy(), theirs_batch, atol=2e-5, rtol=0)
    # the pre-LN case really is exercised: the last state is not the last layer's raw output there
    assert layer_norm_first == (float((ours[-1] - raw_last).abs().max()) > 1e-2)
