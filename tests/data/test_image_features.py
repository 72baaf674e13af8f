"""Image features: TorchScript backbone, scene features, bottom-up-attention TSV and HDF5 regions, their errors."""

import numpy as np
import pytest
import torch
from conftest import run_cli

from fairseq_mtssl.checkpoint_safety import load_checkpoint_safely


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
