"""What torch DDP (fairseq's ``pytorch_ddp`` / ``c10d``, its GPU default) demands of every method: in each
training step every parameter with ``requires_grad`` gets a gradient (None is what c10d refuses without
``find_unused_parameters``: "Expected to have finished reduction in the prior iteration").

One step as fairseq's trainer takes it: the config composed as fairseq-hydra-train does, ``setup_task``,
``build_model``, ``build_criterion``, the task's own ``load_dataset`` and ``get_batch_iterator`` for a real
first batch, and the task's ``train_step`` (model.train, set_num_updates, criterion forward, backward).
Upstreams (SCORE, SUPERB) are freshly initialised tiny checkpoints of the plugin's own configs.

Parameters a method's loss cannot reach are frozen by the method itself (SCORE's dry backward, MT4SSL's
ablations, the VGS task at ``av_weight`` 0 and 1), and the tests check that exactly those are frozen.
"""

from pathlib import Path

import pytest
import torch
from builders import initial_checkpoint, training_config
from conftest import REPO

CONFIG_ROOT = REPO / "fairseq_mtssl/config"


class _Backward:
    """What the trainer's optimizer does in ``task.train_step``: ``optimizer.backward(loss)``."""

    def backward(self, loss):
        loss.backward()


def _one_step(config: Path, overrides, seed: int = 1):
    """Build as fairseq does, take one training step on the first real batch; return (cfg, model, missing)."""
    from fairseq import tasks, utils

    import fairseq_mtssl  # noqa: F401

    cfg = training_config(config, overrides)
    utils.set_torch_seed(seed)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    task.load_dataset(cfg.dataset.train_subset, combine=False, epoch=1)
    itr = task.get_batch_iterator(
        dataset=task.dataset(cfg.dataset.train_subset),
        max_tokens=cfg.dataset.max_tokens,
        max_sentences=cfg.dataset.batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True,
        required_batch_size_multiple=cfg.dataset.required_batch_size_multiple,
        seed=seed,
        epoch=1,
    ).next_epoch_itr(shuffle=True)
    sample = next(iter(itr))
    loss, sample_size, log = task.train_step(sample, model, criterion, _Backward(), update_num=1)
    assert torch.isfinite(loss.detach()).all() and sample_size > 0, log
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
    assert trainable, "nothing trains"
    return cfg, model, missing


@pytest.fixture(scope="module")
def label_overrides(manifest_dir, mfcc_labels):
    return [f"task.data={manifest_dir}", f"task.label_dir={mfcc_labels}", 'task.labels=["km"]']


@pytest.fixture(scope="module")
def upstreams(manifest_dir, mfcc_labels, tmp_path_factory):
    """Fresh tiny HuBERT, MT4SSL and wav2vec 2.0 checkpoints (the plugin's tiny configs)."""
    d = tmp_path_factory.mktemp("upstreams")
    labels = [f"task.data={manifest_dir}", f"task.label_dir={mfcc_labels}", 'task.labels=["km"]']
    return {
        "hubert": initial_checkpoint(CONFIG_ROOT / "hubert/pretrain/hubert_tiny_cpu.yaml",
                                     labels + ["model.label_rate=100"], d / "hubert.pt"),
        "mt4ssl": initial_checkpoint(CONFIG_ROOT / "mt4ssl/pretrain/mt4ssl_tiny_cpu.yaml",
                                     labels + ["task.label_rate=100"], d / "mt4ssl.pt"),
        "wav2vec2": initial_checkpoint(CONFIG_ROOT / "wav2vec2/pretraining/wav2vec2_tiny_cpu.yaml",
                                       [f"task.data={manifest_dir}"], d / "wav2vec2.pt"),
    }  # fmt: skip


def _check(name: str, cfg, model, missing):
    """Every trainable parameter got a gradient: what c10d DDP needs."""
    _report(name, cfg, model, missing)
    assert not missing, f"{name}: trainable parameters without a gradient {missing} (c10d DDP would refuse them)"


def _report(name: str, cfg, model, missing):
    n_train = sum(p.requires_grad for p in model.parameters())
    print(f"{name}: {n_train} trainable tensors, {len(missing)} without a gradient {missing}; "
          f"ddp_backend={cfg.distributed_training.ddp_backend} "
          f"find_unused_parameters={cfg.distributed_training.find_unused_parameters}")  # fmt: skip


def test_hubert(label_overrides):
    overrides = label_overrides + ["model.label_rate=100"]
    _check("hubert", *_one_step(CONFIG_ROOT / "hubert/pretrain/hubert_tiny_cpu.yaml", overrides))


@pytest.mark.parametrize("ablation", [None, "model.online_weight=0", "model.offline_weights=[0]"])
def test_mt4ssl(label_overrides, ablation):
    overrides = label_overrides + ["task.label_rate=100"] + ([ablation] if ablation else [])
    cfg, model, missing = _one_step(CONFIG_ROOT / "mt4ssl/pretrain/mt4ssl_tiny_cpu.yaml", overrides)
    unused = {None: (), "model.online_weight=0": ("final_proj.",), "model.offline_weights=[0]": ("offline_heads.",)}
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == sorted(
        n for n, _ in model.named_parameters() if unused[ablation] and n.startswith(unused[ablation])
    )
    _check(f"mt4ssl {ablation or 'both targets'}", cfg, model, missing)


def _vgs_unreached(names, cfg, av_weight):
    """What the VGS+SSL loss cannot reach at ``av_weight`` 0 (the heads) or 1 (the SSL-only parts), written
    here from the model's structure, independently of ``Wav2Vec2VgsModel.unreached_by``."""
    if av_weight == 0:
        return [n for n in names if not n.startswith("w2v.")]
    if av_weight == 1:
        above = tuple(f"w2v.encoder.layers.{i}." for i in range(cfg.model.vgs_layer, cfg.model.encoder_layers))
        ssl_only = above + ("w2v.final_proj.", "w2v.project_q.", "w2v.quantizer.", "w2v.mask_emb")
        if cfg.model.layer_norm_first:
            ssl_only += ("w2v.encoder.layer_norm.",)  # pre-LN: the final norm follows the last layer
        return [n for n in names if n.startswith(ssl_only)]
    return []


@pytest.mark.parametrize("arch", ["light", "fast_vgs_plus"])
@pytest.mark.parametrize("av_weight", [0.0, 0.5, 1.0])
def test_vgs(vgs_data, arch, av_weight):
    """Every scenario's stages run on c10d: the task freezes what the loss cannot reach (and only that)."""
    cfg, model, missing = _one_step(
        CONFIG_ROOT / "vgs/vgs_ssl_tiny_cpu.yaml",
        [f"task.data={vgs_data}", f"model.vgs_arch={arch}", f"criterion.av_weight={av_weight}", "dataset.batch_size=4"],
    )  # fmt: skip
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == sorted(_vgs_unreached([n for n, _ in model.named_parameters()], cfg, av_weight))
    assert (not frozen) == (av_weight == 0.5)
    _check(f"vgs {arch} av_weight={av_weight}", cfg, model, missing)


@pytest.mark.parametrize("config,upstream", [("score_tiny_cpu", "hubert"), ("score_mt4ssl_tiny_cpu", "mt4ssl"),
                                             ("score_wav2vec2_tiny_cpu", "wav2vec2")])  # fmt: skip
def test_score(manifest_dir, upstreams, config, upstream):
    overrides = [f"task.data={manifest_dir}", f"model.upstream_path={upstreams[upstream]}"]
    _check(config, *_one_step(CONFIG_ROOT / f"score/{config}.yaml", overrides))


@pytest.mark.parametrize("config", ["pr_tiny_cpu", "asr_tiny_cpu"])
def test_superb(manifest_dir, upstreams, config):
    overrides = [f"task.data={manifest_dir}", f"model.upstream_path={upstreams['hubert']}"]
    cfg, model, missing = _one_step(CONFIG_ROOT / f"superb/{config}.yaml", overrides)
    assert not any(p.requires_grad for p in model.upstream.parameters())  # the frozen upstream
    _check(config, cfg, model, missing)
