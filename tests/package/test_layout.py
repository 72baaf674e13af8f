"""The package's shape: no import circle between its modules, every documented command exists."""

import ast
import configparser
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "fairseq_mtssl"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """The plugin modules ``path`` imports anywhere in it (function-level imports too), except the
    package root, whose import only registers the plugin."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t.startswith("fairseq_mtssl.") and t != name:
                yield t


def test_no_import_circle():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: sorted({t for t in _imports(p) if t in modules}) for m, p in modules.items()}
    # a package's __init__ re-exporting its own submodules is not a circle
    graph = {m: [t for t in ts if not t.startswith(m + ".")] for m, ts in graph.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in graph[m]:
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def _documented_files():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "manifests/README.md"]


def test_every_documented_command_and_option_exists():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = dict(line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    missing = []
    for doc in _documented_files():
        for line in doc.read_text().splitlines():
            for cmd, rest in re.findall(r"\b(mtssl-[a-z0-9-]+)((?:\s+[^|`#;]*)?)", line):
                if cmd not in scripts:
                    missing.append(f"{doc.name}: {cmd}")
                    continue
                module, func = scripts[cmd].split(":")
                path = REPO / (module.replace(".", "/") + ".py")
                # the entry module and the plugin modules it imports (a command may add their options)
                paths = [path] + [REPO / (m.replace(".", "/") + ".py") for m in _imports(path)]
                source = "".join(p.read_text() for p in paths if p.exists())
                for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                    if f'"{option}"' not in source and option not in ("--help",):
                        missing.append(f"{doc.name}: {cmd} {option}")
    assert not missing, missing


def test_every_documented_config_exists():
    for doc in _documented_files():
        text = doc.read_text()
        for config_dir, name in re.findall(r"--config-dir (\S+) --config-name (\S+)", text):
            if "..." in config_dir + name:  # a placeholder in a launch template
                continue
            path = REPO / config_dir.replace("$PWD/", "") / f"{name}.yaml"
            assert path.is_file(), f"{doc.name}: {path}"
        for path in re.findall(r"`(fairseq_mtssl/config/[^`{}* ]+\.yaml)`", text):
            assert (REPO / path).is_file(), f"{doc.name}: {path}"


def test_hydra_commands_in_the_docs_use_absolute_data_paths():
    for doc in [*_documented_files(), *sorted(PACKAGE.rglob("*.yaml"))]:
        for line in doc.read_text().splitlines():
            for key, value in re.findall(
                r"\b(task\.data|task\.label_dir|hydra\.run\.dir|common\.user_dir)=(\S+)", line
            ):
                assert value.startswith(("$PWD", "/", "$M", '"$', "$")), f"{doc.name}: {key}={value} is relative"
