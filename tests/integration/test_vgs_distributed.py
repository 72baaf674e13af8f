"""VGS + SSL across data-parallel workers and in fp16: two gloo processes (torch.multiprocessing spawn on
127.0.0.1) where one worker's batch has no image must neither hang nor raise, must give every trained
parameter a gradient on every worker and log the same keys everywhere, and their summed gradients over
the total ``sample_size`` must equal one process on the joined batch (the speech-image loss one mean
over the global pairs). In fp16 the speech-image similarity, logits and loss are float32."""

import datetime
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from builders import free_port
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 400  # the whole 2-process run; a collective that one worker skips fails after COLLECTIVE_TIMEOUT_S
COLLECTIVE_TIMEOUT_S = 120

# ---------------------------------------------------------------------------- helpers


def _run_two_workers(fn, *args):
    """Run ``fn(rank, port, *args)`` in 2 spawned processes; fail (killing them) past ``TIMEOUT_S``."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(free_port(), *args), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the 2 workers did not finish within {TIMEOUT_S} s (a collective one worker skipped?)")


def _init(rank: int, port: int):
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import fairseq_mtssl  # noqa: F401  (imported before the rendezvous, not between two collectives)

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )


def _finish(results, path):
    """Save, wait for the other worker, then skip interpreter teardown (gloo's threads can abort at exit
    under load, as in tests/losses/test_speech_image_loss.py)."""
    import torch.distributed as dist

    torch.save(results, path)
    dist.barrier()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def _grads(model):
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------- a stub model


class StubVgsModel(nn.Module):
    """What :class:`VgsSslCriterion` reads from ``Wav2Vec2VgsModel``: wav2vec 2.0's logits (positive
    first) at masked frames, ``speech_emb``, ``image_emb``. Every row is computed on its own (no random
    masks or negatives, no batch statistics), so a batch split over workers gives the same rows as the
    joined batch: the SSL loss of the joined batch is exactly the sum of the workers' ones."""

    def __init__(self, feat=6, hidden=8, candidates=5, emb=7, image_dim=4):
        super().__init__()
        self.enc = nn.Linear(feat, hidden)
        self.ssl_head = nn.Linear(hidden, candidates)
        self.audio_head = nn.Linear(hidden, emb)
        self.image_head = nn.Linear(image_dim, emb)

    def forward(self, source, padding_mask=None, image_feats=None, image_padding_mask=None, mask_indices=None,
                ssl=True):  # fmt: skip
        h = torch.tanh(self.enc(source))  # (B, T, H)
        out = {"speech_emb": self.audio_head(h.mean(1))}
        if ssl:
            out["x"] = self.ssl_head(h[mask_indices])  # (masked frames, candidates)
        if image_feats is not None:
            out["image_emb"] = self.image_head(image_feats.mean(1))
        return out

    def get_logits(self, net_output):
        return net_output["x"]

    def get_targets(self, sample, net_output, expand_steps=True):
        return net_output["x"].new_zeros(len(net_output["x"]), dtype=torch.long)


def _stub_model():
    torch.manual_seed(0)
    return StubVgsModel()


def _stub_batch(n, masked, image_ids, seed):
    """``n`` utterances of 10 frames, ``masked[i]`` of them masked, images where ``image_ids >= 0``."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 10, dtype=torch.bool)
    for i, m in enumerate(masked):
        mask[i, :m] = True
    ids = torch.tensor(image_ids)
    feats = torch.randn(n, 3, 4, generator=g)
    feats[ids < 0] = 0.0  # the collater's zeros for speech without an image
    return {
        "id": torch.arange(n) + seed * 100,
        "net_input": {
            "source": torch.randn(n, 10, 6, generator=g),
            "padding_mask": None,
            "image_feats": feats,
            "image_padding_mask": (ids < 0)[:, None].expand(n, 3).clone(),
            "mask_indices": mask,
        },
        "image_ids": ids,
    }


def _join(a, b):
    cat = lambda x, y: None if x is None else torch.cat([x, y])  # noqa: E731
    return {
        "id": cat(a["id"], b["id"]),
        "net_input": {k: cat(v, b["net_input"][k]) for k, v in a["net_input"].items()},
        "image_ids": cat(a["image_ids"], b["image_ids"]),
    }


# (name, criterion kwargs, worker 0's batch, worker 1's batch): uneven frames, pairs and rows
_SCENARIOS = {
    # worker 1 has speech without images only (task.audio_only_manifest, or an uneven split)
    "no_image_on_worker_1": (
        dict(av_weight=0.5),
        (4, [6, 2, 5, 3], [0, 1, -1, 2], 1),
        (2, [1, 2], [-1, -1], 2),
    ),
    "vgs_only_no_image_on_worker_1": (
        dict(av_weight=1.0),
        (4, [6, 2, 5, 3], [0, 1, -1, 2], 1),
        (2, [1, 2], [-1, -1], 2),
    ),
    # both have pairs, in other proportions than their masked frames; image 0 has captions on both
    "uneven_pairs_and_frames": (
        dict(av_weight=0.3, vgs_loss="infonce", similarity="cosine", temperature=0.5),
        (3, [7, 8, 6], [0, -1, -1], 3),
        (3, [1, 1, 2], [1, 0, 2], 4),
    ),
}


def _criterion(**kw):
    from fairseq_mtssl.criterions.vgs_criterion import VgsSslCriterion

    return VgsSslCriterion(None, infonce=True, **kw)


def _stub_worker(rank, port, out):
    _init(rank, port)
    model = _stub_model()
    results = {}
    for name, (kw, *batches) in _SCENARIOS.items():
        model.zero_grad(set_to_none=True)
        loss, sample_size, log = _criterion(**kw)(model, _stub_batch(*batches[rank]))
        loss.backward()
        results[name] = dict(loss=loss.detach(), sample_size=float(sample_size), log=log, grads=_grads(model))
    # no worker has a pair: the VGS part drops out everywhere; with av_weight=1 every worker raises
    no_pairs = (_stub_batch(2, [3, 1], [-1, -1], 5), _stub_batch(1, [2], [-1], 6))[rank]
    model.zero_grad(set_to_none=True)
    loss, sample_size, log = _criterion(av_weight=0.5)(model, no_pairs)
    loss.backward()
    results["no_pairs_anywhere"] = dict(loss=loss.detach(), sample_size=float(sample_size), log=log,
                                        grads=_grads(model))  # fmt: skip
    try:
        _criterion(av_weight=1.0)(model, no_pairs)
        results["vgs_only_no_pairs_anywhere"] = "no error"
    except ValueError as e:
        results["vgs_only_no_pairs_anywhere"] = str(e)
    _finish(results, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def stub_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("vgs_ddp_stub")
    _run_two_workers(_stub_worker, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.parametrize("name", list(_SCENARIOS))
def test_two_workers_sum_to_one_process_on_the_joined_batch(stub_runs, name):
    """fairseq's step: gradients summed over workers, divided by the summed sample_size, equal the
    single-process gradient of loss / sample_size on the joined batch (within 1e-5), where the VGS part is
    av_weight x the mean over all pairs and the SSL part (1 - av_weight) x the loss per masked frame."""
    kw, b0, b1 = _SCENARIOS[name]
    r0, r1 = (run[name] for run in stub_runs)
    model = _stub_model()
    joined = _join(_stub_batch(*b0), _stub_batch(*b1))
    loss, sample_size, log = _criterion(**kw)(model, joined)  # one process
    (loss / float(sample_size)).backward()
    total = r0["sample_size"] + r1["sample_size"]
    assert total == pytest.approx(float(sample_size))
    for n, p in model.named_parameters():
        if p.grad is None:  # not trained by this method (the SSL head with av_weight=1): on no worker either
            assert r0["grads"][n] is None and r1["grads"][n] is None, n
            continue
        torch.testing.assert_close((r0["grads"][n] + r1["grads"][n]) / total, p.grad, rtol=1e-5, atol=1e-5)
    # the logged sums, reduced as reduce_metrics does, are the joined batch's numbers
    assert (r0["log"]["loss"] + r1["log"]["loss"]) / total == pytest.approx(
        float(loss.detach()) / float(sample_size), rel=1e-5
    )
    pairs = r0["log"]["vgs_pairs"] + r1["log"]["vgs_pairs"]
    assert pairs == log["vgs_pairs"] == int((joined["image_ids"] >= 0).sum())
    assert (r0["log"]["vgs_loss"] + r1["log"]["vgs_loss"]) / pairs == pytest.approx(log["vgs_loss"] / pairs, rel=1e-5)
    # the mix: av_weight x (global mean over pairs) + (1 - av_weight) x (SSL loss per masked frame)
    a = kw["av_weight"]
    ssl = (r0["log"].get("ssl_loss", 0.0) + r1["log"].get("ssl_loss", 0.0)) / total
    want = a * log["vgs_loss"] / pairs + (1 - a) * ssl
    assert (r0["log"]["loss"] + r1["log"]["loss"]) / total == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("name", [*_SCENARIOS, "no_pairs_anywhere"])
def test_every_worker_logs_the_same_keys_and_trains_the_same_parameters(stub_runs, name):
    """fairseq sums logging outputs key by key across workers, and c10d DDP needs a gradient for the same
    parameters on every worker: a worker without an image logs vgs_loss = vgs_pairs = 0 and still gives
    its heads a (zero) gradient."""
    r0, r1 = (run[name] for run in stub_runs)
    assert sorted(r0["log"]) == sorted(r1["log"])
    assert {"loss", "vgs_loss", "vgs_pairs", "sample_size"} <= set(r0["log"])
    assert [n for n, g in r0["grads"].items() if g is None] == [n for n, g in r1["grads"].items() if g is None]
    for r in (r0, r1):
        assert r["loss"].dtype == torch.float32 and torch.isfinite(r["loss"])
        for n in ("audio_head.weight", "image_head.weight", "enc.weight"):
            assert r["grads"][n] is not None and torch.isfinite(r["grads"][n]).all(), n
    if name in ("no_image_on_worker_1", "vgs_only_no_image_on_worker_1"):
        assert r1["log"]["vgs_pairs"] == 0 and r1["log"]["vgs_loss"] == 0
        assert r1["grads"]["image_head.weight"].abs().max() == 0  # touched, with nothing to learn
        assert r0["grads"]["image_head.weight"].abs().max() > 0
    if name == "no_pairs_anywhere":  # the VGS part is 0 on both; the SSL part alone
        for r in (r0, r1):
            assert r["log"]["vgs_pairs"] == 0 and r["log"]["vgs_loss"] == 0
            assert r["log"]["loss"] == pytest.approx(0.5 * r["log"]["ssl_loss"], rel=1e-6)


def test_vgs_only_without_a_pair_on_any_worker_raises_on_every_worker(stub_runs):
    for run in stub_runs:
        assert (
            "has no images (nor have the other 1 workers' batches), and av_weight=1"
            in run["vgs_only_no_pairs_anywhere"]
        )


# ---------------------------------------------------------------------------- the real tiny model


def _tiny_vgs_model(**overrides):
    """Wav2Vec2VgsModel with fairseq_mtssl/config/vgs/vgs_ssl_tiny_cpu.yaml's model section."""
    import fairseq_mtssl  # noqa: F401
    from fairseq_mtssl.models.wav2vec2_vgs import Wav2Vec2VgsConfig, Wav2Vec2VgsModel

    section = OmegaConf.load(REPO / "fairseq_mtssl/config/vgs/vgs_ssl_tiny_cpu.yaml").model
    section = {k: v for k, v in section.items() if k != "_name"}
    cfg = OmegaConf.merge(OmegaConf.structured(Wav2Vec2VgsConfig), section, overrides)
    return Wav2Vec2VgsModel.build_model(cfg)


def _tiny_batch(n, image_ids, seed, image_dim=72, samples=16000):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(image_ids)
    feats = torch.randn(n, 4, image_dim, generator=g)
    feats[ids < 0] = 0.0
    mask = torch.zeros(n, 4, dtype=torch.bool)
    mask[ids < 0] = True
    return {
        "id": torch.arange(n) + 10 * seed,
        "net_input": {
            "source": torch.randn(n, samples, generator=g),
            "padding_mask": None,
            "image_feats": feats,
            "image_padding_mask": mask,
        },
        "image_ids": ids,
    }


_TINY_KW = dict(loss_weights=[0.1, 10], log_keys=["prob_perplexity", "code_perplexity", "temp"])


def _tiny_worker(rank, port, out):
    _init(rank, port)
    torch.manual_seed(0)
    model = _tiny_vgs_model().train()
    batch = (_tiny_batch(3, [0, 1, -1], 1), _tiny_batch(2, [-1, -1], 2))[rank]
    results = {}
    for av_weight in (0.5, 1.0):
        model.zero_grad(set_to_none=True)
        loss, sample_size, log = _criterion(av_weight=av_weight, **_TINY_KW)(model, batch)
        loss.backward()
        results[av_weight] = dict(loss=float(loss), log=log, grads=_grads(model))
    _finish(results, os.path.join(out, f"rank{rank}.pt"))


def test_tiny_vgs_model_with_a_worker_without_images_trains_the_same_parameters_everywhere(tmp_path):
    """The real Wav2Vec2VgsModel under 2 gloo workers, worker 1 with speech only: no hang, and for the
    mix and for VGS only, the parameters that get a gradient are the same on both workers (those the
    method trains: all of them with av_weight = 0.5), finite, zero for the heads on worker 1."""
    _run_two_workers(_tiny_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    names = [n for n, p in _tiny_vgs_model().named_parameters() if p.requires_grad]
    for av_weight in (0.5, 1.0):
        a, b = r0[av_weight], r1[av_weight]
        assert sorted(a["log"]) == sorted(b["log"])
        with_grad = [n for n in names if a["grads"][n] is not None]
        assert with_grad == [n for n in names if b["grads"][n] is not None]
        if av_weight == 0.5:
            assert with_grad == names
        heads = [n for n in with_grad if n.startswith(("image_", "audio_"))]
        assert heads and math.isfinite(a["loss"]) and math.isfinite(b["loss"])
        for n in with_grad:
            assert torch.isfinite(a["grads"][n]).all() and torch.isfinite(b["grads"][n]).all(), n
        assert all(b["grads"][n].abs().max() == 0 for n in heads if n.startswith("image_"))
        assert any(a["grads"][n].abs().max() > 0 for n in heads if n.startswith("image_"))
        assert b["log"]["vgs_pairs"] == 0 and a["log"]["vgs_pairs"] == 2


# ---------------------------------------------------------------------------- fp16


class _Replay:
    """Returns a recorded ``net_output`` (its float tensors cast to ``dtype``); the rest is the model's."""

    def __init__(self, model, net_output, dtype):
        self.model = model
        self.net_output = {
            k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in net_output.items()
        }

    def __call__(self, **kwargs):
        return self.net_output

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_vgs_criterion_on_a_half_model_is_float32_and_matches_float64():
    """The whole criterion (av_weight 0.5: wav2vec 2.0 + speech-image) on the tiny Wav2Vec2VgsModel run in
    half on the CPU, with 768-d embeddings whose dot products exceed 65504: a finite float32 loss equal,
    within 1e-2 relative, to the criterion on the same outputs in float64."""
    from fairseq_mtssl.criterions.vgs_criterion import _Recording

    torch.manual_seed(0)
    model = _tiny_vgs_model(vgs_dim=768).eval()
    with torch.no_grad():  # embeddings near 10 in every dimension: dot products of about 76800
        model.audio_out.bias.fill_(10.0)
        model.image_out.bias.fill_(10.0)
    model = model.half()
    sample = _tiny_batch(4, [0, 1, 1, 2], 3)
    sample["net_input"]["source"] = sample["net_input"]["source"].half()
    sample["net_input"]["image_feats"] = sample["net_input"]["image_feats"].half()
    recorder = _Recording(model)
    criterion = _criterion(av_weight=0.5, similarity="dot", **_TINY_KW)
    loss, sample_size, log = criterion(recorder, sample)
    out = recorder.net_output
    assert out["speech_emb"].dtype == torch.float16 and out["speech_emb"].size(1) == 768
    assert float((out["speech_emb"].double() @ out["image_emb"].double().T).min()) > 65504
    ref, ref_size, ref_log = criterion(_Replay(model, out, torch.float64), sample)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert float(sample_size) == float(ref_size)
    assert float(loss) == pytest.approx(float(ref), rel=1e-2)
    assert log["vgs_loss"] == pytest.approx(ref_log["vgs_loss"], rel=1e-2)
    assert math.isfinite(log["ssl_loss"]) and log["ssl_loss"] == pytest.approx(ref_log["ssl_loss"], rel=1e-2)
