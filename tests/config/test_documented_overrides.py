"""Every hydra override the docs or the config comments tell a user to write works as written (no ``+``).

fairseq composes ``task``, ``model``, ``criterion``, ``optimizer`` and ``lr_scheduler`` as free-form groups:
a key that is not in the yaml is refused without ``+key=``. An override in a command that names its
config (``--config-name``) is composed against that config; one in prose must be a key of that group in
some packaged config.
"""

import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO

FREE_GROUPS = ("task", "model", "criterion", "optimizer", "lr_scheduler")
OVERRIDE = re.compile(r"(?<![+\w.])(" + "|".join(FREE_GROUPS) + r")\.([a-z_0-9]+)=")
CONFIGS = {p.stem: p for p in (REPO / "fairseq_mtssl/config").rglob("*.yaml")}


def _documents():
    yield from [REPO / "README.md", REPO / "benchmarks/README.md"]
    yield from sorted((REPO / "docs").glob("*.md"))
    yield from sorted((REPO / "examples").rglob("*.sh"))
    yield from sorted(CONFIGS.values())


def _commands(path: Path):
    """``(first line number, text)`` of each logical line (shell continuations joined)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start, parts = None, []
    for i, line in enumerate(lines, start=1):
        start = start or i
        text = line.lstrip("# ").rstrip()
        parts.append(text[:-1] if text.endswith("\\") else text)
        if not text.endswith("\\"):
            yield start, " ".join(parts)
            start, parts = None, []


def documented_overrides():
    found = []
    for path in _documents():
        for lineno, command in _commands(path):
            named = re.search(r"--config-name[ =]([\w.-]+)", command)
            for m in OVERRIDE.finditer(command):
                found.append((f"{path.relative_to(REPO)}:{lineno}", named.group(1) if named else None, m[1], m[2]))
    return found


def _yaml_keys(group: str):
    keys = {}
    for name, p in CONFIGS.items():
        cfg = yaml.safe_load(p.read_text()) or {}
        for k in cfg.get(group) or {}:
            keys.setdefault(k, []).append(name)
    return keys


def test_the_docs_document_some_overrides():
    assert len(documented_overrides()) > 30  # the scanner finds what the README shows


@pytest.mark.parametrize("where,config,group,key", documented_overrides(), ids=lambda v: str(v))
def test_documented_override_needs_no_plus(where, config, group, key):
    if config is not None and config in CONFIGS:
        cfg = yaml.safe_load(CONFIGS[config].read_text()) or {}
        assert key in (cfg.get(group) or {}), f"{where}: {group}.{key}= is not in {config}.yaml (hydra needs +)"
    else:
        assert key in _yaml_keys(group), f"{where}: {group}.{key}= is in no packaged config (hydra needs +)"
