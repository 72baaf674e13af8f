"""SPIN fine-tuning: reproducible speaker-perturbed pairs, pitch ranges required, the paper recipe, training steps."""

import re

import numpy as np
import pytest
import torch
from builders import initial_checkpoint, spin_task, training_config
from conftest import PACKAGE_DIR, REPO, run_cli
from omegaconf import OmegaConf

from fairseq_mtssl.data import speaker_perturb

CONFIG_DIR = REPO / "fairseq_mtssl/config/spin"
needs_praat = pytest.mark.skipif(not speaker_perturb.praat_available(), reason="praat-parselmouth is not installed")


@pytest.fixture(scope="module")
def fresh_hubert(spin_data, tmp_path_factory):
    """A freshly initialised tiny HuBERT (hubert_tiny_cpu) saved as fairseq-hydra-train saves one."""
    overrides = [
        f"task.data={spin_data}",
        f"task.label_dir={spin_data / 'labels'}",
        'task.labels=["km"]',
        "model.label_rate=100",
    ]
    path = tmp_path_factory.mktemp("hubert") / "hubert_tiny.pt"
    return initial_checkpoint(REPO / "fairseq_mtssl/config/hubert/pretrain/hubert_tiny_cpu.yaml", overrides, path)


@needs_praat
def test_perturbation_keeps_the_length_and_is_reproducible_from_seed_epoch_index(spin_data):
    from fairseq_mtssl.tasks.spin_finetuning import SpeakerPerturbedPairDataset, SpinFinetuningConfig

    def dataset(seed=1, epoch=1):
        cfg = SpinFinetuningConfig(data=str(spin_data), seed=seed, max_sample_size=40000, min_sample_size=8000)
        ds = SpeakerPerturbedPairDataset(str(spin_data / "train.tsv"), cfg)
        ds.set_epoch(epoch)
        return ds

    assert not dataset().can_reuse_epoch_itr_across_epochs  # each epoch reaches fresh DataLoader workers
    first = dataset()
    assert first.speakers == ["spkA", "spkB", "spkC"] * 2
    for index in range(len(first)):
        orig, pert, how = first.make_pair(index)
        n = min(first.manifest.entries[first.keep[index]].num_samples, 40000)
        assert len(orig) == len(pert) == n and pert.dtype == np.float32 and np.abs(pert).max() <= 1.0
        assert how["praat"] and not np.allclose(orig, pert, atol=1e-3)
        for ratio, top in (("formant_ratio", 1.4), ("pitch_ratio", 2.0), ("range_ratio", 1.5)):
            assert 1 / top <= how[ratio] <= top
        again_orig, again, again_how = dataset().make_pair(index)  # a fresh dataset: same (seed, epoch, index)
        assert np.array_equal(again, pert) and np.array_equal(again_orig, orig) and again_how == how
        assert not np.allclose(dataset(epoch=2).make_pair(index)[1], pert, atol=1e-4)
        assert not np.allclose(dataset(seed=2).make_pair(index)[1], pert, atol=1e-4)
    long = first.make_pair(5)[0]  # 52000 samples cropped at a start drawn from (seed, epoch, index)
    assert len(long) == 40000 and not np.array_equal(dataset(epoch=2).make_pair(5)[0], long)
    item = first[0]
    batch = first.collater([item, first[1]])
    assert set(batch["net_input"]) == {"source", "perturbed"} and batch["nsentences"] == 2
    assert [len(s) for s in batch["net_input"]["source"]] == [len(s) for s in batch["net_input"]["perturbed"]]


@needs_praat
def test_a_speaker_without_pitch_range_is_refused(spin_data, tmp_path):
    from fairseq_mtssl.tasks.spin_finetuning import SpeakerPerturbedPairDataset

    (tmp_path / "r.tsv").write_text("spkA\t70\t300\nspkB\t100\t400\n")
    task = spin_task(spin_data, speaker_info=str(tmp_path / "r.tsv"))
    with pytest.raises(speaker_perturb.SpeakerInfoError, match="no pitch range for 1 speaker.*spkC"):
        SpeakerPerturbedPairDataset(str(spin_data / "train.tsv"), task.cfg)


# ---------------------------------------------------------------------------------------------------
# Configs and training


def test_paper_config_is_the_authors_recipe():
    cfg = OmegaConf.load(CONFIG_DIR / "spin_base_librispeech.yaml")
    assert cfg.model._name == "spin" and cfg.model.trainable_layers == 2
    assert cfg.model.proj_dim == 256 and cfg.model.num_clusters == 256 and cfg.model.layerdrop == 0
    assert cfg.criterion._name == "spin" and cfg.criterion.epsilon == 0.02
    assert cfg.criterion.sinkhorn_iters == 3 and cfg.criterion.temperature == 0.1
    assert cfg.optimizer._name == "adam" and float(cfg.optimizer.weight_decay) == 1e-6
    assert eval(cfg.optimizer.adam_betas) == (0.9, 0.999) and float(cfg.optimizer.adam_eps) == 1e-8
    assert list(cfg.optimization.lr) == [1e-4] and cfg.optimization.clip_norm == 10.0
    assert cfg.optimization.max_update == 5000 and list(cfg.optimization.update_freq) == [1]
    sched = cfg.lr_scheduler
    assert sched._name == "polynomial_decay" and sched.warmup_updates == 2500 and sched.power == 1.0
    assert sched.total_num_update == 5000 and float(sched.end_learning_rate) == 1e-6
    assert cfg.dataset.max_tokens == 256 * 16000 and cfg.dataset.required_batch_size_multiple == 1
    assert cfg.task._name == "spin_finetuning" and cfg.task.max_sample_size == 272000
    assert cfg.task.min_sample_size == 40000 and cfg.task.normalize is False and cfg.task.eq_gain_db == 12
    assert cfg.common.amp is True and cfg.common.fp16 is False  # Lightning precision 16 = autocast


def _one_step(spin_data, fresh_hubert, *extra):
    from fairseq import tasks, utils

    cfg = training_config(
        CONFIG_DIR / "spin_tiny_cpu.yaml", [f"task.data={spin_data}", f"model.upstream_path={fresh_hubert}", *extra]
    )
    utils.set_torch_seed(1)
    task = tasks.setup_task(cfg.task)
    model, criterion = task.build_model(cfg.model), task.build_criterion(cfg.criterion)
    task.load_dataset("train", combine=False, epoch=1)
    itr = task.get_batch_iterator(
        dataset=task.dataset("train"), max_tokens=cfg.dataset.max_tokens, max_sentences=cfg.dataset.batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True, required_batch_size_multiple=cfg.dataset.required_batch_size_multiple, seed=1, epoch=1,
    ).next_epoch_itr(shuffle=True)  # fmt: skip
    sample = next(iter(itr))

    class Backward:
        def backward(self, loss):
            loss.backward()

    loss, sample_size, log = task.train_step(sample, model, criterion, Backward(), update_num=1)
    return model, sample, loss, sample_size, log


@needs_praat
def test_one_training_step_gives_every_trainable_parameter_a_gradient(spin_data, fresh_hubert):
    """As fairseq's trainer: the tiny config composed, the task's dataset and batches, one train_step. Every
    parameter with requires_grad (the top 2 layers, the head, the codebook) gets a finite, non-zero gradient
    (what c10d DDP needs); nothing else trains."""
    model, sample, loss, sample_size, log = _one_step(spin_data, fresh_hubert)
    assert torch.isfinite(loss) and sample_size == 1 and log["ntokens"] > 0 and len(sample["net_input"]["source"]) >= 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in model.named_parameters() if n.startswith(("student.encoder.layers.", "head.", "codebook."))
    }
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


@pytest.mark.slow
@needs_praat
def test_spin_tiny_cpu_trains_through_fairseq_hydra_train(spin_data, fresh_hubert, tmp_path):
    """4 updates of spin_tiny_cpu (top layer only): finite losses; in the checkpoint the codebook rows have
    unit norm, the top layer, head and codebook changed, and everything below stayed as the upstream."""
    run = tmp_path / "spin"
    out = run_cli(
        "fairseq-hydra-train", "--config-dir", CONFIG_DIR, "--config-name", "spin_tiny_cpu",
        f"common.user_dir={PACKAGE_DIR}", f"task.data={spin_data}", f"model.upstream_path={fresh_hubert}",
        "model.trainable_layers=1", "optimization.max_update=4", "common.log_interval=1", f"hydra.run.dir={run}",
    )  # fmt: skip
    losses = [float(x) for x in re.findall(r"\[train_inner\].* loss=([-\d.]+),", out.stdout + out.stderr)]
    assert len(losses) >= 3 and all(np.isfinite(losses)), (out.stdout + out.stderr)[-3000:]
    tuned = torch.load(run / "checkpoints" / "checkpoint_last.pt")["model"]
    start = torch.load(fresh_hubert)["model"]
    torch.testing.assert_close(tuned["codebook.weight"].norm(dim=1), torch.ones(64), atol=1e-6, rtol=0)
    for k, v in start.items():
        if f"student.{k}" in tuned:
            assert torch.equal(tuned[f"student.{k}"], v) != k.startswith("encoder.layers.1."), k
