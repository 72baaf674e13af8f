"""mtssl-export: every method's model leaves as plain fairseq, transformers and s3prl, with its hidden states.

Each tiny model is built from its method's tiny config with random weights (norms perturbed, so a
misplaced one shows), saved as fairseq saves a checkpoint, exported, and then read in a fresh
interpreter without the plugin imported: by fairseq's ``load_model_ensemble_and_task``, by
transformers' ``AutoModel`` and by s3prl's ``*_local`` upstream. Every hidden state (the first layer's
input, each layer's output, the encoder output) must match the plugin model's within 1e-5.
"""

import json

import pytest
import torch
from builders import (
    EXPORT_TOL,
    assert_states_match,
    exported_hidden_states,
    perturb_norms,
    random_hubert_checkpoint,
    random_mt4ssl_checkpoint,
    random_vgs_checkpoint,
    run_export,
    save_checkpoint,
    saved_config,
    speech_sample,
)

pytestmark = pytest.mark.slow  # whole exports, each target loaded in its own interpreter

# ---------------------------------------------------------------------------------------- VGS+SSL


def test_vgs_ssl_exports_its_wav2vec2_trunk_to_fairseq_transformers_and_s3prl(manifest_dir, tmp_path):
    from fairseq_mtssl.convert.wav2vec2_trunk import load_vgs_export

    model, cfg, ckpt = random_vgs_checkpoint(tmp_path)
    out = tmp_path / "out"
    info = run_export(ckpt, out)
    assert info["architecture"] == "wav2vec2_vgs" and info["fairseq"]["model"] == "wav2vec2"
    assert info["transformers"]["class"] == "Wav2Vec2Model" and info["s3prl"]["upstream"] == "wav2vec2_local"
    plain = torch.load(out / "fairseq.pt")
    assert plain["cfg"]["common"]["user_dir"] is None and plain["cfg"]["task"]["_name"] == "audio_pretraining"
    assert not any(k.startswith(("audio_", "image_", "w2v.")) for k in plain["model"])
    wav = speech_sample(manifest_dir, normalize=False)
    got = exported_hidden_states(out, wav, tmp_path)
    assert set(got) == {"fairseq", "transformers", "s3prl", "s3prl_fairseq"}
    assert_states_match(model.w2v, torch.nn.functional.layer_norm(wav, wav.shape), got, pre_ln=False)

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

    model, cfg, ckpt = random_vgs_checkpoint(tmp_path)
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

    cfg = saved_config(
        "wav2vec2/pretraining",
        "wav2vec2_tiny_cpu",
        "task.data=unused",
        f"++model.extractor_mode={extractor_mode}",
        f"++model.layer_norm_first={layer_norm_first}",
    )
    torch.manual_seed(1)
    names = set(Wav2Vec2Config.__dataclass_fields__)
    model = Wav2Vec2Model(Wav2Vec2Config(**{k: v for k, v in cfg["model"].items() if k in names}))
    perturb_norms(model, seed=1)
    save_checkpoint(model, cfg, tmp_path / "w2v.pt")
    info = run_export(tmp_path / "w2v.pt", tmp_path / "out")
    assert info["architecture"] == "wav2vec2" and info["transformers"]["class"] == "Wav2Vec2Model"
    hf_cfg = json.loads((tmp_path / "out" / "transformers" / "config.json").read_text())
    assert hf_cfg["feat_extract_norm"] == {"default": "group", "layer_norm": "layer"}[extractor_mode]
    assert hf_cfg["do_stable_layer_norm"] == layer_norm_first
    assert (hf_cfg["conv_dim"], hf_cfg["conv_kernel"], hf_cfg["conv_stride"]) == (
        [64] * 7,
        [10, 3, 3, 3, 3, 2, 2],
        [5, 2, 2, 2, 2, 2, 2],
    )
    wav = speech_sample(manifest_dir, normalize=False)
    got = exported_hidden_states(tmp_path / "out", wav, tmp_path)
    assert set(got) == {"fairseq", "transformers", "s3prl", "s3prl_fairseq"}
    assert_states_match(model, torch.nn.functional.layer_norm(wav, wav.shape), got, pre_ln=layer_norm_first)


# ---------------------------------------------------------------------------- MT4SSL / data2vec


@pytest.mark.parametrize(
    "pos_conv_depth,hf_class",
    [(1, "Wav2Vec2Model"), (5, "Data2VecAudioModel")],
    ids=["one-weight-normed-pos-conv(tiny)", "pos-conv-stack(data2vec-base-layout)"],
)
def test_mt4ssl_exports_to_data2vec_transformers_and_s3prl(pos_conv_depth, hf_class, manifest_dir, tmp_path):
    model, ckpt = random_mt4ssl_checkpoint(tmp_path, f"++model.pos_conv_depth={pos_conv_depth}")
    if pos_conv_depth > 1:
        assert len(model.encoder.pos_conv) == 5 and model.encoder.pos_conv[0][0].kernel_size == (6,)  # even: SamePad
    info = run_export(ckpt, tmp_path / "out")
    assert info["architecture"] == "mt4ssl" and info["fairseq"]["model"] == "data2vec_audio"
    assert info["transformers"]["class"] == hf_class and info["s3prl"]["upstream"] == "data2vec_local"
    if pos_conv_depth > 1:
        hf_cfg = json.loads((tmp_path / "out" / "transformers" / "config.json").read_text())
        assert (hf_cfg["num_conv_pos_embeddings"], hf_cfg["conv_pos_kernel_size"]) == (5, 6)
    wav = speech_sample(manifest_dir, normalize=False)
    got = exported_hidden_states(tmp_path / "out", wav, tmp_path)
    assert set(got) == {"fairseq", "transformers", "s3prl"}
    assert_states_match(model, torch.nn.functional.layer_norm(wav, wav.shape), got, pre_ln=False)


def test_a_plain_data2vec_checkpoint_loads_as_an_upstream(manifest_dir, tmp_path):
    """fairseq's data2vec builds its EMA teacher at load, a deep copy torch refuses for weight norm:
    the plugin's upstream loader reads the exported ``data2vec_audio`` with the student's hidden states."""
    from fairseq_mtssl.convert.mt4ssl_to_data2vec import export_mt4ssl_student
    from fairseq_mtssl.upstream import hidden_states, load_upstream

    model, ckpt = random_mt4ssl_checkpoint(tmp_path)
    export_mt4ssl_student(ckpt, tmp_path / "d2v.pt")
    encoder, normalize = load_upstream(tmp_path / "d2v.pt")
    assert type(encoder).__name__ == "Data2VecAudioModel" and normalize
    wav = torch.nn.functional.layer_norm(
        speech_sample(manifest_dir, normalize=False), (len(speech_sample(manifest_dir, False)),)
    )
    with torch.no_grad():
        ours, _ = hidden_states(model.eval(), wav[None], None)
        theirs, _ = hidden_states(encoder, wav[None], None)
    assert len(ours) == len(theirs) and max(float((a - b).abs().max()) for a, b in zip(ours, theirs)) < 1e-5


def test_data2vec_layouts_transformers_lacks_are_refused_in_one_line(tmp_path):
    from fairseq_mtssl.convert.export import export_all
    from fairseq_mtssl.convert.to_transformers import TransformersExportError

    _, ckpt = random_mt4ssl_checkpoint(tmp_path, "++model.pos_conv_depth=5", "++model.extractor_mode=default")
    with pytest.raises(TransformersExportError) as err:
        export_all(ckpt, tmp_path / "out")
    assert "\n" not in str(err.value) and str(ckpt) in str(err.value) and "Data2VecAudioModel" in str(err.value)
    assert not (tmp_path / "out" / "transformers").exists()


# ----------------------------------------------------------------------------- HuBERT and SCORE


@pytest.mark.parametrize("arch", ["hubert", "score"])
def test_hubert_and_score_export_through_the_one_command(arch, manifest_dir, tmp_path):
    from fairseq_mtssl.convert.hubert_checkpoint import load_hubert
    from fairseq_mtssl.models.score import ScoreConfig, ScoreModel

    pre_ln = arch == "hubert"  # the plain HuBERT as Large (layer_norm, pre-LN), SCORE on a Base-like one
    start = tmp_path / "hubert.pt"
    random_hubert_checkpoint(start, "layer_norm" if pre_ln else "default", pre_ln)
    if arch == "hubert":
        ckpt, encoder = start, load_hubert(start)[0]
    else:
        cfg = saved_config("score", "score_tiny_cpu", "task.data=unused", f"model.upstream_path={start}")
        names = set(ScoreConfig.__dataclass_fields__)
        score = ScoreModel.build_model(ScoreConfig(**{k: v for k, v in cfg["model"].items() if k in names}))
        perturb_norms(score.student.encoder.layers[-1], seed=3)  # the student now differs from the start
        ckpt, encoder = tmp_path / "score.pt", score.student
        save_checkpoint(score, cfg, ckpt)
    info = run_export(ckpt, tmp_path / "out")
    assert info["architecture"] == arch and info["transformers"]["class"] == "HubertModel"
    wav = speech_sample(manifest_dir, normalize=False)
    got = exported_hidden_states(tmp_path / "out", wav, tmp_path)
    assert set(got) == {"fairseq", "transformers", "s3prl", "s3prl_fairseq"}
    assert_states_match(encoder, wav, got, pre_ln=pre_ln)  # these HuBERT tasks do not normalise


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
    perturb_norms(model, seed=4)
    hf, _ = build_transformers("wav2vec2", model, cfg)
    wav = torch.randn(1, 8000)
    assert float((fairseq_hidden_states(model, wav) - transformers_hidden_states(hf, wav)).abs().max()) < EXPORT_TOL
