"""One-way layering of the package (docs/design.md, "Layers"), checked on the source with ``ast``.

Every import of a ``fairseq_mtssl`` module anywhere in a module (inside functions too; absolute and
relative; ``from . import x`` resolved to the module ``x``; ``importlib.import_module("fairseq_mtssl...")``
with a literal name) must go to the importer's own package or to a lower layer. A private name (``_x``,
a module or a name in it) is never imported across packages, nor reached as an attribute of a module
imported from another package.
"""

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "fairseq_mtssl"
ROOT = "fairseq_mtssl"

# Lowest first. A "package" is a top-level subpackage or module of fairseq_mtssl; "(root)" is
# fairseq_mtssl/__init__.py, which registers the plugin's fairseq components (the layer below it).
LAYERS: List[Tuple[str, ...]] = [
    ("errors",),
    ("atomic", "checkpoint_safety", "config"),
    ("data", "corpus", "losses"),
    ("upstream",),
    ("models", "tasks", "criterions", "optim", "kmeans"),
    ("(root)",),
    ("evaluation", "convert", "prep"),
    ("jobs",),
]

# Imports between two packages of the same layer, (importer, imported): reason. None today; a new one
# is a decision, written here and in docs/design.md.
SAME_LAYER: Dict[Tuple[str, str], str] = {}

# Known violations whose fix needs a file this change could not edit, "file -> target": what fixes it.
# Each entry must still match a real import (a fixed one fails the test until its entry goes).
PENDING: Dict[str, str] = {}


def _layer_of() -> Dict[str, int]:
    return {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _package(module: str) -> str:
    """The package (layer unit) of a ``fairseq_mtssl`` module: its first component below the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(root)"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass
class Import:
    path: Path
    line: int
    module: str  # the fairseq_mtssl module imported (or the one a name is imported from)
    name: Optional[str]  # a name imported from ``module`` that is not itself a module
    bare_root: bool = False  # ``import fairseq_mtssl``: registration, allowed anywhere

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    def target(self) -> str:
        return self.module + (f".{self.name}" if self.name else "")


def _resolve(base: str, level: int, importer: str, is_package: bool) -> str:
    if not level:
        return base
    anchor = importer.split(".") if is_package else importer.split(".")[:-1]
    anchor = anchor[: len(anchor) - level + 1]
    return ".".join(anchor + ([base] if base else []))


def imports_of(path: Path, modules: Dict[str, Path]) -> Iterator[Import]:
    """Every import of a fairseq_mtssl module or name in ``path``, wherever it is in the file."""
    importer = _module_name(path)
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT:
                    yield Import(path, node.lineno, ROOT, None, bare_root=True)
                elif alias.name.startswith(ROOT + "."):
                    yield Import(path, node.lineno, alias.name, None)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", node.level, importer, is_package)
            if base != ROOT and not base.startswith(ROOT + "."):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in modules:  # ``from . import x``: the module x
                    yield Import(path, node.lineno, full, None)
                else:
                    yield Import(path, node.lineno, base, alias.name)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and node.args[0].value.startswith(ROOT + ".")
        ):
            yield Import(path, node.lineno, node.args[0].value, None)


def _private_attributes(path: Path, modules: Dict[str, Path]) -> Iterator[Tuple[str, str]]:
    """``m._x`` where ``m`` names a fairseq_mtssl module of another package imported in ``path``."""
    importer, is_package = _module_name(path), path.name == "__init__.py"
    own = _package(importer)
    tree = ast.parse(path.read_text(), str(path))
    aliases: Dict[str, str] = {}  # local name -> module of another package
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(ROOT + ".") and alias.asname and _package(alias.name) != own:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", node.level, importer, is_package)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in modules and _package(full) != own:
                    aliases[alias.asname or alias.name] = full
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in aliases:
                target = f"{aliases[value.id]}.{'.'.join(chain)}"
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                yield f"{path.relative_to(REPO)} -> {target}", f"{where}: uses private {target} across packages"


def violations() -> List[Tuple[str, str]]:
    """``(key "file -> target", message)`` for every import that breaks the layering."""
    modules, layer = _modules(), _layer_of()
    found = []
    for module, path in modules.items():
        own = _package(module)
        for imp in imports_of(path, modules):
            if imp.bare_root:
                continue  # ``import fairseq_mtssl`` registers the plugin; it imports nothing into the module
            other = _package(imp.module)
            if other == own:
                continue
            key = f"{path.relative_to(REPO)} -> {imp.target()}"
            if own not in layer or other not in layer:
                unknown = own if own not in layer else other
                found.append(
                    (key, f"{imp.where()}: package {unknown!r} has no layer (tests/package/test_layering.py LAYERS)")
                )
                continue
            private = [p for p in imp.target().split(".")[1:] if _is_private(p)]
            if private:
                found.append((key, f"{imp.where()}: imports private {imp.target()} across packages ({own} -> {other})"))
            if layer[other] > layer[own]:
                found.append(
                    (key, f"{imp.where()}: {own} (layer {layer[own]}) imports {imp.target()} (layer {layer[other]})")
                )
            elif layer[other] == layer[own] and (own, other) not in SAME_LAYER:
                found.append(
                    (key, f"{imp.where()}: {own} imports {imp.target()} of the same layer (not in SAME_LAYER)")
                )
        found.extend(_private_attributes(path, modules))
    return found


def test_every_package_has_a_layer():
    layer = _layer_of()
    packages = {_package(m) for m in _modules()}
    assert not packages - set(layer), f"packages without a layer: {sorted(packages - set(layer))}"
    stale = set(layer) - packages
    assert not stale, f"LAYERS names packages that do not exist: {sorted(stale)}"


def test_imports_follow_the_layers():
    found = [message for key, message in violations() if key not in PENDING]
    assert not found, "imports against the layering (docs/design.md, Layers):\n" + "\n".join(found)


def test_pending_entries_are_still_needed():
    keys = {key for key, _ in violations()}
    stale = sorted(set(PENDING) - keys)
    assert not stale, f"fixed, remove from PENDING: {stale}"


def test_the_documented_order_is_the_tested_one():
    text = (REPO / "docs" / "design.md").read_text()
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    documented = [tuple(p.strip() for p in line.strip().removeprefix("->").split(",")) for line in block.splitlines()]
    documented = [tuple(p.split()[0] if p.startswith("(root)") else p for p in layer) for layer in documented]
    assert documented == LAYERS


# -- the checker itself ------------------------------------------------------------------------------


def test_the_checker_catches_each_kind_of_violation(monkeypatch, tmp_path):
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "REPO", tmp_path)
    monkeypatch.setattr(this, "PACKAGE", tmp_path / ROOT)
    files = {
        "__init__.py": "",
        "errors.py": "",
        "upstream/__init__.py": "",
        "upstream/a.py": (
            "from ..errors import E\n"  # lower layer: fine
            "def f():\n"
            "    from .. import models\n"  # higher layer, inside a function, ``from .. import x``
            "    from fairseq_mtssl.convert.x import _y\n"  # higher layer and private
            "    import fairseq_mtssl\n"  # registration: fine
        ),
        "models/__init__.py": "",
        "models/m.py": "from . import _own\nfrom ..upstream import a\nz = a._hidden\n",  # own package: fine
        "models/_own.py": "",
        "tasks/__init__.py": "from ..models import m\n",  # same layer
        "convert/__init__.py": "",
        "convert/x.py": "import importlib\nimportlib.import_module('fairseq_mtssl.jobs.j')\n",
        "jobs/__init__.py": "",
        "jobs/j.py": "from ..models._own import q\n",
    }
    for rel, text in files.items():
        (tmp_path / ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / ROOT / rel).write_text(text)
    messages = sorted(message for _, message in violations())
    assert messages == [
        "fairseq_mtssl/convert/x.py:2: convert (layer 6) imports fairseq_mtssl.jobs.j (layer 7)",
        "fairseq_mtssl/jobs/j.py:1: imports private fairseq_mtssl.models._own.q across packages (jobs -> models)",
        "fairseq_mtssl/models/m.py:3: uses private fairseq_mtssl.upstream.a._hidden across packages",
        "fairseq_mtssl/tasks/__init__.py:1: tasks imports fairseq_mtssl.models.m of the same layer (not in SAME_LAYER)",
        "fairseq_mtssl/upstream/a.py:3: upstream (layer 3) imports fairseq_mtssl.models (layer 4)",
        "fairseq_mtssl/upstream/a.py:4: imports private fairseq_mtssl.convert.x._y across packages (upstream -> convert)",
        "fairseq_mtssl/upstream/a.py:4: upstream (layer 3) imports fairseq_mtssl.convert.x._y (layer 6)",
    ]
