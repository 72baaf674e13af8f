"""mtssl-export: every method's model leaves as plain fairseq, transformers and s3prl, with its hidden states.

Each tiny model is built from its method's tiny config with random weights (norms perturbed, so a
misplaced one shows), saved as fairseq saves a checkpoint, exported, and then read in a fresh
interpreter without the plugin imported: by fairseq's ``load_model_ensemble_and_task``, by
transformers' ``AutoModel`` and by s3prl's ``*_local`` upstream. Every hidden state (the first layer's
input, each layer's output, the encoder output) must match the plugin model's within 1e-5.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import REPO

pytestmark = pytest.mark.slow  # whole exports, each target loaded in its own interpreter

TOL = 1e-5


def _compose(config_dir: str, name: str, *overrides: str) -> dict:
    """The resolved config dict fairseq-hydra-train would save for a packaged config."""
    from fairseq.dataclass.initialize import hydra_init
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import fairseq_mtssl  # noqa: F401

    GlobalHydra.instance().clear()
    hydra_init(name)
    with initialize_config_dir(config_dir=str(REPO / "fairseq_mtssl/config" / config_dir), version_base="1.1"):
        cfg = compose(name, overrides=["hydra.run.dir=x", *overrides])
    cfg = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    cfg.pop("hydra", None)
    return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)


def _perturb_norms(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "weight_g" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _save(model: torch.nn.Module, cfg: dict, path, task_state=None) -> None:
    torch.save(
        {
            "cfg": cfg,
            "model": model.state_dict(),
            "args": None,
            "task_state": task_state or {},
            "optimizer_history": [
                {
                    "criterion_name": "x",
                    "optimizer_name": "Adam",
                    "lr_scheduler_state": {"best": None},
                    "num_updates": 0,
                }
            ],
            "extra_state": {},
            "last_optimizer_state": None,
        },
        path,
    )


def _speech(manifest_dir, normalize: bool) -> torch.Tensor:
    root, first = (manifest_dir / "valid.tsv").read_text().splitlines()[:2]
    wav, _ = sf.read(f"{root}/{first.split(chr(9))[0]}", dtype="float32")
    wav = torch.from_numpy(wav[:24000])
    return torch.nn.functional.layer_norm(wav, wav.shape) if normalize else wav


def _export(ckpt, out, *extra) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_mtssl.convert.export", str(ckpt), str(out), *extra],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "export.json").read_text())


# Runs without the plugin: what a user of each toolkit does with the exported files.
_TARGETS = r"""
import json, sys, types, argparse
from pathlib import Path
import numpy as np, torch
out, wav_path, result = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
info = json.loads((out / "export.json").read_text())
wav = torch.from_numpy(np.load(wav_path))
normed = torch.nn.functional.layer_norm(wav, wav.shape)
got = {}

# fairseq
from fairseq import checkpoint_utils
from fairseq.data.dictionary import Dictionary
torch.serialization.add_safe_globals([Dictionary, argparse.Namespace])  # what any torch>=2.6 fairseq user needs
if info["fairseq"]["model"] == "data2vec_audio":
    # fairseq's data2vec cannot deep-copy weight norm under torch >= 2.1 when it builds its EMA teacher
    from torch.nn.utils.weight_norm import WeightNorm
    from fairseq.examples.data2vec.models import data2vec_audio
    make = data2vec_audio.Data2VecAudioModel.make_ema_teacher
    def make_detached(self):
        for m in self.modules():
            for h in m._forward_pre_hooks.values():
                if isinstance(h, WeightNorm):
                    setattr(m, h.name, getattr(m, h.name).detach())
        make(self)
    data2vec_audio.Data2VecAudioModel.make_ema_teacher = make_detached
models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(out / "fairseq.pt")])
model = models[0].eval()
assert type(model).__name__ == {"hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model",
                                "data2vec_audio": "Data2VecAudioModel"}[info["fairseq"]["model"]], type(model)
states = []
layers = model.encoder.layers
hooks = [layers[0].register_forward_pre_hook(lambda m, a: states.append(a[0].transpose(0, 1)[0]))]
hooks += [l.register_forward_hook(lambda m, a, o: states.append(o[0].transpose(0, 1)[0])) for l in layers]
x = normed if cfg.task.normalize else wav
with torch.no_grad():
    if info["fairseq"]["model"] == "hubert":
        final = model.extract_features(x[None], padding_mask=None, mask=False)[0][0]
    else:
        final = model.extract_features(x[None], None, mask=False)["x"][0]
t = final.shape[0]
got["fairseq"] = torch.stack([s[:t] for s in states] + [final]).numpy()

# transformers
if "transformers" in info:
    from transformers import AutoModel
    hf = AutoModel.from_pretrained(out / "transformers").eval()
    assert type(hf).__name__ == info["transformers"]["class"], type(hf)
    with torch.no_grad():
        o = hf(x[None], output_hidden_states=True)
    got["transformers"] = torch.stack([h[0] for h in o.hidden_states] + [o.last_hidden_state[0]]).numpy()

# s3prl (it layer-normalises the waveform itself when the task did)
if "s3prl" in info:
    # s3prl 0.4.18's upstream/utils imports torchaudio at module level for a pseudo-data helper that
    # the *_local upstreams never call; this environment has no torchaudio (none builds for torch 2.13).
    sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    import importlib
    name = info["s3prl"]["upstream"]
    hub = importlib.import_module(f"s3prl.upstream.{name.split('_')[0]}.hubconf")
    ups = {"s3prl": getattr(hub, name)(str(out / "s3prl.pt"))}
    if name != "data2vec_local":
        ups["s3prl_fairseq"] = getattr(hub, name)(str(out / "fairseq.pt"), fairseq=True)
    for key, up in ups.items():
        with torch.no_grad():
            o = up.eval()([wav])
        got[key] = torch.stack([h[0] for h in o["hidden_states"]]).numpy()
assert "fairseq_mtssl" not in sys.modules
np.savez(result, **got)
"""


def _targets(out, wav, tmp_path) -> dict:
    np.save(tmp_path / "x.npy", wav.numpy())
    proc = subprocess.run(
        [sys.executable, "-c", _TARGETS, str(out), str(tmp_path / "x.npy"), str(tmp_path / "got.npz")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(tmp_path / "got.npz"))


def _assert_all_match(encoder, x: torch.Tensor, got: dict, pre_ln: bool):
    """Every target's states against the plugin encoder's on ``x`` (the waveform, layer-normalised when
    the task normalises): transformers and fairseq give the first layer's input, every layer's output
    and the encoder output; s3prl the layer inputs and the encoder output."""
    from fairseq_mtssl.convert.to_transformers import fairseq_hidden_states

    ours = fairseq_hidden_states(encoder.eval(), x[None])[:, 0].numpy()  # (L + 2, T, C)
    assert pre_ln == (np.abs(ours[-1] - ours[-2]).max() > 1e-2)  # a pre-LN model's final norm really acts
    s3prl_ours = np.concatenate([ours[:-2], ours[-1:]])
    diffs = {}
    for key, states in got.items():
        ref = s3prl_ours if key.startswith("s3prl") else ours
        assert states.shape == ref.shape, (key, states.shape, ref.shape)
        diffs[key] = float(np.abs(states - ref).max())
    print("max abs differences:", diffs)
    assert all(d < TOL for d in diffs.values()), diffs
    return diffs


# ---------------------------------------------------------------------------------------- VGS+SSL


def _vgs_model(tmp_path, **model_over):
    from fairseq_mtssl.models.wav2vec2_vgs import Wav2Vec2VgsConfig, Wav2Vec2VgsModel

    cfg = _compose("vgs", "vgs_ssl_tiny_cpu", "task.data=unused", *[f"++model.{k}={v}" for k, v in model_over.items()])
    names = set(Wav2Vec2VgsConfig.__dataclass_fields__)
    torch.manual_seed(0)
    model = Wav2Vec2VgsModel(Wav2Vec2VgsConfig(**{k: v for k, v in cfg["model"].items() if k in names}))
    _perturb_norms(model)
    model.eval()
    with torch.no_grad():  # BatchNorm running statistics that are not the identity
        model.audio_batch_norm.running_mean.normal_()
        model.audio_batch_norm.running_var.uniform_(0.5, 2.0)
    ckpt = tmp_path / "vgs.pt"
    _save(model, cfg, ckpt)
    return model, cfg, ckpt


def test_vgs_ssl_exports_its_wav2vec2_trunk_to_fairseq_transformers_and_s3prl(manifest_dir, tmp_path):
    from fairseq_mtssl.convert.wav2vec2_trunk import load_vgs_export

    model, cfg, ckpt = _vgs_model(tmp_path)
    out = tmp_path / "out"
    info = _export(ckpt, out)
    assert info["architecture"] == "wav2vec2_vgs" and info["fairseq"]["model"] == "wav2vec2"
    assert info["transformers"]["class"] == "Wav2Vec2Model" and info["s3prl"]["upstream"] == "wav2vec2_local"
    plain = torch.load(out / "fairseq.pt")
    assert plain["cfg"]["common"]["user_dir"] is None and plain["cfg"]["task"]["_name"] == "audio_pretraining"
    assert not any(k.startswith(("audio_", "image_", "w2v.")) for k in plain["model"])
    wav = _speech(manifest_dir, normalize=False)
    got = _targets(out, wav, tmp_path)
    assert set(got) == {"fairseq", "transformers", "s3prl", "s3prl_fairseq"}
    _assert_all_match(model.w2v, torch.nn.functional.layer_norm(wav, wav.shape), got, pre_ln=False)

    # the heads kept beside the trunk rebuild the plugin model: the same retrieval embeddings
    back = load_vgs_export(out / "fairseq.pt", out / "vgs_heads.pt")
    x = torch.nn.functional.layer_norm(wav, wav.shape)[None]
    images = torch.randn(2, 16, cfg["model"]["image_dim"])
    with torch.no_grad():
        assert torch.equal(back.embed_speech(x), model.embed_speech(x))
        assert torch.equal(back.embed_images(images), model.embed_images(images))


def test_a_trunk_plain_wav2vec2_cannot_represent_is_refused_in_one_line(tmp_path):
    """E.g. FaST-VGS+'s learned CLS token inside the wav2vec 2.0 input: no plain fairseq counterpart."""
    from fairseq_mtssl.convert.export import export_all
    from fairseq_mtssl.convert.wav2vec2_trunk import TrunkNotRepresentable

    model, cfg, ckpt = _vgs_model(tmp_path)
    state = torch.load(ckpt)
    state["model"]["w2v.cls_token"] = torch.zeros(cfg["model"]["encoder_embed_dim"])
    torch.save(state, ckpt)
    with pytest.raises(TrunkNotRepresentable) as err:
        export_all(ckpt, tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and str(ckpt) in msg and "cls_token" in msg
    assert not (tmp_path / "out" / "fairseq.pt").exists()


# ------------------------------------------------------------------------------ wav2vec 2.0


@pytest.mark.parametrize(
    "extractor_mode,layer_norm_first",
    [("default", False), ("layer_norm", True)],
    ids=["group-norm-post-ln(base)", "layer-norm-pre-ln(large)"],
)
def test_wav2vec2_both_front_ends_and_both_layer_norm_placements(
    extractor_mode, layer_norm_first, manifest_dir, tmp_path
):
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model

    cfg = _compose(
        "wav2vec2/pretraining",
        "wav2vec2_tiny_cpu",
        "task.data=unused",
        f"++model.extractor_mode={extractor_mode}",
        f"++model.layer_norm_first={layer_norm_first}",
    )
    torch.manual_seed(1)
    names = set(Wav2Vec2Config.__dataclass_fields__)
    model = Wav2Vec2Model(Wav2Vec2Config(**{k: v for k, v in cfg["model"].items() if k in names}))
    _perturb_norms(model, seed=1)
    _save(model, cfg, tmp_path / "w2v.pt")
    info = _export(tmp_path / "w2v.pt", tmp_path / "out")
    assert info["architecture"] == "wav2vec2" and info["transformers"]["class"] == "Wav2Vec2Model"
    hf_cfg = json.loads((tmp_path / "out" / "transformers" / "config.json").read_text())
    assert hf_cfg["feat_extract_norm"] == {"default": "group", "layer_norm": "layer"}[extractor_mode]
    assert hf_cfg["do_stable_layer_norm"] == layer_norm_first
    assert (hf_cfg["conv_dim"], hf_cfg["conv_kernel"], hf_cfg["conv_stride"]) == (
        [64] * 7,
        [10, 3, 3, 3, 3, 2, 2],
        [5, 2, 2, 2, 2, 2, 2],
    )
    wav = _speech(manifest_dir, normalize=False)
    got = _targets(tmp_path / "out", wav, tmp_path)
    assert set(got) == {"fairseq", "transformers", "s3prl", "s3prl_fairseq"}
    _assert_all_match(model, torch.nn.functional.layer_norm(wav, wav.shape), got, pre_ln=layer_norm_first)


# ---------------------------------------------------------------------------- MT4SSL / data2vec


def _mt4ssl_checkpoint(tmp_path, *overrides):
    from fairseq_mtssl.models.mt4ssl import MT4SSLConfig, MT4SSLModel

    cfg = _compose(
        "mt4ssl/pretrain",
        "mt4ssl_tiny_cpu",
        "task.data=unused",
        "task.label_dir=unused",
        "task.labels=[km]",
        "task.label_rate=100",
        *overrides,
    )
    names = set(MT4SSLConfig.__dataclass_fields__)
    torch.manual_seed(2)
    model = MT4SSLModel(MT4SSLConfig(**{k: v for k, v in cfg["model"].items() if k in names}), [12], [100.0], [1])
    _perturb_norms(model, seed=2)
    model.make_ema_teacher()  # what training builds at its first update: the checkpoint's ``_ema``
    _save(model, cfg, tmp_path / "mt4ssl.pt")
    return model, tmp_path / "mt4ssl.pt"


@pytest.mark.parametrize(
    "pos_conv_depth,hf_class",
    [(1, "Wav2Vec2Model"), (5, "Data2VecAudioModel")],
    ids=["one-weight-normed-pos-conv(tiny)", "pos-conv-stack(data2vec-base-layout)"],
)
def test_mt4ssl_exports_to_data2vec_transformers_and_s3prl(pos_conv_depth, hf_class, manifest_dir, tmp_path):
    model, ckpt = _mt4ssl_checkpoint(tmp_path, f"++model.pos_conv_depth={pos_conv_depth}")
    if pos_conv_depth > 1:
        assert len(model.encoder.pos_conv) == 5 and model.encoder.pos_conv[0][0].kernel_size == (6,)  # even: SamePad
    info = _export(ckpt, tmp_path / "out")
    assert info["architecture"] == "mt4ssl" and info["fairseq"]["model"] == "data2vec_audio"
    assert info["transformers"]["class"] == hf_class and info["s3prl"]["upstream"] == "data2vec_local"
    if pos_conv_depth > 1:
        hf_cfg = json.loads((tmp_path / "out" / "transformers" / "config.json").read_text())
        assert (hf_cfg["num_conv_pos_embeddings"], hf_cfg["conv_pos_kernel_size"]) == (5, 6)
    wav = _speech(manifest_dir, normalize=False)
    got = _targets(tmp_path / "out", wav, tmp_path)
    assert set(got) == {"fairseq", "transformers", "s3prl"}
    _assert_all_match(model, torch.nn.functional.layer_norm(wav, wav.shape), got, pre_ln=False)


def test_a_plain_data2vec_checkpoint_loads_as_an_upstream(manifest_dir, tmp_path):
    """fairseq's data2vec builds its EMA teacher at load, a deep copy torch refuses for weight norm:
    the plugin's upstream loader reads the exported ``data2vec_audio`` with the student's hidden states."""
    from fairseq_mtssl.convert.mt4ssl_to_data2vec import export_mt4ssl_student
    from fairseq_mtssl.upstream import hidden_states, load_upstream

    model, ckpt = _mt4ssl_checkpoint(tmp_path)
    export_mt4ssl_student(ckpt, tmp_path / "d2v.pt")
    encoder, normalize = load_upstream(tmp_path / "d2v.pt")
    assert type(encoder).__name__ == "Data2VecAudioModel" and normalize
    wav = torch.nn.functional.layer_norm(_speech(manifest_dir, normalize=False), (len(_speech(manifest_dir, False)),))
    with torch.no_grad():
        ours, _ = hidden_states(model.eval(), wav[None], None)
        theirs, _ = hidden_states(encoder, wav[None], None)
    assert len(ours) == len(theirs) and max(float((a - b).abs().max()) for a, b in zip(ours, theirs)) < 1e-5


def test_data2vec_layouts_transformers_lacks_are_refused_in_one_line(tmp_path):
    from fairseq_mtssl.convert.export import export_all
    from fairseq_mtssl.convert.to_transformers import TransformersExportError

    _, ckpt = _mt4ssl_checkpoint(tmp_path, "++model.pos_conv_depth=5", "++model.extractor_mode=default")
    with pytest.raises(TransformersExportError) as err:
        export_all(ckpt, tmp_path / "out")
    assert "\n" not in str(err.value) and str(ckpt) in str(err.value) and "Data2VecAudioModel" in str(err.value)
    assert not (tmp_path / "out" / "transformers").exists()


# ----------------------------------------------------------------------------- HuBERT and SCORE


@pytest.mark.parametrize("arch", ["hubert", "score"])
def test_hubert_and_score_export_through_the_one_command(arch, manifest_dir, tmp_path):
    from test_interop import _build_checkpoint

    from fairseq_mtssl.convert.hubert_checkpoint import load_hubert
    from fairseq_mtssl.models.score import ScoreConfig, ScoreModel

    pre_ln = arch == "hubert"  # the plain HuBERT as Large (layer_norm, pre-LN), SCORE on a Base-like one
    start = tmp_path / "hubert.pt"
    _build_checkpoint(start, "layer_norm" if pre_ln else "default", pre_ln)
    if arch == "hubert":
        ckpt, encoder = start, load_hubert(start)[0]
    else:
        cfg = _compose("score", "score_tiny_cpu", "task.data=unused", f"model.upstream_path={start}")
        names = set(ScoreConfig.__dataclass_fields__)
        score = ScoreModel.build_model(ScoreConfig(**{k: v for k, v in cfg["model"].items() if k in names}))
        _perturb_norms(score.student.encoder.layers[-1], seed=3)  # the student now differs from the start
        ckpt, encoder = tmp_path / "score.pt", score.student
        _save(score, cfg, ckpt)
    info = _export(ckpt, tmp_path / "out")
    assert info["architecture"] == arch and info["transformers"]["class"] == "HubertModel"
    wav = _speech(manifest_dir, normalize=False)
    got = _targets(tmp_path / "out", wav, tmp_path)
    assert set(got) == {"fairseq", "transformers", "s3prl", "s3prl_fairseq"}
    _assert_all_match(encoder, wav, got, pre_ln=pre_ln)  # these HuBERT tasks do not normalise


def test_unknown_architectures_are_refused_in_one_line(tmp_path):
    from fairseq_mtssl.convert.export import UnknownArchitecture, export_all

    bad = tmp_path / "lm.pt"
    torch.save({"cfg": {"model": {"_name": "transformer_lm"}}, "model": {}, "args": None}, bad)
    with pytest.raises(UnknownArchitecture, match="lm.pt: model 'transformer_lm' has no export"):
        export_all(bad, tmp_path / "out")


def test_a_wav2vec2_without_a_feature_projection_gets_the_identity_in_transformers():
    """fairseq builds no ``post_extract_proj`` when the conv width equals the encoder width."""
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model

    from fairseq_mtssl.convert.to_transformers import (
        build_transformers,
        fairseq_hidden_states,
        transformers_hidden_states,
    )

    cfg = dict(
        extractor_mode="layer_norm",
        conv_feature_layers="[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2",
        encoder_layers=2,
        encoder_embed_dim=64,
        encoder_ffn_embed_dim=128,
        encoder_attention_heads=4,
        conv_pos=16,
        conv_pos_groups=8,
    )
    torch.manual_seed(4)
    model = Wav2Vec2Model(Wav2Vec2Config(**cfg)).eval()
    assert model.post_extract_proj is None
    _perturb_norms(model, seed=4)
    hf, _ = build_transformers("wav2vec2", model, cfg)
    wav = torch.randn(1, 8000)
    assert float((fairseq_hidden_states(model, wav) - transformers_hidden_states(hf, wav)).abs().max()) < TOL
