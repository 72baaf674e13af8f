"""SpinModel: the student's top-layer features and what learns, the unit-norm codebook, the trainable-layer limit."""

import pytest
import torch
from builders import random_hubert, spin_task


def _hubert(**overrides):
    tiny = dict(encoder_layers=3, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=4,
                conv_pos=16, conv_pos_groups=4, conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
                dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, dropout_input=0.0, final_dim=16)  # fmt: skip
    tiny.update(overrides)
    return random_hubert(**tiny)


def _spin_model(trainable_layers=2, **hubert_overrides):
    from fairseq_mtssl.models.spin import SpinConfig, SpinModel

    torch.manual_seed(0)
    cfg = SpinConfig(upstream_path="-", trainable_layers=trainable_layers, proj_dim=8, num_clusters=16)
    return SpinModel(cfg, _hubert(**hubert_overrides))


@pytest.mark.parametrize("extractor_mode", ["layer_norm", "default"], ids=["padded-batch", "length-groups"])
def test_student_features_are_the_top_layer_and_only_the_top_layers_learn(extractor_mode):
    """The split forward (frozen bottom without a graph, trainable top) gives each utterance's top-layer
    output of fairseq's own forward, padded batch or length groups alike; gradients reach exactly the top
    layer, the head and the codebook."""
    from fairseq_mtssl.upstream.layers import run_encoder

    model = _spin_model(trainable_layers=1, extractor_mode=extractor_mode).eval()
    assert model.batchable == (extractor_mode == "layer_norm") and model.first_trainable == 2
    assert all(n.startswith("encoder.layers.2.") for n in model.trainable) and model.trainable
    sources = [torch.randn(9000), torch.randn(6400), torch.randn(9000)]
    with torch.enable_grad():
        outs = model.encode(sources)
    with torch.no_grad():
        for s, o in zip(sources, outs):
            alone = run_encoder(model.student, s[None], None, 3)[0][0]
            torch.testing.assert_close(o, alone, atol=1e-5, rtol=1e-5)
    model.scores(torch.cat(outs)).logsumexp(-1).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    want = {n for n, p in model.named_parameters() if n.startswith(("student.encoder.layers.2.", "head.", "codebook."))}
    assert grads == want and want == {n for n, p in model.named_parameters() if p.requires_grad}


def test_codebook_is_unit_norm_after_every_update(spin_data):
    """fairseq's train_step then the task's optimizer_step, three updates with a large learning rate: after
    each step every prototype has unit norm (a plain optimizer step alone moves them off it); the model's
    set_num_updates renormalises too; fairseq's fp16 optimizer (fp32 master copies) is refused."""
    from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig

    from fairseq_mtssl.criterions.spin_criterion import SpinCriterion
    from fairseq_mtssl.errors import MtsslError

    model, task = _spin_model().train(), spin_task(spin_data)
    crit = SpinCriterion(task)
    assert torch.allclose(model.codebook.weight.norm(dim=1), torch.ones(16), atol=1e-6)  # unit at build
    opt = FairseqAdam(
        FairseqAdamConfig(lr=[0.05], adam_betas="(0.9, 0.999)", weight_decay=1e-6),
        [p for p in model.parameters() if p.requires_grad],
    )
    g = torch.Generator().manual_seed(0)
    sample = {"net_input": {"source": [torch.randn(8000, generator=g), torch.randn(6000, generator=g)]}}
    sample["net_input"]["perturbed"] = [
        s + 0.1 * torch.randn(len(s), generator=g) for s in sample["net_input"]["source"]
    ]
    for update in range(3):
        before = model.codebook.weight.detach().clone()
        opt.zero_grad()
        task.train_step(sample, model, crit, opt, update_num=update)
        task.optimizer_step(opt, model, update_num=update)
        w = model.codebook.weight.detach()
        assert not torch.equal(w, before)
        torch.testing.assert_close(w.norm(dim=1), torch.ones(16), atol=1e-6, rtol=0)
    opt.zero_grad()
    task.train_step(sample, model, crit, opt, update_num=3)
    opt.step()  # no renormalisation
    assert (model.codebook.weight.norm(dim=1) - 1).abs().max() > 1e-3
    model.set_num_updates(4)
    torch.testing.assert_close(model.codebook.weight.norm(dim=1), torch.ones(16), atol=1e-6, rtol=0)

    class FP16Like:
        fp32_params = []

    with pytest.raises(MtsslError, match="common.amp=true"):
        task.optimizer_step(FP16Like(), model, update_num=5)


def test_trainable_layers_beyond_the_upstream_are_refused():
    from fairseq_mtssl.models.score import TrainableSetError

    with pytest.raises(TrainableSetError, match="trainable_layers=4 but the upstream has 3 layers"):
        _spin_model(trainable_layers=4)
