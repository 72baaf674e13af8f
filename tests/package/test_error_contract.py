"""One error contract (docs/design.md): every error a user can cause is a ``MtsslError``, which each
``mtssl-*`` command (wrapped in ``errors.cli``) prints as one line with exit code 1; library code never
exits. Checked on the source with ``ast``, so a module that cannot be imported here is checked too."""

import ast
import builtins
import configparser
import re
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import pytest

from fairseq_mtssl.errors import MtsslError, cli

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "fairseq_mtssl"
ROOT = "fairseq_mtssl"

# Exception classes that never reach a user, "file:Class": where they are handled.
INTERNAL: Dict[str, str] = {
    "fairseq_mtssl/data/speaker_perturb.py:NoVoicedFrames": "raised by change_gender, caught in perturb_speaker (which keeps the clean audio, as the authors do)",
}

# Exits outside errors.cli whose fix needs a file this change could not edit, "file:line-free call": fix.
PENDING_EXITS: Dict[str, str] = {}

ClassRef = Tuple[str, str]  # (module, class name) of a class defined in the package


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class _Source:
    """Every module's classes (with their base expressions) and what its imported names refer to."""

    def __init__(self):
        self.paths: Dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
        self.classes: Dict[ClassRef, Tuple[ast.ClassDef, str]] = {}
        self.imported: Dict[str, Dict[str, str]] = {}  # module -> local name -> dotted origin
        for module, path in self.paths.items():
            tree = ast.parse(path.read_text(), str(path))
            names: Dict[str, str] = {}
            package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    self.classes[(module, node.name)] = (node, module)
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        names[alias.asname or alias.name.split(".")[0]] = (
                            alias.name if alias.asname else alias.name.split(".")[0]
                        )
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                        base = ".".join(anchor + ([base] if base else []))
                    for alias in node.names:
                        names[alias.asname or alias.name] = f"{base}.{alias.name}"
            self.imported[module] = names

    def _dotted(self, expr: ast.expr) -> Optional[str]:
        if isinstance(expr, ast.Name):
            return expr.id
        if isinstance(expr, ast.Attribute):
            head = self._dotted(expr.value)
            return f"{head}.{expr.attr}" if head else None
        return None

    def resolve(self, module: str, expr: ast.expr, seen=()) -> Tuple[str, object]:
        """``("package", ClassRef)``, ``("builtin", class)`` or ``("external", dotted name)``."""
        dotted = self._dotted(expr)
        if dotted is None:
            return "external", ast.unparse(expr)
        return self._resolve_name(module, dotted, seen)

    def _resolve_name(self, module: str, dotted: str, seen) -> Tuple[str, object]:
        head, _, rest = dotted.partition(".")
        if not rest and (module, head) in self.classes:
            return "package", (module, head)
        origin = self.imported.get(module, {}).get(head)
        if origin is None:
            value = getattr(builtins, dotted, None)
            if isinstance(value, type):
                return "builtin", value
            return "external", dotted
        full = f"{origin}.{rest}" if rest else origin
        if full.startswith(ROOT + ".") and (full, module) not in seen:
            owner, _, name = full.rpartition(".")
            if owner in self.paths:  # a name of a package module, maybe re-exported there
                return self._resolve_name(owner, name, seen + ((full, module),))
        return "external", full

    def bases(self, ref: ClassRef):
        node, module = self.classes[ref]
        return [self.resolve(module, b) for b in node.bases]

    def derives(self, ref: ClassRef, test) -> bool:
        """Whether ``ref`` or a base of it, followed through the package, satisfies ``test(kind, value)``."""
        todo, seen = [ref], set()
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            for kind, value in self.bases(current):
                if test(kind, value):
                    return True
                if kind == "package":
                    todo.append(value)
        return False


def _is_exception(kind, value) -> bool:
    if kind == "builtin":
        return issubclass(value, BaseException)
    if kind == "external":  # a third-party exception is named like one (parselmouth.PraatError ...)
        return bool(re.search(r"(Error|Exception|Exit|Interrupt)$", str(value)))
    return False


def _is_warning(kind, value) -> bool:
    return kind == "builtin" and issubclass(value, Warning)


def _is_mtssl(kind, value) -> bool:
    return kind == "package" and value == ("fairseq_mtssl.errors", "MtsslError")


def exception_classes(source: _Source) -> Iterator[Tuple[str, ClassRef]]:
    for ref in source.classes:
        if source.derives(ref, _is_exception) and not source.derives(ref, _is_warning):
            module, name = ref
            yield f"{source.paths[module].relative_to(REPO)}:{name}", ref


def test_every_user_facing_exception_is_an_mtssl_error():
    source = _Source()
    found = dict(exception_classes(source))
    assert "fairseq_mtssl/errors.py:ExportError" in found  # the walk sees the package's errors
    bad = [
        f"{key} (line {source.classes[ref][0].lineno})"
        for key, ref in sorted(found.items())
        if key not in INTERNAL and ref != ("fairseq_mtssl.errors", "MtsslError") and not source.derives(ref, _is_mtssl)
    ]
    assert not bad, "exceptions a user can meet that are no MtsslError (or list them in INTERNAL):\n" + "\n".join(bad)
    stale = sorted(set(INTERNAL) - set(found))
    assert not stale, f"INTERNAL names no exception class: {stale}"


def _exits(path: Path) -> Iterator[Tuple[int, str]]:
    """``(line, what)`` of each exit in ``path``: ``sys.exit``/``exit``/``quit``/``os._exit``/``os.abort``
    calls and ``SystemExit`` anywhere, except under ``if __name__ == "__main__":``."""
    tree = ast.parse(path.read_text(), str(path))
    skip = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__"
        ):
            skip.update(id(n) for n in ast.walk(node))
    exit_names = {"exit", "quit"}  # the site builtins, and ``from sys import exit`` / ``from os import _exit``
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("sys", "os"):
            exit_names.update(a.asname or a.name for a in node.names if a.name in ("exit", "_exit", "abort"))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in exit_names:
                yield node.lineno, f"{func.id}()"
            elif (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and (func.value.id, func.attr) in (("sys", "exit"), ("os", "_exit"), ("os", "abort"))
            ):
                yield node.lineno, f"{func.value.id}.{func.attr}()"
        elif isinstance(node, ast.Name) and node.id == "SystemExit":
            yield node.lineno, "SystemExit"


def test_only_the_cli_wrapper_exits():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(REPO))
        for line, what in _exits(path):
            if rel == "fairseq_mtssl/errors.py" and what == "sys.exit()":
                continue  # errors.cli: the one place a command exits
            if f"{rel}:{what}" not in PENDING_EXITS:
                found.append(f"{rel}:{line}: {what}")
    assert not found, "library code that exits (raise a MtsslError; errors.cli exits):\n" + "\n".join(found)


def test_the_exit_scan_sees_every_form(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "import os, sys\nfrom sys import exit as bye\n"
        "def f():\n    sys.exit(2)\n    raise SystemExit('x')\n    bye(1)\n    os._exit(1)\n    exit()\n"
        "if __name__ == '__main__':\n    sys.exit(f())\n"
    )
    assert sorted(line for line, _ in _exits(path)) == [4, 5, 6, 7, 8]


def _entry_points() -> Dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(line.split(" = ") for line in lines)


def _is_cli_wrapped(module: str, func: str, depth: int = 0) -> bool:
    """Whether ``module.func`` is defined with ``@cli`` (following a re-export ``from .x import func``)."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == func:
            return any(
                (isinstance(d, ast.Name) and d.id == "cli") or (isinstance(d, ast.Attribute) and d.attr == "cli")
                for d in node.decorator_list
            )
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and depth < 5 and any((a.asname or a.name) == func for a in node.names):
            (alias,) = [a for a in node.names if (a.asname or a.name) == func]
            package = module.rsplit(".", 1)[0]
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            return _is_cli_wrapped(base, alias.name, depth + 1)
    return False


def test_every_command_reports_errors_through_cli():
    bare = [
        f"{cmd} = {target}"
        for cmd, target in sorted(_entry_points().items())
        if not _is_cli_wrapped(*target.split(":"))
    ]
    assert not bare, "commands whose main is not wrapped in fairseq_mtssl.errors.cli:\n" + "\n".join(bare)


def test_cli_prints_the_first_line_and_exits_1(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["mtssl-x"])

    @cli
    def main(argv=None):
        raise MtsslError("data/x.tsv:3: bad line\nmore detail")

    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "mtssl-x: error: data/x.tsv:3: bad line\n"

    @cli
    def buggy(argv=None):
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        buggy([])
