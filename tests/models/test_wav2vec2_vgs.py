"""Wav2Vec2VgsModel: the speech embedding's layer and feature norm; FaST-VGS+ as the authors built it."""

import pytest
import torch
import torch.nn.functional as F
from builders import vgs_config, vgs_task

from fairseq_mtssl.losses.speech_image import speech_image_loss


def test_speech_embedding_reads_the_configured_layer(vgs_data):
    cfg, task = vgs_task(vgs_data)
    model = task.build_model(cfg.model).eval()
    src = torch.randn(1, 20000)
    with torch.no_grad():
        h = model.w2v.extract_features(src, None, mask=False, layer=1)["x"]  # output of layer 2 (0-based 1)
        expected = model._audio_embedding(h, None)
        got = model.embed_speech(src)
        out = model(src, ssl=False)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(out["speech_emb"], expected)


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_audio_feature_norm_uses_only_the_valid_frames(vgs_data, norm):
    cfg, task = vgs_task(vgs_data, audio_feature_norm=norm)
    model = task.build_model(cfg.model).train()
    lengths = [7, 4]
    h = torch.randn(2, 7, cfg.model.encoder_embed_dim) * 3 + 5
    mask = torch.arange(7)[None, :] >= torch.tensor(lengths)[:, None]
    got = model._normalise_features(h, mask)
    if norm == "instance":  # each utterance, each channel, over its own frames (brute force)
        for i, n in enumerate(lengths):
            x = h[i, :n].double()
            want = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
            torch.testing.assert_close(got[i, :n].double(), want, rtol=1e-4, atol=1e-4)
    else:  # statistics of the 11 valid frames of the batch, not of the padding
        x = torch.cat([h[0], h[1, :4]]).double()
        want = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
        torch.testing.assert_close(torch.cat([got[0], got[1, :4]]).double(), want, rtol=1e-4, atol=1e-4)
    assert got[1, 4:].abs().max() == 0


# ---------------------------------------------------------------------------- the FaST-VGS+ architecture


def _bert_layer(d, ffn):  # q, k, v, output projection, two LayerNorms, FFN
    return 4 * (d * d + d) + 2 * 2 * d + (d * ffn + ffn) + (ffn * d + d)


def _cls_mlp(d):  # Linear(d, 2d) -> GELU -> Linear(2d, d)
    return (d * 2 * d + 2 * d) + (2 * d * d + d)


def _resdavenet(c, widths, k=9):
    """FaST-VGS's ResDAVEnet: Linear c -> w0 + BN, then per stage 2 basic blocks (two bias-free k-wide
    convs + BNs; the first block of a stage strided, with a 1x1 conv + BN on its shortcut)."""
    n = c * widths[0] + widths[0] + 2 * widths[0]
    cin = widths[0]
    for w in widths:
        n += k * cin * w + 2 * w + k * w * w + 2 * w + cin * w + 2 * w  # block 1 (strided, shortcut conv)
        n += 2 * (k * w * w + 2 * w)  # block 2
        cin = w
    return n


def test_paper_config_builds_fast_vgs_plus_with_the_authors_parameter_counts():
    """Per part, the count derived from the authors' DualEncoder (models/fast_vgs.py, utils.py) at
    hidden 768, 12 heads, FFN 3072, trm_layers 6, layer widths 128/256/512/768. The authors' module
    also holds ``audio_cls_token_proj_coarse`` (2,361,600 parameters), whose output their forward
    overwrites; it is not built here."""
    from fairseq.models import build_model
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Model

    from fairseq_mtssl.models.wav2vec2_vgs import ClsTransformerEncoder, Wav2Vec2VgsModel

    cfg = vgs_config("vgs_ssl_base_spokencoco", "task.data=x")
    model = build_model(cfg.model, None)  # fairseq merges the yaml with the model's dataclass
    assert isinstance(model, Wav2Vec2VgsModel)
    assert model.arch == "fast_vgs_plus" and isinstance(model.w2v.encoder, ClsTransformerEncoder)

    def count(prefix):
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))

    plain = Wav2Vec2Model(model.cfg)  # fairseq's own wav2vec 2.0 Base, the reference for the trunk
    assert count("w2v.") == sum(p.numel() for p in plain.parameters()) + 768  # + the CLS token
    assert count("w2v.encoder.cls_token") == 768 and len(model.w2v.encoder.layers) == 12
    d, ffn = 768, 3072
    want = {
        "audio_cls_mlp": _cls_mlp(d),
        "audio_branch": _resdavenet(768, [128, 256, 512, 768]),
        "audio_transformer": _bert_layer(d, ffn),
        "audio_out": d * d + d,
        "image_feat_in": 2048 * d + d + 2 * d,
        "image_box_in": 4 * d + d + 2 * d,
        "image_cls": d,
        "image_transformer": 6 * _bert_layer(d, ffn),
        "image_out": _cls_mlp(d),
    }
    got = {k: count(k) for k in want}
    assert got == want
    heads = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("w2v."))
    assert heads == sum(want.values())
    assert model.audio_transformer[0].self_attn.num_heads == 12 and not model.audio_transformer[0].layer_norm_first
    assert len(model.image_transformer) == 6 and not model.image_transformer[0].layer_norm_first


def _small_fast_vgs_plus(**kw):
    from fairseq_mtssl.models.wav2vec2_vgs import Wav2Vec2VgsConfig, Wav2Vec2VgsModel

    cfg = Wav2Vec2VgsConfig(
        extractor_mode="layer_norm",
        conv_feature_layers="[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2",
        encoder_layers=3,
        encoder_embed_dim=64,
        encoder_ffn_embed_dim=128,
        encoder_attention_heads=4,
        conv_pos=16,
        conv_pos_groups=4,
        quantize_targets=True,
        latent_vars=8,
        latent_groups=2,
        final_dim=32,
        num_negatives=10,
        encoder_layerdrop=0.0,
        vgs_layer=2,
        vgs_dim=64,
        vgs_heads=4,
        vgs_ffn_dim=128,
        audio_widths=[16, 32, 48, 64],
        image_dim=36,
        image_layers=2,
        **kw,
    )
    return Wav2Vec2VgsModel(cfg)


def test_cls_token_passes_pos_conv_and_every_layer_and_feeds_the_audio_head():
    from fairseq.models.wav2vec.wav2vec2 import TransformerEncoder

    from fairseq_mtssl.upstream.layers import hidden_states

    torch.manual_seed(0)
    model = _small_fast_vgs_plus().eval()
    enc = model.w2v.encoder
    # fairseq's own encoder with the same weights, fed [CLS; frames] by hand, is the reference
    ref = TransformerEncoder(model.cfg).eval()
    ref.load_state_dict({k: v for k, v in enc.state_dict().items() if k != "cls_token"})
    x = torch.randn(2, 13, 64)
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[1, 9:] = True
    with torch.no_grad():
        ours, _ = enc(x, padding_mask=mask)
        theirs, _ = ref(torch.cat([enc.cls_token.expand(2, 1, -1), x], 1), F.pad(mask, (1, 0)))
        torch.testing.assert_close(ours, theirs[:, 1:])
        plain, _ = ref(x, padding_mask=mask)
        assert (ours - plain).abs().max() > 1e-3  # the token changes the frames: it is really inside

    # the audio head's CLS is the MLP of the token's state at layer vgs_layer (2); its frames are the others
    seen = {}
    model.w2v.encoder.layers[1].register_forward_hook(lambda m, a, out: seen.__setitem__("layer2", out[0]))
    model.audio_cls_mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp_in", a[0]))
    model.audio_branch.register_forward_pre_hook(lambda m, a: seen.__setitem__("frames", a[0]))
    src = torch.randn(2, 16000)
    with torch.no_grad():
        emb = model.embed_speech(src)
    layer2 = seen["layer2"].transpose(0, 1)
    t = seen["frames"].size(1)
    torch.testing.assert_close(seen["mlp_in"], layer2[:, 0])
    torch.testing.assert_close(seen["frames"], layer2[:, 1 : 1 + t])
    assert emb.shape == (2, 64)
    # feature readers see frames only: as many as the conv front end makes, equal to the encoder's output
    with torch.no_grad():
        states, _ = hidden_states(model.speech_encoder(), src, None)
        last = model.w2v.extract_features(src, None, mask=False, layer=None)["x"]
    frames = int(model.w2v._get_feat_extract_output_lengths(torch.tensor(16000)))
    assert len(states) == 4 and all(h.shape == (2, frames, 64) for h in states)
    torch.testing.assert_close(states[-1], last)
    # and the VGS loss trains the token
    model.train()
    out = model(src, image_feats=torch.randn(2, 4, 36), ssl=False)
    speech_image_loss(out["speech_emb"], out["image_emb"], torch.arange(2)).backward()
    assert enc.cls_token.grad is not None and enc.cls_token.grad.abs().sum() > 0


def test_fast_vgs_plus_image_head_splits_feature_and_box_and_audio_mask_follows_the_strides():
    torch.manual_seed(0)
    model = _small_fast_vgs_plus().eval()
    feats = torch.randn(1, 4, 36)
    with torch.no_grad():
        base = model.embed_images(feats)
        moved = feats.clone()
        moved[..., -4:] += 0.5  # only the boxes
        assert (model.embed_images(moved) - base).abs().max() > 1e-4
        x = (model.image_feat_in(feats[..., :-4]) + model.image_box_in(feats[..., -4:])) / 2
        torch.testing.assert_close(x, (model.image_feat_in[1](model.image_feat_in[0](feats[..., :32])) +
                                       model.image_box_in[1](model.image_box_in[0](feats[..., 32:]))) / 2)  # fmt: skip
        # padding: a short caption in a batch with a long one embeds as it does alone
        src = torch.randn(2, 32000)
        pad = torch.zeros(2, 32000, dtype=torch.bool)
        pad[1, 12000:] = True
        src[1, 12000:] = 0.0  # padding as the collater writes it
        together = model.embed_speech(src, pad)[1]
        alone = model.embed_speech(src[1:, :12000])[0]
    lengths = model.audio_branch.output_lengths(torch.tensor([1, 16, 17, 100]))
    assert lengths.tolist() == [1, 1, 2, 7]  # ceil(n / 16): four stride-2 convolutions of width 9, padding 4
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_old_light_checkpoints_need_the_light_override(vgs_data):
    cfg, task = vgs_task(vgs_data)
    light = task.build_model(cfg.model)
    paper = _small_fast_vgs_plus()
    with pytest.raises(ValueError, match="load it with the override model.vgs_arch=light"):
        paper.load_state_dict(light.state_dict())
