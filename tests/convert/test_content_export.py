"""SPIN checkpoints leave as their start's own format: the fine-tuned student, its head and codebook dropped.

A tiny SPIN model is built on a small fairseq HuBERT (group-normed front end, post-LN, as HuBERT Base;
``builders.random_hubert_checkpoint``) with the packaged ``spin_tiny_cpu`` config, its top layer and codebook
changed (so the student differs from the start), and saved as fairseq saves a checkpoint. The quick test
exports it in-process and reads the result back with the plugin's loader; the slow one runs the one
command ``mtssl-export`` and reads every format in a fresh interpreter without the plugin, as
``tests/convert/test_export.py`` does for the other methods: every hidden state equals the fine-tuned student's.
"""

import pytest
import torch
from builders import (
    assert_states_match,
    exported_hidden_states,
    perturb_norms,
    random_hubert_checkpoint,
    run_export,
    save_checkpoint,
    saved_config,
    speech_sample,
)


def _spin_checkpoint(tmp_path):
    """``(SpinModel, its checkpoint, the start)``: spin_tiny_cpu on a small fairseq HuBERT."""
    from fairseq_mtssl.models.spin import SpinConfig, SpinModel

    start = tmp_path / "hubert.pt"
    random_hubert_checkpoint(start, "default", False)
    cfg = saved_config(
        "spin", "spin_tiny_cpu", "task.data=unused", f"model.upstream_path={start}", "task.normalize=false"
    )
    names = set(SpinConfig.__dataclass_fields__)
    torch.manual_seed(5)
    spin = SpinModel.build_model(SpinConfig(**{k: v for k, v in cfg["model"].items() if k in names}))
    perturb_norms(spin.student.encoder.layers[-1], seed=5)  # the fine-tuned top layer now differs from the start
    with torch.no_grad():
        spin.codebook.weight.normal_()
    spin.normalize_codebook()
    ckpt = tmp_path / "spin.pt"
    save_checkpoint(spin, cfg, ckpt)
    return spin, ckpt, start


def test_spin_student_exports_as_plain_hubert_without_head_and_codebook(manifest_dir, tmp_path):
    """In-process: ``mtssl-export``'s fairseq step writes a plain ``hubert`` checkpoint whose weights are
    exactly the student's (no ``head.``/``codebook.``), with no user_dir; the plugin's upstream loader reads
    it with the student's hidden states at every layer."""
    from fairseq_mtssl.convert.export import detect, export_fairseq
    from fairseq_mtssl.upstream import hidden_states, load_upstream

    spin, ckpt, start = _spin_checkpoint(tmp_path)
    assert detect(ckpt) == "spin"
    state = torch.load(ckpt)["model"]
    assert {k.split(".")[0] for k in state} == {"student", "head", "codebook"}
    assert _student_differs(state, start)  # the student is not the start
    arch, written = export_fairseq(ckpt, tmp_path / "fairseq.pt")
    assert (arch, written) == ("spin", "hubert")
    plain = torch.load(tmp_path / "fairseq.pt")
    assert plain["cfg"]["model"]["_name"] == "hubert" and not plain["cfg"]["common"].get("user_dir")
    assert set(plain["model"]) == {k[len("student.") :] for k in state if k.startswith("student.")}
    assert all(torch.equal(v, state[f"student.{k}"]) for k, v in plain["model"].items())

    encoder, normalize = load_upstream(tmp_path / "fairseq.pt")
    assert type(encoder).__name__ == "HubertModel" and not normalize
    wav = speech_sample(manifest_dir, normalize=False)[None]
    with torch.no_grad():
        ours, _ = hidden_states(spin.student.eval(), wav, None)
        theirs, _ = hidden_states(encoder, wav, None)
    assert len(ours) == len(theirs) == 4  # encoder input + 3 layers
    assert max(float((a - b).abs().max()) for a, b in zip(ours, theirs)) < 1e-6


def _student_differs(state: dict, start) -> bool:
    """Some student weight differs from the start's (the test would be blind otherwise)."""
    start_state = torch.load(start)["model"]
    return any(not torch.equal(v, state[f"student.{k}"]) for k, v in start_state.items())


@pytest.mark.slow
def test_spin_exports_to_fairseq_transformers_and_s3prl_through_the_one_command(manifest_dir, tmp_path):
    """``python -m fairseq_mtssl.convert.export SPIN.pt OUT``: architecture ``spin``, fairseq ``hubert``,
    ``HubertModel`` and ``hubert_local``; each loaded without the plugin gives the student's hidden states
    (first layer input, every layer output, encoder output) within 1e-5."""
    spin, ckpt, _ = _spin_checkpoint(tmp_path)
    info = run_export(ckpt, tmp_path / "out")
    assert info["architecture"] == "spin" and info["fairseq"]["model"] == "hubert"
    assert info["transformers"]["class"] == "HubertModel" and info["s3prl"]["upstream"] == "hubert_local"
    plain = torch.load(tmp_path / "out" / "fairseq.pt")["model"]
    assert not any(k.startswith(("head.", "codebook.", "student.")) for k in plain)
    wav = speech_sample(manifest_dir, normalize=False)
    got = exported_hidden_states(tmp_path / "out", wav, tmp_path)
    assert set(got) == {"fairseq", "transformers", "s3prl", "s3prl_fairseq"}
    assert_states_match(spin.student, wav, got, pre_ln=False)  # this HuBERT task does not normalise


def test_a_spin_checkpoint_without_its_start_is_one_line(tmp_path):
    """The start is where the export takes the upstream's config: gone, the error says to give it."""
    from fairseq_mtssl.convert.export import export_all
    from fairseq_mtssl.errors import ExportError

    _, ckpt, start = _spin_checkpoint(tmp_path)
    start.unlink()
    with pytest.raises(ExportError, match="is not a file \\(give --start\\)") as err:
        export_all(ckpt, tmp_path / "out", formats=["fairseq"])
    assert "\n" not in str(err.value) and str(ckpt) in str(err.value)
