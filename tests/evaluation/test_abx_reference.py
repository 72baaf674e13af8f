"""mtssl-abx against the reference tools themselves: libri-light's ABX (zerospeech-libriabx, its own code
and Cython DTW) and fastabx. Skipped, with the reason, where a reference cannot be imported."""

import numpy as np
import pytest
import torch
from builders import HAND_ACROSS, HAND_WITHIN, hand_example

from fairseq_mtssl.evaluation.abx import abx_scores, dtw_path_mean, read_items, write_items
from fairseq_mtssl.evaluation.libri_light_abx import libri_light_abx, random_item_set, unavailable_reason

LIBRI_LIGHT_MISSING = unavailable_reason()
needs_libri_light = pytest.mark.skipif(
    LIBRI_LIGHT_MISSING is not None, reason=f"libri-light's ABX unavailable: {LIBRI_LIGHT_MISSING}"
)


@needs_libri_light
def test_libri_light_gives_the_hand_computed_numbers(tmp_path):
    items, utts = hand_example()
    write_items(items, tmp_path / "hand.item")
    ref = libri_light_abx(tmp_path / "hand.item", utts, 10.0)
    assert ref["within"] == pytest.approx(HAND_WITHIN, abs=1e-6)
    assert ref["across"] == pytest.approx(HAND_ACROSS, abs=1e-6)


@needs_libri_light
def test_dtw_equals_libri_light_cython_dtw_with_ties():
    import libri_light_dtw

    rng = np.random.default_rng(0)
    mats = [rng.integers(0, 3, rng.integers(1, 8, 2)).astype(np.float32) for _ in range(300)]  # many ties
    mats += [rng.random(rng.integers(1, 8, 2)).astype(np.float32) for _ in range(100)]
    n, m = max(x.shape[0] for x in mats), max(x.shape[1] for x in mats)
    padded = torch.full((len(mats), n, m), 7.0)
    for k, x in enumerate(mats):
        padded[k, : x.shape[0], : x.shape[1]] = torch.from_numpy(x)
    got = dtw_path_mean(padded, torch.tensor([x.shape[0] for x in mats]), torch.tensor([x.shape[1] for x in mats]))
    want = [libri_light_dtw._dtw(x.shape[0], x.shape[1], x, True) for x in mats]
    np.testing.assert_array_equal(got.numpy(), np.array(want, dtype=np.float32))


@needs_libri_light
@pytest.mark.parametrize("frame_rate,dim,seed", [(50.0, 24, 0), (100.0, 8, 1)])
def test_random_features_score_as_libri_light(tmp_path, frame_rate, dim, seed):
    items, feats = random_item_set(40, dim, frame_rate, n_phones=4, n_speakers=4, seed=seed, phone_scale=0.5)
    write_items(items, tmp_path / "x.item")
    ours = abx_scores(read_items(tmp_path / "x.item"), feats, frame_rate)
    ref = libri_light_abx(tmp_path / "x.item", feats, frame_rate)
    if frame_rate == 50:
        assert ours["dropped_items"] > 0  # some 20-40 ms phones have no frame at 50 Hz under libri-light's rule
    assert 0.05 < ours["within"] < 0.45 and 0.05 < ours["across"] < 0.45
    assert ours["within"] == pytest.approx(ref["within"], abs=2e-7)
    assert ours["across"] == pytest.approx(ref["across"], abs=2e-7)
    # the former frame rule is measurably different
    centre = abx_scores(read_items(tmp_path / "x.item"), feats, frame_rate, item_frames="centre")
    assert centre["dropped_items"] == 0 and abs(centre["within"] - ref["within"]) > 1e-4


@needs_libri_light
def test_zero_frames_score_as_libri_light(tmp_path):
    # libri-light puts an all-zero frame at distance 1 from any other frame and 0 from another zero frame
    items, feats = random_item_set(30, 6, 50.0, n_phones=3, n_speakers=3, seed=3, phone_scale=0.5)
    for k, f in enumerate(feats.values()):
        f[k % 3 :: 3] = 0.0
    write_items(items, tmp_path / "x.item")
    ours = abx_scores(read_items(tmp_path / "x.item"), feats, 50.0)
    ref = libri_light_abx(tmp_path / "x.item", feats, 50.0)
    assert ours["within"] == pytest.approx(ref["within"], abs=2e-7)
    assert ours["across"] == pytest.approx(ref["across"], abs=2e-7)


def _fastabx_missing():
    try:
        import fastabx  # noqa: F401
    except SyntaxError as err:  # fastabx uses Python 3.12 syntax (PEP 695)
        return f"fastabx needs Python >= 3.12 ({err.msg})"
    except ImportError as err:
        return f"fastabx is not installed ({err}); it needs Python >= 3.12 and torchdtw, this venv runs Python 3.11"
    return None


@pytest.mark.skipif(_fastabx_missing() is not None, reason=str(_fastabx_missing()))
@pytest.mark.parametrize("librilight_bug", [True, False])
def test_random_features_score_as_fastabx(tmp_path, monkeypatch, librilight_bug):
    from fastabx import zerospeech_abx

    items, feats = random_item_set(40, 24, 50.0, n_phones=4, n_speakers=4, seed=2, phone_scale=0.5)
    items = [it for it in items if it.offset - it.onset > 0.04]  # fastabx refuses items with no frame
    write_items(items, tmp_path / "x.item")
    for utt, f in feats.items():
        np.save(tmp_path / f"{utt}.npy", f)
    # fastabx reproduces libri-light's exclusive item end only with FASTABX_WITH_LIBRILIGHT_BUG=1
    monkeypatch.setenv("FASTABX_WITH_LIBRILIGHT_BUG", "1" if librilight_bug else "0")
    rule = "libri-light" if librilight_bug else "fastabx"
    ours = abx_scores(read_items(tmp_path / "x.item"), feats, 50.0, item_frames=rule)
    for mode in ("within", "across"):
        ref = zerospeech_abx(
            tmp_path / "x.item",
            tmp_path,
            max_size_group=None,
            max_x_across=None,
            speaker=mode,
            frequency=50,
            feature_maker=lambda p: torch.from_numpy(np.load(p)),
            extension=".npy",
            device="cpu",
            progress=False,
        )
        assert ours[mode] == pytest.approx(ref, abs=1e-6)
