"""The frame-level phone probe: frame/phone mapping, and it tells informative features from noise."""

import numpy as np
import torch

from fairseq_mtssl.corpus.alignment import Segment
from fairseq_mtssl.evaluation.phone_probe import fit_probe, frame_phones, run_probe


def test_frame_phones_matches_brute_force():
    segs = [Segment(0.0, 0.013, "sil"), Segment(0.013, 0.05, "a"), Segment(0.05, 0.2, "b"), Segment(0.2, 0.31, "sil")]
    got = frame_phones(segs, 15, hop=320, window=400)
    for t, label in enumerate(got):
        centre = (t * 320 + 200) / 16000
        expected = next((s.label for s in segs if s.start <= centre < s.end), segs[-1].label)
        assert label == expected, (t, centre)


def test_probe_decodes_phones_from_mfcc_and_not_from_noise(manifest_dir, corpus_dir):
    result = run_probe("mfcc", 0, manifest_dir, corpus_dir / "alignments")
    assert result["test_acc"] > result["test_majority"] + 0.2, result  # held-out speakers
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 3000)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    clf = fit_probe(x[:2000], y[:2000], 5)
    with torch.no_grad():
        acc = (clf(torch.from_numpy(x[2000:])).argmax(1).numpy() == y[2000:]).mean()
    assert acc < 0.3  # chance is 0.2
