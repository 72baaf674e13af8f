"""MT4SSL against fairseq's data2vec (same weights, batch and mask) and against hand computations."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fairseq.data.data_utils import compute_mask_indices
from fairseq.examples.data2vec.models.data2vec_audio import Data2VecAudioConfig, Data2VecAudioModel, get_annealed_rate

from fairseq_mtssl.models.mt4ssl import MT4SSLConfig, MT4SSLModel, frame_targets
from fairseq_mtssl.models.weight_norm import detach_weight_norm_weights

TINY = dict(
    extractor_mode="layer_norm",
    conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
    encoder_layers=3,
    encoder_embed_dim=64,
    encoder_ffn_embed_dim=128,
    encoder_attention_heads=4,
    conv_pos=16,
    conv_pos_groups=8,
    average_top_k_layers=2,
    instance_norm_target_layer=True,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    encoder_layerdrop=0.0,
    dropout_input=0.0,
    dropout_features=0.0,
    mask_prob=0.5,
    mask_length=4,
    ema_decay=0.99,
    ema_end_decay=0.999,
    ema_anneal_end_step=100,
    max_update=100,
)
N_CLASSES, PAD = 12, 1


def _mt4ssl(**over) -> MT4SSLModel:
    torch.manual_seed(0)
    return MT4SSLModel(MT4SSLConfig(**{**TINY, **over}), [N_CLASSES], [100.0], [PAD])


def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(2, 12000, generator=g)
    padding_mask = torch.zeros(2, 12000, dtype=torch.bool)
    padding_mask[1, 9000:] = True
    T = int(model._get_feat_extract_output_lengths(torch.tensor(12000)))
    valid_frames = int(model._get_feat_extract_output_lengths(torch.tensor(9000)))
    frame_pad = torch.zeros(2, T, dtype=torch.bool)
    frame_pad[1, valid_frames:] = True
    np.random.seed(seed)
    mask = torch.from_numpy(compute_mask_indices((2, T), frame_pad, 0.5, 4, min_masks=2))
    labels = torch.randint(2, N_CLASSES, (2, 2 * T + 1), generator=g)  # 100 Hz labels for 50 Hz frames
    labels[1, 2 * valid_frames + 1 :] = PAD
    return source, padding_mask, mask, [labels]


def test_online_only_is_exactly_data2vec():
    mt = _mt4ssl(offline_weights=[0.0])
    d2v = Data2VecAudioModel(Data2VecAudioConfig(**TINY))
    missing, unexpected = d2v.load_state_dict(mt.state_dict(), strict=False)
    assert not missing and all(k.startswith("offline_heads.") for k in unexpected)
    detach_weight_norm_weights(d2v)  # without it torch 2.13 cannot deepcopy fairseq's data2vec (weight norm)
    mt.set_num_updates(1), d2v.set_num_updates(1)  # both build their EMA teacher from identical weights
    source, padding_mask, mask, targets = _batch(mt)
    ours = mt(source, padding_mask, target_list=targets, mask_indices=mask)
    ref = d2v(source, padding_mask, mask_indices=mask)
    assert set(ours["losses"]) == {"regression"}
    assert torch.equal(ours["losses"]["regression"], ref["losses"]["regression"])
    assert ours["sample_size"] == ref["sample_size"] == int(mask.sum())


def test_offline_loss_is_the_cross_entropy_of_the_masked_frames():
    mt = _mt4ssl(online_weight=0.0, offline_weights=[0.7])
    source, padding_mask, mask, targets = _batch(mt)
    out = mt(source, padding_mask, target_list=targets, mask_indices=mask)
    assert mt.ema is None and set(out["losses"]) == {"offline_0"} and out["sample_size"] == int(mask.sum())
    x = Data2VecAudioModel.forward(mt, source, padding_mask, mask=True, features_only=True, mask_indices=mask)["x"]
    total, count, correct = 0.0, 0, 0
    for b, t in zip(*torch.nonzero(mask, as_tuple=True)):  # frame by frame, label round(t * 100/50)
        label = targets[0][b, 2 * t]
        if label == PAD:
            continue
        logits = mt.offline_heads[0](x[b, t])
        total = total + F.cross_entropy(logits[None], label[None].long(), reduction="sum")
        count += 1
        correct += int(logits.argmax() == label)
    assert torch.allclose(out["losses"]["offline_0"], 0.7 * total, rtol=1e-5)
    assert out["logs"] == {"_offline_correct_0": correct, "_offline_count_0": count}


def test_both_targets_share_the_mask_and_the_teacher_gets_no_gradient():
    mt = _mt4ssl(offline_head="cosine")
    mt.set_num_updates(1)
    source, padding_mask, mask, targets = _batch(mt)
    out = mt(source, padding_mask, target_list=targets, mask_indices=mask)
    assert set(out["losses"]) == {"regression", "offline_0"} and out["sample_size"] == int(mask.sum())
    sum(out["losses"].values()).backward()
    teacher = list(mt.ema.model.parameters())
    assert teacher and all(p.grad is None and not p.requires_grad for p in teacher)
    assert mt.offline_heads[0].label_embs.grad is not None and mt.encoder.layers[0].fc1.weight.grad is not None


def test_teacher_follows_the_ema_formula_and_copies_pos_conv():
    mt = _mt4ssl()
    mt.set_num_updates(1)
    teacher0 = {k: v.clone() for k, v in mt.ema.model.state_dict().items()}
    with torch.no_grad():
        for p in mt.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    mt.train()
    mt.set_num_updates(40)
    d = get_annealed_rate(0.99, 0.999, 40, 100)
    student = mt.encoder.state_dict()
    for k, v in mt.ema.model.state_dict().items():
        if k.startswith("pos_conv"):
            torch.testing.assert_close(v, student[k])  # copied, not averaged (ema_layers_only)
        elif v.dtype.is_floating_point:
            torch.testing.assert_close(v, d * teacher0[k] + (1 - d) * student[k], rtol=1e-5, atol=1e-6)


def test_teacher_state_is_saved_and_restored():
    mt = _mt4ssl()
    mt.set_num_updates(1)
    with torch.no_grad():
        for p in mt.ema.model.parameters():
            p.add_(1.0)
    state = copy.deepcopy(mt.state_dict())
    assert "_ema" in state
    fresh = _mt4ssl()
    fresh.set_num_updates(0)  # fairseq's trainer builds the teacher before loading a checkpoint
    fresh.load_state_dict(state)
    for a, b in zip(mt.ema.model.state_dict().values(), fresh.ema.model.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_labels_that_do_not_fit_the_audio_are_an_error():
    mt = _mt4ssl(online_weight=0.0)
    source, padding_mask, mask, targets = _batch(mt)
    short = targets[0][:, : targets[0].size(1) // 2]
    with pytest.raises(
        ValueError,
        match=r"label set 0 \(100 Hz\): batch item 0 has labels for \d+ feature frames but its audio gives \d+",
    ):
        mt(source, padding_mask, target_list=[short], mask_indices=mask)


def test_frame_targets_matches_brute_force():
    labels = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 1, 1], [2, 3, 4, 5, 6, 7, 8, 9, 10]])
    for rate in (50.0, 100.0):
        out, covered = frame_targets(labels, 6, rate, pad=1)
        ratio = rate / 50
        for b in range(2):
            n = int((labels[b] != 1).sum())
            assert covered[b] == int(n // ratio)
            for t in range(6):
                i = round(t * ratio)
                assert out[b, t] == (labels[b, i] if i < n else 1)


def test_remove_pretraining_modules_leaves_a_plain_encoder():
    mt = _mt4ssl()
    mt.set_num_updates(1)
    mt.remove_pretraining_modules()
    assert mt.ema is None and mt.final_proj is None and mt.offline_heads is None
    source, padding_mask, _, _ = _batch(mt)
    x = mt.extract_features(source, padding_mask)["x"]
    assert x.shape[-1] == 64
