"""Exported HuBERT checkpoints load in other toolkits and give the plugin's hidden states (the other
architectures, and mtssl-export, are in test_export.py).

Each toolkit runs in a fresh interpreter without the plugin imported, so what it loads is what a
user of that toolkit would load.
"""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from builders import random_hubert_checkpoint
from conftest import run_cli

pytestmark = pytest.mark.slow  # whole exports, each target loaded in its own interpreter


def fairseq_hidden_states(model, wav: torch.Tensor):
    """``(layer_inputs (L, T, C), last_layer_output (T, C), encoder_output (T, C))`` of a fairseq HuBERT.

    The encoder output differs from the last layer's output only in a pre-LN (``layer_norm_first``)
    model, where the encoder ends with a layer norm. transformers' ``hidden_states`` are the layer
    inputs and the last layer's output (its ``last_hidden_state`` the encoder output); s3prl's are
    the layer inputs and the encoder output.
    """
    inputs, outputs = [], []
    hooks = [
        layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].transpose(0, 1)[0].clone()))
        for layer in model.encoder.layers
    ]
    hooks.append(
        model.encoder.layers[-1].register_forward_hook(
            lambda m, args, out: outputs.append(out[0].transpose(0, 1)[0].clone())
        )
    )
    try:
        with torch.no_grad():
            final, _ = model.extract_features(wav[None], padding_mask=None, mask=False)
    finally:
        for h in hooks:
            h.remove()
    t = final.shape[1]  # fairseq pads the layers' input to a multiple of required_seq_len_multiple
    return torch.stack([x[:t] for x in inputs]).numpy(), outputs[0][:t].numpy(), final[0].numpy()


def _speech(manifest_dir) -> torch.Tensor:
    root, first = (manifest_dir / "valid.tsv").read_text().splitlines()[:2]
    wav, _ = sf.read(f"{root}/{first.split(chr(9))[0]}", dtype="float32")
    return torch.from_numpy(wav)


_TRANSFORMERS = """
import sys, numpy as np, torch
from transformers import HubertModel
m = HubertModel.from_pretrained(sys.argv[1]).eval()
assert "fairseq_mtssl" not in sys.modules
with torch.no_grad():
    out = m(torch.from_numpy(np.load(sys.argv[2]))[None], output_hidden_states=True)
np.save(sys.argv[3], torch.stack([h[0] for h in out.hidden_states] + [out.last_hidden_state[0]]).numpy())
"""

_S3PRL = """
import sys, types, argparse, numpy as np, torch
# s3prl 0.4.18's upstream/utils imports torchaudio at module level for a pseudo-data helper that
# hubert_local never calls; this environment has no torchaudio (none builds for torch 2.13).
sys.modules["torchaudio"] = types.ModuleType("torchaudio")
from fairseq.data.dictionary import Dictionary
torch.serialization.add_safe_globals([Dictionary, argparse.Namespace])  # what any torch>=2.6 fairseq user needs
from s3prl.upstream.hubert.hubconf import hubert_local
upstream = hubert_local(sys.argv[1], fairseq=True).eval()
assert "fairseq_mtssl" not in sys.modules
with torch.no_grad():
    out = upstream([torch.from_numpy(np.load(sys.argv[2]))])
np.save(sys.argv[3], torch.stack([h[0] for h in out["hidden_states"]]).numpy())
"""


def _run(script: str, *args) -> None:
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize(
    "extractor_mode,layer_norm_first",
    [("default", False), ("layer_norm", True)],
    ids=["group-norm-post-ln(base)", "layer-norm-pre-ln(large)"],
)
def test_transformers_export_matches_fairseq_hidden_states(extractor_mode, layer_norm_first, manifest_dir, tmp_path):
    from fairseq_mtssl.convert.hubert_checkpoint import load_hubert

    ckpt = tmp_path / "hubert.pt"
    random_hubert_checkpoint(ckpt, extractor_mode, layer_norm_first)
    run_cli("mtssl-export-transformers", ckpt, tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    wav = _speech(manifest_dir)
    np.save(tmp_path / "x.npy", wav.numpy())
    _run(_TRANSFORMERS, tmp_path / "hf", tmp_path / "x.npy", tmp_path / "y.npy")
    inputs, last_layer, final = fairseq_hidden_states(load_hubert(ckpt)[0], wav)
    got = np.load(tmp_path / "y.npy")  # hidden_states (L + 1), then last_hidden_state
    assert got.shape == (5, final.shape[0], 96)
    assert np.abs(got[:3] - inputs).max() < 1e-5
    assert np.abs(got[3] - last_layer).max() < 1e-5
    assert np.abs(got[4] - final).max() < 1e-5
    assert layer_norm_first == (np.abs(final - last_layer).max() > 1e-2)  # the pre-LN case is really exercised


def test_score_export_loads_in_transformers_and_s3prl(tiny_hubert_checkpoint, manifest_dir, tmp_path):
    """The trained tiny HuBERT written back out as vanilla fairseq (what SCORE's export writes), then read by
    s3prl's ``hubert_local`` and, through mtssl-export-transformers, by transformers."""
    from fairseq_mtssl.convert.hubert_checkpoint import load_hubert, save_vanilla_hubert

    model, state = load_hubert(tiny_hubert_checkpoint)
    vanilla = tmp_path / "vanilla.pt"
    save_vanilla_hubert(model, state, vanilla)
    wav = _speech(manifest_dir)
    np.save(tmp_path / "x.npy", wav.numpy())
    ours = load_hubert(vanilla)[0]
    assert state["cfg"]["task"]["normalize"]  # s3prl layer-normalises the waveform itself, as the task did
    inputs, last_layer, final = fairseq_hidden_states(ours, torch.nn.functional.layer_norm(wav, wav.shape))

    _run(_S3PRL, vanilla, tmp_path / "x.npy", tmp_path / "s3prl.npy")
    s3prl_states = np.load(tmp_path / "s3prl.npy")
    assert s3prl_states.shape == (len(inputs) + 1, *final.shape)
    assert np.abs(s3prl_states[:-1] - inputs).max() < 1e-5 and np.abs(s3prl_states[-1] - final).max() < 1e-5

    run_cli("mtssl-export-transformers", vanilla, tmp_path / "hf")
    np.save(tmp_path / "xn.npy", torch.nn.functional.layer_norm(wav, wav.shape).numpy())
    _run(_TRANSFORMERS, tmp_path / "hf", tmp_path / "xn.npy", tmp_path / "hf.npy")
    hf = np.load(tmp_path / "hf.npy")
    assert np.abs(hf[:-2] - inputs).max() < 1e-5 and np.abs(hf[-2] - last_layer).max() < 1e-5
    assert np.abs(hf[-1] - final).max() < 1e-5


def test_transformers_export_refuses_what_it_cannot_represent(tmp_path):
    from fairseq_mtssl.convert.export import UnknownArchitecture, transformers_main
    from fairseq_mtssl.convert.wav2vec2_trunk import TrunkNotRepresentable

    bad = tmp_path / "lm.pt"
    torch.save({"cfg": {"model": {"_name": "transformer_lm"}}, "model": {}, "args": None}, bad)
    with pytest.raises(UnknownArchitecture, match="lm.pt"):
        transformers_main.__wrapped__([str(bad), str(tmp_path / "hf")])  # the exception, not its one-line exit
    empty = tmp_path / "w2v.pt"  # a wav2vec2 config without its weights
    torch.save({"cfg": {"model": {"_name": "wav2vec2"}, "task": {}}, "model": {}, "args": None}, empty)
    with pytest.raises(TrunkNotRepresentable, match="w2v.pt.*missing"):
        transformers_main.__wrapped__([str(empty), str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()
