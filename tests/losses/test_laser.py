"""LASER: its loss against a brute force written from the formulas, finite-difference gradients, half-precision
inputs, the authors' trainable set, one step's gradients (c10d), the paper config, and a few
fairseq-hydra-train updates from a tiny HuBERT (slow)."""

import importlib.util
import math
import re

import pytest
import torch
import torch.nn.functional as F
from builders import random_hubert
from conftest import PACKAGE_DIR, REPO, run_cli

BACKENDS = ["torch"] + (["numba"] if importlib.util.find_spec("numba") else [])


# ------------------------------------------------------------------ brute force, from the formulas alone
def _sq_dist(p, q):
    return sum((a - b) ** 2 for a, b in zip(p, q))


def _softmin(values, gamma):
    finite = [v for v in values if v != math.inf]
    lo = min(finite)
    return lo - gamma * math.log(sum(math.exp(-(v - lo) / gamma) for v in finite))


def _sdtw(x, y, gamma):
    """R[i][j] = C[i-1][j-1] + softmin(R[i-1][j-1], R[i-1][j], R[i][j-1]), R[0][0] = 0, other borders inf."""
    n, m = len(x), len(y)
    R = [[math.inf] * (m + 1) for _ in range(n + 1)]
    R[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            R[i][j] = _sq_dist(x[i - 1], y[j - 1]) + _softmin([R[i - 1][j - 1], R[i - 1][j], R[i][j - 1]], gamma)
    return R[n][m]


def brute_divergence(x, y, gamma):
    """D(x, y) = sdtw(x, y) - (sdtw(x, x) + sdtw(y, y)) / 2 (lists of frames), not divided by length."""
    return _sdtw(x, y, gamma) - 0.5 * (_sdtw(x, x, gamma) + _sdtw(y, y, gamma))


def brute_idm(x, sigma, margin):
    """I(x) = 1/n^2 sum_ij [b W max(0, margin - d) + (1 - b) d / W], d = ||x_i - x_j||, W = (i-j)^2 + 1,
    b = [|i - j| > sigma]."""
    n, total = len(x), 0.0
    for i in range(n):
        for j in range(n):
            d = math.sqrt(_sq_dist(x[i], x[j]))
            w = (i - j) ** 2 + 1
            total += w * max(0.0, margin - d) if abs(i - j) > sigma else d / w
    return total / n**2


def _frames(t, length):
    return t[:length].double().tolist()


def _pairs(dtype, seed=0, dim=4):
    """Two pairs of L2-normalised frame sequences with ragged lengths, padded."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(2, 9, dim, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    y = F.normalize(torch.randn(2, 7, dim, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    return x, y, torch.tensor([9, 6]), torch.tensor([5, 7])


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the loss
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_equals_brute_force_and_is_not_divided_by_length(dtype, backend):
    from fairseq_mtssl.losses.laser import laser_divergence
    from fairseq_mtssl.losses.soft_dtw import soft_dtw_divergence

    x, y, lx, ly = _pairs(dtype)
    got = laser_divergence(x, y, lx, ly, gamma=0.1, backend=backend)
    assert got.dtype == dtype
    want = [brute_divergence(_frames(x[b], lx[b]), _frames(y[b], ly[b]), 0.1) for b in range(2)]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), **_tol(dtype))
    scored = soft_dtw_divergence(x, y, lx, ly, gamma=0.1, backend=backend)  # SCORE's: divided by n + m
    torch.testing.assert_close(got, scored * (lx + ly).to(dtype), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma", [0, 1, 3])
@pytest.mark.parametrize("margin", [0.5, 1.1, 2.5])
def test_regulariser_equals_brute_force(dtype, sigma, margin):
    from fairseq_mtssl.losses.laser import idm_regulariser

    x, _, lx, _ = _pairs(dtype, seed=sigma)
    x[1, 4] = x[1, 2]  # a repeated frame: d = 0 off the diagonal
    got = idm_regulariser(x, lx, sigma=sigma, margin=margin)
    assert got.dtype == dtype
    want = [brute_idm(_frames(x[b], lx[b]), sigma, margin) for b in range(2)]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), **_tol(dtype))
    # padding does not count: each item alone gives the same value
    for b in range(2):
        alone = idm_regulariser(x[b : b + 1, : lx[b]], sigma=sigma, margin=margin)
        torch.testing.assert_close(alone[0], got[b], **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_is_divergence_plus_alpha_times_both_regularisers(dtype):
    from fairseq_mtssl.losses.laser import laser_loss

    x, y, lx, ly = _pairs(dtype, seed=5)
    loss, div, reg = laser_loss(x, y, lx, ly, gamma=0.1, sigma=0, margin=1.1, alpha=0.4)
    for b in range(2):
        fx, fy = _frames(x[b], lx[b]), _frames(y[b], ly[b])
        r = brute_idm(fx, 0, 1.1) + brute_idm(fy, 0, 1.1)
        d = brute_divergence(fx, fy, 0.1)
        torch.testing.assert_close(reg[b].double(), torch.tensor(r, dtype=torch.float64), **_tol(dtype))
        torch.testing.assert_close(loss[b].double(), torch.tensor(d + 0.4 * r, dtype=torch.float64), **_tol(dtype))
    torch.testing.assert_close(loss, div + 0.4 * reg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma,margin", [(0, 1.1), (2, 0.8)])
def test_gradients_match_finite_differences(backend, sigma, margin):
    """Through the L2 normalisation, both soft-DTW terms and both regularisers, ragged lengths, float64."""
    from fairseq_mtssl.losses.laser import laser_loss

    g = torch.Generator().manual_seed(11)
    a = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lx, ly = torch.tensor([5, 3]), torch.tensor([4, 4])

    def f(p, q):
        return laser_loss(F.normalize(p, dim=-1), F.normalize(q, dim=-1), lx, ly, 0.1, sigma, margin, 0.4,
                          backend=backend)[0]  # fmt: skip

    assert torch.autograd.gradcheck(f, (a, b), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_a_zero_distance_has_the_gradient_finite_differences_see():
    """d_ij = 0 (the diagonal, a repeated frame) is not differentiable; central differences see 0 there, and
    so does the regulariser (no NaN from the square root). eps 1e-4: the distances come from a float64 Gram
    matrix, whose rounding (~1e-8 absolute) would blur differences of a 1e-6 step."""
    from fairseq_mtssl.losses.laser import idm_regulariser

    x = torch.randn(1, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x[0, 4] = x[0, 1]
    x.requires_grad_(True)
    for sigma in (0, 2):
        assert torch.autograd.gradcheck(lambda t: idm_regulariser(t, sigma=sigma, margin=1.5), (x,), eps=1e-4)
    idm_regulariser(x, sigma=0).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_regulariser_of_half_inputs_is_computed_wide_and_stays_accurate():
    """400 frames: W reaches 399^2 + 1 = 159202, past float16's largest finite value; half inputs (and autocast)
    still give the float64 value of the same frames, in float32, with finite gradients."""
    from fairseq_mtssl.losses.laser import idm_regulariser, laser_loss

    n = 400
    assert torch.isinf(torch.tensor(float((n - 1) ** 2 + 1), dtype=torch.float16))  # what a half computation hits
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(1, n, 16, generator=g), dim=-1).half().requires_grad_(True)
    reference = idm_regulariser(x.detach().double(), sigma=0, margin=1.1)
    got = idm_regulariser(x, sigma=0, margin=1.1)
    assert got.dtype == torch.float32 and torch.isfinite(got).all() and reference.item() > 1.0
    torch.testing.assert_close(got.double(), reference, rtol=1e-6, atol=0)
    as_float32 = idm_regulariser(x, sigma=0, margin=1.1, dtype=torch.float32)  # the narrowest it allows
    torch.testing.assert_close(as_float32.double(), reference, rtol=1e-4, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = idm_regulariser(x.float(), sigma=0, margin=1.1)
    torch.testing.assert_close(under_autocast.double(), reference, rtol=1e-6, atol=0)
    got.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    loss, div, reg = laser_loss(x[:, :60].detach(), x[:, 5:70].detach(), gamma=0.1)
    assert loss.dtype == torch.float32 and torch.isfinite(torch.stack([loss, div, reg])).all()


# ------------------------------------------------------------------ the model
TINY = dict(
    encoder_layers=4,
    encoder_embed_dim=32,
    encoder_ffn_embed_dim=64,
    encoder_attention_heads=4,
    conv_pos=16,
    conv_pos_groups=4,
    conv_feature_layers="[(16,10,5)] + [(16,3,2)] * 4 + [(16,2,2)] * 2",
    final_dim=8,
)


def _laser_authors_trainable(hubert) -> set:
    """runner_part_freeze.py (LASER) on s3prl's ``hubert_base``, whose parameters are the HubertModel's under
    ``model.``: 1-based positions 3..176 frozen, then any name containing 'model.layer_norm' (the front end's
    LayerNorm, not encoder.layer_norm) or 'model.final_proj' frozen; the rest trainable."""
    names = ["model." + n for n, _ in hubert.named_parameters()]
    return {
        n[len("model.") :]
        for count, n in enumerate(names, start=1)
        if not 2 < count < 177 and "model.layer_norm" not in n and "model.final_proj" not in n
    }


def test_paper_config_trains_the_authors_set_exactly_top2_layers_and_encoder_layer_norm():
    from omegaconf import OmegaConf

    from fairseq_mtssl.models.laser import LaserConfig, LaserModel
    from fairseq_mtssl.models.score import resolve_trainable

    torch.manual_seed(0)
    hubert = random_hubert()
    authors = _laser_authors_trainable(hubert)
    paper = OmegaConf.load(REPO / "fairseq_mtssl/config/laser/laser_base_librispeech.yaml").model
    assert set(resolve_trainable(hubert, list(paper.trainable))) == authors  # the paper config names their set
    model = LaserModel(LaserConfig(upstream_path="-", trainable=list(paper.trainable), proj_dim=256), hubert)
    assert set(model.gradless) == {"mask_emb", "label_embs_concat"}
    trains = {n for n, p in model.student.named_parameters() if p.requires_grad}
    groups = {".".join(n.split(".")[:3]) if n.startswith("encoder.layers.") else n.rsplit(".", 1)[0] for n in trains}
    assert groups == {"encoder.layers.10", "encoder.layers.11", "encoder.layer_norm"}, groups
    expected = {n for n, _ in hubert.named_parameters() if n.startswith(tuple(g + "." for g in groups))}
    assert trains == expected == set(model.trainable)
    assert not hubert.layer_norm.weight.requires_grad  # the front end's LayerNorm: SCORE trains it, LASER not
    assert {k.split(".")[0] for k in model.state_dict()} == {"student", "proj"}  # no teacher
    assert model.proj.in_features == 768 and model.proj.out_features == 256
    assert model.student.encoder.layerdrop == 0.0 and model.student.feature_grad_mult == 0.0


@pytest.mark.parametrize("extractor", ["layer_norm", "default"], ids=["batched", "one-by-one"])
def test_one_step_gives_every_trainable_parameter_a_gradient(extractor):
    """The default trainable set; both sides of every pair go through the student (dropout on): a step of the
    criterion reaches every parameter that requires a gradient (c10d DDP's condition) and no other."""
    from fairseq_mtssl.criterions.laser_criterion import LaserCriterion
    from fairseq_mtssl.models.laser import LaserConfig, LaserModel

    torch.manual_seed(0)
    model = LaserModel(LaserConfig(upstream_path="-", proj_dim=16), random_hubert(**TINY, extractor_mode=extractor))
    model.train()
    assert model.student.training and model.teacher is None
    assert model.gradless == ["mask_emb"]
    sources, targets = [torch.randn(8000), torch.randn(6400)], [torch.randn(7200), torch.randn(8800)]
    sample = {"net_input": {"source": sources, "target_source": targets}}
    crit = LaserCriterion(None, gamma=0.1, sigma=0, margin=1.1, alpha=0.4)
    loss, n, log = crit(model, sample)
    assert n == 2 and torch.isfinite(loss)
    torch.testing.assert_close(log["loss"], log["divergence"] + 0.4 * log["regulariser"])
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient"
        else:
            assert p.grad is None, f"{name}: frozen but has a gradient"
    trains = {n for n, p in model.student.named_parameters() if p.requires_grad}
    assert {n for n in trains if not n.startswith(("encoder.layers.2.", "encoder.layers.3."))} == {
        "encoder.layer_norm.weight",
        "encoder.layer_norm.bias",
    }
    # the second side is the student's too: its output alone reaches the trainable layers
    out = model(**sample["net_input"])
    assert out["x"].shape[0] == out["y"].shape[0] == 2 and out["y"].requires_grad
    grads = torch.autograd.grad(out["y"].sum(), [model.student.encoder.layers[3].fc2.weight])
    assert grads[0].abs().sum() > 0
    # each side's frames are its own forward's
    model.eval()
    with torch.no_grad():
        out = model(**sample["net_input"])
        for b, wav in enumerate(targets):
            alone = model.project(model._encode(model.student, [wav])[0])[0]
            assert out["len_y"][b] == len(alone)
            torch.testing.assert_close(out["y"][b, : len(alone)], alone, atol=1e-5, rtol=1e-5)


def test_criterion_logs_the_mean_loss_divergence_and_regulariser():
    from fairseq import metrics

    from fairseq_mtssl.criterions.laser_criterion import LaserCriterion

    logs = [
        {
            "loss": torch.tensor(3.0),
            "divergence": torch.tensor(1.0),
            "regulariser": torch.tensor(5.0),
            "sample_size": 1,
        },
        {
            "loss": torch.tensor(5.0),
            "divergence": torch.tensor(2.0),
            "regulariser": torch.tensor(7.5),
            "sample_size": 2,
        },
    ]
    with metrics.aggregate() as agg:
        LaserCriterion.reduce_metrics(logs)
    values = agg.get_smoothed_values()
    assert values["loss"] == pytest.approx(8 / 3, abs=1e-4)
    assert values["divergence"] == pytest.approx(1.0, abs=1e-4)
    assert values["regulariser"] == pytest.approx(12.5 / 3, abs=1e-4)


def test_paper_config_has_the_authors_loss_optimisation_and_batches():
    """laser_base_librispeech.yaml against the authors' code (LASER_finetuning/config.yaml, the README's HuBERT
    command, expert.py, s3prl's AdamW and runner)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "fairseq_mtssl/config/laser/laser_base_librispeech.yaml")
    assert cfg.criterion._name == "laser" and cfg.criterion.gamma == 0.1
    assert (cfg.criterion.sigma, cfg.criterion.margin, cfg.criterion.alpha) == (0, 1.1, 0.4)
    assert cfg.model._name == "laser" and cfg.model.proj_dim == 256 and cfg.model.layerdrop == 0.0
    assert cfg.task._name == "score_finetuning" and cfg.task.pitch_method == "phase_vocoder"
    assert list(cfg.task.speed_factors) == [0.9, 1.0, 1.1] and sorted(cfg.task.pitch_semitones) == [-2.0, 2.0]
    assert cfg.task.max_sample_size >= 24.6 * 16000  # whole train-clean-100 utterances
    opt = cfg.optimizer
    assert opt._name == "adam" and eval(opt.adam_betas) == (0.9, 0.999)
    assert float(opt.adam_eps) == 1e-7 and float(opt.weight_decay) == 0.0
    assert cfg.optimization.clip_norm == 1.0 and list(cfg.optimization.lr) == [2e-5]
    assert cfg.optimization.max_update == 3600 and list(cfg.optimization.update_freq) == [8]
    assert cfg.lr_scheduler._name == "polynomial_decay" and cfg.lr_scheduler.warmup_updates == 1000
    assert cfg.lr_scheduler.power == 1.0 and cfg.lr_scheduler.end_learning_rate == 0.0
    assert cfg.common.fp16 is False and cfg.dataset.batch_size == 1 and "max_tokens" not in cfg.dataset


# ------------------------------------------------------------------ fairseq-hydra-train
@pytest.mark.slow
def test_a_few_laser_updates_from_a_tiny_hubert(tiny_hubert_checkpoint, manifest_dir, tmp_path):
    """5 updates of laser_tiny_cpu: finite loss, divergence and regulariser at every update; exactly the
    top 2 layers (both of the tiny model's) and encoder.layer_norm change, nothing else; no teacher saved;
    the evaluation tools' loader and SCORE's exporter read the tuned student."""
    from fairseq_mtssl.convert.score_export import export_score_student
    from fairseq_mtssl.upstream import load_upstream

    run = tmp_path / "laser"
    out = run_cli(
        "fairseq-hydra-train",
        "--config-dir",
        REPO / "fairseq_mtssl/config/laser",
        "--config-name",
        "laser_tiny_cpu",
        f"common.user_dir={PACKAGE_DIR}",
        f"task.data={manifest_dir}",
        f"model.upstream_path={tiny_hubert_checkpoint}",
        "optimization.max_update=5",
        "common.log_interval=1",
        f"hydra.run.dir={run}",
    )
    number = r"(-?[\d.]+(?:e[-+]?\d+)?|nan|inf)"
    lines = [line for line in out.stdout.splitlines() if "[train_inner]" in line]
    assert len(lines) == 5, out.stdout[-3000:]
    for line in lines:
        for key in ("loss", "divergence", "regulariser"):
            value = float(re.search(rf"\b{key}={number}", line).group(1))
            assert math.isfinite(value), line
    start = torch.load(tiny_hubert_checkpoint)["model"]
    tuned = torch.load(run / "checkpoints" / "checkpoint_last.pt")["model"]
    assert {k.split(".")[0] for k in tuned} == {"student", "proj"}
    learns = ("encoder.layers.", "encoder.layer_norm.")
    for k, v in start.items():
        assert torch.equal(tuned[f"student.{k}"], v) != k.startswith(learns), f"{k}: changed iff it learns"

    # the evaluation tools read the checkpoint's upstream: the tuned student
    encoder, _ = load_upstream(run / "checkpoints" / "checkpoint_last.pt")
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, tuned[f"student.{k}"]), k
    # the layout is SCORE's (student.* + proj.*): SCORE's export writes it once its name gate admits "laser";
    # until then, the same checkpoint under SCORE's name exports the tuned student as a plain HuBERT
    state = torch.load(run / "checkpoints" / "checkpoint_last.pt")
    state["cfg"]["model"]["_name"] = "score"
    torch.save(state, tmp_path / "as_score.pt")
    assert export_score_student(tmp_path / "as_score.pt", tmp_path / "student.pt") == "hubert"
    exported = torch.load(tmp_path / "student.pt")["model"]
    assert all(torch.equal(v, tuned[f"student.{k}"]) for k, v in exported.items())
