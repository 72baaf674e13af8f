"""SCORE through fairseq-hydra-train from a real HuBERT checkpoint, and the vanilla export."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import TINY_HUBERT, random_hubert
from conftest import PACKAGE_DIR, REPO, run_cli

_VANILLA = """
import sys, argparse, numpy as np, torch
from torch.nn.utils.weight_norm import WeightNorm
from fairseq.data.dictionary import Dictionary
torch.serialization.add_safe_globals([Dictionary, argparse.Namespace])  # what any torch>=2.6 fairseq user needs
from fairseq.examples.data2vec.models import data2vec_audio  # what common.user_dir=examples/data2vec does

# fairseq's data2vec cannot build its EMA teacher under torch >= 2.1 (weight norm's derived weight is
# not deep-copyable), and loading any data2vec checkpoint builds it; every torch 2.13 user needs this.
make_teacher = data2vec_audio.Data2VecAudioModel.make_ema_teacher
def detached_make_teacher(self):
    for m in self.modules():
        for h in m._forward_pre_hooks.values():
            if isinstance(h, WeightNorm):
                setattr(m, h.name, getattr(m, h.name).detach())
    make_teacher(self)
data2vec_audio.Data2VecAudioModel.make_ema_teacher = detached_make_teacher

from fairseq import checkpoint_utils
models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([sys.argv[1]])
m = models[0].eval()
assert type(m).__name__ == sys.argv[4] and "fairseq_mtssl" not in sys.modules, type(m)
out = []
for layer in m.encoder.layers:
    layer.register_forward_hook(lambda mod, i, o: out.append(o[0].transpose(0, 1)))
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    if type(m).__name__ == "HubertModel":
        last = m.extract_features(x, padding_mask=None, mask=False)[0]
    else:
        last = m.extract_features(x, None, mask=False)["x"]
np.save(sys.argv[3], torch.stack(out + [last]).numpy())
"""


def _layer_outputs(model, x):
    """Every transformer layer's output and the final output ``(L + 1, B, T, C)``, as _VANILLA computes them."""
    from fairseq_mtssl.models.score import features_after

    out = []
    layers = model.encoder.layers
    hooks = [layer.register_forward_hook(lambda mod, i, o: out.append(o[0].transpose(0, 1))) for layer in layers]
    try:
        with torch.no_grad():
            last, _ = features_after(model.eval(), x, None)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(out + [last]).numpy()


@pytest.fixture(scope="module")
def tiny_wav2vec2_checkpoint(manifest_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("w2v2")
    run_cli(
        "fairseq-hydra-train",
        "--config-dir",
        REPO / "fairseq_mtssl/config/wav2vec2/pretraining",
        "--config-name",
        "wav2vec2_tiny_cpu",
        f"common.user_dir={PACKAGE_DIR}",
        f"task.data={manifest_dir}",
        "optimization.max_update=4",
        f"hydra.run.dir={run}",
    )
    return run / "checkpoints" / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def tiny_mt4ssl_checkpoint(manifest_dir, mfcc_labels, tmp_path_factory):
    run = tmp_path_factory.mktemp("mt4ssl")
    run_cli(
        "fairseq-hydra-train",
        "--config-dir",
        REPO / "fairseq_mtssl/config/mt4ssl/pretrain",
        "--config-name",
        "mt4ssl_tiny_cpu",
        f"common.user_dir={PACKAGE_DIR}",
        f"task.data={manifest_dir}",
        f"task.label_dir={mfcc_labels}",
        'task.labels=["km"]',
        "task.label_rate=100",
        "optimization.max_update=10",  # tri_stage needs >= 10 for a decay stage
        f"hydra.run.dir={run}",
    )
    return run / "checkpoints" / "checkpoint_last.pt"


UPSTREAMS = {  # SCORE config, fixture of the starting checkpoint, model class of the export in plain fairseq
    "hubert": ("score_tiny_cpu", "tiny_hubert_checkpoint", "HubertModel"),
    "wav2vec2": ("score_wav2vec2_tiny_cpu", "tiny_wav2vec2_checkpoint", "Wav2Vec2Model"),
    "mt4ssl": ("score_mt4ssl_tiny_cpu", "tiny_mt4ssl_checkpoint", "Data2VecAudioModel"),
}


@pytest.mark.slow
@pytest.mark.parametrize("upstream", sorted(UPSTREAMS))
def test_score_finetunes_the_authors_set_and_exports_the_upstreams_format(upstream, manifest_dir, request, tmp_path):
    """A few SCORE updates of each upstream through fairseq-hydra-train: the authors' set learns and
    nothing else does, the teacher stays the start; the export loads in plain fairseq (no plugin) as
    the upstream's own model class, with the student's hidden states at every layer."""
    from fairseq_mtssl.upstream import load_speech_model, speech_encoder_of

    config, fixture, exported_class = UPSTREAMS[upstream]
    start_ckpt = request.getfixturevalue(fixture)
    run = tmp_path / "score"
    out = run_cli(
        "fairseq-hydra-train",
        "--config-dir",
        REPO / "fairseq_mtssl/config/score",
        "--config-name",
        config,
        f"common.user_dir={PACKAGE_DIR}",
        f"task.data={manifest_dir}",
        f"model.upstream_path={start_ckpt}",
        f"optimization.max_update={30 if upstream == 'hubert' else 6}",
        "common.log_interval=5",
        f"hydra.run.dir={run}",
    )
    if upstream == "hubert":
        losses = [float(x) for x in re.findall(r"\[train_inner\].* loss=([\d.]+),", out.stdout)]
        assert len(losses) >= 5 and losses[-1] < losses[0], losses

    start = {k: v for k, v in torch.load(start_ckpt)["model"].items() if k != "_ema"}
    tuned = torch.load(run / "checkpoints" / "checkpoint_last.pt")["model"]
    # the authors' set on a 2-layer model: both layers and the two LayerNorms learn; the conv front end,
    # post_extract_proj and pos_conv stay; final_proj, mask_emb (label_embs_concat) are named but get no
    # gradient, so they stay frozen
    learns = ("encoder.layers.", "encoder.layer_norm.", "layer_norm.")
    for k, v in start.items():
        assert torch.equal(tuned[f"teacher.{k}"], v), f"teacher changed: {k}"
        assert torch.equal(tuned[f"student.{k}"], v) != k.startswith(learns), f"{k}: changed iff it learns"

    exported = tmp_path / "student.pt"
    score_ckpt = run / "checkpoints" / "checkpoint_last.pt"
    if upstream == "hubert":
        run_cli("mtssl-export-hubert", score_ckpt, exported)  # the earlier command name still works
    else:
        run_cli(Path(sys.executable).name, "-m", "fairseq_mtssl.convert.score_export", score_ckpt, exported)
    score_model, _ = load_speech_model(str(score_ckpt))
    x = torch.randn(1, 20000)
    np.save(tmp_path / "x.npy", x.numpy())
    vanilla = [sys.executable, "-c", _VANILLA, exported, tmp_path / "x.npy", tmp_path / "y.npy", exported_class]
    proc = subprocess.run([str(a) for a in vanilla], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _layer_outputs(speech_encoder_of(score_model), x)
    assert np.abs(np.load(tmp_path / "y.npy") - expected).max() < 1e-4
    top = "encoder.layers.1.fc1.weight"  # the exported student is SCORE's, not the start
    assert not torch.equal(torch.load(exported)["model"][top], start[top])


def test_export_refuses_other_architectures(tiny_hubert_checkpoint, tmp_path):
    from fairseq_mtssl.convert.hubert_checkpoint import NotAHubertCheckpoint, load_hubert
    from fairseq_mtssl.convert.score_to_hubert import ExportError, export_score_student

    with pytest.raises(ExportError, match="not a SCORE"):
        export_score_student(tiny_hubert_checkpoint, tmp_path / "x.pt")
    state = torch.load(tiny_hubert_checkpoint)
    state["cfg"]["model"]["_name"] = "wav2vec2"
    torch.save(state, tmp_path / "w2v.pt")
    with pytest.raises(NotAHubertCheckpoint, match="w2v.pt: model is 'wav2vec2'"):
        load_hubert(tmp_path / "w2v.pt")
    assert not (tmp_path / "x.pt").exists()


def _authors_trainable(hubert) -> set:
    """The authors' freeze-by-position rule (runner_part_freeze_layers.py) applied to s3prl's
    ``hubert_base`` upstream, whose parameters are the HubertModel's under ``model.``: the 1-based
    parameters 3..176 are frozen; every other one keeps requires_grad=True (their two ``elif``
    branches, for ``model.layer_norm`` and ``model.final_proj``, set True again)."""
    names = ["model." + n for n, _ in hubert.named_parameters()]
    return {n[len("model.") :] for count, n in enumerate(names, start=1) if not 2 < count < 177}


def _grad_names(module) -> set:
    return {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_paper_config_trains_the_authors_set_and_gradients_reach_what_theirs_reach():
    """HuBERT Base's architecture: the trainable set of score_base_librispeech.yaml is, by name, what the
    authors' positional rule leaves trainable; of it, final_proj, mask_emb and label_embs_concat get no
    gradient and stay frozen; the parameters that receive a gradient from the SCORE loss are those that
    receive one in a plain fairseq HuBERT frozen their way (feature_grad_mult 0, as s3prl)."""
    from omegaconf import OmegaConf

    from fairseq_mtssl.criterions.score_criterion import ScoreCriterion
    from fairseq_mtssl.models.score import ScoreConfig, ScoreModel
    from fairseq_mtssl.models.weight_norm import detach_weight_norm_weights

    torch.manual_seed(0)
    hubert = random_hubert(encoder_layerdrop=0.05)  # the official hubert_base_ls960's layerdrop
    authors = _authors_trainable(hubert)
    paper = OmegaConf.load(REPO / "fairseq_mtssl/config/score/score_base_librispeech.yaml").model
    detach_weight_norm_weights(hubert)  # torch >= 2.1 deep-copies weight-normed modules only so
    reference = copy.deepcopy(hubert)
    model = ScoreModel(ScoreConfig(upstream_path="-", trainable=list(paper.trainable), proj_dim=256), hubert).train()
    gradless = {"final_proj.weight", "final_proj.bias", "mask_emb", "label_embs_concat"}
    assert set(model.gradless) == gradless and gradless <= authors
    ours = {n for n, p in model.student.named_parameters() if p.requires_grad}
    assert ours == authors - gradless, sorted(ours ^ (authors - gradless))
    assert model.student.encoder.layerdrop == 0 and model.teacher.encoder.layerdrop == 0

    x, y = torch.randn(16000), torch.randn(17600)
    out = model([x], [y])
    loss, _, _ = ScoreCriterion(None)(model, {"net_input": {"source": [x], "target_source": [y]}})
    loss.backward()
    got = _grad_names(model.student)

    for n, p in reference.named_parameters():
        p.requires_grad_(n in authors)
    reference.feature_grad_mult, reference.encoder.layerdrop = 0.0, 0.0
    reference.train().extract_features(x[None], padding_mask=None, mask=False)[0].square().sum().backward()
    expected = _grad_names(reference)
    assert got == expected, sorted(got ^ expected)
    groups = {".".join(n.split(".")[:3]) if n.startswith("encoder.layers.") else n.rsplit(".", 1)[0] for n in got}
    assert groups == {"encoder.layers.10", "encoder.layers.11", "encoder.layer_norm", "layer_norm"}, groups
    assert model.proj.weight.grad is not None and out["teacher"].requires_grad  # the projection learns from both


@pytest.mark.parametrize("layerdrop", [0.0, 0.5])
def test_layerdrop_is_the_configs_in_student_and_teacher(layerdrop):
    from fairseq_mtssl.models.score import ScoreConfig, ScoreModel

    torch.manual_seed(0)
    hubert = random_hubert(**TINY_HUBERT, extractor_mode="layer_norm", encoder_layerdrop=0.05)
    model = ScoreModel(ScoreConfig(upstream_path="-", proj_dim=8, layerdrop=layerdrop, teacher_dropout=True), hubert)
    model.train()
    assert model.student.encoder.layerdrop == layerdrop and model.teacher.encoder.layerdrop == layerdrop
    assert model.teacher.training  # teacher_dropout: the authors' train-mode teacher
    x = [torch.randn(8000)]
    outs = [model._encode(model.student, x)[0].detach() for _ in range(12)]
    same = all(torch.equal(o, outs[0]) for o in outs)  # the tiny model has no dropout: only LayerDrop varies
    assert same == (layerdrop == 0)
    model.eval()
    assert not model.teacher.training


@pytest.mark.parametrize(
    "batched", [True, False], ids=["layer-norm-front-end(batched)", "group-norm-front-end(one-by-one)"]
)
@pytest.mark.parametrize("trainable", ["top2", "paper", "pre-ln-top1"])
def test_student_forward_equals_the_full_forward_and_graphs_only_what_trains(batched, trainable):
    """Split or full, the student's output is fairseq's extract_features (padded batch or one by one);
    gradients reach exactly the trainable set's feature-path parameters; below the lowest trainable
    layer no graph is recorded when nothing there trains."""
    from fairseq_mtssl.models.score import AUTHORS_TRAINABLE, ScoreConfig, ScoreModel

    torch.manual_seed(0)
    entries = {
        "top2": ["encoder.layers.-2", "encoder.layers.-1"],
        "paper": AUTHORS_TRAINABLE,
        "pre-ln-top1": ["encoder.layers.3", "encoder.layer_norm"],
    }[trainable]
    hubert = random_hubert(
        **TINY_HUBERT,
        extractor_mode="layer_norm" if batched else "default",
        layer_norm_first=trainable == "pre-ln-top1",
    )
    model = ScoreModel(ScoreConfig(upstream_path="-", trainable=entries, proj_dim=8), hubert).train()
    assert model.batchable == batched
    assert model.first_graph_layer == {"top2": 2, "paper": None, "pre-ln-top1": 3}[trainable]
    recorded = []
    model.student.encoder.layers[0].register_forward_hook(lambda m, i, o: recorded.append(o[0].requires_grad))
    sources = [torch.randn(9000), torch.randn(6400)]
    x, lengths = model._encode(model.student, sources)
    assert recorded and all(r == (trainable == "paper") for r in recorded)
    with torch.no_grad():
        for i, s in enumerate(sources):
            full, _ = model.student.extract_features(s[None], padding_mask=None, mask=False)
            torch.testing.assert_close(x[i, : lengths[i]], full[0], atol=1e-5, rtol=1e-5)
    x[0, : lengths[0]].sum().backward()
    grads = _grad_names(model.student)
    want = {
        "top2": ("encoder.layers.2.", "encoder.layers.3."),
        "paper": ("encoder.layers.2.", "encoder.layers.3.", "encoder.layer_norm.", "layer_norm."),
        "pre-ln-top1": ("encoder.layers.3.", "encoder.layer_norm."),
    }[trainable]
    assert grads and all(n.startswith(want) for n in grads), sorted(grads)
    assert all(any(n.startswith(w) for n in grads) for w in want), sorted(grads)


def test_trainable_names_that_select_nothing_are_refused():
    from fairseq_mtssl.models.score import ScoreConfig, ScoreModel, TrainableSetError

    hubert = random_hubert(**TINY_HUBERT, extractor_mode="layer_norm")
    with pytest.raises(TrainableSetError, match="'encoder.layerz.1' names no parameter of the HubertModel"):
        ScoreModel(ScoreConfig(upstream_path="-", trainable=["encoder.layerz.1"]), hubert)
    with pytest.raises(TrainableSetError, match="'encoder.layers.-5' but the upstream has 4 layers"):
        ScoreModel(ScoreConfig(upstream_path="-", trainable=["encoder.layers.-5"]), hubert)


def test_paper_config_has_the_authors_optimisation_and_batches():
    """score_base_librispeech.yaml against the facts of the authors' code (content_preserving_hubert/config.yaml,
    s3prl's AdamW defaults, runner's clipping, train_batch_size 1, whole LibriSpeech utterances)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "fairseq_mtssl/config/score/score_base_librispeech.yaml")
    opt = cfg.optimizer
    assert opt._name == "adam" and eval(opt.adam_betas) == (0.9, 0.999)  # fairseq's Adam decays decoupled
    assert float(opt.adam_eps) == 1e-7 and float(opt.weight_decay) == 0.0
    assert cfg.optimization.clip_norm == 1.0 and list(cfg.optimization.lr) == [2e-5]
    assert cfg.optimization.max_update == 3600 and list(cfg.optimization.update_freq) == [8]
    assert cfg.lr_scheduler._name == "polynomial_decay" and cfg.lr_scheduler.warmup_updates == 1000
    assert cfg.lr_scheduler.power == 1.0 and cfg.lr_scheduler.end_learning_rate == 0.0  # linear to 0
    assert cfg.common.fp16 is False and cfg.dataset.batch_size == 1 and "max_tokens" not in cfg.dataset
    assert cfg.task.max_sample_size >= 24.6 * 16000  # no crop: train-clean-100's longest utterance is 24.5 s
    assert cfg.task.pitch_method == "phase_vocoder" and cfg.criterion.gamma == 0.1 and cfg.model.proj_dim == 256
    assert cfg.model.layerdrop == 0.0 and cfg.model.teacher_dropout is False


def test_a_task_that_normalises_differently_from_the_upstream_is_refused():
    from types import SimpleNamespace

    from fairseq_mtssl.models.score import UpstreamMismatch, check_normalize

    task = SimpleNamespace(cfg=SimpleNamespace(normalize=False))
    with pytest.raises(
        UpstreamMismatch, match="up.pt: the upstream was trained with normalize=True but task.normalize=False"
    ):
        check_normalize("up.pt", SimpleNamespace(normalize=True), task)
    check_normalize("up.pt", SimpleNamespace(normalize=False), task)


def test_the_earlier_score_hubert_still_builds_and_its_checkpoints_export(tiny_hubert_checkpoint, tmp_path):
    """``score_hubert`` (``hubert_path``, top ``trainable_layers``): same state-dict layout as before, so an
    older checkpoint (its config and weights) still exports through ``model.hubert_path``."""
    from fairseq_mtssl.convert.hubert_checkpoint import load_hubert
    from fairseq_mtssl.convert.score_export import export_score_student
    from fairseq_mtssl.models.score import ScoreHubertConfig, ScoreHubertModel

    hubert, _ = load_hubert(tiny_hubert_checkpoint)
    cfg = ScoreHubertConfig(hubert_path=str(tiny_hubert_checkpoint), trainable_layers=1, proj_dim=8)
    model = ScoreHubertModel(cfg, hubert)
    assert model.first_graph_layer == 1 and all(n.startswith("encoder.layers.1.") for n in model.trainable)
    with torch.no_grad():
        model.student.encoder.layers[1].fc1.weight.add_(1.0)
    legacy = {"cfg": {"model": {"_name": "score_hubert", "hubert_path": str(tiny_hubert_checkpoint),
                                "trainable_layers": 1, "proj_dim": 8, "teacher_dropout": False}},
              "model": model.state_dict()}  # fmt: skip
    assert {k.split(".")[0] for k in legacy["model"]} == {"student", "teacher", "proj"}
    torch.save(legacy, tmp_path / "old_score.pt")
    assert export_score_student(tmp_path / "old_score.pt", tmp_path / "out.pt") == "hubert"
    out = torch.load(tmp_path / "out.pt")["model"]
    assert torch.equal(out["encoder.layers.1.fc1.weight"], model.student.encoder.layers[1].fc1.weight)
