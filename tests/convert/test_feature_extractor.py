"""The transformers export prepares raw audio as the checkpoint was trained: its ``preprocessor_config.json``.

A model trained on layer-normalised waveforms (the task's ``normalize``) and fed raw audio gives other
hidden states. s3prl normalises by the task's flag itself; a transformers user relies on the feature
extractor saved beside the model. Each tiny model here (random weights, norms perturbed) is exported
with ``mtssl-export``'s :func:`~fairseq_mtssl.convert.export.export_all`, then the same RAW utterances go
through each library's own input path:

- transformers: ``AutoFeatureExtractor`` + ``AutoModel`` from the exported directory;
- s3prl: its ``*_local`` upstream on ``s3prl.pt``, given the waveforms as they are;
- the plugin: :func:`~fairseq_mtssl.upstream.load_upstream` of the trained checkpoint (the model and
  its ``normalize``), :func:`~fairseq_mtssl.upstream.batch_waveforms` and
  :func:`~fairseq_mtssl.upstream.hidden_states`, one utterance at a time.

The models are post-LN, where the three libraries' hidden states are the same ``L + 1`` tensors (the
first layer's input, then every layer's output). A layer-normalised front end
(``return_attention_mask``) also runs the utterances as one padded batch in transformers and s3prl,
each utterance's valid frames compared with its unpadded states.

Tolerances. s3prl normalises as the plugin does (``F.layer_norm``) and runs the same network: 1e-5
(float rounding). transformers' feature extractor normalises with ``(x - mean) / sqrt(var + 1e-7)``
(its epsilon is fixed), fairseq with eps 1e-5, so its waveform is the plugin's times
``sqrt((var + 1e-5) / (var + 1e-7))``, 1 + 4e-4 on these utterances (checked to 1e-5). A normalised
front end cancels that scale except on near-silent frames, where its own epsilon dominates: the hidden
states then differ by up to 1e-4 of their largest magnitude (TOL; measured 3e-5 for the layer-norm
front end, 7e-7 for the group-norm one). That this is the feature extractor's epsilon alone is checked:
transformers' model on the plugin's normalised waveform is within 1e-5. Raw audio (the export without
``do_normalize``) is off by more than TOL on both normalised models (measured 2e-3 and 0.43 of the
largest state), so the test fails without the feature extractor's ``do_normalize``.
"""

import json
import sys
import types

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from builders import random_hubert_checkpoint, random_mt4ssl_checkpoint, random_vgs_checkpoint

TOL = 1e-4  # transformers' path, relative to the largest hidden state (see above)
S3PRL_TOL = 1e-5  # the same normalisation and the same network: float rounding only


def _utterances(manifest_dir):
    """Two raw utterances of different lengths (1.5 s and 1.1 s), float32 numpy, as read from disk."""
    root, *lines = (manifest_dir / "valid.tsv").read_text().splitlines()
    wavs = [sf.read(f"{root}/{line.split(chr(9))[0]}", dtype="float32")[0] for line in lines[:2]]
    return [wavs[0][:24000], wavs[1][:17600]]


def _vgs_group_norm(tmp_path):
    """VGS+SSL as its Base config: group-normalised front end, ``normalize: true``."""
    model, cfg, ckpt = random_vgs_checkpoint(tmp_path, extractor_mode="default")
    assert cfg["task"]["normalize"] and cfg["model"]["extractor_mode"] == "default"
    return ckpt


def _mt4ssl_layer_norm(tmp_path):
    """MT4SSL (data2vec's layer-normalised front end), ``normalize: true``; its head sizes recorded in the
    config as training records them, so it loads with no label directory."""
    _, ckpt = random_mt4ssl_checkpoint(
        tmp_path, "++model.offline_num_classes=[12]", "++model.offline_label_rates=[100.0]"
    )
    return ckpt


def _hubert_unnormalised(tmp_path):
    """A fairseq HuBERT Base-like model whose task does not normalise."""
    ckpt = tmp_path / "hubert.pt"
    random_hubert_checkpoint(ckpt, "default", False)
    return ckpt


def _s3prl_upstream(name: str, path):
    """s3prl's ``*_local`` upstream. s3prl 0.4.18's upstream/utils imports torchaudio at module level for a
    pseudo-data helper the ``*_local`` upstreams never call; this environment has no torchaudio."""
    import importlib

    if "torchaudio" not in sys.modules:
        try:
            import torchaudio  # noqa: F401
        except ImportError:
            sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    hub = importlib.import_module(f"s3prl.upstream.{name.split('_')[0]}.hubconf")
    return getattr(hub, name)(str(path)).eval()


def _plugin_states(ckpt, wavs):
    """Per utterance ``(L + 1, T, C)``: the plugin's upstream path on the trained checkpoint."""
    from fairseq_mtssl.upstream import batch_waveforms, hidden_states, load_upstream

    encoder, normalize = load_upstream(ckpt)
    out = []
    for w in wavs:
        source, _, _ = batch_waveforms([w], normalize)
        with torch.no_grad():
            states, _ = hidden_states(encoder, source, None)
        out.append(torch.stack([s[0] for s in states]).numpy())
    return out, normalize, encoder


def _transformers_states(hf_dir, wavs, batched: bool):
    from transformers import AutoFeatureExtractor, AutoModel

    fe = AutoFeatureExtractor.from_pretrained(hf_dir)
    hf = AutoModel.from_pretrained(hf_dir).eval()
    groups = [wavs] if batched else [[w] for w in wavs]
    out = []
    for group in groups:
        inputs = fe(group, sampling_rate=16000, padding=True, return_tensors="pt")
        assert ("attention_mask" in inputs) == fe.return_attention_mask
        with torch.no_grad():
            o = hf(**inputs, output_hidden_states=True)
        out += [torch.stack([h[i] for h in o.hidden_states]).numpy() for i in range(len(group))]
    return out, fe, hf


def _hf_states(hf_model, x: torch.Tensor) -> np.ndarray:
    """``(L + 1, T, C)`` of transformers' model on one waveform as given, without the feature extractor."""
    o = hf_model(x[None], output_hidden_states=True)
    return torch.stack([h[0] for h in o.hidden_states]).numpy()


def _s3prl_states(upstream, wavs, batched: bool):
    groups = [wavs] if batched else [[w] for w in wavs]
    out = []
    for group in groups:
        with torch.no_grad():
            o = upstream([torch.from_numpy(w) for w in group])
        out += [torch.stack([h[i] for h in o["hidden_states"]]).numpy() for i in range(len(group))]
    return out


def _max_diff(got, ref) -> float:
    """Largest difference over each utterance's valid frames (``ref``'s, unpadded)."""
    diffs = []
    for g, r in zip(got, ref):
        assert g.shape[0] == r.shape[0] and g.shape[2] == r.shape[2] and g.shape[1] >= r.shape[1], (g.shape, r.shape)
        diffs.append(float(np.abs(g[:, : r.shape[1]] - r).max()))
    return max(diffs)


@pytest.mark.parametrize(
    "build,arch,normalize,attention_mask",
    [
        (_vgs_group_norm, "wav2vec2_vgs", True, False),
        (_mt4ssl_layer_norm, "mt4ssl", True, True),
        (_hubert_unnormalised, "hubert", False, False),
    ],
    ids=["vgs+-group-norm-normalized", "mt4ssl-layer-norm-normalized", "hubert-base-not-normalized"],
)
def test_raw_audio_gives_the_same_hidden_states_in_transformers_s3prl_and_the_plugin(
    build, arch, normalize, attention_mask, manifest_dir, tmp_path
):
    from fairseq_mtssl.convert.export import export_all

    ckpt = build(tmp_path)
    info = export_all(ckpt, tmp_path / "out", formats=["transformers", "s3prl"])
    assert info["architecture"] == arch
    hf_dir = tmp_path / "out" / "transformers"
    wavs = _utterances(manifest_dir)

    ours, trained_normalize, encoder = _plugin_states(ckpt, wavs)
    assert trained_normalize == normalize
    hf, fe, hf_model = _transformers_states(hf_dir, wavs, batched=attention_mask)
    upstream = _s3prl_upstream(info["s3prl"]["upstream"], tmp_path / "out" / "s3prl.pt")
    s3prl = _s3prl_states(upstream, wavs, batched=attention_mask)
    scale = max(float(np.abs(r).max()) for r in ours)
    diffs = {"transformers": _max_diff(hf, ours), "s3prl": _max_diff(s3prl, ours)}

    # what transformers' model gives on the waveform the plugin normalises (the feature extractor left out),
    # and on the raw waveform (the export before it had a feature extractor)
    plugin_input = [F.layer_norm(torch.from_numpy(w), w.shape) if normalize else torch.from_numpy(w) for w in wavs]
    with torch.no_grad():
        model_only = [_hf_states(hf_model, x) for x in plugin_input]
        raw = [_hf_states(hf_model, torch.from_numpy(w)) for w in wavs]
    diffs["transformers_model_only"] = _max_diff(model_only, ours)
    diffs["transformers_raw_audio"] = _max_diff(raw, ours)
    print(f"{arch}: max |state| {scale:.2f}; max abs differences from the plugin's hidden states: {diffs}")

    assert diffs["s3prl"] < S3PRL_TOL and diffs["transformers_model_only"] < S3PRL_TOL, diffs
    assert diffs["transformers"] < TOL * scale, diffs
    if normalize:  # a transformers user fed raw audio (no do_normalize) is far off: the test sees the difference
        assert diffs["transformers_raw_audio"] > TOL * scale, diffs
    for w, x in zip(wavs, plugin_input):  # the feature extractor's input_values: the plugin's, up to its epsilon
        got = fe(w, sampling_rate=16000, return_tensors="pt")["input_values"][0]
        eps_scale = float(np.sqrt((w.var() + 1e-5) / (w.var() + 1e-7))) if normalize else 1.0
        assert torch.allclose(got, x * eps_scale, rtol=1e-5, atol=1e-6)

    assert info["transformers"]["feature_extractor"] == {
        "do_normalize": normalize,
        "return_attention_mask": attention_mask,
    }
    assert json.loads((hf_dir / "preprocessor_config.json").read_text()) == {
        "do_normalize": normalize,
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": attention_mask,
        "sampling_rate": 16000,
    }


def test_the_feature_extractor_is_written_with_the_model_or_nothing_is(tmp_path, monkeypatch):
    """``preprocessor_config.json`` is part of the export's one atomic directory: a failure writing it
    leaves neither a new directory nor a changed old one."""
    from transformers import Wav2Vec2FeatureExtractor

    from fairseq_mtssl.convert.to_transformers import export_transformers

    ckpt = _hubert_unnormalised(tmp_path)
    out = tmp_path / "hf"
    info = export_transformers(ckpt, out, verify=False)
    assert info["feature_extractor"] == {"do_normalize": False, "return_attention_mask": False}
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"config.json", "preprocessor_config.json"} <= set(before)

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Wav2Vec2FeatureExtractor, "save_pretrained", fail)
    for target in (out, tmp_path / "fresh"):
        with pytest.raises(OSError, match="disk full"):
            export_transformers(ckpt, target, verify=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hubert.pt"]  # no temporary directory left
