"""The SUPERB downstream as s3prl 0.4.18 runs it (docs/results.md): heads, SpecAugment, decoding, configs, CTC loss."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import random_hubert_checkpoint
from conftest import PACKAGE_DIR


def _s3prl_module(name: str, monkeypatch):
    """``s3prl/downstream/<name>.py`` loaded from the installed s3prl under a private name. ``torchaudio`` and
    ``pandas``, imported at module level by some of these files for data loading they do not need here, are
    stand-ins while it loads (neither is installed)."""
    import importlib.util
    import types

    import s3prl

    for missing in ("torchaudio", "pandas"):
        monkeypatch.setitem(sys.modules, missing, types.ModuleType(missing))
    spec = importlib.util.spec_from_file_location(
        f"_s3prl_{name.replace('/', '_')}", Path(s3prl.__file__).parent / "downstream" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def group_norm_upstream(tmp_path_factory):
    """A randomly initialised fairseq HuBERT with a group-normalised front end (HuBERT Base's
    ``extractor_mode: default``), ``normalize: false``, 3 layers of 96."""
    path = tmp_path_factory.mktemp("gn") / "hubert.pt"
    random_hubert_checkpoint(path, "default", False)
    return path


def _gn_model(manifest_dir, upstream_path, **kw):
    from omegaconf import OmegaConf

    from fairseq_mtssl.models.superb import SuperbDownstreamConfig, SuperbDownstreamModel
    from fairseq_mtssl.tasks.superb_downstream import SuperbDownstreamTask, SuperbDownstreamTaskConfig

    task_cfg = SuperbDownstreamTaskConfig(data=str(manifest_dir), labels="phn", normalize=False, tpu=False, seed=1)
    task = SuperbDownstreamTask.setup_task(OmegaConf.structured(task_cfg))  # as fairseq hands it over
    cfg = SuperbDownstreamConfig(upstream_path=str(upstream_path), **kw)
    return SuperbDownstreamModel.build_model(cfg, task), task


def test_heads_have_s3prls_structure_and_defaults(manifest_dir, group_norm_upstream):
    """PR: ``Linear(D, 256)`` then ``Linear(256, V)``, nothing between (ctc/libriphone.yaml project_dim 256,
    FrameLevel without hiddens); ASR: ``Linear(D, 1024)``, 2 x BiLSTM 1024, dropout 0.2, ``Linear(2048, V)``."""
    import torch.nn as nn

    pr, task = _gn_model(manifest_dir, group_norm_upstream)  # the model's defaults are s3prl's PR
    v = len(task.target_dictionary)
    assert pr.cfg.downstream == "linear"
    trainable = [(n, m) for n, m in pr.named_modules() if not n.startswith("upstream") and n]
    assert [(n, type(m).__name__) for n, m in trainable] == [
        ("featurizer", "WeightedLayerSum"),
        ("projector", "Linear"),
        ("head", "Linear"),
    ]
    assert (pr.projector.in_features, pr.projector.out_features) == (96, 256)
    assert (pr.head.in_features, pr.head.out_features) == (256, v)
    states = [torch.randn(2, 7, 96) for _ in range(4)]
    with torch.no_grad():
        x = pr.featurizer(states)
        p = pr.projector(x)
        assert torch.equal(pr.head(p), torch.nn.functional.linear(p, pr.head.weight, pr.head.bias))
        assert (x < 0).any() and (pr.projector(x) < 0).any()  # a ReLU would show as no negatives

    asr, _ = _gn_model(manifest_dir, group_norm_upstream, downstream="bilstm")
    assert (asr.projector.in_features, asr.projector.out_features) == (96, 1024)
    lstm = asr.lstm
    assert (lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bidirectional, lstm.dropout) == (
        1024, 1024, 2, True, 0.2,
    )  # fmt: skip
    assert isinstance(asr.head[0], nn.Dropout) and asr.head[0].p == 0.2
    assert (asr.head[1].in_features, asr.head[1].out_features) == (2048, v)
    c = asr.cfg
    assert (c.time_warp_window, c.freq_masks, c.freq_mask_width, c.time_masks, c.time_mask_width) == (5, 4, 50, 2, 40)


def test_heads_compute_what_s3prls_modules_compute(manifest_dir, group_norm_upstream, monkeypatch):
    """With s3prl's own ``FrameLevel`` / ``RNNs`` (downstream/model.py, downstream/asr/model.py) given the
    plugin's weights, the same features give the same logits (eval mode; smaller widths, same structure)."""
    frame_level = _s3prl_module("model", monkeypatch).FrameLevel
    rnns = _s3prl_module("asr/model", monkeypatch).RNNs
    features = torch.randn(3, 40, 96)
    lengths = torch.tensor([40, 33, 21])
    mask = torch.arange(40)[None] >= lengths[:, None]

    pr, task = _gn_model(manifest_dir, group_norm_upstream)
    v = len(task.target_dictionary)
    theirs = frame_level(256, v)  # ctc/libriphone.yaml: no FrameLevel block, so no hiddens
    theirs.linear.load_state_dict(pr.head.state_dict())
    with torch.no_grad():
        p = pr.projector(features)
        np.testing.assert_allclose(pr.head(p).numpy(), theirs(p, lengths)[0].numpy(), atol=1e-6)

    asr, _ = _gn_model(manifest_dir, group_norm_upstream, downstream="bilstm", project_dim=48, lstm_dim=32)
    asr.eval()
    theirs = rnns(
        48, v, 320, module="LSTM", bidirection=True, dim=[32, 32], dropout=[0.2, 0.2], layer_norm=[False, False],
        proj=[False, False], sample_rate=[1, 1], sample_style="concat", total_rate=-1,
    ).eval()  # fmt: skip
    ours = asr.lstm.state_dict()
    for i, layer in enumerate(theirs.rnns):
        layer.layer.load_state_dict({k: ours[k.replace("_l0", f"_l{i}")] for k in layer.layer.state_dict()})
    theirs.linear.load_state_dict(asr.head[1].state_dict())
    with torch.no_grad():
        x = asr.projector(features)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        h, _ = torch.nn.utils.rnn.pad_packed_sequence(asr.lstm(packed)[0], batch_first=True, total_length=40)
        mine = asr.head(h)
        their_logits, their_lengths = theirs(x, lengths)
    assert their_lengths.tolist() == lengths.tolist()
    for i, n in enumerate(lengths.tolist()):
        np.testing.assert_allclose(mine[i, :n].numpy(), their_logits[i, :n].numpy(), atol=1e-5)
    assert mask.any()


def test_spec_augment_is_s3prls(monkeypatch):
    """Same seed, same draws, same output as s3prl's ``SpecAug`` (downstream/specaug.py) with
    downstream/asr/config.yaml's ``specaug`` block, time warp included."""
    from fairseq_mtssl.models.superb import spec_augment

    spec_aug = _s3prl_module("specaug", monkeypatch).SpecAug(
        adaptive=False, adaptive_number_ratio=0.04, adaptive_size_ratio=0.04, max_n_time_masks=20,
        apply_time_warp=True, apply_time_mask=True, apply_freq_mask=True, time_warp_window=5,
        time_mask_width_range=[0, 40], freq_mask_width_range=[0, 50], num_freq_mask=4, num_time_mask=2,
    )  # fmt: skip
    lengths = torch.tensor([120, 97, 64, 9])  # the last too short to warp (n <= 2 x window)
    for seed in range(5):
        x = torch.randn(4, 120, 96, requires_grad=True)  # the weighted sum carries a gradient
        torch.manual_seed(seed)
        theirs, _ = spec_aug([x[i, :n] for i, n in enumerate(lengths.tolist())])
        torch.manual_seed(seed)
        mine = spec_augment(x, lengths, 5, 2, 40, 4, 50)
        for i, n in enumerate(lengths.tolist()):
            assert torch.equal(mine[i, :n], theirs[i])
        assert not torch.equal(mine[0], x[0])
    mine.sum().backward()
    assert x.grad is not None


def test_decoding_one_utterance_at_a_time_is_the_unpadded_forward(manifest_dir, group_norm_upstream):
    """mtssl-superb-eval's default (and the configs' ``batch_size_valid: 1``) decode each utterance alone,
    as s3prl does: for a group-normalised front end, which normalises over the padded input, that is
    the unpadded forward, and a padded batch is not."""
    import inspect

    from fairseq_mtssl.evaluation import superb_eval

    assert inspect.signature(superb_eval.evaluate).parameters["batch_size"].default == 1
    assert inspect.signature(superb_eval.evaluate_model).parameters["batch_size"].default == 1
    model, task = _gn_model(manifest_dir, group_norm_upstream)
    model.eval()
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    alone = {}
    with torch.no_grad():
        for i in range(len(dataset)):
            out = model(dataset[i]["source"][None], None)
            alone[i] = model.get_normalized_probs(out, log_probs=True)[:, 0]
    lengths = {i: len(dataset[i]["source"]) for i in alone}
    assert len(set(lengths.values())) > 1  # a padded batch pads something
    one = dict((i, lp) for i, lp, _ in superb_eval.utterance_log_probs(model, task, "valid", batch_size=1))
    assert sorted(one) == sorted(alone)
    for i in alone:
        assert torch.equal(one[i], alone[i]), i
    padded = dict((i, lp) for i, lp, _ in superb_eval.utterance_log_probs(model, task, "valid", batch_size=8))
    shortest = min(lengths, key=lengths.get)
    assert padded[shortest].shape == alone[shortest].shape
    assert float((padded[shortest] - alone[shortest]).abs().max()) > 1e-3  # the group norm saw the padding
    blank = task.target_dictionary.index(task.blank_symbol)
    result = superb_eval.evaluate_model(model, task, "valid")
    hyps = [superb_eval.ctc_greedy(alone[i], blank) for i in sorted(alone)]
    refs = [t for _, _, t in sorted(superb_eval.utterance_log_probs(model, task, "valid"), key=lambda u: u[0])]
    assert result["batch_size"] == 1 and result["per"] == round(superb_eval.error_rate(hyps, refs), 2)


@pytest.mark.parametrize("config", ["pr_base", "asr_base"])
def test_base_configs_follow_s3prl(config):
    """Batch sizes, validation batching, cadence, head and loss reduction of the base configs: s3prl's
    (the values and their s3prl sources are in each yaml's comments and docs/results.md)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(PACKAGE_DIR / "config" / "superb" / f"{config}.yaml")
    d, m, o = cfg.dataset, cfg.model, cfg.optimization
    assert d.batch_size_valid == 1 and cfg.criterion.ctc_reduction == "s3prl" and o.clip_norm == 1.0
    if config == "pr_base":
        assert (d.batch_size, d.max_tokens, d.required_batch_size_multiple) == (16, 4800000, 8)
        assert list(o.update_freq) == [2]
        assert (m.downstream, m.project_dim, list(o.lr), o.max_update, d.validate_interval_updates) == (
            "linear", 256, [0.01], 100000, 1000,
        )  # fmt: skip
    else:
        assert (d.batch_size, d.max_tokens, o.get("update_freq", [1])) == (16, None, [1])
        assert (m.downstream, m.project_dim, m.lstm_dim, m.lstm_layers, m.dropout) == ("bilstm", 1024, 1024, 2, 0.2)
        assert (m.time_warp_window, m.freq_masks, m.freq_mask_width) == (5, 4, 50)
        assert (m.time_masks, m.time_mask_width) == (2, 40)
        assert (list(o.lr), o.max_update, d.validate_interval_updates) == ([0.0001], 200000, 2000)


def test_pr_batches_halve_where_s3prl_halves():
    """pr_base's batch_size 16, max_tokens 4800000 and required_batch_size_multiple 8 give fairseq
    batches of 16 up to 300000 samples and 8 above: s3prl ctc/data.py's half_batch_size_wav_len=300000."""
    from fairseq.data.data_utils import batch_by_size

    sizes = np.array([150000] * 32 + [300000] * 32 + [300001] * 32 + [392000] * 32)
    batches = batch_by_size(
        np.argsort(sizes, kind="mergesort"), lambda i: sizes[i], max_tokens=4800000, max_sentences=16,
        required_batch_size_multiple=8,
    )  # fmt: skip
    assert {(int(sizes[b].max()), len(b)) for b in batches} == {(150000, 16), (300000, 16), (300001, 8), (392000, 8)}


@pytest.mark.parametrize("reduction", ["s3prl", "fairseq"])
def test_ctc_loss_reduction(manifest_dir, group_norm_upstream, reduction):
    """``ctc_reduction: s3prl`` optimises what s3prl's experts do, ``nn.CTCLoss``'s default ``reduction='mean'``
    (each utterance's loss over its target length, averaged over utterances), as loss / sample size;
    ``fairseq`` is fairseq's ctc criterion (summed loss over summed target length)."""
    from fairseq_mtssl.criterions.superb_ctc import SuperbCtcConfig, SuperbCtcCriterion

    model, task = _gn_model(manifest_dir, group_norm_upstream)
    model.eval()
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    sample = dataset.collater([dataset[i] for i in range(4)])
    cfg = SuperbCtcConfig(zero_infinity=True, sentence_avg=False, ctc_reduction=reduction)
    criterion = SuperbCtcCriterion(cfg, task)
    with torch.no_grad():
        loss, sample_size, log = criterion(model, sample)
        out = model(**sample["net_input"])
    lprobs = model.get_normalized_probs(out, log_probs=True)
    input_lengths = (~out["padding_mask"]).sum(1) if out["padding_mask"] is not None else None
    keep = (sample["target"] != task.target_dictionary.pad()) & (sample["target"] != task.target_dictionary.eos())
    targets = [t[k] for t, k in zip(sample["target"], keep)]
    blank = task.target_dictionary.index(task.blank_symbol)
    s3prl = torch.nn.CTCLoss(blank=blank, zero_infinity=True)(  # s3prl ctc/expert.py, asr/expert.py
        lprobs, torch.nn.utils.rnn.pad_sequence(targets, batch_first=True), input_lengths, keep.sum(1)
    )
    assert input_lengths is not None and len(set(input_lengths.tolist())) > 1
    if reduction == "s3prl":
        assert sample_size == 4 and float(loss / sample_size) == pytest.approx(float(s3prl), rel=1e-5)
    else:
        assert sample_size == int(keep.sum()) and float(loss / sample_size) != pytest.approx(float(s3prl), rel=1e-3)
    assert log["utt_loss"] / 4 == pytest.approx(float(s3prl), rel=1e-5)
    assert log["sample_size"] == int(keep.sum())  # the logged loss stays fairseq's
    assert "c_errors" in log and all(f"layer_w{i}" in log for i in range(4))


@pytest.mark.parametrize("downstream", ["linear", "bilstm"])
def test_a_checkpoint_from_before_the_projector_loads_as_trained(manifest_dir, group_norm_upstream, downstream):
    """Downstream checkpoints written when the head read the weighted sum directly (no projector) load into
    a model built with today's defaults: the projector goes, the head keeps the trained input width."""
    old, _ = _gn_model(manifest_dir, group_norm_upstream, downstream=downstream, project_dim=0, lstm_dim=8)
    new, _ = _gn_model(manifest_dir, group_norm_upstream, downstream=downstream, lstm_dim=8)
    assert "projector.weight" not in old.state_dict() and "projector.weight" in new.state_dict()
    new.load_state_dict(old.state_dict(), strict=True)
    x = torch.randn(1, 8000)
    with torch.no_grad():
        assert torch.equal(old.eval()(x)["encoder_out"], new.eval()(x)["encoder_out"])
    assert new.cfg.project_dim == 0
