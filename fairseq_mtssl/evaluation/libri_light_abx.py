"""libri-light's own ABX (zerospeech-libriabx), called on in-memory features: the reference that
tests/evaluation/test_abx_reference.py and benchmarks/bench_abx.py compare ``mtssl-abx`` with.

zerospeech-libriabx is optional (``pip install --no-deps zerospeech-libriabx progressbar2 python-utils``,
then ``scripts/build_libriabx_dtw.py`` to rebuild its DTW for numpy 2). Its package ``__init__`` imports a
virtual-dataset wrapper, and ``eval_ABX`` imports libri-light's CPC loader, which imports torchaudio; none of
them is needed to score features, so this registers the two packages without running their ``__init__`` and
puts a stand-in that refuses to load CPC in place of the loader; its progress bars are silenced (see
``_SilentBar``). Everything that scores (``eval_ABX.ABX``, ``ABX_src``, the Cython DTW) is libri-light's
code, unchanged.
"""

import contextlib
import importlib
import importlib.util
import io
import sys
import types
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch


def _refuse_cpc(*args, **kwargs):
    raise RuntimeError("libri-light's CPC loader is not loaded here (it imports torchaudio); give features")


def load_eval_abx():
    """libri-light's ``eval_ABX`` module; ImportError (with the reason) when it cannot be used."""
    if "libriabx" not in sys.modules:
        spec = importlib.util.find_spec("libriabx")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("zerospeech-libriabx is not installed (pip install --no-deps zerospeech-libriabx)")
        root = Path(list(spec.submodule_search_locations)[0])
        for name, path in (("libriabx", root), ("libriabx.libri_light", root / "libri_light")):
            # the package, registered without running its __init__
            spec = importlib.util.spec_from_file_location(
                name, path / "__init__.py", submodule_search_locations=[str(path)]
            )
            sys.modules[name] = importlib.util.module_from_spec(spec)
    if "libriabx.libri_light.CPC_loader" not in sys.modules:
        stand_in = types.ModuleType("libriabx.libri_light.CPC_loader")
        stand_in.load_cpc_features = stand_in.build_feature_from_file = _refuse_cpc
        sys.modules["libriabx.libri_light.CPC_loader"] = stand_in
    try:
        import libri_light_dtw  # noqa: F401
    except (ImportError, ValueError) as err:  # ValueError: built against another numpy
        raise ImportError(f"libri-light's DTW does not import ({err}): run scripts/build_libriabx_dtw.py") from err
    eval_abx = importlib.import_module("libriabx.libri_light.eval_ABX")
    for module in (eval_abx.abx_g, eval_abx.abx_it):
        module.progressbar = types.SimpleNamespace(ProgressBar=_SilentBar)
    return eval_abx


class _SilentBar:
    """Stands in for libri-light's ``progressbar.ProgressBar``: eval_ABX sizes the "across" bar before it
    sets ``max_x_across``, so with more than 5 X speakers the bar overflows and progressbar2 raises
    ("Value ... is too large"). The bar only displays progress; scoring is untouched."""

    def __init__(self, *args, **kwargs):
        pass

    def start(self):
        return self

    def update(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def unavailable_reason() -> Optional[str]:
    try:
        load_eval_abx()
    except ImportError as err:
        return str(err)
    return None


def libri_light_abx(
    item_file,
    utterance_feats,
    frame_rate: float,
    modes: Sequence[str] = ("within", "across"),
    max_size_group: Optional[int] = None,
    max_x_across: Optional[int] = None,
    quiet: bool = True,
) -> Dict[str, float]:
    """libri-light's ``ABX`` (cosine distance, CPU) for ``item_file`` on ``utterance_feats``: a dict
    ``{utt: (T, C)}``, or a folder of ``{utt}.npy`` read as libri-light's ``--file_extension .npy`` does.
    Returns ``{mode: error 0..1}``. ``max_size_group`` / ``max_x_across`` None: above every group and
    speaker count, so libri-light samples nothing and scores every triplet; its own defaults are 10 and 5."""
    eval_abx = load_eval_abx()
    with open(item_file, encoding="utf-8") as f:
        lines = f.readlines()
    n_speakers = len({line.split()[6] for line in lines[1:] if line.strip()})
    if isinstance(utterance_feats, dict):
        seq_list = [(utt, utt) for utt in sorted(utterance_feats)]

        def feature_function(utt):  # libri-light normalises in place: hand it a copy
            return torch.from_numpy(np.array(utterance_feats[utt], dtype=np.float32))

    else:
        seq_list = eval_abx.find_all_files(str(utterance_feats), ".npy")
        feature_function = eval_abx.load_npy
    sink = io.StringIO()
    with contextlib.ExitStack() as stack:
        if quiet:
            stack.enter_context(contextlib.redirect_stdout(sink))
            stack.enter_context(contextlib.redirect_stderr(sink))
        return eval_abx.ABX(
            feature_function,
            str(item_file),
            seq_list,
            "cosine",
            frame_rate,
            list(modes),
            cuda=False,
            max_x_across=max_x_across if max_x_across is not None else n_speakers,
            max_size_group=max_size_group if max_size_group is not None else len(lines),
        )


def random_item_set(
    n_utts: int,
    dim: int,
    frame_rate: float = 50.0,
    n_phones: int = 5,
    n_speakers: int = 3,
    phones_per_utt: int = 12,
    seed: int = 0,
    phone_scale: float = 1.0,
):
    """A random ABX set for comparing implementations: ``(items, {utt: (T, C) float32})``. Each utterance is a
    random phone string (durations 20-160 ms, so a few items get no frame at ``frame_rate``); its frames are
    the phone's direction (times ``phone_scale``), a weaker speaker direction and unit noise. Items are the phones with both neighbours."""
    from .abx import AbxItem

    rng = np.random.default_rng(seed)
    phone_dir = rng.standard_normal((n_phones, dim))
    speaker_dir = rng.standard_normal((n_speakers, dim))
    items, feats = [], {}
    for u in range(n_utts):
        utt, spk = f"utt{u:04d}", u % n_speakers
        phones = rng.integers(0, n_phones, phones_per_utt)
        bounds = np.round(np.concatenate([[0.0], np.cumsum(rng.uniform(0.02, 0.16, phones_per_utt))]), 4)
        n_frames = int(np.ceil(bounds[-1] * frame_rate)) + 1
        centres = (np.arange(n_frames) + 0.5) / frame_rate
        which = np.clip(np.searchsorted(bounds, centres, side="right") - 1, 0, phones_per_utt - 1)
        f = phone_scale * (phone_dir[phones[which]] + 0.6 * speaker_dir[spk]) + rng.standard_normal((n_frames, dim))
        feats[utt] = f.astype(np.float32)
        for k in range(1, phones_per_utt - 1):
            ph = [f"p{phones[k + d]}" for d in (-1, 0, 1)]
            items.append(AbxItem(utt, float(bounds[k]), float(bounds[k + 1]), ph[1], ph[0], ph[2], f"s{spk}"))
    return items, feats
