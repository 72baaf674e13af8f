"""Shared by the benchmarks: record a measured figure with its target so ``run_all.py`` can table it.

A benchmark calls :func:`record` next to what it prints; when ``MTSSL_BENCH_JSON`` names a file (as
``run_all.py`` sets it), the figures are appended there as JSON lines.
"""

import json
import os
from typing import Optional


def record(benchmark: str, figure: str, value: float, target: Optional[str] = None) -> None:
    """``target`` like ``"<= 1.05"`` or ``">= 20"`` (None: reported, no target)."""
    path = os.environ.get("MTSSL_BENCH_JSON")
    if not path:
        return
    met = None
    if target:
        op, bound = target.split()
        met = value <= float(bound) if op == "<=" else value >= float(bound)
    with open(path, "a", encoding="utf-8") as f:
        f.write(
            json.dumps({"benchmark": benchmark, "figure": figure, "value": value, "target": target, "met": met}) + "\n"
        )
