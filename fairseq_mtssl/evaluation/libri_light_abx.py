"""libri-light's own ABX (zerospeech-libriabx), called on in-memory features: the reference that
tests/test_abx_reference.py and benchmarks/bench_abx.py compare ``mtssl-abx`` with.

zerospeech-libriabx is optional (``pip install --no-deps zerospeech-libriabx progressbar2 python-utils``,
then ``scripts/build_libriabx_dtw.py`` to rebuild its DTW for numpy 2). Its package ``__init__`` imports a
virtual-dataset wrapper, and ``eval_ABX`` imports libri-light's CPC loader, which imports torchaudio; none of
them is needed to score features, so this registers the two packages without running their ``__init__`` and
puts a stand-in that refuses to load CPC in place of the loader. Everything that scores (``eval_ABX.ABX``,
``ABX_src``, the Cython DTW) is libri-light's code, unchanged.
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
    spec = importlib.util.find_spec("libriabx")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("zerospeech-libriabx is not installed (pip install --no-deps zerospeech-libriabx)")
    root = Path(list(spec.submodule_search_locations)[0])
    for name, path in (("libriabx", root), ("libriabx.libri_light", root / "libri_light")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    if "libriabx.libri_light.CPC_loader" not in sys.modules:
        stand_in = types.ModuleType("libriabx.libri_light.CPC_loader")
        stand_in.load_cpc_features = stand_in.build_feature_from_file = _refuse_cpc
        sys.modules["libriabx.libri_light.CPC_loader"] = stand_in
    try:
        import libri_light_dtw  # noqa: F401
    except (ImportError, ValueError) as err:  # ValueError: built against another numpy
        raise ImportError(f"libri-light's DTW does not import ({err}): run scripts/build_libriabx_dtw.py") from err
    return importlib.import_module("libriabx.libri_light.eval_ABX")


def unavailable_reason() -> Optional[str]:
    try:
        load_eval_abx()
    except ImportError as err:
        return str(err)
    return None


def libri_light_abx(
    item_file,
    utterance_feats: Dict[str, np.ndarray],
    frame_rate: float,
    modes: Sequence[str] = ("within", "across"),
    max_size_group: Optional[int] = None,
    max_x_across: Optional[int] = None,
    quiet: bool = True,
) -> Dict[str, float]:
    """libri-light's ``ABX`` (cosine distance, CPU) on ``utterance_feats[utt] (T, C)`` for ``item_file``:
    ``{mode: error 0..1}``. ``max_size_group`` / ``max_x_across`` None: above every group and speaker
    count, so libri-light samples nothing and scores every triplet; its own defaults are 10 and 5."""
    eval_abx = load_eval_abx()
    n_lines = sum(1 for _ in open(item_file, encoding="utf-8"))
    n_speakers = len({line.split()[6] for line in open(item_file, encoding="utf-8").readlines()[1:] if line.strip()})
    seq_list = [(utt, utt) for utt in sorted(utterance_feats)]

    def feature_function(utt):  # libri-light normalises in place: hand it a copy
        return torch.from_numpy(np.array(utterance_feats[utt], dtype=np.float32))

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
            max_size_group=max_size_group if max_size_group is not None else n_lines,
        )
