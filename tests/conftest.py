"""Shared fixtures: one small embedded corpus and its manifests per test session.

The tests live in folders named after the package they test (tests/models/ for fairseq_mtssl/models/, ...),
end-to-end, training and distributed runs in tests/integration/; what several of them build (tiny
checkpoints, composed configs, the export round trip) is in tests/builders.py. This folder is put on
``sys.path`` so that every test file imports ``builders`` and ``conftest`` by name.
"""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
REPO = TESTS.parent
PACKAGE_DIR = REPO / "fairseq_mtssl"
BIN = Path(sys.executable).parent

# ``slow`` (``pytest -m "not slow"``, the quick loop, leaves them out): tests that request a fixture which
# trains a model, tests marked ``@pytest.mark.slow`` because they train, everything in tests/integration/
# (end-to-end, training, distributed), and whole-tool runs: a test that starts a console script (``run_cli``)
# or another Python process (each pays torch's and fairseq's imports, 3-20 s).
TRAINING_FIXTURES = {"tiny_hubert_checkpoint"}
WHOLE_TOOL = re.compile(r"\brun_cli\(|subprocess\.|sys\.executable|mp\.spawn|torch\.multiprocessing")


def _runs_a_whole_tool(item) -> bool:
    try:
        return bool(WHOLE_TOOL.search(inspect.getsource(item.function)))
    except (OSError, TypeError):
        return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (
            TRAINING_FIXTURES & set(getattr(item, "fixturenames", ()))
            or "integration" in Path(str(item.fspath)).parts
            or _runs_a_whole_tool(item)
        ):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    from fairseq_mtssl.corpus.synth import ensure_corpus

    out = tmp_path_factory.mktemp("corpus") / "corpus"
    ensure_corpus(out, hours=0.03, seed=3)
    return out


@pytest.fixture(scope="session")
def manifest_dir(corpus_dir, tmp_path_factory):
    from fairseq_mtssl.prep.corpus_manifest import build_corpus_manifests

    dest = tmp_path_factory.mktemp("manifests")
    build_corpus_manifests(corpus_dir, dest)
    return dest


@pytest.fixture(scope="session")
def mfcc_labels(manifest_dir, tmp_path_factory):
    """MFCC k-means (k=20) labels at 100 Hz for train and valid."""
    work = tmp_path_factory.mktemp("labels")
    run_cli("mtssl-dump-features", manifest_dir / "train.tsv", work / "feats", "--feature", "mfcc")
    run_cli("mtssl-learn-kmeans", work / "feats", "train", "1", work / "km.npy", "--n-clusters", "20")
    for split in ("train", "valid"):
        run_cli("mtssl-apply-kmeans", work / "km.npy", work / "km", "--manifest", manifest_dir / f"{split}.tsv")
    return work / "km"


@pytest.fixture(scope="session")
def tiny_hubert_checkpoint(manifest_dir, mfcc_labels, tmp_path_factory):
    """A tiny HuBERT trained for 20 updates by fairseq-hydra-train with the plugin's task."""
    run = tmp_path_factory.mktemp("hubert")
    run_cli(
        "fairseq-hydra-train",
        "--config-dir",
        REPO / "fairseq_mtssl/config/hubert/pretrain",
        "--config-name",
        "hubert_tiny_cpu",
        f"common.user_dir={PACKAGE_DIR}",
        f"task.data={manifest_dir}",
        f"task.label_dir={mfcc_labels}",
        'task.labels=["km"]',
        "model.label_rate=100",
        "optimization.max_update=20",
        f"hydra.run.dir={run}",
    )
    return run / "checkpoints" / "checkpoint_last.pt"


@pytest.fixture(scope="session")
def vgs_data(manifest_dir, corpus_dir, tmp_path_factory):
    """The session manifests with object-region image features (mtssl-image-features default) for every split."""
    import shutil

    data = tmp_path_factory.mktemp("vgs_data")
    for f in manifest_dir.iterdir():
        shutil.copy(f, data / f.name)
    for split in ("train", "valid", "test"):
        run_cli(
            "mtssl-image-features", "--images", data / f"{split}.images", "--root", corpus_dir, "--out", data / split
        )
    return data


@pytest.fixture(scope="module")
def spin_data(tmp_path_factory):
    """A voiced corpus of 3 speakers for SPIN (builders.write_spin_corpus), one per test module."""
    from builders import write_spin_corpus

    return write_spin_corpus(tmp_path_factory.mktemp("spin_corpus"))


def run_cli(*args, check=True, cwd=None, timeout=600):
    """Run a console script of this environment; return the CompletedProcess (text output)."""
    cmd = [str(BIN / args[0]), *map(str, args[1:])]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def assert_padded_layer_features_match(ckpt, manifest_dir, layer: int, dim: int):
    """Layer features as the reader computes them (each utterance zero-padded to its length bucket, with
    the model's padding mask) equal the model's own forward on the unpadded utterance, with the conv
    stack's frame count."""
    import numpy as np
    import soundfile as sf
    import torch

    from fairseq_mtssl import upstream
    from fairseq_mtssl.data.manifest import read_manifest
    from fairseq_mtssl.upstream.readers import open_reader

    model_reader = open_reader(str(ckpt))
    reader = model_reader.at_layer(layer)
    assert reader.batchable and reader.frame_rate == 50 and reader.dim == dim  # layer_norm front end, tiny configs
    m = read_manifest(manifest_dir / "valid.tsv")
    wavs = [sf.read(m.audio_path(i), dtype="float32")[0] for i in range(4)]
    assert any(upstream.bucket_length(len(w)) > len(w) for w in wavs)  # the padding is exercised
    for wav, feats in zip(wavs, reader(wavs)):
        source, _, _ = upstream.batch_waveforms([wav], model_reader.normalize)
        with torch.inference_mode():
            alone = upstream.layers.run_encoder(model_reader.encoder, source, None, layer)[0][0].numpy()
        assert feats.shape == alone.shape == (reader.num_frames(len(wav)), dim)
        assert abs(len(wav) / 320 - len(feats)) <= 2
        np.testing.assert_allclose(feats, alone, atol=1e-4, rtol=1e-4)
    return reader
