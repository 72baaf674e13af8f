"""The embedded corpus: real, aligned, multi-speaker speech, deterministic from its seed."""

import json

import numpy as np
import pytest
import soundfile as sf

from fairseq_mtssl.corpus.alignment import SILENCE, read_ctm
from fairseq_mtssl.corpus.synth import ensure_corpus


def _captions(corpus_dir, split):
    return json.loads((corpus_dir / "captions" / f"{split}.json").read_text())["data"]


def test_layout_and_audio_format(corpus_dir):
    info = json.loads((corpus_dir / "corpus.json").read_text())
    assert set(info["utterances"]) == {"train", "valid", "test"}
    for split in ("train", "valid", "test"):
        data = _captions(corpus_dir, split)
        assert sum(len(d["captions"]) for d in data) == info["utterances"][split]
        for entry in data:
            assert (corpus_dir / entry["image"]).exists()
            for cap in entry["captions"]:
                wav_info = sf.info(str(corpus_dir / cap["wav"]))
                assert (wav_info.samplerate, wav_info.channels) == (16000, 1)
                assert 0.8 < wav_info.duration < 6.0
    assert len(info["phones"]) > 25 and SILENCE in info["phones"]


def test_test_speakers_are_held_out(corpus_dir):
    spk = {
        s: {c["speaker"] for d in _captions(corpus_dir, s) for c in d["captions"]} for s in ("train", "valid", "test")
    }
    assert spk["test"].isdisjoint(spk["train"] | spk["valid"])
    assert len(spk["train"]) >= 8 and len(spk["test"]) >= 3
    images = {s: {d["image"] for d in _captions(corpus_dir, s)} for s in ("train", "valid", "test")}
    assert images["train"].isdisjoint(images["valid"]) and images["train"].isdisjoint(images["test"])


def test_alignments_cover_each_file_and_match_the_audio(corpus_dir):
    phones = read_ctm(corpus_dir / "alignments" / "train.phones.ctm")
    words = read_ctm(corpus_dir / "alignments" / "train.words.ctm")
    vowel_energy, sil_energy = [], []
    for entry in _captions(corpus_dir, "train"):
        for cap in entry["captions"]:
            wav, sr = sf.read(str(corpus_dir / cap["wav"]))
            segs = phones[cap["uttid"]]
            assert segs[0].start == 0.0
            assert abs(segs[-1].end - len(wav) / sr) < 1e-3
            for a, b in zip(segs, segs[1:]):
                assert abs(a.end - b.start) < 1e-6 and b.end > b.start
            spoken = [w for seg in words[cap["uttid"]] if seg.label != SILENCE for w in seg.label.split("+")]
            assert spoken == cap["text"].split()
            for s in segs:
                chunk = wav[int(s.start * sr) : int(s.end * sr)]
                if s.label == SILENCE and len(chunk) > 160:
                    sil_energy.append(np.mean(chunk**2))
                elif s.label in ("E", "a", "aI", "u:", "i:", "O:", "oU"):
                    vowel_energy.append(np.mean(chunk**2))
    # If the alignment were shifted or invented, silences would not be far quieter than vowels.
    assert np.median(sil_energy) < 0.05 * np.median(vowel_energy)


@pytest.mark.slow
def test_same_seed_same_corpus_other_seed_other_corpus(corpus_dir, tmp_path):
    again = tmp_path / "again"
    ensure_corpus(again, hours=0.03, seed=3)
    for rel in ("alignments/train.phones.ctm", "captions/test.json", "scenes.jsonl"):
        assert (again / rel).read_bytes() == (corpus_dir / rel).read_bytes()
    first = _captions(corpus_dir, "train")[0]["captions"][0]["wav"]
    assert (again / first).read_bytes() == (corpus_dir / first).read_bytes()
    other = tmp_path / "other"
    ensure_corpus(other, hours=0.03, seed=4)
    assert (other / "scenes.jsonl").read_bytes() != (corpus_dir / "scenes.jsonl").read_bytes()


def test_existing_corpus_with_other_parameters_is_not_overwritten(corpus_dir):
    import pytest

    with pytest.raises(FileExistsError, match="--force"):
        ensure_corpus(corpus_dir, hours=0.03, seed=99)
    assert json.loads((corpus_dir / "corpus.json").read_text())["params"]["seed"] == 3
