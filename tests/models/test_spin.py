"""SPIN: Sinkhorn-Knopp targets and swapped prediction against references written from SwAV, the unit-norm
codebook, the speaker perturbation, one training step and (slow) a few fairseq-hydra-train updates."""

import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from builders import initial_checkpoint, random_hubert, training_config
from conftest import PACKAGE_DIR, REPO, run_cli
from omegaconf import OmegaConf

from fairseq_mtssl.data import speaker_perturb
from fairseq_mtssl.losses.spin import sinkhorn, spin_loss, swapped_prediction_loss

SR = 16000
CONFIG_DIR = REPO / "fairseq_mtssl/config/spin"
needs_praat = pytest.mark.skipif(not speaker_perturb.praat_available(), reason="praat-parselmouth is not installed")


# ---------------------------------------------------------------------------------------------------
# References written from SwAV (Caron et al. 2020, Algorithm 1 / main_swav.py), in float64


def swav_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int, local_b=None) -> torch.Tensor:
    """SwAV's ``distributed_sinkhorn`` on one worker, in the exponential form: Q = exp(s / eps)^T, Q /= sum;
    per iteration rows /= K x row sums, columns /= B x column sums; Q x B. ``local_b`` (one entry per
    column): the B each column's worker divides by (SPIN's authors use the local batch size)."""
    q = torch.exp(scores.double() / epsilon).t()
    k, b = q.shape
    cols_b = torch.full((b,), float(b), dtype=torch.float64) if local_b is None else torch.as_tensor(local_b).double()
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / cols_b
    return (q * cols_b).t()


def swav_loss(s1, s2, q1, q2, t):
    """SwAV's swapped prediction: -1/2 [mean_n sum_k q1 log softmax(s2 / t) + mean_n sum_k q2 log softmax(s1 / t)]."""
    p1, p2 = torch.softmax(s1 / t, -1), torch.softmax(s2 / t, -1)
    return -0.5 * ((q1 * torch.log(p2)).sum(-1).mean() + (q2 * torch.log(p1)).sum(-1).mean())


def swav_loss_grads(s1, s2, q1, q2, t):
    """The closed form of the loss's gradient (targets constant, each target row summing to 1):
    d/ds1 = (softmax(s1 / t) - q2) / (2 N t), d/ds2 = (softmax(s2 / t) - q1) / (2 N t)."""
    n = len(s1)
    return (torch.softmax(s1 / t, -1) - q2) / (2 * n * t), (torch.softmax(s2 / t, -1) - q1) / (2 * n * t)


def cosine_scores(n: int, k: int, d: int = 16, seed: int = 0, dtype=torch.float64):
    """Scores as SPIN's have them: unit-norm frames against unit-norm prototypes."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=-1)
    return (z @ c.t()).to(dtype)


# ---------------------------------------------------------------------------------------------------
# Sinkhorn


@pytest.mark.parametrize("epsilon,iterations", [(0.02, 3), (0.05, 1), (0.5, 10)])
def test_sinkhorn_equals_swav_and_has_its_marginals(epsilon, iterations):
    scores = cosine_scores(200, 32)
    ours = sinkhorn(scores.float(), epsilon, iterations)
    ref = swav_sinkhorn(scores.float(), epsilon, iterations)
    assert ours.dtype == torch.float32 and ours.shape == (200, 32) and not ours.requires_grad
    torch.testing.assert_close(ours.double(), ref, atol=1e-7, rtol=1e-4)
    # every frame's targets sum to 1 (the last normalisation); before it, each prototype row held exactly
    # 1/K of the mass, so the prototype sums are B/K up to what the last column step moved
    torch.testing.assert_close(ours.sum(1), torch.ones(200), atol=1e-5, rtol=0)
    q = torch.exp(scores / epsilon).t()
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(1, keepdim=True) / 32
        rows_before_last_column_step = q.sum(1)
        q = q / q.sum(0, keepdim=True) / 200
    torch.testing.assert_close(rows_before_last_column_step, torch.full((32,), 1 / 32, dtype=torch.float64))
    torch.testing.assert_close(q.sum(0), torch.full((200,), 1 / 200, dtype=torch.float64))


def test_sinkhorn_converges_to_both_marginals():
    """Many iterations: frames sum to 1 and every prototype holds B/K (the equipartition SwAV asks for)."""
    q = sinkhorn(cosine_scores(128, 16, seed=3).float(), epsilon=0.2, iterations=200)
    torch.testing.assert_close(q.sum(1), torch.ones(128), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.sum(0), torch.full((16,), 128 / 16), atol=1e-3, rtol=0)


def test_sinkhorn_on_half_inputs_is_finite_and_equals_float64():
    scores = cosine_scores(400, 256, seed=1, dtype=torch.float16)
    assert torch.isinf(torch.exp(scores[:5] / 0.02)).any()  # why it must not run in half precision
    q = sinkhorn(scores, 0.02, 3)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), swav_sinkhorn(scores.double(), 0.02, 3), atol=1e-6, rtol=1e-4)
    # a prototype far from every frame: the exponential form's row underflows to 0 in float32 (0/0 = NaN)
    far = scores.float().clone()
    far[:, 0] = -1.0
    far[:, 1:] = far[:, 1:].clamp(min=0.9)
    naive = torch.exp(far / 0.02).t()
    naive = naive / naive.sum()
    assert (naive[0] == 0).all()
    q = sinkhorn(far.half(), 0.02, 3)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), swav_sinkhorn(far.half().double(), 0.02, 3), atol=1e-6, rtol=1e-4)


_DIST_WORKER = textwrap.dedent(
    """
    import importlib.util, sys, torch, torch.distributed as dist
    rank, rdv, inp, out, module = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    spec = importlib.util.spec_from_file_location("spin_loss", module)  # the file alone: no fairseq import
    spin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spin)
    sinkhorn = spin.sinkhorn
    dist.init_process_group("gloo", init_method="file://" + rdv, rank=rank, world_size=2)
    torch.save(sinkhorn(torch.load(inp)[rank], 0.02, 3), out)
    dist.destroy_process_group()
    """
)


def test_sinkhorn_across_two_workers_all_reduces_the_sums(tmp_path):
    """Two gloo workers with 70 and 50 frames: the result is the one-worker algorithm on all 120 frames with
    the prototype sums taken over both and each column divided by its own worker's B (the authors')."""
    scores = cosine_scores(120, 24, seed=5).float()
    parts = [scores[:70], scores[70:]]
    torch.save(parts, tmp_path / "in.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [str(tmp_path / "rdv"), str(tmp_path / "in.pt")]
    module = str(PACKAGE_DIR / "losses/spin.py")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DIST_WORKER, str(r), *args, str(tmp_path / f"{r}.pt"), module],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(2)
    ]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    got = torch.cat([torch.load(tmp_path / f"{r}.pt") for r in range(2)])
    ref = swav_sinkhorn(scores, 0.02, 3, local_b=[70.0] * 70 + [50.0] * 50)
    torch.testing.assert_close(got.double(), ref, atol=1e-7, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Swapped prediction


def test_swapped_prediction_loss_and_gradients_match_swav():
    t = 0.1
    s1 = cosine_scores(60, 20, seed=7).requires_grad_()
    s2 = cosine_scores(60, 20, seed=8).requires_grad_()
    loss, stats = spin_loss(s1, s2, epsilon=0.05, iterations=3, temperature=t)
    q1, q2 = swav_sinkhorn(s1.detach(), 0.05, 3), swav_sinkhorn(s2.detach(), 0.05, 3)
    torch.testing.assert_close(loss, swav_loss(s1.detach(), s2.detach(), q1, q2, t), atol=1e-10, rtol=1e-9)
    g1, g2 = torch.autograd.grad(loss, [s1, s2])
    r1, r2 = swav_loss_grads(s1.detach(), s2.detach(), q1, q2, t)  # no gradient through the targets
    torch.testing.assert_close(g1, r1, atol=1e-12, rtol=1e-8)
    torch.testing.assert_close(g2, r2, atol=1e-12, rtol=1e-8)
    assert set(stats) == {"acc", "code_perplexity", "prob_perplexity"} and 0 <= stats["acc"] <= 1
    assert 1 <= stats["code_perplexity"] <= 20 and 1 <= stats["prob_perplexity"] <= 20


def test_swapped_prediction_gradcheck_in_float64():
    """With the targets fixed (they carry no gradient), the loss through L2-normalised frames and codebook."""
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(12, 6, dtype=torch.float64, generator=g, requires_grad=True)
    z2 = torch.randn(12, 6, dtype=torch.float64, generator=g, requires_grad=True)
    c = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    with torch.no_grad():
        q1 = sinkhorn(F.normalize(z1, dim=-1) @ c.t(), 0.05, 3)
        q2 = sinkhorn(F.normalize(z2, dim=-1) @ c.t(), 0.05, 3)
    assert q1.dtype == torch.float64

    def f(z1, z2, c):
        return swapped_prediction_loss(F.normalize(z1, dim=-1) @ c.t(), F.normalize(z2, dim=-1) @ c.t(), q1, q2, 0.1)

    assert torch.autograd.gradcheck(f, (z1, z2, c))
    assert torch.autograd.gradgradcheck(f, (z1, z2, c))


# ---------------------------------------------------------------------------------------------------
# A tiny corpus of voiced, speech-like audio and a fresh tiny HuBERT


def voiced(n: int, f0: float, seed: int = 0) -> np.ndarray:
    """A harmonic tone at ``f0`` with vibrato, syllable-rate amplitude and a little noise, peak 0.5."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / SR
    x = sum(np.sin(h * phase) / h for h in range(1, int(6000 // f0)))
    x *= 0.35 + 0.65 * (0.5 - 0.5 * np.cos(2 * np.pi * 4 * t))
    x = 0.5 * x / np.abs(x).max() + 1e-3 * rng.standard_normal(n)
    return x.astype(np.float32)


SPEAKERS = {"spkA": 110.0, "spkB": 180.0, "spkC": 240.0}


@pytest.fixture(scope="module")
def spin_data(tmp_path_factory):
    """train: 6 utterances of 3 speakers (one longer than the test crop), valid: 2; {split}.spk beside each."""
    root = tmp_path_factory.mktemp("spin_corpus")
    lengths = {"train": [20000, 26000, 30000, 23000, 34000, 52000], "valid": [21000, 25000]}
    for split, lens in lengths.items():
        rows, spks = [], []
        for i, n in enumerate(lens):
            spk = sorted(SPEAKERS)[i % 3]
            rel = f"wav/{split}/{spk}/{spk}-{split}-{i}.wav"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(root / rel, voiced(n, SPEAKERS[spk], seed=i), SR, subtype="PCM_16")
            rows.append(f"{rel}\t{n}")
            spks.append(spk)
        (root / f"{split}.tsv").write_text(f"{root}\n" + "\n".join(rows) + "\n")
        (root / f"{split}.spk").write_text("\n".join(spks) + "\n")
    labels = root / "labels"
    labels.mkdir()
    (labels / "dict.km.txt").write_text("".join(f"{i} 1\n" for i in range(20)))
    return root


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


def _task(data: Path, **overrides):
    from fairseq_mtssl.tasks.spin_finetuning import SpinFinetuningConfig, SpinFinetuningTask

    cfg = SpinFinetuningConfig(data=str(data), seed=1, max_sample_size=40000, min_sample_size=8000, **overrides)
    return SpinFinetuningTask(cfg)


# ---------------------------------------------------------------------------------------------------
# Model


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

    model, task = _spin_model().train(), _task(spin_data)
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


# ---------------------------------------------------------------------------------------------------
# Speaker perturbation


def _median_f0(x: np.ndarray) -> float:
    parselmouth = speaker_perturb.require_parselmouth()
    f0 = parselmouth.Sound(x.astype(np.float64), sampling_frequency=SR).to_pitch_ac(pitch_floor=75, pitch_ceiling=600)
    f = f0.selected_array["frequency"]
    return float(np.median(f[f > 0]))


@needs_praat
def test_change_gender_moves_the_pitch_median_and_keeps_the_length():
    x = voiced(24000, 150.0)
    y = speaker_perturb.change_gender(x, SR, 75, 600, formant_ratio=1.2, pitch_ratio=1.5, range_ratio=1.0)
    assert len(y) == len(x)
    assert abs(_median_f0(y) / _median_f0(x) - 1.5) < 0.05


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
def test_a_praat_failure_leaves_the_clean_copy_equalised():
    x = (1e-4 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)  # nothing voiced
    out, how = speaker_perturb.perturb_speaker(x, SR, np.random.default_rng(7))
    assert not how["praat"] and len(out) == len(x)
    rng = np.random.default_rng(7)
    for _ in range(6):  # the three ratios and their coins, drawn before Praat runs, then Praat's seed
        rng.random()
    rng.integers(speaker_perturb.PRAAT_SEEDS)
    np.testing.assert_allclose(out, np.clip(speaker_perturb.random_eq(x, SR, rng), -1, 1).astype(np.float32), atol=1e-7)


def test_equaliser_filters_are_the_cookbooks():
    """Peaking: the gain at its centre; low shelf: the gain at DC; high shelf: at Nyquist; 0 dB: identity."""
    from scipy.signal import sosfreqz

    for g in (-12.0, -3.0, 6.0, 12.0):
        _, h = sosfreqz(speaker_perturb.peaking(g, 1000.0, 3.0, SR)[None], worN=[1000.0], fs=SR)
        assert abs(20 * np.log10(abs(h[0])) - g) < 1e-6
        _, h = sosfreqz(speaker_perturb.low_shelf(g, 200.0, 2.0, SR)[None], worN=[0.0], fs=SR)
        assert abs(20 * np.log10(abs(h[0])) - g) < 1e-6
        _, h = sosfreqz(speaker_perturb.high_shelf(g, 5000.0, 2.0, SR)[None], worN=[SR / 2], fs=SR)
        assert abs(20 * np.log10(abs(h[0])) - g) < 1e-6
    fc = speaker_perturb.eq_frequencies()
    assert len(fc) == 10 and abs(fc[0] - 60) < 1e-9 and abs(fc[-1] - 7600) < 1e-6
    flat = speaker_perturb.eq_sections(np.zeros(10), fc, np.full(10, 3.0), SR)
    x = np.random.default_rng(0).standard_normal(4000)
    from scipy.signal import sosfilt

    np.testing.assert_allclose(sosfilt(flat, x), x, atol=1e-9)
    q, gains = speaker_perturb.draw_eq(np.random.default_rng(0))
    assert q.min() >= 2 and q.max() <= 5 and np.abs(gains).max() <= 12


def test_missing_praat_is_one_clear_error(monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "parselmouth", None)  # not installed
    with pytest.raises(speaker_perturb.PraatUnavailable, match=r"pip install praat-parselmouth \(the PyPI name"):
        speaker_perturb.perturb_speaker(np.zeros(16000, np.float32), SR, np.random.default_rng(0))
    monkeypatch.setitem(sys.modules, "parselmouth", types.ModuleType("parselmouth"))  # the unrelated package
    with pytest.raises(speaker_perturb.PraatUnavailable, match="unrelated module"):
        speaker_perturb.require_parselmouth()
    assert not speaker_perturb.praat_available()
    out = speaker_perturb.random_eq(np.ones(100), SR, np.random.default_rng(0))  # the equaliser needs no Praat
    assert out.shape == (100,)


def test_speaker_pitch_ranges_from_a_tsv_or_the_authors_pickle(tmp_path):
    tsv = tmp_path / "ranges.tsv"
    tsv.write_text("speaker\tfloor\tceiling\nspkA\t70\t300\nspkB\t120\t500\n")
    assert speaker_perturb.read_speaker_pitch_ranges(tsv) == {"spkA": (70.0, 300.0), "spkB": (120.0, 500.0)}
    authors = {"train": {"19": ("F", (50, 450, 200)), "1447": ("M", (75, 300, 120)), "26": ("M", (np.float64(70.0), 250.0, 1))},
               "valid": {}}  # fmt: skip
    (tmp_path / "spk2info.dict").write_bytes(pickle.dumps(authors))
    table = speaker_perturb.read_speaker_pitch_ranges(tmp_path / "spk2info.dict", "train")
    assert table == {"19": (75.0, 450.0), "1447": (60.0, 400.0), "26": (70.0, 250.0)}  # the authors' corrections
    (tmp_path / "evil.dict").write_bytes(pickle.dumps({"train": {"1": (os.system, (1, 2, 3))}}))
    with pytest.raises(speaker_perturb.SpeakerInfoError, match="refusing to load"):
        speaker_perturb.read_speaker_pitch_ranges(tmp_path / "evil.dict")
    tsv.write_text("spkA\t70\n")
    with pytest.raises(speaker_perturb.SpeakerInfoError, match="ranges.tsv:1: expected"):
        speaker_perturb.read_speaker_pitch_ranges(tsv)


@needs_praat
def test_a_speaker_without_pitch_range_is_refused(spin_data, tmp_path):
    from fairseq_mtssl.tasks.spin_finetuning import SpeakerPerturbedPairDataset

    (tmp_path / "r.tsv").write_text("spkA\t70\t300\nspkB\t100\t400\n")
    task = _task(spin_data, speaker_info=str(tmp_path / "r.tsv"))
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
