"""Manifest builders: formats, determinism, and clear errors on bad input."""

import difflib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fairseq_mtssl.data.audio import AudioFormatError
from fairseq_mtssl.data.manifest import ManifestError, read_manifest
from fairseq_mtssl.prep.common import letters
from fairseq_mtssl.prep.librispeech_manifest import LibriSpeechError, build_librispeech_manifest
from fairseq_mtssl.prep.spokencoco_manifest import build_spokencoco_manifest
from fairseq_mtssl.prep.wav_manifest import build_wav_manifests


def _tone(n=16000, sr=16000, channels=1):
    x = 0.1 * np.sin(np.arange(n) * 2 * np.pi * 220 / sr).astype(np.float32)
    return np.stack([x] * channels, 1) if channels > 1 else x


def _tree(root: Path, names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / name, _tone(16000 + len(name)), 16000)


def test_wav_tree_manifest_format_and_stable_split(tmp_path):
    names = [f"spk{i % 3}/utt{i:03d}.{'flac' if i % 2 else 'wav'}" for i in range(60)]
    _tree(tmp_path / "audio", names)
    counts = build_wav_manifests(tmp_path / "audio", tmp_path / "m", valid_percent=0.2, seed=0)
    train, valid = read_manifest(tmp_path / "m/train.tsv"), read_manifest(tmp_path / "m/valid.tsv")
    assert counts == {"train": len(train), "valid": len(valid)} and len(train) + len(valid) == 60
    assert 3 <= len(valid) <= 25
    assert train.root == str((tmp_path / "audio").resolve())
    for e in train.entries:
        assert e.num_samples == 16000 + len(e.path)
    assert [e.path for e in train.entries] == sorted(e.path for e in train.entries)
    # Adding files never moves an existing file to the other split.
    _tree(tmp_path / "audio", [f"spk9/new{i}.wav" for i in range(20)])
    build_wav_manifests(tmp_path / "audio", tmp_path / "m2", valid_percent=0.2, seed=0)
    valid2 = {e.path for e in read_manifest(tmp_path / "m2/valid.tsv").entries}
    assert {e.path for e in valid.entries} <= valid2


@pytest.mark.parametrize(
    "make_bad,message",
    [
        (lambda p: sf.write(p, _tone(channels=2), 16000), "2 channels"),
        (lambda p: sf.write(p, _tone(8000, 8000), 8000), "sample rate 8000"),
        (lambda p: p.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage"), "unreadable audio"),
    ],
    ids=["stereo", "8kHz", "corrupt"],
)
def test_wav_tree_rejects_bad_audio_naming_the_file(tmp_path, make_bad, message):
    _tree(tmp_path / "audio", ["a.wav", "b.wav"])
    bad = tmp_path / "audio" / "sub" / "bad.wav"
    bad.parent.mkdir()
    make_bad(bad)
    with pytest.raises(AudioFormatError, match=message) as err:
        build_wav_manifests(tmp_path / "audio", tmp_path / "m", valid_percent=0.0)
    assert "bad.wav" in str(err.value)
    assert not (tmp_path / "m" / "train.tsv").exists()


def test_truncated_audio_is_caught_when_read_against_the_manifest(tmp_path):
    from fairseq_mtssl.data.audio import read_audio

    _tree(tmp_path / "audio", ["a.wav"])
    build_wav_manifests(tmp_path / "audio", tmp_path / "m", valid_percent=0.0)
    m = read_manifest(tmp_path / "m/train.tsv")
    path = Path(m.audio_path(0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioFormatError, match=r"train.tsv:2.*manifest says"):
        read_audio(m.audio_path(0), m.where(0), m.entries[0].num_samples)


def test_empty_and_malformed_manifests_name_file_and_line(tmp_path):
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(ManifestError, match=r"empty.tsv:1: empty manifest"):
        read_manifest(tmp_path / "empty.tsv")
    (tmp_path / "rootonly.tsv").write_text(f"{tmp_path}\n")
    with pytest.raises(ManifestError, match="no audio files"):
        read_manifest(tmp_path / "rootonly.tsv")
    (tmp_path / "bad.tsv").write_text(f"{tmp_path}\na.wav\t100\nb.wav 200\n")
    with pytest.raises(ManifestError, match=r"bad.tsv:3: expected"):
        read_manifest(tmp_path / "bad.tsv")


def test_letters_format_matches_fairseq():
    assert letters("hello big world") == "H E L L O | B I G | W O R L D |"


def _librispeech_from_corpus(corpus_dir, manifest_dir, root):
    """Re-arrange some corpus utterances into LibriSpeech's layout (flac + trans.txt)."""
    m = read_manifest(manifest_dir / "valid.tsv")
    texts = (manifest_dir / "valid.wrd").read_text().splitlines()
    utts = []
    for i, (e, text) in enumerate(zip(m.entries, texts)):
        spk, chap = 100 + i % 2, 7
        utt = f"{spk}-{chap}-{i:04d}"
        d = root / str(spk) / str(chap)
        d.mkdir(parents=True, exist_ok=True)
        wav, sr = sf.read(m.audio_path(i))
        sf.write(d / f"{utt}.flac", wav, sr)
        with open(d / f"{spk}-{chap}.trans.txt", "a") as f:
            f.write(f"{utt} {text.upper()}\n")
        utts.append((utt, Path(e.path).stem, text))
    return utts


def test_librispeech_layout_with_lexicon_and_alignments(corpus_dir, manifest_dir, tmp_path):
    utts = _librispeech_from_corpus(corpus_dir, manifest_dir, tmp_path / "ls")
    n, left_out = build_librispeech_manifest(
        tmp_path / "ls", tmp_path / "out", "train", lexicon=corpus_dir / "lexicon.txt"
    )
    assert n == len(utts) and left_out == 0
    m = read_manifest(tmp_path / "out/train.tsv")
    wrd = (tmp_path / "out/train.wrd").read_text().splitlines()
    ltr = (tmp_path / "out/train.ltr").read_text().splitlines()
    phn = (tmp_path / "out/train.phn").read_text().splitlines()
    by_id = {u: text for u, _, text in utts}
    corpus_phones = {
        Path(e.path).stem: p
        for e, p in zip(
            read_manifest(manifest_dir / "valid.tsv").entries, (manifest_dir / "valid.phn").read_text().splitlines()
        )
    }
    by_orig = {u: orig for u, orig, _ in utts}
    lex = dict(line.split(" ", 1) for line in (corpus_dir / "lexicon.txt").read_text().splitlines())
    for e, w, lt, p in zip(m.entries, wrd, ltr, phn):
        utt = Path(e.path).name[: -len(".flac")]
        assert w == by_id[utt].upper() and lt == letters(w)
        expected, words = [], w.lower().split()
        while words:  # independent greedy lookup; "of+a" entries cover words spoken as one unit
            n = 2 if len(words) > 1 and f"{words[0]}+{words[1]}" in lex else 1
            expected += lex["+".join(words[:n])].split()
            words = words[n:]
        assert p.split() == expected
        # citation forms are close to what the voice said (connected speech adds linking r etc.)
        spoken = corpus_phones[by_orig[utt]].split()
        assert difflib.SequenceMatcher(a=p.split(), b=spoken).ratio() > 0.85
    assert (tmp_path / "out/dict.ltr.txt").exists() and (tmp_path / "out/dict.phn.txt").exists()

    # With the phone alignment instead (ids renamed to the LibriSpeech ones): sil dropped.
    ctm = [line.split() for line in (corpus_dir / "alignments/valid.phones.ctm").read_text().splitlines()]
    rename = {orig: utt for utt, orig, _ in utts}
    (tmp_path / "ls.ctm").write_text("".join(f"{rename[u]} {s} {e} {ph}\n" for u, s, e, ph in ctm))
    build_librispeech_manifest(tmp_path / "ls", tmp_path / "out2", "dev", alignments=tmp_path / "ls.ctm")
    phn2 = (tmp_path / "out2/dev.phn").read_text().splitlines()
    assert all("sil" not in line.split() and line for line in phn2)


def test_librispeech_word_missing_from_lexicon_names_transcript_line(corpus_dir, manifest_dir, tmp_path):
    _librispeech_from_corpus(corpus_dir, manifest_dir, tmp_path / "ls")
    (tmp_path / "lex.txt").write_text("A a#\n")
    with pytest.raises(LibriSpeechError, match=r"trans.txt:1: word not in lexicon"):
        build_librispeech_manifest(tmp_path / "ls", tmp_path / "out", "train", lexicon=tmp_path / "lex.txt")


def test_corpus_manifests_are_aligned_line_for_line(corpus_dir, manifest_dir):
    info = json.loads((corpus_dir / "corpus.json").read_text())
    for split in ("train", "valid", "test"):
        m = read_manifest(manifest_dir / f"{split}.tsv")
        assert len(m) == info["utterances"][split]
        images = (manifest_dir / f"{split}.images").read_text().splitlines()
        cols = {
            ext: (manifest_dir / f"{split}.{ext}").read_text().splitlines()
            for ext in ("img", "wrd", "ltr", "phn", "spk")
        }
        assert all(len(v) == len(m) for v in cols.values())
        captions = {
            c["uttid"]: (d["image"], c["text"])
            for d in json.loads((corpus_dir / f"captions/{split}.json").read_text())["data"]
            for c in d["captions"]
        }
        for i, e in enumerate(m.entries):
            image, text = captions[Path(e.path).stem]
            assert images[int(cols["img"][i])] == image and cols["wrd"][i] == text
            assert e.num_samples == sf.info(m.audio_path(i)).frames
    phones = set((manifest_dir / "dict.phn.txt").read_text().split()[::2])
    assert "sil" not in phones and len(phones) > 20


def test_spokencoco_missing_image_names_the_entry(corpus_dir, tmp_path):
    data = json.loads((corpus_dir / "captions/valid.json").read_text())
    data["data"][1]["image"] = "images/does_not_exist.png"
    (tmp_path / "caps.json").write_text(json.dumps(data))
    with pytest.raises(FileNotFoundError, match=r"caps.json: data\[1\]: image images/does_not_exist.png not found"):
        build_spokencoco_manifest(tmp_path / "caps.json", corpus_dir, corpus_dir, tmp_path / "out", "valid")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_corpus_dictionaries_cover_every_split(manifest_dir):
    """Held-out speakers may use phones the training captions do not: they are listed with count 0."""
    for labels in ("phn", "ltr"):
        entries = dict(line.rsplit(" ", 1) for line in (manifest_dir / f"dict.{labels}.txt").read_text().splitlines())
        train = set((manifest_dir / f"train.{labels}").read_text().split())
        for split in ("train", "valid", "test"):
            assert set((manifest_dir / f"{split}.{labels}").read_text().split()) <= set(entries), (labels, split)
        assert all(int(c) > 0 for s, c in entries.items() if s in train)
        assert all(int(c) == 0 for s, c in entries.items() if s not in train)
