"""Read the training curves out of ``fairseq-hydra-train`` logs (``hydra_train.log``)."""

import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

_NUMBER = r"(-?[\d.]+(?:e-?\d+)?)"
_FIELD = re.compile(r"(\w+)=" + _NUMBER + r"(?=[,\s]|$)")  # simple format: key=value, ...
_PIPE_FIELD = re.compile(r"\|\s*(\w+)\s+" + _NUMBER + r"(?=\s|$)")  # valid lines: | key value |


def read_curve(log: Path, kind: str = "train_inner", keys: Sequence[str] = ("loss",)) -> List[Dict[str, float]]:
    """One dict per ``[kind]`` line (``train_inner`` or ``valid``): ``num_updates`` and ``keys``."""
    return _parse(_lines(log), kind, keys)


def latest_update(log: Path, tail_bytes: int = 8192) -> Optional[int]:
    """The last ``num_updates`` a training log reports, read from its tail (None before the first)."""
    log = Path(log)
    if not log.exists():
        return None
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - tail_bytes))
        text = f.read().decode("utf-8", errors="replace")
    found = [int(float(v)) for k, v in _FIELD.findall(text) + _PIPE_FIELD.findall(text) if k.endswith("num_updates")]
    return found[-1] if found else None


def _lines(log: Path) -> List[str]:
    return Path(log).read_text(encoding="utf-8", errors="replace").splitlines()


def _parse(lines: Sequence[str], kind: str, keys: Sequence[str]) -> List[Dict[str, float]]:
    rows = []
    for line in lines:
        if f"[{kind}]" not in line:
            continue
        text = line.split(" - ", 1)[-1]
        fields = {k: float(v) for k, v in _FIELD.findall(text) + _PIPE_FIELD.findall(text)}
        upd = fields.get("num_updates", fields.get(f"{kind}_num_updates"))
        if upd is None:
            continue
        row = {"num_updates": int(upd)}
        for k in keys:
            v = fields.get(k, fields.get(f"{kind}_{k}"))
            if v is not None:
                row[k] = v
        rows.append(row)
    return rows


def read_stages(logs: Sequence[Path], keys: Sequence[str] = ("loss",)) -> Tuple[List[Dict[str, float]], int]:
    """``(curve, updates)`` of consecutive stages (sequential training): the ``train_inner`` rows on
    one update axis, each tagged with its ``stage`` (0, 1, ...), and the updates run in all. A stage
    that restarts at update 0 (optimiser reset) is counted on from where the previous one ended: its
    last update, which the end-of-epoch ``[train]`` lines give even when it falls between two logged
    intervals."""
    joined: List[Dict[str, float]] = []
    end = 0
    for stage, log in enumerate(logs):
        lines = _lines(log)
        rows = _parse(lines, "train_inner", keys)
        offset = 0 if rows and joined and rows[0]["num_updates"] > end else end  # 0: the log continues the count itself
        joined += [{**r, "num_updates": r["num_updates"] + offset, "stage": stage} for r in rows]
        end = offset + max((r["num_updates"] for r in rows + _parse(lines, "train", ())), default=0)
    return joined, end


def read_curves(logs: Sequence[Path], keys: Sequence[str] = ("loss",)) -> List[Dict[str, float]]:
    """The joined curve of :func:`read_stages`."""
    return read_stages(logs, keys)[0]


def trained_updates(logs: Sequence[Path]) -> int:
    """Updates the stages ran in all (not only up to the last logged interval)."""
    return read_stages(logs, ())[1]
