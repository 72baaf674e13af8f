"""SCORE on a cluster: fairseq's default DDP, DataLoader workers, mixed precision, and upstreams without
training state.

- Every parameter that SCORE trains gets a gradient at every step, so torch's DDP (fairseq's default
  ``c10d`` backend, no ``find_unused_parameters``) runs; the parameters named in ``model.trainable``
  that SCORE's loss cannot reach stay frozen and are logged.
- The pairs of an epoch are perturbed anew in persistent DataLoader workers (fairseq's default), and
  reproducibly.
- An MT4SSL (data2vec) upstream comes without its EMA teacher, with the same hidden states.
- fairseq's ``bf16``, ``memory_efficient_bf16`` and ``memory_efficient_fp16`` trainers optimise exactly
  SCORE's trainable set, LayerNorms included.
"""

import datetime
import logging
import time

import pytest
import torch
from builders import TINY_HUBERT, fairseq_cfg, free_port, perturb_norms, random_hubert, save_checkpoint, saved_config
from conftest import REPO
from omegaconf import OmegaConf

from fairseq_mtssl.upstream.frontend import use_channels_last_front_end

# the authors' set on HuBERT, as score_tiny_cpu.yaml names it: what SCORE's forward cannot reach
HUBERT_GRADLESS = {"final_proj.weight", "final_proj.bias", "mask_emb", "label_embs_concat"}


def _compose(config_dir: str, name: str, *overrides: str):
    """The resolved config (DictConfig) fairseq-hydra-train would run for a packaged config."""
    return OmegaConf.create(saved_config(config_dir, name, *overrides))


@pytest.fixture(scope="module")
def hubert_upstream(tmp_path_factory):
    """A randomly initialised tiny fairseq HuBERT (layer_norm front end, post-LN, 2 layers, waveform
    normalised as score_tiny_cpu's task expects), saved as fairseq saves one."""
    from fairseq.data.dictionary import Dictionary
    from fairseq.models.hubert import HubertConfig, HubertModel
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

    torch.manual_seed(0)
    model_cfg = HubertConfig(
        extractor_mode="layer_norm",
        encoder_layers=2,
        encoder_embed_dim=64,
        encoder_ffn_embed_dim=128,
        encoder_attention_heads=4,
        conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
        conv_pos=16,
        conv_pos_groups=4,
        final_dim=16,
        label_rate=100.0,
    )
    task_cfg = HubertPretrainingConfig(data="unused", labels=["km"], label_rate=100.0, normalize=True)
    d = Dictionary()
    for i in range(10):
        d.add_symbol(str(i))
    model = HubertModel(model_cfg, task_cfg, [d])
    perturb_norms(model, seed=0, weight_g=False)
    path = tmp_path_factory.mktemp("hubert") / "hubert.pt"
    cfg = fairseq_cfg(model_cfg, "hubert", task_cfg, "hubert_pretraining")
    save_checkpoint(model, cfg, path, {"dictionaries": [d]}, num_updates=3)
    return path


@pytest.fixture(scope="module")
def mt4ssl_upstream(tmp_path_factory):
    """``(checkpoint, the model saved in it)``: a tiny MT4SSL (a data2vec-audio with one offline head) with
    the EMA teacher that training builds at its first update, saved with it (``_ema``) as training does."""
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

    from fairseq_mtssl.models.mt4ssl import MT4SSLConfig, MT4SSLModel

    torch.manual_seed(1)
    model_cfg = MT4SSLConfig(
        extractor_mode="layer_norm",
        conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
        encoder_layers=2,
        encoder_embed_dim=64,
        encoder_ffn_embed_dim=128,
        encoder_attention_heads=4,
        conv_pos=16,
        conv_pos_groups=8,
        average_top_k_layers=2,
        offline_num_classes=[12],
        offline_label_rates=[100.0],
        ema_anneal_end_step=100,
        max_update=100,
    )
    model = MT4SSLModel(model_cfg, [12], [100.0], [1])
    use_channels_last_front_end(model)  # as the plugin's task builds it for training
    perturb_norms(model, seed=1, weight_g=False)
    model.make_ema_teacher()
    task_cfg = HubertPretrainingConfig(data="unused", labels=["km"], label_rate=100.0, normalize=True)
    path = tmp_path_factory.mktemp("mt4ssl") / "mt4ssl.pt"
    save_checkpoint(model, fairseq_cfg(model_cfg, "mt4ssl", task_cfg, "hubert_pretraining"), path, num_updates=3)
    return path, model.eval()


@pytest.fixture(scope="module")
def small_manifests(manifest_dir, tmp_path_factory):
    """The session corpus's first 6 training and 2 validation utterances (all longer than 1 s)."""
    out = tmp_path_factory.mktemp("small_manifests")
    for split, n in (("train", 6), ("valid", 2)):
        root, *rows = (manifest_dir / f"{split}.tsv").read_text().splitlines()
        rows = [r for r in rows if int(r.split("\t")[1]) > 16000][:n]
        assert len(rows) == n
        (out / f"{split}.tsv").write_text("\n".join([root, *rows]) + "\n")
    return out


def _score_setup(config: str, data, upstream_path, *overrides):
    """``(cfg, task, model, criterion)`` of a packaged SCORE config, built as fairseq's training builds them."""
    from fairseq import tasks

    cfg = _compose("score", config, f"task.data={data}", f"model.upstream_path={upstream_path}", *overrides)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    task.load_dataset("train")
    return cfg, task, model, criterion


def _sample(task, ids=(0, 1)):
    ds = task.dataset("train")
    return ds.collater([ds[i] for i in ids])


# ---------------------------------------------------------------------------------------------- DDP


def test_every_trainable_parameter_gets_a_gradient_and_the_unreachable_ones_are_logged(
    small_manifests, hubert_upstream, caplog
):
    """score_tiny_cpu (the authors' set, with final_proj, mask_emb and label_embs_concat) built through the
    task: one step (forward, criterion, backward) gives every parameter with requires_grad a gradient;
    those three were named but cannot be reached, so they are frozen, listed, and logged in one line."""
    with caplog.at_level(logging.INFO, logger="fairseq_mtssl.models.score"):
        _, task, model, criterion = _score_setup("score_tiny_cpu", small_manifests, hubert_upstream)
    assert set(model.gradless) == HUBERT_GRADLESS
    lines = [r.getMessage() for r in caplog.records if "no gradient" in r.getMessage()]
    assert lines == [
        "model.trainable names mask_emb, label_embs_concat, final_proj, which get no gradient in SCORE's forward: "
        "left frozen"
    ]
    trainable = {n for n, p in model.student.named_parameters() if p.requires_grad}
    assert trainable == set(model.trainable) and not trainable & HUBERT_GRADLESS
    assert {n.split(".")[0] for n in trainable} == {"encoder", "layer_norm"}  # both layers and both LayerNorms

    model.train()
    loss, _, _ = criterion(model, _sample(task))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(p.grad is None for p in model.teacher.parameters())


def test_a_set_of_which_nothing_can_learn_is_refused_in_one_line():
    from fairseq_mtssl.errors import MtsslError
    from fairseq_mtssl.models.score import ScoreConfig, ScoreModel

    hubert = random_hubert(**TINY_HUBERT, extractor_mode="layer_norm")
    with pytest.raises(MtsslError, match=r"^model.trainable \['final_proj', 'mask_emb'\]: none of it gets a gradient"):
        ScoreModel(ScoreConfig(upstream_path="-", trainable=["final_proj", "mask_emb"]), hubert)


def test_unreached_parameters_come_from_the_forward_not_from_names():
    """A parameter of the feature path that the forward does not reach is found too (here the conv front
    end, which runs without a graph when none of its parameters trains), and the dry run leaves the
    modules' modes, numpy's random state and the gradients as they were."""
    import numpy as np

    from fairseq_mtssl.models.score import ScoreConfig, ScoreModel

    torch.manual_seed(0)
    model = ScoreModel(
        ScoreConfig(upstream_path="-", proj_dim=8), random_hubert(**TINY_HUBERT, extractor_mode="layer_norm")
    )
    model.student.train()
    model.student.feature_extractor.conv_layers[0][0].weight.requires_grad_(True)  # feature_grad_mult stays 0
    state = np.random.get_state()[1].copy()
    assert model.unreached_parameters() == ["feature_extractor.conv_layers.0.0.weight"]
    assert np.array_equal(np.random.get_state()[1], state)
    assert model.student.training and not model.teacher.training
    assert all(p.grad is None for p in model.parameters())


def test_score_runs_under_torch_ddp_without_find_unused_parameters(small_manifests, hubert_upstream):
    """fairseq's default c10d backend is torch's DistributedDataParallel with find_unused_parameters off,
    which stops at the second update if a parameter that requires a gradient got none at the first."""
    import torch.distributed as dist

    _, task, model, criterion = _score_setup("score_tiny_cpu", small_manifests, hubert_upstream)
    port = free_port()  # a hung rendezvous or collective fails after 2 minutes, not gloo's default 30
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=datetime.timedelta(minutes=2)
    )
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model.train(), find_unused_parameters=False)
        for ids in ((0, 1), (2, 3), (4, 5)):  # DDP refuses at the second
            loss, _, _ = criterion(ddp, _sample(task, ids))  # as fairseq's trainer: the criterion runs the wrapper
            loss.backward()
            assert torch.isfinite(loss)
    finally:
        # Each gloo worker thread, having finished an all-reduce, drops the work's thread-local state, which
        # needs the GIL; ~ProcessGroupGloo joins those threads while holding it. Freed right after the last
        # backward (the reducer holds the group), the group could deadlock there (seen here: the suite stopped
        # in this test with the main thread in std::thread::join). So the GIL is let go first, and the DDP
        # wrapper goes before the group.
        time.sleep(0.5)
        ddp = None
        dist.destroy_process_group()


def test_the_configs_ask_for_no_unused_parameter_search():
    for name in ("score_base_librispeech", "score_tiny_cpu", "score_wav2vec2_tiny_cpu", "score_mt4ssl_tiny_cpu"):
        text = (REPO / f"fairseq_mtssl/config/score/{name}.yaml").read_text()
        assert "find_unused_parameters" not in text, name
    paper = OmegaConf.load(REPO / "fairseq_mtssl/config/score/score_base_librispeech.yaml")
    assert "ddp_backend" not in paper.distributed_training  # fairseq's default: pytorch_ddp (c10d)


# ---------------------------------------------------------------------------------- DataLoader workers


def _stop_workers(itr) -> None:
    """Stop an EpochBatchIterator's persistent DataLoader workers now. Left to garbage collection, torch
    joins each of them with a 5 s timeout (measured here: 10 s per pair of workers); training pays that
    once per epoch, a test would pay it for every iterator."""
    workers = getattr(getattr(itr, "dataloader", None), "_iterator", None)
    if workers is not None:
        workers._shutdown_workers()


def _pairs_by_epoch(data, epochs=(1, 2)) -> dict:
    """``{(epoch, index): (source, target_source)}`` through fairseq's get_batch_iterator with 2 persistent
    workers, asked for each epoch as fairseq's training loop asks (``trainer.get_train_iterator``), each
    epoch read to its end; also ``(epoch, index, "main")``: the pair the main process makes for that epoch."""
    from fairseq import tasks

    cfg = _compose(
        "score", "score_tiny_cpu", f"task.data={data}", "model.upstream_path=-", "task.max_sample_size=16000"
    )
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    ds = task.dataset("train")
    pairs, iterators = {}, []
    for epoch in epochs:
        itr = task.get_batch_iterator(ds, max_sentences=2, seed=cfg.common.seed, num_workers=2, epoch=epoch)
        assert itr.persistent_workers and itr.next_epoch_idx == epoch
        for batch in itr.next_epoch_itr(shuffle=True):
            for i, x, y in zip(batch["id"].tolist(), *batch["net_input"].values()):
                pairs[epoch, i] = (x, y)
        assert itr.end_of_epoch()
        iterators.append(itr)
    for itr in {id(i): i for i in iterators}.values():
        _stop_workers(itr)
    for epoch in epochs:
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            pairs[epoch, i, "main"] = (item["source"], item["target_source"])
    return pairs


def test_persistent_workers_perturb_each_epoch_anew_and_reproducibly(small_manifests):
    first, again = _pairs_by_epoch(small_manifests), _pairs_by_epoch(small_manifests)
    indices = range(6)
    assert {k for k in first if len(k) == 2} == {(e, i) for e in (1, 2) for i in indices}
    same = lambda a, b: all(torch.equal(u, v) for u, v in zip(a, b))  # noqa: E731
    for i in indices:
        assert not same(first[1, i], first[2, i]), f"index {i}: epoch 2 repeats epoch 1"
        for e in (1, 2):
            assert same(first[e, i], first[e, i, "main"]), f"index {i}: the workers did not see epoch {e}"
            assert same(first[e, i], again[e, i]), f"index {i}, epoch {e}: not reproducible"


def test_the_dataset_asks_fairseq_for_a_new_iterator_each_epoch(small_manifests):
    from fairseq import tasks

    cfg = _compose("score", "score_tiny_cpu", f"task.data={small_manifests}", "model.upstream_path=-")
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    ds = task.dataset("train")
    assert ds.can_reuse_epoch_itr_across_epochs is False and not task.can_reuse_epoch_itr(ds)
    one = task.get_batch_iterator(ds, max_sentences=2, epoch=1)
    two = task.get_batch_iterator(ds, max_sentences=2, epoch=2)
    assert one is not two and ds.epoch == 2


# ------------------------------------------------------------------------------------------- upstreams


def _hidden(encoder, x):
    from fairseq_mtssl.upstream import hidden_states

    with torch.no_grad():
        return torch.stack(hidden_states(encoder.eval(), x, None)[0])


def _assert_no_ema(model):
    from fairseq.examples.data2vec.models.data2vec_audio import Data2VecAudioModel
    from fairseq.modules.ema_module import EMAModule

    d2v = [m for m in model.modules() if isinstance(m, Data2VecAudioModel)]
    assert d2v and all(m.ema is None for m in d2v)
    assert not any(isinstance(v, EMAModule) for m in model.modules() for v in vars(m).values())
    assert not [k for k in model.state_dict() if k.split(".")[-1] == "_ema"]


def test_an_mt4ssl_upstream_of_superb_has_no_ema_teacher_and_the_same_hidden_states(mt4ssl_upstream):
    from fairseq_mtssl.models.superb import SuperbDownstreamConfig, SuperbDownstreamModel
    from fairseq_mtssl.upstream import load_upstream

    path, saved = mt4ssl_upstream
    assert "_ema" in torch.load(path)["model"] and saved.ema is not None  # a checkpoint as training writes it
    encoder, normalize = load_upstream(path)
    assert normalize is True
    _assert_no_ema(encoder)
    x = torch.randn(1, 12000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_hidden(encoder, x), _hidden(saved, x))

    superb = SuperbDownstreamModel(SuperbDownstreamConfig(upstream_path=str(path)), encoder, num_outputs=5)
    superb.train()
    superb.set_num_updates(1)  # fairseq's task.train_step, at every update; data2vec would build its teacher
    _assert_no_ema(superb)
    # a state written while the upstream still carried its teacher (``upstream._ema``) still loads
    superb.load_state_dict({**superb.state_dict(), "upstream._ema": saved.state_dict()["_ema"]})
    assert torch.equal(_hidden(superb.upstream, x), _hidden(saved, x))


def test_an_mt4ssl_upstream_of_score_has_no_ema_teacher(mt4ssl_upstream):
    from fairseq_mtssl.models.score import ScoreConfig, ScoreModel

    path, saved = mt4ssl_upstream
    names = OmegaConf.load(REPO / "fairseq_mtssl/config/score/score_mt4ssl_tiny_cpu.yaml").model.trainable
    model = ScoreModel.build_model(ScoreConfig(upstream_path=str(path), trainable=list(names), proj_dim=8))
    _assert_no_ema(model)
    assert set(model.gradless) == {"final_proj.weight", "final_proj.bias", "mask_emb"}
    model.train().set_num_updates(1)
    _assert_no_ema(model)
    x = torch.randn(1, 12000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_hidden(model.student, x), _hidden(saved, x))
    old = {**model.state_dict(), "student._ema": saved.state_dict()["_ema"], "teacher._ema": saved.state_dict()["_ema"]}
    model.load_state_dict(old)  # a SCORE checkpoint written before the teacher was dropped


# ------------------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize(
    "precision",
    [
        ("common.bf16=true",),
        ("common.bf16=true", "common.memory_efficient_bf16=true"),
        ("common.fp16=true", "common.memory_efficient_fp16=true"),
        ("common.fp16=true", "common.fp16_no_flatten_grads=true"),  # the flat fp32 copy needs CUDA
    ],
    ids=["bf16", "memory_efficient_bf16", "memory_efficient_fp16", "fp16"],
)
def test_mixed_precision_trainers_optimise_the_trainable_set_layer_norms_included(
    precision, small_manifests, hubert_upstream
):
    """fairseq's Trainer casts the model (``half()`` / bfloat16, which keeps every ``requires_grad``) and
    builds its optimiser from the parameters that require a gradient at that time: for each flag it
    holds exactly SCORE's trainable set and the projection (never the teacher), both LayerNorms and every
    LayerNorm of the trainable layers among them. Where it keeps fp32 master copies (``FP16Optimizer``:
    bf16, fp16), one update moves every one of them. (The memory-efficient optimisers keep none: an
    update smaller than half a bf16 / fp16 step of a weight is lost, which a LayerNorm gain near 1 shows
    at once; score_base_librispeech.yaml says so.)"""
    from fairseq.trainer import Trainer

    cfg, task, model, criterion = _score_setup(
        "score_tiny_cpu", small_manifests, hubert_upstream, "lr_scheduler.warmup_updates=0", *precision
    )  # no warm-up: the first update's learning rate is not 0
    trainer = Trainer(cfg, task, model, criterion)
    wanted = torch.bfloat16 if cfg.common.bf16 else torch.float16
    assert all(p.dtype == wanted for p in model.parameters())
    opt = trainer.optimizer
    held = getattr(opt, "fp16_params", None) or list(opt.params)  # FP16Optimizer keeps fp32 copies of fp16_params
    assert type(opt).__name__ == ("MemoryEfficientFP16Optimizer" if "memory" in str(precision) else "FP16Optimizer")
    names = {id(p): n for n, p in model.named_parameters()}
    got = sorted(names[id(p)] for p in held)
    expected = sorted(["proj.weight", "proj.bias"] + [f"student.{n}" for n in model.trainable])
    assert got == expected
    norms = [n for n in got if "layer_norm" in n]
    assert {"student.encoder.layer_norm.weight", "student.layer_norm.weight"} <= set(norms)
    assert {f"student.encoder.layers.{i}.final_layer_norm.bias" for i in (0, 1)} <= set(norms)
    assert not any(n.startswith("teacher.") or n[len("student.") :] in HUBERT_GRADLESS for n in got)
    if "memory" not in str(precision):
        masters = {names[id(p)]: p32 for p, p32 in zip(opt.fp16_params, opt.fp32_params)}
        before = {n: p32.detach().clone() for n, p32 in masters.items()}
        trainer.train_step([_sample(task)])
        assert [n for n, p32 in masters.items() if torch.equal(p32, before[n])] == []
