"""Every shipped fairseq-hydra-train config composes with hydra and builds its task and model."""

import pytest
from builders import compose_config, initial_checkpoint
from conftest import PACKAGE_DIR, REPO
from omegaconf import open_dict

CONFIGS = sorted(p for p in (REPO / "fairseq_mtssl/config").rglob("*.yaml"))


@pytest.fixture(scope="module")
def label_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("labels")
    (d / "dict.km.txt").write_text("".join(f"{i} 1\n" for i in range(100)))
    return d


@pytest.fixture(scope="module")
def pretrained_mt4ssl(manifest_dir, label_dir, tmp_path_factory):
    """A freshly initialised tiny MT4SSL checkpoint for the fine-tuning configs to load."""
    return initial_checkpoint(
        REPO / "fairseq_mtssl/config/mt4ssl/pretrain/mt4ssl_tiny_cpu.yaml",
        [f"task.data={manifest_dir}", f"task.label_dir={label_dir}", 'task.labels=["km"]', "task.label_rate=100"],
        tmp_path_factory.mktemp("ckpt") / "mt4ssl.pt",
    )


@pytest.fixture(scope="module")
def pretrained_hubert(manifest_dir, label_dir, tmp_path_factory):
    """Freshly initialised HuBERT checkpoints, ``{"tiny": path, "base": path}``, for SCORE configs to start from."""
    labels = [f"task.data={manifest_dir}", f"task.label_dir={label_dir}", 'task.labels=["km"]', "model.label_rate=100"]
    return {
        scale: initial_checkpoint(
            REPO / f"fairseq_mtssl/config/hubert/pretrain/{name}.yaml",
            labels,
            tmp_path_factory.mktemp("hubert") / f"{name}.pt",
        )
        for scale, name in (("tiny", "hubert_tiny_cpu"), ("base", "hubert_base_iter1"))
    }


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
    cfg = compose_config(config, overrides)
    if "w2v_path" in cfg.model:
        with open_dict(cfg):  # the paper-scale recipes expect normalised audio from an MT4SSL checkpoint
            cfg.task.normalize = True
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 100_000
    if "base" in config.name and "finetune" not in str(config):
        assert cfg.model.get("encoder_embed_dim", 768) == 768 and n_params > 90_000_000  # paper scale
