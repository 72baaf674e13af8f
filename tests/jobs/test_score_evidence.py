"""The SCORE evidence command: the perturbed test split and its alignment, and a one-seed smoke run."""

import json

import numpy as np
import pytest
import soundfile as sf


@pytest.fixture(scope="module")
def data_dir(manifest_dir, corpus_dir, tmp_path_factory):
    """The main job's data layout (manifests/, corpus/alignments/) over the session's corpus."""
    d = tmp_path_factory.mktemp("data")
    (d / "manifests").symlink_to(manifest_dir)
    (d / "corpus").symlink_to(corpus_dir)
    return d


def test_perturbed_split_rescales_the_alignment_by_the_speed_factor(data_dir, tmp_path):
    from fairseq_mtssl.corpus.alignment import read_ctm
    from fairseq_mtssl.data.manifest import read_manifest
    from fairseq_mtssl.jobs.score_evidence import perturb_split

    m, al = data_dir / "manifests", data_dir / "corpus" / "alignments"
    draws = perturb_split(m / "test.tsv", al / "test.phones.ctm", tmp_path, seed=0)
    clean, pert = read_manifest(m / "test.tsv"), read_manifest(tmp_path / "test.tsv")
    segs, new_segs = read_ctm(al / "test.phones.ctm"), read_ctm(tmp_path / "test.phones.ctm")
    assert len(pert) == len(clean) and (tmp_path / "test.spk").read_text() == (m / "test.spk").read_text()
    assert {d["speed"] for d in draws.values()} <= {0.9, 1.0, 1.1} and len({d["speed"] for d in draws.values()}) > 1
    for e, p in zip(clean.entries, pert.entries):
        utt = e.path.rsplit("/", 1)[-1][: -len(".wav")]
        f = draws[utt]["speed"]
        assert abs(p.num_samples - e.num_samples / f) <= 2
        assert len(sf.read(tmp_path / p.path)[0]) == p.num_samples
        old, new = segs[utt], new_segs[utt]
        assert [s.label for s in old] == [s.label for s in new]
        assert abs(new[-1].end - p.num_samples / 16000) < 1e-3
        for a, b in zip(old[:-1], new[:-1]):
            assert abs(b.end - a.end / f) < 1e-3  # ctm times have 4 decimals


def test_evidence_runs_end_to_end_on_one_seed(data_dir, tiny_hubert_checkpoint, tmp_path):
    """Smoke size (1 seed, 2 SCORE updates, layer 1): every measure is there for the start and the run."""
    from fairseq_mtssl.jobs.score_evidence import main

    out = tmp_path / "evidence"
    main([str(tiny_hubert_checkpoint), "--data", str(data_dir), "--out", str(out), "--seeds", "1", "--updates", "2",
          "--layer", "1", "--abx-context", "none"])  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"start", "score_seed1"} and results["config"] == "score_tiny_cpu"
    for r in results["models"].values():
        assert r["sdtw_divergence"] > 0 and np.isfinite(r["sdtw_divergence"])
        assert 0 < r["probe_clean"] <= 1 and 0 < r["probe_perturbed"] <= 1
        assert 0 <= r["abx_within_perturbed"] <= 100 and r["probe_gap"] == r["probe_perturbed"] - r["probe_clean"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["probe_clean"]["score_values"] == [results["models"]["score_seed1"]["probe_clean"]]
    assert "| sdtw_divergence |" in (out / "summary.md").read_text()
    assert "fairseq-hydra-train" in (out / "commands.sh").read_text()
