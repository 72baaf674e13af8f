"""Every shipped fairseq-hydra-train config composes with hydra and builds its task and model."""

from pathlib import Path

import pytest
import torch
from conftest import PACKAGE_DIR, REPO
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

CONFIGS = sorted(p for p in (REPO / "fairseq_mtssl/config").rglob("*.yaml"))


def _compose(path: Path, overrides):
    from fairseq.dataclass.initialize import hydra_init

    hydra_init(path.stem)  # as fairseq-hydra-train does: the schema under the config's own name
    with initialize_config_dir(config_dir=str(path.parent), version_base="1.1"):  # fairseq's hydra mode
        cfg = compose(path.stem, overrides=overrides)
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True))


@pytest.fixture(scope="module")
def label_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("labels")
    (d / "dict.km.txt").write_text("".join(f"{i} 1\n" for i in range(100)))
    return d


@pytest.fixture(scope="module")
def pretrained_mt4ssl(manifest_dir, label_dir, tmp_path_factory):
    """A freshly initialised tiny MT4SSL checkpoint for the fine-tuning configs to load."""
    from fairseq import tasks

    import fairseq_mtssl  # noqa: F401

    cfg = _compose(
        REPO / "fairseq_mtssl/config/mt4ssl/pretrain/mt4ssl_tiny_cpu.yaml",
        [
            f"task.data={manifest_dir}",
            f"task.label_dir={label_dir}",
            'task.labels=["km"]',
            "task.label_rate=100",
            "hydra.run.dir=x",
        ],
    )
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    path = tmp_path_factory.mktemp("ckpt") / "mt4ssl.pt"
    model.set_num_updates(0)
    torch.save(
        {
            "cfg": OmegaConf.to_container(cfg, resolve=True),
            "model": model.state_dict(),
            "args": None,
            "optimizer_history": [
                {
                    "criterion_name": "MT4SSLCriterion",
                    "optimizer_name": "Adam",
                    "lr_scheduler_state": {"best": None},
                    "num_updates": 0,
                }
            ],
            "extra_state": {},
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def pretrained_hubert(manifest_dir, label_dir, tmp_path_factory):
    """Freshly initialised HuBERT checkpoints, ``{"tiny": path, "base": path}``, for SCORE configs to start from."""
    from fairseq import tasks

    import fairseq_mtssl  # noqa: F401

    paths = {}
    for scale, name in (("tiny", "hubert_tiny_cpu"), ("base", "hubert_base_iter1")):
        cfg = _compose(
            REPO / f"fairseq_mtssl/config/hubert/pretrain/{name}.yaml",
            [
                f"task.data={manifest_dir}",
                f"task.label_dir={label_dir}",
                'task.labels=["km"]',
                "model.label_rate=100",
                "hydra.run.dir=x",
            ],
        )
        task = tasks.setup_task(cfg.task)
        model = task.build_model(cfg.model)
        paths[scale] = tmp_path_factory.mktemp("hubert") / f"{name}.pt"
        torch.save(
            {
                "cfg": OmegaConf.to_container(cfg, resolve=True),
                "model": model.state_dict(),
                "args": None,
                "task_state": {},
                "extra_state": {},
                "optimizer_history": [
                    {
                        "criterion_name": "HubertCriterion",
                        "optimizer_name": "Adam",
                        "lr_scheduler_state": {"best": None},
                        "num_updates": 0,
                    }
                ],
            },
            paths[scale],
        )
    return paths


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(REPO / "fairseq_mtssl/config")) for p in CONFIGS])
def test_config_builds_its_model(config, manifest_dir, label_dir, pretrained_mt4ssl, pretrained_hubert):
    from fairseq import tasks

    import fairseq_mtssl  # noqa: F401

    overrides = [f"common.user_dir={PACKAGE_DIR}", f"task.data={manifest_dir}", "hydra.run.dir=x"]
    text = config.read_text()
    if "label_dir: ???" in text:
        overrides += [f"task.label_dir={label_dir}", 'task.labels=["km"]']
    if "label_rate: ???" in text:
        overrides.append("task.label_rate=100" if "_name: mt4ssl" in text else "model.label_rate=100")
    if "w2v_path: ???" in text:
        overrides.append(f"model.w2v_path={pretrained_mt4ssl}")
    if "upstream_path: ???" in text:  # SUPERB downstream: a fresh HuBERT of the config's scale as the upstream
        overrides.append(f"model.upstream_path={pretrained_hubert['base' if 'base' in config.name else 'tiny']}")
    if "normalize: ???" in text:
        overrides.append("task.normalize=false")  # what the base HuBERT config trains with
    if "hubert_path: ???" in text:
        overrides.append(f"model.hubert_path={pretrained_hubert['base' if 'base' in config.name else 'tiny']}")
    cfg = _compose(config, overrides)
    if "w2v_path" in cfg.model:
        with open_dict(cfg):  # the paper-scale recipes expect normalised audio from an MT4SSL checkpoint
            cfg.task.normalize = True
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 100_000
    if "base" in config.name and "finetune" not in str(config):
        assert cfg.model.get("encoder_embed_dim", 768) == 768 and n_params > 90_000_000  # paper scale
