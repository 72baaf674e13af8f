"""The VGS pre-training task: its image-feature errors named, the start crop normalised, the paper config's recipe."""

import numpy as np
import pytest
from builders import vgs_config, vgs_task


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
