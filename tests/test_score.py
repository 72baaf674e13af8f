"""SCORE through fairseq-hydra-train from a real HuBERT checkpoint, and the vanilla export."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import PACKAGE_DIR, REPO, run_cli

_VANILLA = """
import sys, argparse, numpy as np, torch
from fairseq.data.dictionary import Dictionary
torch.serialization.add_safe_globals([Dictionary, argparse.Namespace])  # what any torch>=2.6 fairseq user needs
from fairseq import checkpoint_utils
models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([sys.argv[1]])
m = models[0].eval()
assert type(m).__name__ == "HubertModel" and "fairseq_mtssl" not in sys.modules
with torch.no_grad():
    x, _ = m.extract_features(torch.from_numpy(np.load(sys.argv[2])), padding_mask=None, mask=False)
np.save(sys.argv[3], x.numpy())
"""


@pytest.mark.slow
def test_score_finetunes_top_layers_only_and_exports_a_vanilla_hubert(manifest_dir, tiny_hubert_checkpoint, tmp_path):
    run = tmp_path / "score"
    out = run_cli(
        "fairseq-hydra-train",
        "--config-dir",
        REPO / "fairseq_mtssl/config/score",
        "--config-name",
        "score_tiny_cpu",
        f"common.user_dir={PACKAGE_DIR}",
        f"task.data={manifest_dir}",
        f"model.hubert_path={tiny_hubert_checkpoint}",
        "optimization.max_update=30",
        "common.log_interval=5",
        f"hydra.run.dir={run}",
    )
    losses = [float(x) for x in re.findall(r"\[train_inner\].* loss=([\d.]+),", out.stdout)]
    assert len(losses) >= 5 and losses[-1] < losses[0], losses

    start = torch.load(tiny_hubert_checkpoint)["model"]
    tuned = torch.load(run / "checkpoints" / "checkpoint_last.pt")["model"]
    top = "encoder.layers.1."  # tiny HuBERT: 2 layers, trainable_layers 1
    for k, v in start.items():
        assert torch.equal(tuned[f"teacher.{k}"], v), f"teacher changed: {k}"
        if not k.startswith(top):
            assert torch.equal(tuned[f"student.{k}"], v), f"frozen student parameter changed: {k}"
    assert any(not torch.equal(tuned[f"student.{k}"], v) for k, v in start.items() if k.startswith(top))

    exported = tmp_path / "hubert_score.pt"
    run_cli("mtssl-export-hubert", run / "checkpoints" / "checkpoint_last.pt", exported)
    from fairseq_mtssl.convert.hubert_checkpoint import load_hubert

    ours, _ = load_hubert(exported)
    x = torch.randn(1, 20000)
    np.save(tmp_path / "x.npy", x.numpy())
    subprocess.run(
        [sys.executable, "-c", _VANILLA, str(exported), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        check=True,
        capture_output=True,
    )
    with torch.no_grad():
        expected, _ = ours.extract_features(x, padding_mask=None, mask=False)
    assert np.abs(np.load(tmp_path / "y.npy") - expected.numpy()).max() < 1e-4
    # and the exported student differs from the start where SCORE trained it
    assert not torch.equal(torch.load(exported)["model"][f"{top}fc1.weight"], start[f"{top}fc1.weight"])


@pytest.mark.slow
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


@pytest.mark.parametrize(
    "batched", [True, False], ids=["layer-norm-front-end(batched)", "group-norm-front-end(one-by-one)"]
)
def test_student_split_forward_equals_the_full_forward(batched):
    """The student's frozen bottom runs under no_grad and its top layers on top of it: same output as
    fairseq's full extract_features (padded batch or one by one), gradient only into the top layers."""
    from fairseq.data.dictionary import Dictionary
    from fairseq.models.hubert import HubertConfig, HubertModel
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

    from fairseq_mtssl.models.score import ScoreHubertConfig, ScoreHubertModel

    torch.manual_seed(0)
    d = Dictionary()
    cfg = HubertConfig(
        extractor_mode="layer_norm" if batched else "default",
        encoder_layers=4,
        encoder_embed_dim=64,
        encoder_ffn_embed_dim=128,
        encoder_attention_heads=4,
        conv_pos=16,
        conv_pos_groups=4,
        label_rate=50.0,
        conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        final_dim=16,
    )
    hubert = HubertModel(cfg, HubertPretrainingConfig(labels=["km"], label_rate=50.0), [d])
    model = ScoreHubertModel(ScoreHubertConfig(hubert_path="-", trainable_layers=2, proj_dim=8), hubert).train()
    assert model.batchable == batched
    sources = [torch.randn(9000), torch.randn(6400)]
    x, lengths = model._encode(model.student, sources)
    with torch.no_grad():
        for i, s in enumerate(sources):
            full, _ = model.student.extract_features(s[None], padding_mask=None, mask=False)
            torch.testing.assert_close(x[i, : lengths[i]], full[0], atol=1e-5, rtol=1e-5)
    x[0, : lengths[0]].sum().backward()
    grads = {n for n, p in model.student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith(("encoder.layers.2.", "encoder.layers.3.")) for n in grads), sorted(grads)
