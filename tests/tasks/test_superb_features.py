"""The SUPERB task from a feature cache (``task.features``): the same batches, targets, outputs and gradients
as from the audio, and a cache that does not belong to the run refused in one line."""

import shutil

import pytest
import torch
from builders import random_hubert_checkpoint
from omegaconf import OmegaConf

from fairseq_mtssl.upstream.features import FeatureCacheError, cache_splits

IDS = [0, 3, 5, 6]  # utterances of different lengths: the batch is padded


def _task(data, normalize: bool, **kw):
    from fairseq_mtssl.tasks.superb_downstream import SuperbDownstreamTask, SuperbDownstreamTaskConfig

    cfg = SuperbDownstreamTaskConfig(data=str(data), labels="phn", normalize=normalize, tpu=False, seed=1, **kw)
    return SuperbDownstreamTask.setup_task(OmegaConf.structured(cfg))


def _model(task, upstream, **kw):
    from fairseq_mtssl.models.superb import SuperbDownstreamConfig, SuperbDownstreamModel

    torch.manual_seed(0)
    return SuperbDownstreamModel.build_model(SuperbDownstreamConfig(upstream_path=str(upstream), **kw), task)


def _batch(task, ids, split="train"):
    if split not in task.datasets:
        task.load_dataset(split)
    ds = task.dataset(split)
    return ds.collater([ds[i] for i in ids])


@pytest.fixture(scope="module")
def hubert(tmp_path_factory):
    """A random HuBERT with a layer-normed front end (padding changes no frame) on normalised audio."""
    path = tmp_path_factory.mktemp("hubert") / "hubert.pt"
    random_hubert_checkpoint(path, "layer_norm", layer_norm_first=False, normalize=True)
    return path


def _log_probs_and_grad(model, batch):
    """``(log-probabilities (B, T, V) zeroed on padding, the layer weights' gradient of their sum)``."""
    model.zero_grad()
    out = model(**batch["net_input"])
    lprobs = model.get_normalized_probs(out, log_probs=True).transpose(0, 1)
    if out["padding_mask"] is not None:
        lprobs = lprobs.masked_fill(out["padding_mask"][..., None], 0.0)
    lprobs.sum().backward()
    return lprobs.detach(), model.featurizer.weights.grad.clone()


@pytest.mark.parametrize("upstream", ["hubert", "mfcc"])
@pytest.mark.parametrize("downstream", ["linear", "bilstm"])
def test_the_cache_gives_each_utterance_the_upstreams_forward_of_it_alone(
    upstream, downstream, hubert, manifest_dir, tmp_path
):
    """From the cache, an utterance gets what the audio path gives it alone (no padding: what s3prl evaluates
    on), in a padded batch too. (In a padded batch from audio, fairseq's frame mask counts a frame that
    is partly padding as speech, so there the states differ a little: the cache's are the exact ones.)"""
    source, normalize = (hubert, True) if upstream == "hubert" else ("mfcc", False)
    result = cache_splits(str(source), manifest_dir, tmp_path / "features", splits=["train"])
    if upstream == "hubert":
        assert result["forwards"] == result["splits"]["train"]["utterances"]  # one forward per utterance
    audio = _task(manifest_dir, normalize)
    cached = _task(manifest_dir, normalize, features=str(tmp_path / "features"))
    model = _model(cached, source, downstream=downstream, lstm_dim=16).eval()  # no SpecAugment, no dropout
    padded = _batch(cached, IDS)
    assert padded["net_input"]["padding_mask"].any() and "source" not in padded["net_input"]
    assert torch.equal(padded["target"], _batch(audio, IDS)["target"])
    in_batch, _ = _log_probs_and_grad(model, padded)
    grads = {"audio": 0, "cache": 0}
    for j, i in enumerate(IDS):
        alone = {}
        for name, task in (("audio", audio), ("cache", cached)):
            alone[name], grad = _log_probs_and_grad(model, _batch(task, [i]))
            grads[name] = grads[name] + grad
        torch.testing.assert_close(alone["cache"], alone["audio"], atol=1e-4, rtol=1e-4)
        frames = alone["cache"].size(1)
        torch.testing.assert_close(in_batch[j, :frames], alone["cache"][0], atol=1e-4, rtol=1e-4)
        assert not in_batch[j, frames:].any()
    torch.testing.assert_close(grads["cache"], grads["audio"], atol=1e-3, rtol=1e-3)
    if upstream == "hubert":  # MFCC has one state: its softmax weight gets no gradient
        assert grads["cache"].abs().sum() > 0


def test_a_cache_that_is_not_the_runs_is_refused_in_one_line(hubert, manifest_dir, tmp_path):
    features = tmp_path / "features"
    cache_splits(str(hubert), manifest_dir, features, splits=["train", "valid"])
    task = _task(manifest_dir, True, features=str(features))
    other = tmp_path / "other.pt"
    shutil.copy(hubert, other)
    with pytest.raises(FeatureCacheError, match=r"meta.json: layers \[0, 1, 2, 3\] of .*hubert.pt; the downstream"):
        _model(task, other)  # the hidden states of another upstream
    (features / "valid").rename(features / "test")  # the valid split's features where the test split's should be
    with pytest.raises(FeatureCacheError, match=r"test/meta.json: features of .*valid.tsv, not of .*test.tsv"):
        task.load_dataset("test")
    with pytest.raises(FeatureCacheError, match=r"features/valid: no feature cache here"):
        task.load_dataset("valid")
    cropping = _task(manifest_dir, True, features=str(features), max_sample_size=16000)
    with pytest.raises(FeatureCacheError, match="task.max_sample_size .16000. would crop the audio"):
        cropping.load_dataset("train")
