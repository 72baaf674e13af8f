"""Shared fixtures: one small embedded corpus and its manifests per test session.

The tests live in folders named after the package they test (tests/models/ for fairseq_mtssl/models/, ...),
end-to-end, training and distributed runs in tests/integration/; what several of them build (tiny
checkpoints, composed configs, the export round trip) is in tests/builders.py. This folder is put on
``sys.path`` so that every test file imports ``builders`` and ``conftest`` by name.
"""

import inspect
import os
import re
import shutil
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

# Under pytest-xdist (``-n 2``, the README's command) each worker, and every process its tests start, gets its
# share of the cores. Set before torch is imported: more threads than cores make torch's small ops 10-50x slower.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_threads))

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


def _shared(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` once per test run, its folder shared by every pytest-xdist worker.

    A session fixture runs once per worker; what the session fixtures below build (a corpus, labels, a
    trained HuBERT) would then be built twice. The first worker to ask builds it under a file lock in the
    run's base folder and marks it done; the others wait for the lock and reuse it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder = root / f"shared_{name}"
    built = root / f"shared_{name}.built"  # beside the folder, so that nothing in it changes what tests list
    with FileLock(str(root / f"shared_{name}.lock")):
        if not built.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            build(folder)
            built.touch()
    return folder


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    from fairseq_mtssl.corpus.synth import ensure_corpus

    return _shared(tmp_path_factory, "corpus", lambda d: ensure_corpus(d / "corpus", hours=0.03, seed=3)) / "corpus"


@pytest.fixture(scope="session")
def manifest_dir(corpus_dir, tmp_path_factory):
    from fairseq_mtssl.prep.corpus_manifest import build_corpus_manifests

    return _shared(tmp_path_factory, "manifests", lambda d: build_corpus_manifests(corpus_dir, d))


@pytest.fixture(scope="session")
def mfcc_labels(manifest_dir, tmp_path_factory):
    """MFCC k-means (k=20) labels at 100 Hz for train and valid."""

    def build(work):
        run_cli("mtssl-dump-features", manifest_dir / "train.tsv", work / "feats", "--feature", "mfcc")
        run_cli("mtssl-learn-kmeans", work / "feats", "train", "1", work / "km.npy", "--n-clusters", "20")
        for split in ("train", "valid"):
            run_cli("mtssl-apply-kmeans", work / "km.npy", work / "km", "--manifest", manifest_dir / f"{split}.tsv")

    return _shared(tmp_path_factory, "labels", build) / "km"


@pytest.fixture(scope="session")
def tiny_hubert_checkpoint(manifest_dir, mfcc_labels, tmp_path_factory):
    """A tiny HuBERT trained for 20 updates by fairseq-hydra-train with the plugin's task."""

    def build(run):
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

    return _shared(tmp_path_factory, "hubert", build) / "checkpoints" / "checkpoint_last.pt"


@pytest.fixture(scope="session")
def vgs_data(manifest_dir, corpus_dir, tmp_path_factory):
    """The session manifests with object-region image features (mtssl-image-features default) for every split."""

    def build(data):
        for f in manifest_dir.iterdir():
            if f.is_file():
                shutil.copy(f, data / f.name)
        for split in ("train", "valid", "test"):
            run_cli(
                "mtssl-image-features",
                "--images",
                data / f"{split}.images",
                "--root",
                corpus_dir,
                "--out",
                data / split,
            )

    return _shared(tmp_path_factory, "vgs_data", build)


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
