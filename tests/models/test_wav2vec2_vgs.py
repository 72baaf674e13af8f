"""VGS + SSL: losses against brute force and across 2 gloo workers, the composed model and criterion
against fairseq's wav2vec 2.0, the data pipeline's errors, scenarios with hand-over, retrieval."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import vgs_batch, vgs_config, vgs_task
from conftest import run_cli

from fairseq_mtssl.checkpoint_safety import load_checkpoint_safely
from fairseq_mtssl.losses.speech_image import speech_image_loss


def brute_loss(speech, image, ids, kind="margin_infonce", margin=1.0, temperature=0.07, similarity="dot"):
    """FaST-VGS's formula, one element at a time: ``S[i][j] = image_i . caption_j`` (rows images, columns
    captions); I2C_i = -log softmax over row i, C2I_j = -log softmax over column j, the positive's score
    less the margin (or every score over the temperature), entries of other captions of the same image
    left out; loss = mean_i I2C_i + mean_j C2I_j."""
    speech, image = np.asarray(speech, dtype=np.float64), np.asarray(image, dtype=np.float64)
    if similarity == "cosine":
        speech = speech / np.linalg.norm(speech, axis=1, keepdims=True)
        image = image / np.linalg.norm(image, axis=1, keepdims=True)
    n = len(ids)

    def score(i, j):  # image i against caption j
        s = sum(float(image[i][k]) * float(speech[j][k]) for k in range(len(image[i])))
        if kind == "margin_infonce":
            return s - margin if i == j else s
        return s / temperature

    def kept(i, j):
        return i == j or ids[i] != ids[j]

    i2c = [-score(i, i) + math.log(sum(math.exp(score(i, j)) for j in range(n) if kept(i, j))) for i in range(n)]
    c2i = [-score(j, j) + math.log(sum(math.exp(score(i, j)) for i in range(n) if kept(i, j))) for j in range(n)]
    return sum(i2c) / n + sum(c2i) / n


@pytest.mark.parametrize(
    "kind,similarity",
    [("margin_infonce", "dot"), ("margin_infonce", "cosine"), ("infonce", "dot"), ("infonce", "cosine")],
)
def test_speech_image_loss_matches_brute_force(kind, similarity):
    torch.manual_seed(0)
    speech = torch.randn(7, 5, dtype=torch.float64) * 0.7  # unnormalised: dot products well outside [-1, 1]
    image = torch.randn(7, 5, dtype=torch.float64) * 0.7
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3])  # captions sharing images
    got = speech_image_loss(speech, image, ids, kind, margin=1.0, temperature=0.5, similarity=similarity) / 7
    want = brute_loss(speech.numpy(), image.numpy(), ids.tolist(), kind, 1.0, 0.5, similarity)
    assert float(got) == pytest.approx(want, rel=1e-10)
    # the masking matters: with every caption of its own image, the loss is a different number
    unmasked = brute_loss(speech.numpy(), image.numpy(), list(range(7)), kind, 1.0, 0.5, similarity)
    assert abs(unmasked - want) > 1e-3


def test_speech_image_loss_defaults_are_the_authors():
    """dot similarity, margin 1, directions summed: doubling the embeddings changes the loss (no
    normalisation), and one pair of orthogonal embeddings gives 2 x (log(e^-1 + 1) + 1) - 2."""
    torch.manual_seed(2)
    s, i = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    ids = torch.arange(5)
    assert float(speech_image_loss(s, i, ids)) != pytest.approx(float(speech_image_loss(2 * s, 2 * i, ids)))
    assert float(speech_image_loss(s, i, ids)) == pytest.approx(5 * brute_loss(s.numpy(), i.numpy(), list(range(5))))
    e = torch.eye(2, dtype=torch.float64)  # caption 0 = image 0 = e0, caption 1 = image 1 = e1
    # each direction, each query: positive 1 - 1 = 0, negative 0: -log(1 / 2); two pairs x two directions
    assert float(speech_image_loss(e, e, torch.arange(2))) == pytest.approx(4 * math.log(2))
    with pytest.raises(ValueError, match="unknown speech-image similarity 'l2'"):
        speech_image_loss(s, i, ids, similarity="l2")


_WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from fairseq_mtssl.losses.speech_image import speech_image_loss
    rank, world, out = int(sys.argv[1]), 2, sys.argv[2]
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[3], rank=rank, world_size=world)
    data = torch.load(os.path.join(out, "batch.pt"))
    rows = slice(0, 4) if rank == 0 else slice(4, 7)  # unequal shares
    speech = data["speech"][rows].clone().requires_grad_(True)
    image = data["image"][rows].clone().requires_grad_(True)
    loss = speech_image_loss(speech, image, data["ids"][rows], "margin_infonce") / 7
    loss.backward()
    torch.save({"loss": loss.detach(), "speech": speech.grad, "image": image.grad}, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    # skip interpreter teardown: gloo's background threads can abort ("terminate called without an
    # active exception") when the process exits under load, after the results are safely written
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
""")


def test_negatives_across_two_gloo_workers_equal_one_process_on_the_joined_batch(tmp_path):
    torch.manual_seed(1)
    speech = torch.randn(7, 6, dtype=torch.float64) * 0.5
    image = torch.randn(7, 6, dtype=torch.float64) * 0.5
    ids = torch.tensor([0, 1, 2, 2, 3, 4, 0])  # image 0 has captions on both workers
    torch.save({"speech": speech, "image": image, "ids": ids}, tmp_path / "batch.pt")
    port = str(29500 + os.getpid() % 1000)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(r), str(tmp_path), port], stderr=subprocess.PIPE, text=True
        )
        for r in (0, 1)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    s, i = speech.clone().requires_grad_(True), image.clone().requires_grad_(True)
    full = speech_image_loss(s, i, ids, "margin_infonce", gather=False) / 7
    full.backward()
    torch.testing.assert_close(parts[0]["loss"] + parts[1]["loss"], full.detach())
    assert float(parts[0]["loss"] + parts[1]["loss"]) == pytest.approx(
        brute_loss(speech.numpy(), image.numpy(), ids.tolist()), rel=1e-10
    )
    torch.testing.assert_close(torch.cat([parts[0]["speech"], parts[1]["speech"]]), s.grad)
    torch.testing.assert_close(torch.cat([parts[0]["image"], parts[1]["image"]]), i.grad)


# ---------------------------------------------------------------------------- model, task, criterion


def test_av_weight_zero_is_exactly_fairseqs_wav2vec2_loss(vgs_data):
    from fairseq.criterions.wav2vec_criterion import Wav2vecCriterion

    from fairseq_mtssl.criterions.vgs_criterion import VgsSslCriterion

    cfg, task = vgs_task(vgs_data, dropout_input=0.0, dropout_features=0.0, dropout=0.0, attention_dropout=0.0)
    model = task.build_model(cfg.model).train()
    sample = vgs_batch(task)
    # fairseq draws masks from an unseeded generator: fix one mask for both runs (negatives follow torch's seed)
    from fairseq.data.data_utils import compute_mask_indices

    frames = int(model.w2v._get_feat_extract_output_lengths(torch.tensor(sample["net_input"]["source"].size(1))))
    sample["net_input"]["mask_indices"] = torch.from_numpy(
        compute_mask_indices((4, frames), None, 0.65, 10, min_masks=2)
    )
    kw = dict(infonce=True, loss_weights=[0.1, 10], log_keys=[])
    torch.manual_seed(5), np.random.seed(5)
    ours, n_ours, _ = VgsSslCriterion(task, av_weight=0.0, **kw)(model, sample)
    plain = {
        "id": sample["id"],
        "net_input": {k: v for k, v in sample["net_input"].items() if not k.startswith("image")},
    }
    torch.manual_seed(5), np.random.seed(5)
    theirs, n_theirs, _ = Wav2vecCriterion(task, **kw)(model.w2v, plain)
    assert n_ours == n_theirs
    torch.testing.assert_close(ours, theirs)


def test_av_weight_mixes_the_two_losses_as_the_papers_alpha_and_vgs_only_needs_images(vgs_data):
    from fairseq_mtssl.criterions.vgs_criterion import VgsSslCriterion

    cfg, task = vgs_task(vgs_data)
    model = task.build_model(cfg.model).eval()  # no dropout: both criteria see one function
    sample = vgs_batch(task)
    kw = dict(infonce=True, loss_weights=[0.1, 10], log_keys=[])
    torch.manual_seed(3), np.random.seed(3)
    mixed, size, log = VgsSslCriterion(task, av_weight=0.3, **kw)(model, sample)
    vgs_mean = log["vgs_loss"] / log["vgs_pairs"]  # per pair, per unit of sample_size: 0.3 x L_AV + 0.7 x L_AUD
    assert float(mixed) / size == pytest.approx(0.3 * vgs_mean + 0.7 * log["ssl_loss"] / size, rel=1e-5)
    only, pairs, _ = VgsSslCriterion(task, av_weight=1.0, **kw)(model, sample)
    with torch.no_grad():  # VGS only: unmasked forward; the loss of the model's own embeddings, summed over pairs
        ni = sample["net_input"]
        speech = model.embed_speech(ni["source"], ni["padding_mask"])
        image = model.embed_images(ni["image_feats"], ni["image_padding_mask"])
        ids = sample["image_ids"].tolist()
    assert pairs == 4 and float(only) / pairs == pytest.approx(brute_loss(speech, image, ids), rel=1e-5)
    no_images = dict(sample, image_ids=torch.full_like(sample["image_ids"], -1))
    with pytest.raises(ValueError, match="no images, and av_weight=1"):
        VgsSslCriterion(task, av_weight=1.0, **kw)(model, no_images)
    with pytest.raises(ValueError, match="criterion.alpha=0.5: renamed to criterion.av_weight"):
        VgsSslCriterion(task, alpha=0.5, **kw)


def test_speech_embedding_reads_the_configured_layer(vgs_data):
    cfg, task = vgs_task(vgs_data)
    model = task.build_model(cfg.model).eval()
    src = torch.randn(1, 20000)
    with torch.no_grad():
        h = model.w2v.extract_features(src, None, mask=False, layer=1)["x"]  # output of layer 2 (0-based 1)
        expected = model._audio_embedding(h, None)
        got = model.embed_speech(src)
        out = model(src, ssl=False)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(out["speech_emb"], expected)


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_audio_feature_norm_uses_only_the_valid_frames(vgs_data, norm):
    cfg, task = vgs_task(vgs_data, audio_feature_norm=norm)
    model = task.build_model(cfg.model).train()
    lengths = [7, 4]
    h = torch.randn(2, 7, cfg.model.encoder_embed_dim) * 3 + 5
    mask = torch.arange(7)[None, :] >= torch.tensor(lengths)[:, None]
    got = model._normalise_features(h, mask)
    if norm == "instance":  # each utterance, each channel, over its own frames (brute force)
        for i, n in enumerate(lengths):
            x = h[i, :n].double()
            want = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
            torch.testing.assert_close(got[i, :n].double(), want, rtol=1e-4, atol=1e-4)
    else:  # statistics of the 11 valid frames of the batch, not of the padding
        x = torch.cat([h[0], h[1, :4]]).double()
        want = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
        torch.testing.assert_close(torch.cat([got[0], got[1, :4]]).double(), want, rtol=1e-4, atol=1e-4)
    assert got[1, 4:].abs().max() == 0


def test_bad_image_inputs_are_named(vgs_data, tmp_path):
    import shutil

    from fairseq_mtssl.data.image_features import ImageFeatureError

    data = tmp_path / "d"
    shutil.copytree(vgs_data, data)
    idx = (data / "valid.idx").read_text().splitlines()
    missing = idx[1].split("\t")[0]
    (data / "valid.idx").write_text("\n".join([idx[0]] + idx[2:]) + "\n")
    first = next(
        i
        for i, line in enumerate((data / "valid.img").read_text().splitlines(), 1)
        if (data / "valid.images").read_text().splitlines()[int(line)] == missing
    )
    with pytest.raises(ImageFeatureError, match=rf"valid.img:{first}: image {missing} has no feature row"):
        vgs_task(data)
    with pytest.raises(ValueError, match="image_dim=32 but the task.s image features have 72"):
        cfg, task = vgs_task(vgs_data, image_dim=32)
        task.build_model(cfg.model)


def test_recall_at_k_against_brute_force():
    from fairseq_mtssl.evaluation.retrieval import recall_at_k

    torch.manual_seed(0)
    speech, images = torch.randn(40, 8), torch.randn(8, 8)
    cap = torch.arange(40) % 8  # 5 captions per image
    got = recall_at_k(speech, images, cap, block=3)
    sims = (speech @ images.T).numpy()
    for k in (1, 5, 10):
        s2i = np.mean([cap[i].item() in np.argsort(-sims[i])[:k] for i in range(40)])
        i2s = np.mean([any(cap[j].item() == m for j in np.argsort(-sims[:, m])[:k]) for m in range(8)])
        assert got[f"s2i_r{k}"] == pytest.approx(100 * s2i, abs=0.01)
        assert got[f"i2s_r{k}"] == pytest.approx(100 * i2s, abs=0.01)


def _logged_lr(log: str) -> dict:
    """``{num_updates: lr}`` of fairseq's per-update training log lines (log_format simple)."""
    import re

    out = {}
    for line in log.splitlines():
        if "[train_inner][INFO]" in line:
            n, lr = re.search(r"num_updates=(\d+)", line), re.search(r"lr=([0-9.e+-]+)", line)
            out[int(n.group(1))] = float(lr.group(1))
    return out


@pytest.mark.slow
def test_sequential_scenario_hands_over_weights_and_freezes(vgs_data, tmp_path):
    out = tmp_path / "w2v2_vgs"
    run_cli(
        "mtssl-vgs-train",
        "--scenario",
        "W2V2,VGS",
        "--data",
        vgs_data,
        "--out",
        out,
        "--updates",
        "14",
        "--freeze-shared",
        "2",
        "checkpoint.save_interval_updates=5",
        "common.log_interval=1",
        "lr_scheduler.warmup_fraction=0.5",
        timeout=900,
    )
    # each stage its own schedule: stage A 4 updates (warm-up 2), stage B 10 updates (warm-up 5), both peaking at lr
    for stage, n, warm in (("stage1_w2v2", 4, 2), ("stage2_vgs", 10, 5)):
        logged = _logged_lr((out / "logs" / f"{stage}.log").read_text())
        assert sorted(logged) == list(range(1, n + 1)), (stage, logged)
        for k, lr in logged.items():  # the lr the scheduler sets after update k: warm-up, then linear to 0
            want = 1e-3 * (k / warm if k <= warm else (n - k) / (n - warm))
            assert lr == pytest.approx(want, rel=1e-3, abs=1e-9), (stage, k, lr, want)
    report = json.loads((out / "handover.json").read_text())
    a = torch.load(out / "stage1_w2v2/checkpoints/checkpoint_last.pt")["model"]
    b = torch.load(out / "stage2_vgs/checkpoints/checkpoint_last.pt")["model"]
    # layer 3 serves only the SSL loss: stage B leaves it exactly as stage A trained it (so A's weights were loaded)
    layer3 = [k for k in a if k.startswith("w2v.encoder.layers.2.")]
    assert layer3 and all(torch.equal(a[k], b[k]) for k in layer3)
    # frozen: the front end and the shared layers 1-2; trained: the VGS heads
    frozen = [k for k in a if k.startswith(("w2v.feature_extractor", "w2v.encoder.layers.0.", "w2v.encoder.layers.1."))]
    assert all(torch.equal(a[k], b[k]) for k in frozen)
    assert not all(torch.equal(a[k], b[k]) for k in a if k.startswith("image_"))
    assert report["VGS image head"]["status"].startswith("new to training") and report["VGS image head"]["changed_in_b"]
    assert report["SSL-only layers 3-3"]["status"] == "kept but unused in B"
    assert report["shared layers 1-2"]["frozen_in_b"] and not report["shared layers 1-2"]["changed_in_b"]
    run_cli(
        "mtssl-vgs-retrieval",
        out / "stage2_vgs/checkpoints/checkpoint_last.pt",
        "--split",
        "test",
        "--json",
        tmp_path / "r.json",
    )
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["captions"] == 10 and all(0 <= r[f"{d}_r{k}"] <= 100 for d in ("s2i", "i2s") for k in (1, 5, 10))
    # a rerun finds both stages done
    again = run_cli(
        "mtssl-vgs-train",
        "--scenario",
        "W2V2,VGS",
        "--data",
        vgs_data,
        "--out",
        out,
        "--updates",
        "14",
        "--freeze-shared",
        "2",
    )
    assert again.stdout.count("done before") == 2


@pytest.mark.slow
def test_image_features_from_a_torchscript_backbone_and_the_scene_feature(corpus_dir, manifest_dir, tmp_path):
    from fairseq_mtssl.data.image_features import ImageFeatureStore

    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 7, stride=8), torch.nn.ReLU())
    torch.jit.save(torch.jit.script(backbone), tmp_path / "backbone.ts")
    run_cli(
        "mtssl-image-features",
        "--images",
        manifest_dir / "valid.images",
        "--root",
        corpus_dir,
        "--out",
        tmp_path / "bb",
        "--backbone",
        tmp_path / "backbone.ts",
        "--size",
        "32",
    )
    store = ImageFeatureStore(tmp_path / "bb")
    names = (manifest_dir / "valid.images").read_text().splitlines()
    assert store.dim == 8 + 4 and store[names[0]].shape == (16, 12)  # 4 x 4 map -> 16 regions + boxes
    run_cli(
        "mtssl-image-features",
        "--images",
        manifest_dir / "valid.images",
        "--root",
        corpus_dir,
        "--out",
        tmp_path / "s1",
    )
    run_cli(
        "mtssl-image-features",
        "--images",
        manifest_dir / "valid.images",
        "--root",
        corpus_dir,
        "--out",
        tmp_path / "s2",
    )
    a, b = ImageFeatureStore(tmp_path / "s1"), ImageFeatureStore(tmp_path / "s2")
    assert all(np.array_equal(a[n], b[n]) for n in names)  # deterministic
    assert not np.array_equal(a[names[0]], a[names[1]])  # and it sees the pixels
    assert a.dim == 72 and all(len(a[n]) == 2 for n in names)  # the default: two object regions per scene
    run_cli(*("mtssl-image-features", "--images", manifest_dir / "valid.images", "--root", corpus_dir),
            *("--out", tmp_path / "grid", "--backbone", "scene"))  # fmt: skip
    grid = ImageFeatureStore(tmp_path / "grid")
    assert grid.dim == 64 and grid[names[0]].shape == (16, 64)  # the 4 x 4 grid option
    (tmp_path / "broken.images").write_text(names[0] + "\nimages/missing.png\n")
    with pytest.raises(AssertionError, match="broken.images:2: cannot read image"):
        run_cli(
            "mtssl-image-features",
            "--images",
            tmp_path / "broken.images",
            "--root",
            corpus_dir,
            "--out",
            tmp_path / "x",
        )
    assert not (tmp_path / "x.npy").exists()


# ---------------------------------------------------------------------------- bottom-up-attention region features


def _b64(a, dtype):
    import base64

    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode("ascii")


def write_bua_tsv(path, images, n_boxes=8, dim=2048, seed=0, bad=None):
    """A bottom-up-attention TSV written from its format description: one image a line, no header,
    img_id img_h img_w objects_id objects_conf attrs_id attrs_conf num_boxes boxes features, arrays
    base64 of raw int64 / float32. Returns ``{img_id: (conf, pixel boxes, features, h, w)}``."""
    rng = np.random.default_rng(seed)
    truth, lines = {}, []
    for img_id in images:
        h, w = int(rng.integers(200, 640)), int(rng.integers(200, 640))
        conf = rng.permutation(np.linspace(0.05, 0.95, n_boxes)).astype(np.float32)
        x0, y0 = rng.uniform(0, w / 2, n_boxes), rng.uniform(0, h / 2, n_boxes)
        boxes = np.stack([x0, y0, x0 + rng.uniform(1, w / 2, n_boxes), y0 + rng.uniform(1, h / 2, n_boxes)], 1)
        feats = rng.standard_normal((n_boxes, dim)).astype(np.float32)
        truth[img_id] = (conf, boxes.astype(np.float32), feats, h, w)
        cols = [
            img_id,
            str(h),
            str(w),
            _b64(rng.integers(0, 1600, n_boxes), np.int64),
            _b64(conf, np.float32),
            _b64(rng.integers(0, 400, n_boxes), np.int64),
            _b64(rng.uniform(0, 1, n_boxes), np.float32),
            str(n_boxes),
            _b64(boxes, np.float32),
            _b64(feats, np.float32),
        ]
        lines.append("\t".join(cols))
    path.write_text("\n".join(lines) + "\n")
    return truth


def test_bottom_up_attention_tsv_into_the_store(manifest_dir, tmp_path):
    from fairseq_mtssl.data.image_features import ImageFeatureStore
    from fairseq_mtssl.data.region_features import image_key

    names = (manifest_dir / "valid.images").read_text().splitlines()
    ids = [image_key(n) for n in names]
    # two files, as COCO's train2014 / val2014, with an image nobody asked for in between
    truth = write_bua_tsv(tmp_path / "a.tsv", ids[:2] + ["unused_image"], seed=1)
    truth.update(write_bua_tsv(tmp_path / "b.tsv", ids[2:], seed=2))
    run_cli("mtssl-image-features", "--images", manifest_dir / "valid.images", "--tsv", tmp_path / "a.tsv",
            tmp_path / "b.tsv", "--out", tmp_path / "rf", "--regions", "5")  # fmt: skip
    store = ImageFeatureStore(tmp_path / "rf")
    assert store.dim == 2052
    for name in names:
        conf, boxes, feats, h, w = truth[image_key(name)]
        got = store[name]
        top = sorted(range(len(conf)), key=lambda k: -conf[k])[:5]  # the 5 most confident, in that order
        assert got.shape == (5, 2052)
        np.testing.assert_array_equal(got[:, :2048], feats[top])
        np.testing.assert_allclose(got[:, 2048:], boxes[top] / np.array([w, h, w, h]), rtol=1e-6)


@pytest.mark.slow
def test_fast_vgs_hdf5_gives_the_same_rows_as_the_tsv(manifest_dir, tmp_path):
    h5py = pytest.importorskip("h5py")
    from fairseq_mtssl.data.image_features import ImageFeatureStore
    from fairseq_mtssl.data.region_features import image_key

    images = manifest_dir / "valid.images"
    names = images.read_text().splitlines()
    ids = ["other_image"] + [image_key(n) for n in names]
    truth = write_bua_tsv(tmp_path / "a.tsv", ids, n_boxes=7, seed=4)
    # FaST-VGS's layout (generate_hdf5_coco_places_flickr8k_imgfeat.py): one row per image, pixel boxes
    with h5py.File(tmp_path / "a.hdf5", "w") as f:
        f.create_dataset("img_id", data=np.array([i.encode() for i in ids], dtype=h5py.string_dtype("utf-8", 27)))
        f.create_dataset("img_h", data=np.array([truth[i][3] for i in ids], dtype=np.int64))
        f.create_dataset("img_w", data=np.array([truth[i][4] for i in ids], dtype=np.int64))
        f.create_dataset("objects_conf", data=np.stack([truth[i][0] for i in ids]))
        f.create_dataset("boxes", data=np.stack([truth[i][1] for i in ids]))
        f.create_dataset("features", data=np.stack([truth[i][2] for i in ids]))
    for fmt in ("tsv", "hdf5"):
        run_cli("mtssl-image-features", "--images", images, f"--{fmt}", tmp_path / f"a.{fmt}", "--out",
                tmp_path / fmt, "--regions", "4")  # fmt: skip
    a, b = ImageFeatureStore(tmp_path / "tsv"), ImageFeatureStore(tmp_path / "hdf5")
    assert all(a[n].shape == (4, 2052) and np.array_equal(a[n], b[n]) for n in names)
    with pytest.raises(AssertionError, match=r"a.hdf5: features of shape \(3, 7, 2048\), expected \(n, R, 1024\)"):
        run_cli("mtssl-image-features", "--images", images, "--hdf5", tmp_path / "a.hdf5", "--out", tmp_path / "x",
                "--feature-dim", "1024")  # fmt: skip


@pytest.mark.slow
def test_bottom_up_attention_tsv_errors_name_the_file_and_line(manifest_dir, tmp_path):
    from fairseq_mtssl.data.region_features import image_key

    images = manifest_dir / "train.images"  # 8 images
    ids = [image_key(n) for n in images.read_text().splitlines()]

    def fails(tsv, pattern, *extra):
        with pytest.raises(AssertionError, match=pattern):
            run_cli("mtssl-image-features", "--images", images, "--tsv", tsv, "--out", tmp_path / "x", *extra)
        assert not (tmp_path / "x.npy").exists() and not (tmp_path / "x.idx").exists()

    write_bua_tsv(tmp_path / "missing.tsv", ids[:1] + ids[2:])
    fails(tmp_path / "missing.tsv", rf"train.images:2: image \S+ \(img_id {ids[1]}\) is in none of \S+missing.tsv")
    write_bua_tsv(tmp_path / "narrow.tsv", ids, dim=1024)
    fails(tmp_path / "narrow.tsv", rf"narrow.tsv:1: image {ids[0]}: 1024-dim region features, expected 2048")
    good = tmp_path / "good.tsv"
    write_bua_tsv(good, ids)
    lines = good.read_text().splitlines()
    cols = lines[2].split("\t")
    (tmp_path / "cut.tsv").write_text("\n".join(lines[:2] + ["\t".join(cols[:7])] + lines[3:]) + "\n")
    fails(tmp_path / "cut.tsv", "cut.tsv:3: corrupt row: 7 tab-separated columns, expected 10")
    (tmp_path / "b64.tsv").write_text("\n".join(lines[:2] + ["\t".join(cols[:9] + [cols[9][:-7] + "!"])] + lines[3:]))
    fails(tmp_path / "b64.tsv", "b64.tsv:3: corrupt row: column features is not base64")
    (tmp_path / "n.tsv").write_text("\n".join(lines[:2] + ["\t".join(cols[:7] + ["9"] + cols[8:])] + lines[3:]))
    fails(tmp_path / "n.tsv", r"n.tsv:3: corrupt row: 8 confidences and 8 boxes for num_boxes=9")


@pytest.mark.slow
def test_region_features_train_a_model(vgs_data, manifest_dir, tmp_path):
    """A bottom-up-attention TSV through mtssl-image-features into a few VGS+ updates of the FaST-VGS+
    architecture (the tiny trunk, narrower ResDAVEnet widths) with the authors' dot-product loss."""
    import shutil

    from fairseq_mtssl.data.region_features import image_key

    data = tmp_path / "data"
    shutil.copytree(manifest_dir, data)
    for split in ("train", "valid"):
        ids = [image_key(n) for n in (data / f"{split}.images").read_text().splitlines()]
        write_bua_tsv(tmp_path / f"{split}.tsv", ids, n_boxes=6)
        run_cli("mtssl-image-features", "--images", data / f"{split}.images", "--tsv", tmp_path / f"{split}.tsv",
                "--out", data / split)  # fmt: skip
    out = tmp_path / "run"
    run_cli("mtssl-vgs-train", "--scenario", "VGS+", "--data", data, "--out", out, "--updates", "3",
            "model.image_dim=2052", "checkpoint.save_interval_updates=3", "dataset.validate_interval_updates=3",
            "model.vgs_arch=fast_vgs_plus",
            "criterion.vgs_loss=margin_infonce", "criterion.similarity=dot", timeout=900)  # fmt: skip
    log = (out / "logs" / "stage1_vgs_plus.log").read_text()
    assert "num_updates 3" in log or '"num_updates": "3"' in log
    ckpt = load_checkpoint_safely(out / "stage1_vgs_plus/checkpoints/checkpoint_last.pt")
    assert ckpt["cfg"]["model"]["image_dim"] == 2052 and ckpt["cfg"]["model"]["vgs_arch"] == "fast_vgs_plus"
    assert "w2v.encoder.cls_token" in ckpt["model"] and "image_box_in.0.weight" in ckpt["model"]
    assert "vgs_loss" in log


# ---------------------------------------------------------------------------- the FaST-VGS+ architecture


def _bert_layer(d, ffn):  # q, k, v, output projection, two LayerNorms, FFN
    return 4 * (d * d + d) + 2 * 2 * d + (d * ffn + ffn) + (ffn * d + d)


def _cls_mlp(d):  # Linear(d, 2d) -> GELU -> Linear(2d, d)
    return (d * 2 * d + 2 * d) + (2 * d * d + d)


def _resdavenet(c, widths, k=9):
    """FaST-VGS's ResDAVEnet: Linear c -> w0 + BN, then per stage 2 basic blocks (two bias-free k-wide
    convs + BNs; the first block of a stage strided, with a 1x1 conv + BN on its shortcut)."""
    n = c * widths[0] + widths[0] + 2 * widths[0]
    cin = widths[0]
    for w in widths:
        n += k * cin * w + 2 * w + k * w * w + 2 * w + cin * w + 2 * w  # block 1 (strided, shortcut conv)
        n += 2 * (k * w * w + 2 * w)  # block 2
        cin = w
    return n


def test_paper_config_builds_fast_vgs_plus_with_the_authors_parameter_counts():
    """Per part, the count derived from the authors' DualEncoder (models/fast_vgs.py, utils.py) at
    hidden 768, 12 heads, FFN 3072, trm_layers 6, layer widths 128/256/512/768. The authors' module
    also holds ``audio_cls_token_proj_coarse`` (2,361,600 parameters), whose output their forward
    overwrites; it is not built here."""
    from fairseq.models import build_model
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Model

    from fairseq_mtssl.models.wav2vec2_vgs import ClsTransformerEncoder, Wav2Vec2VgsModel

    cfg = vgs_config("vgs_ssl_base_spokencoco", "task.data=x")
    model = build_model(cfg.model, None)  # fairseq merges the yaml with the model's dataclass
    assert isinstance(model, Wav2Vec2VgsModel)
    assert model.arch == "fast_vgs_plus" and isinstance(model.w2v.encoder, ClsTransformerEncoder)

    def count(prefix):
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))

    plain = Wav2Vec2Model(model.cfg)  # fairseq's own wav2vec 2.0 Base, the reference for the trunk
    assert count("w2v.") == sum(p.numel() for p in plain.parameters()) + 768  # + the CLS token
    assert count("w2v.encoder.cls_token") == 768 and len(model.w2v.encoder.layers) == 12
    d, ffn = 768, 3072
    want = {
        "audio_cls_mlp": _cls_mlp(d),
        "audio_branch": _resdavenet(768, [128, 256, 512, 768]),
        "audio_transformer": _bert_layer(d, ffn),
        "audio_out": d * d + d,
        "image_feat_in": 2048 * d + d + 2 * d,
        "image_box_in": 4 * d + d + 2 * d,
        "image_cls": d,
        "image_transformer": 6 * _bert_layer(d, ffn),
        "image_out": _cls_mlp(d),
    }
    got = {k: count(k) for k in want}
    assert got == want
    heads = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("w2v."))
    assert heads == sum(want.values())
    assert model.audio_transformer[0].self_attn.num_heads == 12 and not model.audio_transformer[0].layer_norm_first
    assert len(model.image_transformer) == 6 and not model.image_transformer[0].layer_norm_first


def _small_fast_vgs_plus(**kw):
    from fairseq_mtssl.models.wav2vec2_vgs import Wav2Vec2VgsConfig, Wav2Vec2VgsModel

    cfg = Wav2Vec2VgsConfig(
        extractor_mode="layer_norm",
        conv_feature_layers="[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2",
        encoder_layers=3,
        encoder_embed_dim=64,
        encoder_ffn_embed_dim=128,
        encoder_attention_heads=4,
        conv_pos=16,
        conv_pos_groups=4,
        quantize_targets=True,
        latent_vars=8,
        latent_groups=2,
        final_dim=32,
        num_negatives=10,
        encoder_layerdrop=0.0,
        vgs_layer=2,
        vgs_dim=64,
        vgs_heads=4,
        vgs_ffn_dim=128,
        audio_widths=[16, 32, 48, 64],
        image_dim=36,
        image_layers=2,
        **kw,
    )
    return Wav2Vec2VgsModel(cfg)


def test_cls_token_passes_pos_conv_and_every_layer_and_feeds_the_audio_head():
    from fairseq.models.wav2vec.wav2vec2 import TransformerEncoder

    from fairseq_mtssl.upstream.layers import hidden_states

    torch.manual_seed(0)
    model = _small_fast_vgs_plus().eval()
    enc = model.w2v.encoder
    # fairseq's own encoder with the same weights, fed [CLS; frames] by hand, is the reference
    ref = TransformerEncoder(model.cfg).eval()
    ref.load_state_dict({k: v for k, v in enc.state_dict().items() if k != "cls_token"})
    x = torch.randn(2, 13, 64)
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[1, 9:] = True
    with torch.no_grad():
        ours, _ = enc(x, padding_mask=mask)
        theirs, _ = ref(torch.cat([enc.cls_token.expand(2, 1, -1), x], 1), F.pad(mask, (1, 0)))
        torch.testing.assert_close(ours, theirs[:, 1:])
        plain, _ = ref(x, padding_mask=mask)
        assert (ours - plain).abs().max() > 1e-3  # the token changes the frames: it is really inside

    # the audio head's CLS is the MLP of the token's state at layer vgs_layer (2); its frames are the others
    seen = {}
    model.w2v.encoder.layers[1].register_forward_hook(lambda m, a, out: seen.__setitem__("layer2", out[0]))
    model.audio_cls_mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp_in", a[0]))
    model.audio_branch.register_forward_pre_hook(lambda m, a: seen.__setitem__("frames", a[0]))
    src = torch.randn(2, 16000)
    with torch.no_grad():
        emb = model.embed_speech(src)
    layer2 = seen["layer2"].transpose(0, 1)
    t = seen["frames"].size(1)
    torch.testing.assert_close(seen["mlp_in"], layer2[:, 0])
    torch.testing.assert_close(seen["frames"], layer2[:, 1 : 1 + t])
    assert emb.shape == (2, 64)
    # feature readers see frames only: as many as the conv front end makes, equal to the encoder's output
    with torch.no_grad():
        states, _ = hidden_states(model.speech_encoder(), src, None)
        last = model.w2v.extract_features(src, None, mask=False, layer=None)["x"]
    frames = int(model.w2v._get_feat_extract_output_lengths(torch.tensor(16000)))
    assert len(states) == 4 and all(h.shape == (2, frames, 64) for h in states)
    torch.testing.assert_close(states[-1], last)
    # and the VGS loss trains the token
    model.train()
    out = model(src, image_feats=torch.randn(2, 4, 36), ssl=False)
    speech_image_loss(out["speech_emb"], out["image_emb"], torch.arange(2)).backward()
    assert enc.cls_token.grad is not None and enc.cls_token.grad.abs().sum() > 0


def test_fast_vgs_plus_image_head_splits_feature_and_box_and_audio_mask_follows_the_strides():
    torch.manual_seed(0)
    model = _small_fast_vgs_plus().eval()
    feats = torch.randn(1, 4, 36)
    with torch.no_grad():
        base = model.embed_images(feats)
        moved = feats.clone()
        moved[..., -4:] += 0.5  # only the boxes
        assert (model.embed_images(moved) - base).abs().max() > 1e-4
        x = (model.image_feat_in(feats[..., :-4]) + model.image_box_in(feats[..., -4:])) / 2
        torch.testing.assert_close(x, (model.image_feat_in[1](model.image_feat_in[0](feats[..., :32])) +
                                       model.image_box_in[1](model.image_box_in[0](feats[..., 32:]))) / 2)  # fmt: skip
        # padding: a short caption in a batch with a long one embeds as it does alone
        src = torch.randn(2, 32000)
        pad = torch.zeros(2, 32000, dtype=torch.bool)
        pad[1, 12000:] = True
        src[1, 12000:] = 0.0  # padding as the collater writes it
        together = model.embed_speech(src, pad)[1]
        alone = model.embed_speech(src[1:, :12000])[0]
    lengths = model.audio_branch.output_lengths(torch.tensor([1, 16, 17, 100]))
    assert lengths.tolist() == [1, 1, 2, 7]  # ceil(n / 16): four stride-2 convolutions of width 9, padding 4
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_old_light_checkpoints_need_the_light_override(vgs_data):
    cfg, task = vgs_task(vgs_data)
    light = task.build_model(cfg.model)
    paper = _small_fast_vgs_plus()
    with pytest.raises(ValueError, match="load it with the override model.vgs_arch=light"):
        paper.load_state_dict(light.state_dict())


def test_paper_config_states_the_authors_recipe():
    cfg = vgs_config("vgs_ssl_base_spokencoco", "task.data=x")
    o, t, c, m = cfg.optimization, cfg.task, cfg.criterion, cfg.model
    assert cfg.dataset.batch_size == 16  # x 4 GPUs: the authors' 64 captions a step
    assert (o.lr, o.clip_norm, cfg.common.fp16) == ([1e-4], 1.0, False)
    assert cfg.lr_scheduler._name == "polynomial_decay_fraction" and cfg.lr_scheduler.warmup_fraction == 0.1
    assert o.max_update == 70 * (592064 // 64)  # 70 epochs of 9,251 updates
    assert (t.normalize, t.crop, t.max_sample_size, t.max_sample_size_valid) == (True, "start", 8 * 16000, 10 * 16000)
    assert (c.av_weight, c.vgs_loss, c.similarity, c.margin, list(c.loss_weights)) == (
        0.5, "margin_infonce", "dot", 1.0, [0.1, 1.0])  # fmt: skip
    assert (m.vgs_arch, m.feature_grad_mult, m.encoder_layerdrop, m.vgs_layer) == ("fast_vgs_plus", 1.0, 0.0, 8)


def test_start_crop_keeps_the_first_seconds_normalised(tmp_path):
    import soundfile as sf

    from fairseq_mtssl.tasks.vgs_pretraining import StartCropAudioDataset

    rng = np.random.default_rng(0)
    wav = (rng.standard_normal(5000) * 0.3 + np.linspace(0, 1, 5000)).astype(np.float32)  # a drift: mean varies
    sf.write(tmp_path / "a.wav", wav, 16000)
    (tmp_path / "m.tsv").write_text(f"{tmp_path}\na.wav\t5000\n")
    ds = StartCropAudioDataset(
        str(tmp_path / "m.tsv"), sample_rate=16000, max_sample_size=2000, pad=True, normalize=True
    )
    got = ds.collater([ds[0]])["net_input"]["source"][0].numpy()
    raw = sf.read(tmp_path / "a.wav", dtype="float32")[0][:2000]  # the authors: cut the first part, then normalise
    np.testing.assert_allclose(got, (raw - raw.mean()) / raw.std(), rtol=1e-3, atol=1e-3)
