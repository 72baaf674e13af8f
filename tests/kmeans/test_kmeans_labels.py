"""Feature dumps (sharded, resumable after kill -9), k-means learning and label assignment."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from npy_append_array import NpyAppendArray

from fairseq_mtssl.data.label_checks import LabelMismatchError, check_frame_labels
from fairseq_mtssl.data.manifest import read_manifest
from fairseq_mtssl.kmeans.apply_kmeans import CentroidAssigner, apply_to_audio, apply_to_dumped
from fairseq_mtssl.kmeans.dump_features import dump_features, load_features, recover_partial, shard_paths
from fairseq_mtssl.kmeans.learn_kmeans import fairseq_minibatch_kmeans, learn_kmeans
from fairseq_mtssl.upstream.readers import MfccReader


@pytest.fixture(scope="module")
def mfcc_dump(manifest_dir, tmp_path_factory):
    feat_dir = tmp_path_factory.mktemp("feats")
    dump_features(manifest_dir / "train.tsv", feat_dir, MfccReader())
    return feat_dir


def test_sharded_dump_equals_single_dump(manifest_dir, mfcc_dump, tmp_path):
    for rank in range(3):
        dump_features(
            manifest_dir / "train.tsv", tmp_path, MfccReader(), rank=rank, nshard=3, max_batch_samples=200_000
        )
    ((single, single_len),) = load_features(mfcc_dump, "train", 1)
    shards = load_features(tmp_path, "train", 3)
    np.testing.assert_array_equal(np.concatenate([a for a, _ in shards]), single)
    assert sum((n for _, n in shards), []) == single_len
    assert len(single_len) == len(read_manifest(manifest_dir / "train.tsv"))


def test_torn_partial_files_are_repaired(manifest_dir, mfcc_dump, tmp_path):
    """The states a kill can leave: extra rows after the last length line, a half-written line."""
    ((full, lens),) = load_features(mfcc_dump, "train", 1)
    npy, ln = shard_paths(tmp_path, "train", 0, 1)
    part_npy, part_len = npy.with_name(npy.name + ".partial"), ln.with_name(ln.name + ".partial")
    done = 5
    rows = sum(lens[:done])
    with NpyAppendArray(str(part_npy)) as out:
        out.append(np.ascontiguousarray(full[: rows + lens[done]]))  # one more utterance than recorded
    part_len.write_text("".join(f"{n}\n" for n in lens[:done]) + str(lens[done])[:1])  # torn last line
    assert recover_partial(part_npy, part_len) == done
    assert np.load(part_npy).shape[0] == rows
    dump_features(manifest_dir / "train.tsv", tmp_path, MfccReader())
    ((resumed, resumed_len),) = load_features(tmp_path, "train", 1)
    np.testing.assert_array_equal(resumed, full)
    assert resumed_len == lens and not part_npy.exists()


def test_dump_killed_with_sigkill_resumes_to_the_same_result(manifest_dir, mfcc_dump, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "fairseq_mtssl.kmeans.dump_features",
        str(manifest_dir / "train.tsv"),
        str(tmp_path),
        "--max-batch-samples",
        "50000",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part_len = tmp_path / "train_0_1.len.partial"
    deadline = time.time() + 120
    while time.time() < deadline and not (part_len.exists() and part_len.read_text().count("\n") >= 3):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    npy, ln = shard_paths(tmp_path, "train", 0, 1)
    assert not npy.exists() and not ln.exists(), "a killed dump must not leave files with final names"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ((resumed, resumed_len),) = load_features(tmp_path, "train", 1)
    ((full, lens),) = load_features(mfcc_dump, "train", 1)
    assert resumed_len == lens
    np.testing.assert_array_equal(resumed, full)


def test_fairseq_kmeans_defaults():
    km = fairseq_minibatch_kmeans(100)
    assert (km.init, km.batch_size, km.n_init, km.max_iter, km.max_no_improvement, km.reassignment_ratio, km.tol) == (
        "k-means++",
        10000,
        20,
        100,
        100,
        0.0,
        0.0,
    )


def test_assignment_matches_brute_force():
    rng = np.random.default_rng(0)
    C, x = rng.normal(size=(17, 39)), rng.normal(size=(500, 39)) * 3
    brute = np.array([np.argmin([np.sum((xi - c) ** 2) for c in C]) for xi in x])
    np.testing.assert_array_equal(CentroidAssigner(C)(x), brute)


def test_labels_from_dump_and_from_audio_are_identical_and_fit_the_audio(manifest_dir, mfcc_dump, tmp_path):
    km = tmp_path / "km.npy"
    model = learn_kmeans(mfcc_dump, "train", 1, km, n_clusters=12, percent=0.5, seed=0)
    assert np.load(km, allow_pickle=False).shape == model.cluster_centers_.shape == (12, 39)
    a = apply_to_dumped(km, tmp_path / "a", "train", mfcc_dump)
    b = apply_to_audio(km, tmp_path / "b", manifest_dir / "train.tsv", MfccReader(), max_batch_samples=300_000)
    assert a.read_text() == b.read_text()
    ((feats, lens),) = load_features(mfcc_dump, "train", 1)
    first = np.array(a.read_text().splitlines()[0].split(), dtype=int)
    np.testing.assert_array_equal(first, model.predict(np.asarray(feats[: lens[0]], dtype=np.float32)))
    assert (tmp_path / "a" / "dict.km.txt").read_text().splitlines() == [f"{i} 1" for i in range(12)]
    assert check_frame_labels(manifest_dir / "train.tsv", a, label_rate=100) == len(lens)


def test_label_mismatches_are_errors_naming_file_and_line(manifest_dir, mfcc_dump, tmp_path):
    km = tmp_path / "km.npy"
    learn_kmeans(mfcc_dump, "train", 1, km, n_clusters=8, percent=0.3)
    labels = apply_to_dumped(km, tmp_path, "train", mfcc_dump)
    lines = labels.read_text().splitlines()
    with pytest.raises(LabelMismatchError, match="wrong label_rate"):
        check_frame_labels(manifest_dir / "train.tsv", labels, label_rate=50)
    (tmp_path / "short.km").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(
        LabelMismatchError, match=rf"short.km: {len(lines) - 1} lines but .*train.tsv lists {len(lines)}"
    ):
        check_frame_labels(manifest_dir / "train.tsv", tmp_path / "short.km", label_rate=100)
    lines[3] = " ".join(lines[3].split()[:-30])
    (tmp_path / "cut.km").write_text("\n".join(lines) + "\n")
    with pytest.raises(LabelMismatchError, match=r"cut.km:4: .* labels at 100 Hz"):
        check_frame_labels(manifest_dir / "train.tsv", tmp_path / "cut.km", label_rate=100)
