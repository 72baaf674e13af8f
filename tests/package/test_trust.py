"""Nothing unpickles code, no silent wrong result, clean one-line errors, outputs readable under the umask."""

import json
import os
import pickle
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import BIN, run_cli

from fairseq_mtssl.data.label_checks import LabelMismatchError, check_frame_labels
from fairseq_mtssl.data.manifest import ManifestError, check_task_dirs, read_manifest
from fairseq_mtssl.kmeans.dump_features import FeatureDumpError, dump_features
from fairseq_mtssl.prep.librispeech_manifest import LibriSpeechError, build_librispeech_manifest
from fairseq_mtssl.prep.spokencoco_manifest import CaptionFileError, read_caption_entries
from fairseq_mtssl.upstream.readers import MfccReader


class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with exit code 1 and one line on stderr, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in err, err
    return err


# -- code execution ------------------------------------------------------------------------------


def test_pickled_kmeans_is_refused_without_the_flag(manifest_dir, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "km.joblib"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    proc = run_cli("mtssl-apply-kmeans", evil, tmp_path / "lab", "--manifest", manifest_dir / "valid.tsv", check=False)
    _one_line_error(proc, str(evil), "executes code", "--trust-pickled-kmeans")
    assert not marker.exists()
    # the flag means what it says: the file is unpickled (and here it runs its payload)
    run_cli(
        "mtssl-apply-kmeans", evil, tmp_path / "lab", "--manifest", manifest_dir / "valid.tsv",
        "--trust-pickled-kmeans", check=False,
    )  # fmt: skip
    assert marker.exists()


def test_a_text_file_as_kmeans_model_is_a_clear_error(manifest_dir, tmp_path):
    text = tmp_path / "km.npy"
    text.write_text("not centroids\n")
    proc = run_cli("mtssl-apply-kmeans", text, tmp_path / "lab", "--manifest", manifest_dir / "valid.tsv", check=False)
    _one_line_error(proc, str(text), "not a .npy centroid array")


def test_kmeans_learnt_on_mfcc_is_refused_for_another_feature(manifest_dir, tmp_path):
    from fairseq_mtssl.kmeans.apply_kmeans import CentroidAssigner
    from fairseq_mtssl.kmeans.centroids import KmeansFileError, save_centroids

    km = tmp_path / "km.npy"
    save_centroids(km, np.zeros((4, 39)), MfccReader().spec())
    CentroidAssigner.load(km, feature=MfccReader().spec())
    with pytest.raises(KmeansFileError, match="learnt on feature 'mfcc' \\(asked: 'model'\\)"):
        CentroidAssigner.load(km, feature={"feature": "model", "layer": 2, "dim": 39})


@pytest.mark.slow
def test_a_checkpoint_that_pickles_code_is_refused_even_with_weights_only_forced_off(
    manifest_dir, corpus_dir, tmp_path
):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    torch.save({"cfg": {"model": {"_name": "hubert"}}, "model": {}, "extra": _Payload(marker)}, ckpt)
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    for cmd in (
        ["mtssl-dump-features", manifest_dir / "valid.tsv", tmp_path / "f", "--feature", "model", "--checkpoint", ckpt,
         "--layer", "1"],
        ["mtssl-qbe", ckpt, "--layer", "1", "--manifests", manifest_dir, "--alignments", corpus_dir / "alignments"],
        ["mtssl-phone-probe", ckpt, "--layer", "1", "--manifests", manifest_dir, "--alignments",
         corpus_dir / "alignments"],
        ["mtssl-superb-eval", ckpt, "--split", "test"],
        ["mtssl-vgs-retrieval", ckpt, "--split", "test"],
        ["mtssl-export-hubert", ckpt, tmp_path / "out.pt"],
    ):  # fmt: skip
        proc = subprocess.run([str(BIN / cmd[0]), *map(str, cmd[1:])], capture_output=True, text=True, env=env)
        _one_line_error(proc, str(ckpt))
        assert not marker.exists(), cmd[0]


# -- silent wrong results ------------------------------------------------------------------------


def test_a_truncated_wav_is_refused_when_building_the_manifest(tmp_path):
    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio" / "ok.wav", np.zeros(16000, dtype=np.float32), 16000, subtype="PCM_16")
    sf.write(tmp_path / "full.wav", np.zeros(32000, dtype=np.float32), 16000, subtype="PCM_16")
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "audio" / "cut.wav").write_bytes(data[: 44 + 15989 * 2])
    assert sf.info(tmp_path / "audio" / "cut.wav").frames == 15989  # libsndfile reads it short, silently
    proc = run_cli("mtssl-manifest-wav", tmp_path / "audio", "--dest", tmp_path / "m", check=False)
    _one_line_error(proc, "cut.wav", "truncated WAV", "64000 data bytes", "31978")
    assert not (tmp_path / "m").exists()


def test_labels_outside_the_dictionary_are_errors_naming_the_line(manifest_dir, tmp_path):
    m = read_manifest(manifest_dir / "valid.tsv")
    lines = [" ".join(["3"] * round(e.num_samples / 160)) for e in m.entries]
    (tmp_path / "dict.km.txt").write_text("".join(f"{i} 1\n" for i in range(5)))
    for bad in ("x7", "-3", "5"):
        bad_lines = list(lines)
        bad_lines[1] = bad_lines[1].replace("3", bad, 1)
        (tmp_path / "valid.km").write_text("\n".join(bad_lines) + "\n")
        with pytest.raises(LabelMismatchError, match=rf"valid.km:2: label '{bad}' is not in .*dict.km.txt"):
            check_frame_labels(
                manifest_dir / "valid.tsv", tmp_path / "valid.km", 100, dict_path=tmp_path / "dict.km.txt"
            )
    (tmp_path / "valid.km").write_text("\n".join(lines) + "\n")
    assert check_frame_labels(
        manifest_dir / "valid.tsv", tmp_path / "valid.km", 100, dict_path=tmp_path / "dict.km.txt"
    )
    bad_lines = list(lines)
    bad_lines[0] = "x7 " + bad_lines[0]
    (tmp_path / "valid.km").write_text("\n".join(bad_lines) + "\n")
    proc = run_cli(
        "mtssl-check-labels", manifest_dir / "valid.tsv", tmp_path / "valid.km", "--label-rate", "100", check=False
    )
    _one_line_error(proc, "valid.km:1: label 'x7'")


def _librispeech(root: Path, manifest_dir: Path, n: int = 3):
    m = read_manifest(manifest_dir / "valid.tsv")
    words = (manifest_dir / "valid.wrd").read_text().splitlines()
    d = root / "100" / "7"
    d.mkdir(parents=True)
    with open(d / "100-7.trans.txt", "w") as f:
        for i in range(n):
            sf.write(d / f"100-7-{i:04d}.flac", sf.read(m.audio_path(i))[0], 16000)
            f.write(f"100-7-{i:04d} {words[i].upper()}\n")
    return d


def test_librispeech_audio_without_transcript_is_reported(manifest_dir, tmp_path):
    d = _librispeech(tmp_path / "ls", manifest_dir)
    sf.write(d / "100-7-0099.flac", np.zeros(16000, dtype=np.float32), 16000)
    with pytest.raises(LibriSpeechError, match=r"100-7-0099.flac: no transcript line names this audio \(1 such"):
        build_librispeech_manifest(tmp_path / "ls", tmp_path / "out", "train")
    assert not (tmp_path / "out").exists()
    n, left_out = build_librispeech_manifest(tmp_path / "ls", tmp_path / "out", "train", allow_untranscribed=True)
    assert (n, left_out) == (3, 1)


def test_librispeech_validates_everything_before_writing(corpus_dir, manifest_dir, tmp_path):
    _librispeech(tmp_path / "ls", manifest_dir)
    out = tmp_path / "out"
    build_librispeech_manifest(tmp_path / "ls", out, "train", lexicon=corpus_dir / "lexicon.txt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    trans = tmp_path / "ls/100/7/100-7.trans.txt"
    trans.write_text(trans.read_text().replace("\n", " ZYZZYVA\n", 1))  # a word the lexicon lacks, on line 1
    with pytest.raises(LibriSpeechError, match="trans.txt:1: word not in lexicon"):
        build_librispeech_manifest(tmp_path / "ls", out, "train", lexicon=corpus_dir / "lexicon.txt")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old outputs, untouched


def test_dump_into_a_folder_of_another_dump_or_order_is_refused(manifest_dir, tmp_path):
    feats = tmp_path / "feats"
    dump_features(manifest_dir / "valid.tsv", feats, MfccReader(), split="valid")
    dump_features(manifest_dir / "valid.tsv", feats, MfccReader(), split="valid")  # the same request: done

    class OtherFeature(MfccReader):
        def spec(self):
            return {"feature": "model", "checkpoint": "/x.pt", "checkpoint_bytes": 1, "layer": 2, "dim": 39}

    with pytest.raises(FeatureDumpError, match="holds another dump .*feature: 'mfcc' there, 'model' asked"):
        dump_features(manifest_dir / "valid.tsv", feats, OtherFeature(), split="valid")
    # a reordered manifest, resumed from a partial dump
    lines = (manifest_dir / "valid.tsv").read_text().splitlines()
    (tmp_path / "valid.tsv").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    for name in ("valid_0_1.npy", "valid_0_1.len"):
        os.replace(feats / name, feats / (name + ".partial"))
    with pytest.raises(FeatureDumpError, match="manifest_sha1"):
        dump_features(tmp_path / "valid.tsv", feats, MfccReader(), split="valid")


def test_a_second_dump_into_the_same_shard_is_refused_while_one_runs(manifest_dir, tmp_path):
    started, release = threading.Event(), threading.Event()

    class SlowReader(MfccReader):
        def __call__(self, wavs):
            started.set()
            release.wait(30)
            return super().__call__(wavs)

    errors = []

    def first():
        try:
            dump_features(manifest_dir / "valid.tsv", tmp_path / "f", SlowReader(), split="valid", max_batch_samples=1)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(30)
    proc = run_cli("mtssl-dump-features", manifest_dir / "valid.tsv", tmp_path / "f", "--split", "valid", check=False)
    release.set()
    t.join()
    _one_line_error(proc, "another mtssl-dump-features is writing this shard")
    assert not errors
    n = len(read_manifest(manifest_dir / "valid.tsv"))
    assert len((tmp_path / "f" / "valid_0_1.len").read_text().split()) == n


def test_sharded_labels_are_merged_into_the_split_file(manifest_dir, tmp_path):
    from fairseq_mtssl.kmeans.centroids import save_centroids

    km = tmp_path / "km.npy"
    save_centroids(km, np.random.default_rng(0).normal(size=(6, 39)), MfccReader().spec())
    run_cli("mtssl-apply-kmeans", km, tmp_path / "one", "--manifest", manifest_dir / "valid.tsv")
    for rank in (1, 0):
        run_cli("mtssl-apply-kmeans", km, tmp_path / "two", "--manifest", manifest_dir / "valid.tsv",
                "--rank", rank, "--nshard", 2)  # fmt: skip
    assert (tmp_path / "two" / "valid.km").read_text() == (tmp_path / "one" / "valid.km").read_text()


# -- messages and files --------------------------------------------------------------------------


def test_unclear_inputs_get_clear_messages(manifest_dir, tmp_path):
    lines = (manifest_dir / "valid.tsv").read_text().splitlines()
    (tmp_path / "moved.tsv").write_text("\n".join(["/no/such/root", *lines[1:]]) + "\n")
    with pytest.raises(ManifestError, match="moved.tsv:1: the audio root /no/such/root is not a directory"):
        read_manifest(tmp_path / "moved.tsv")
    (tmp_path / "caps.json").write_text(json.dumps({"data": ["x"]}))
    with pytest.raises(CaptionFileError, match=r"caps.json: data\[0\] is a str"):
        read_caption_entries(tmp_path / "caps.json")


def test_a_relative_task_path_error_says_it_is_resolved_against_the_run_dir(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ManifestError, match="task.label_dir=runs/x/labels: not a directory; a relative path is "
                       "resolved against the run directory .*task.label_dir=\\$PWD/runs/x/labels"):  # fmt: skip
        check_task_dirs(SimpleNamespace(data=str(tmp_path), label_dir="runs/x/labels"), "data", "label_dir")


def test_outputs_are_readable_under_the_umask(tmp_path):
    from fairseq_mtssl.atomic import atomic_directory, atomic_write

    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "f.txt") as f:
            f.write("x")
        with atomic_directory(tmp_path / "d") as d:
            (d / "a").write_text("y")
        assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
        os.umask(0o077)
        with atomic_write(tmp_path / "g.txt") as f:
            f.write("x")
        assert (tmp_path / "g.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    "cmd,needle",
    [
        (["mtssl-manifest-wav", "/no/such/dir", "--dest", "{tmp}/m"], "/no/such/dir"),
        (["mtssl-manifest-librispeech", "{tmp}", "--dest", "{tmp}/m", "--split", "train"], "no *.trans.txt"),
        (["mtssl-manifest-spokencoco", "{tmp}/none.json", "--audio-root", "{tmp}", "--dest", "{tmp}/m", "--split", "x"],
         "none.json"),
        (["mtssl-check-labels", "{tmp}/none.tsv", "{tmp}/none.km", "--label-rate", "100"], "none.tsv"),
        (["mtssl-learn-kmeans", "{tmp}", "train", "1", "{tmp}/km.npy", "--n-clusters", "3"], "train_0_1"),
        (["mtssl-dump-features", "{tmp}/none.tsv", "{tmp}/f"], "none.tsv"),
        (["mtssl-abx", "mfcc", "--manifest", "{tmp}/none.tsv", "--items", "{tmp}/none.item"], "none"),
        (["mtssl-export-data2vec", "{tmp}/none.pt", "{tmp}/out.pt"], "none.pt"),
        (["mtssl-export-transformers", "{tmp}/none.pt", "{tmp}/out"], "none.pt"),
        (["mtssl-image-features", "--images", "{tmp}/none.images", "--root", "{tmp}", "--out", "{tmp}/o"], "none.images"),
    ],
)  # fmt: skip
def test_expected_errors_are_one_line_with_exit_code_1(tmp_path, cmd, needle):
    proc = run_cli(*[c.format(tmp=tmp_path) for c in cmd], check=False)
    _one_line_error(proc, needle)
