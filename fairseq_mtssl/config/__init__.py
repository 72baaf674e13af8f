"""The plugin's hydra configs, shipped inside the package (``fairseq_mtssl/config/<method>/...yaml``).

Every tool finds them through :func:`config_dir`, so they are found the same way in a checkout, an
editable install and a wheel. From a checkout, ``fairseq-hydra-train --config-dir
fairseq_mtssl/config/hubert/pretrain --config-name hubert_tiny_cpu ...`` reads the same files.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def config_dir(name: str) -> Path:
    """The folder of one method's configs, e.g. ``config_dir("hubert/pretrain")``."""
    path = ROOT / name
    if not path.is_dir():
        known = sorted(str(p.parent.relative_to(ROOT)) for p in ROOT.rglob("*.yaml"))
        raise FileNotFoundError(f"no config folder {name!r} in {ROOT}; known: {sorted(set(known))}")
    return path


def config_path(name: str, config: str) -> Path:
    """One config file, e.g. ``config_path("hubert/pretrain", "hubert_tiny_cpu")``."""
    path = config_dir(name) / f"{config}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config {config!r} in {config_dir(name)}")
    return path
