"""SUPERB-style downstream: frozen upstream, weighted layer sum, CTC decoding and error rates, training."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import PACKAGE_DIR, REPO, run_cli


def levenshtein(a, b) -> int:
    """Textbook dynamic programme, the reference for editdistance."""
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


def test_ctc_greedy_and_error_rates_against_references():
    from fairseq_mtssl.evaluation.superb_eval import ctc_greedy, error_rate, letters_to_words

    blank = 0
    path = [0, 3, 3, 0, 3, 5, 5, 5, 0, 0, 2, 2]  # -> 3 3 5 2 (a blank separates the repeated 3)
    lprobs = torch.log_softmax(torch.nn.functional.one_hot(torch.tensor(path), 6).float() * 5, -1)
    assert ctc_greedy(lprobs, blank) == [3, 3, 5, 2]
    rng = np.random.default_rng(0)
    hyps = [list(rng.integers(0, 5, rng.integers(0, 9))) for _ in range(20)]
    refs = [list(rng.integers(0, 5, rng.integers(1, 9))) for _ in range(20)]
    expected = 100 * sum(levenshtein(h, r) for h, r in zip(hyps, refs)) / sum(len(r) for r in refs)
    assert error_rate(hyps, refs) == pytest.approx(expected)
    assert letters_to_words(list("the|cat|")) == ["the", "cat"]


@pytest.fixture(scope="module")
def pr_task(manifest_dir):
    return _task(manifest_dir, normalize=True)


def _task(data, normalize):
    from fairseq_mtssl.tasks.superb_downstream import SuperbDownstreamTask, SuperbDownstreamTaskConfig

    cfg = SuperbDownstreamTaskConfig(data=str(data), labels="phn", normalize=normalize, tpu=False, seed=1)
    return SuperbDownstreamTask.setup_task(cfg)


def _model(task, checkpoint, **kw):
    from fairseq_mtssl.models.superb import SuperbDownstreamConfig, SuperbDownstreamModel

    return SuperbDownstreamModel.build_model(SuperbDownstreamConfig(upstream_path=str(checkpoint), **kw), task)


@pytest.mark.parametrize("downstream", ["linear", "bilstm"])
def test_upstream_gets_no_gradient_and_stays_in_eval(pr_task, tiny_hubert_checkpoint, downstream):
    model = _model(pr_task, tiny_hubert_checkpoint, downstream=downstream, lstm_dim=16).train()
    assert not model.upstream.training
    source = torch.randn(2, 16000)
    padding = torch.zeros(2, 16000, dtype=torch.bool)
    padding[1, 12000:] = True
    out = model(source, padding)
    out["encoder_out"].float().logsumexp(-1).sum().backward()
    assert all(p.grad is None for p in model.upstream.parameters())
    assert model.featurizer.weights.grad is not None and model.featurizer.weights.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.head.parameters())


def test_one_hot_layer_weights_give_that_layer(pr_task, tiny_hubert_checkpoint, manifest_dir):
    from fairseq_mtssl.data.manifest import read_manifest
    from fairseq_mtssl.upstream.readers import layer_reader

    model = _model(pr_task, tiny_hubert_checkpoint).eval()
    wav, _ = sf.read(read_manifest(manifest_dir / "valid.tsv").audio_path(0), dtype="float32")
    source = torch.nn.functional.layer_norm(torch.from_numpy(wav), (len(wav),))[None]  # the task normalises
    states, _ = model.upstream_states(source, None)
    for layer in (1, 2):
        with torch.no_grad():
            model.featurizer.weights.copy_(torch.full((3,), -1e4))
            model.featurizer.weights[layer] = 0.0
            mixed = model.featurizer(states)[0].numpy()
        expected = layer_reader(str(tiny_hubert_checkpoint), layer)([wav])[0]
        np.testing.assert_allclose(mixed, expected, atol=1e-5)


def test_normalisation_mismatch_and_bad_transcripts_are_named(manifest_dir, tiny_hubert_checkpoint, tmp_path):
    import shutil

    from fairseq_mtssl.tasks.superb_downstream import TranscriptError

    task = _task(manifest_dir, normalize=False)
    with pytest.raises(ValueError, match="task.normalize=True"):
        _model(task, tiny_hubert_checkpoint)
    data = tmp_path / "data"
    shutil.copytree(manifest_dir, data)
    task = _task(data, normalize=True)
    lines = (data / "valid.phn").read_text().splitlines()
    (data / "valid.phn").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(TranscriptError, match=f"valid.phn: {len(lines) - 1} lines"):
        task.load_dataset("valid")
    lines[2] = lines[2] + " qq"
    (data / "valid.phn").write_text("\n".join(lines) + "\n")
    with pytest.raises(TranscriptError, match=r"valid.phn:3: symbols not in the dictionary: \['qq'\]"):
        task.load_dataset("valid")


@pytest.mark.parametrize("config,metric", [("pr_tiny_cpu", "per"), ("asr_tiny_cpu", "wer")])
@pytest.mark.slow
def test_downstream_trains_with_fairseq_hydra_train_and_evaluates(
    config, metric, manifest_dir, tiny_hubert_checkpoint, tmp_path
):
    run = tmp_path / config
    out = run_cli(
        "fairseq-hydra-train",
        "--config-dir",
        REPO / "fairseq_mtssl/config/superb",
        "--config-name",
        config,
        f"common.user_dir={PACKAGE_DIR}",
        f"task.data={manifest_dir}",
        f"model.upstream_path={tiny_hubert_checkpoint}",
        "optimization.max_update=40",
        "dataset.validate_interval_updates=40",
        f"hydra.run.dir={run}",
    )
    assert "layer_w0" in out.stdout + out.stderr
    run_cli(
        "mtssl-superb-eval",
        run / "checkpoints" / "checkpoint_last.pt",
        "--split",
        "test",
        "--json",
        tmp_path / "r.json",
    )
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["utterances"] == 10 and metric in result and result[metric] >= 0
    assert len(result["layer_weights"]) == 3 and abs(sum(result["layer_weights"]) - 1) < 1e-3
    # the frozen upstream in the checkpoint is the upstream we started from
    state = torch.load(run / "checkpoints" / "checkpoint_last.pt")["model"]
    start = torch.load(tiny_hubert_checkpoint)["model"]
    assert all(torch.equal(state[f"upstream.{k}"], v) for k, v in start.items() if f"upstream.{k}" in state)
    assert sum(f"upstream.{k}" in state for k in start) > 20
