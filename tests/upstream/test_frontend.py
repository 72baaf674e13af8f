"""The channels-last conv front end (upstream/frontend.py) against fairseq's own ``layer_norm`` front end:
the same function of the same parameters (values and gradients), the same state dict, installed by the
plugin's tasks and its checkpoint loader, and never in place of a group-normed front end."""

import copy

import pytest
import torch
from fairseq.models.wav2vec.wav2vec2 import ConvFeatureExtractionModel

from builders import TINY_HUBERT, random_hubert, random_hubert_checkpoint, vgs_config
from fairseq_mtssl.upstream.checkpoint import load_model_and_task
from fairseq_mtssl.upstream.frontend import ChannelsLastFrontEnd, use_channels_last_front_end

TINY = [(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2  # the tiny configs' front end


def _fairseq_front_end(layers, conv_bias: bool, seed: int = 0) -> ConvFeatureExtractionModel:
    torch.manual_seed(seed)
    ext = ConvFeatureExtractionModel(layers, dropout=0.0, mode="layer_norm", conv_bias=conv_bias)
    with torch.no_grad():  # LayerNorm affine parameters away from (1, 0), so that they matter
        for p in ext.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return ext


def _value_and_grads(module, x):
    module.zero_grad(set_to_none=True)
    y = module(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize(
    "layers, conv_bias, lengths",
    [
        (TINY, False, (4000, 3517)),
        (TINY, True, (1234,)),
        ([(48, 7, 3), (40, 5, 2), (32, 1, 1)], True, (999, 640)),  # other kernels, strides, a 1x1 conv
    ],
)
def test_channels_last_front_end_is_fairseqs_function(layers, conv_bias, lengths):
    ref = _fairseq_front_end(layers, conv_bias)
    ours = ChannelsLastFrontEnd(copy.deepcopy(ref))
    torch.manual_seed(1)
    for n in lengths:
        x = torch.randn(3, n)
        y_ref, g_ref = _value_and_grads(ref, x)
        y, g = _value_and_grads(ours, x)
        assert y.shape == y_ref.shape  # (B, C, T), frame counts by the conv formula
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        assert g.keys() == g_ref.keys()
        for name in g_ref:
            scale = g_ref[name].abs().max()
            torch.testing.assert_close(g[name] / scale, g_ref[name] / scale, rtol=0, atol=1e-5, msg=name)


def test_channels_last_front_end_keeps_fairseqs_state_dict_and_parameters():
    ref = _fairseq_front_end(TINY, conv_bias=False)
    ours = ChannelsLastFrontEnd(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [id(p) for p in ours.parameters()] == [id(p) for p in ref.parameters()]


def test_use_channels_last_front_end_swaps_layer_norm_front_ends_only():
    model = random_hubert(**{**TINY_HUBERT, "extractor_mode": "layer_norm"})
    keys = list(model.state_dict())
    x = torch.randn(2, 5000)
    model.eval()
    with torch.no_grad():
        before = model.extract_features(x, mask=False)[0]
        assert use_channels_last_front_end(model) == 1
        assert use_channels_last_front_end(model) == 0  # idempotent
        after = model.extract_features(x, mask=False)[0]
    assert isinstance(model.feature_extractor, ChannelsLastFrontEnd)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)

    base = random_hubert(**{**TINY_HUBERT, "extractor_mode": "default"})  # group norm over time: stays
    assert use_channels_last_front_end(base) == 0
    assert type(base.feature_extractor) is ConvFeatureExtractionModel


def test_the_plugin_task_and_checkpoint_loader_install_it(tmp_path):
    from fairseq import tasks

    cfg = vgs_config("vgs_ssl_tiny_cpu", "task.data=unused")
    task = tasks.setup_task(cfg.task, from_checkpoint=True)
    task.image_feature_dim = cfg.model.image_dim
    assert isinstance(task.build_model(cfg.model).w2v.feature_extractor, ChannelsLastFrontEnd)

    for mode, swapped in (("layer_norm", True), ("default", False)):
        random_hubert_checkpoint(tmp_path / f"{mode}.pt", extractor_mode=mode, layer_norm_first=False)
        model = load_model_and_task(tmp_path / f"{mode}.pt")[0]
        assert isinstance(model.feature_extractor, ChannelsLastFrontEnd) == swapped
