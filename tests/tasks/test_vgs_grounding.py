"""What VGS grounding rests on: object regions read from the pixels, random caption batches, fixed-length
padding, the authors' trunk init, the unmasked VGS input, and chance levels of retrieval."""

import itertools

import numpy as np
import pytest
import torch
from builders import vgs_batch, vgs_config, vgs_task

from fairseq_mtssl.corpus.scenes import SIZES, render_scene, sample_scene
from fairseq_mtssl.data.scene_regions import region_dim, scene_regions


def _object_rows(n_scenes=400, side=64, seed=0):
    """Each object's region row (matched to the object by box centre) and its true labels."""
    rng = np.random.default_rng(seed)
    rows, labels, boxes = [], [], []
    for i in range(n_scenes):
        scene = sample_scene(rng, str(i))
        regions = scene_regions(np.asarray(render_scene(scene, side)))
        assert len(regions) == len(scene.objects)  # two objects, two blobs, nothing else
        centres = (regions[:, -4:-2] + regions[:, -2:]) / 2
        for o in scene.objects:
            k = int(np.argmin(((centres - [o.x, o.y]) ** 2).sum(1)))
            rows.append(regions[k])
            labels.append((o.colour, o.shape, o.size))
            boxes.append((o, regions[k, -4:]))
    return np.stack(rows), labels, boxes


def test_regions_carry_colour_shape_and_size_for_a_linear_probe():
    from sklearn.linear_model import LogisticRegression

    rows, labels, _ = _object_rows()
    assert rows.shape[1] == region_dim()
    half = len(rows) // 2
    for j, attribute in enumerate(("colour", "shape", "size")):
        y = np.array([lab[j] for lab in labels])
        probe = LogisticRegression(max_iter=3000).fit(rows[:half], y[:half])
        majority = max(np.mean(y[half:] == v) for v in set(y))
        acc = probe.score(rows[half:], y[half:])
        assert acc >= 0.97 and acc > majority + 0.1, (attribute, acc, majority)


def test_region_boxes_are_the_objects_extents():
    _, _, boxes = _object_rows(n_scenes=60)
    px = 1 / 64
    for o, (x0, y0, x1, y1) in boxes:
        r = SIZES[o.size]  # every shape is drawn inside the circle of radius r about its centre
        assert o.x - r - px <= x0 < o.x < x1 <= o.x + r + 2 * px and o.y - r - px <= y0 < o.y < y1 <= o.y + r + 2 * px
        assert x1 - x0 > 1.3 * r  # a square's side is 1.7 r, a triangle's 1.73 r, the others about 2 r


def test_background_only_image_gives_one_whole_scene_row():
    img = np.full((32, 32, 3), 150, dtype=np.uint8)
    rows = scene_regions(img)
    assert rows.shape == (1, region_dim()) and np.allclose(rows[0, -4:], [0, 0, 1, 1])
    img[5:9, 5:9] = (200, 10, 10)
    assert len(scene_regions(img)) == 1 and len(scene_regions(img, scene_region=True)) == 2


def _epochs(task, n=2, seed=1, batch_size=4):
    """The batches fairseq's own iterator makes for epochs 1..n (the trainer asks for each epoch's)."""
    out = []
    for epoch in range(1, n + 1):
        itr = task.get_batch_iterator(
            task.dataset("train"), max_tokens=10**9, max_sentences=batch_size, seed=seed, epoch=epoch,
            disable_iterator_cache=True,
        )  # fmt: skip
        out.append([sorted(map(int, b)) for b in itr.frozen_batches])
    return out


def test_random_batches_change_every_epoch_and_repeat_on_a_rerun(vgs_data):
    cfg, task = vgs_task(vgs_data)
    task.load_dataset("train")
    e1, e2 = _epochs(task)
    assert e1 != e2 and sorted(map(tuple, e1)) != sorted(map(tuple, e2))
    _, again = vgs_task(vgs_data)
    again.load_dataset("train")
    assert _epochs(again, 1)[0] == e1
    sizes = task.dataset("train").sizes
    assert any(max(sizes[b]) - min(sizes[b]) > 8000 for b in map(np.array, e1))  # not length-sorted
    cfg.task.random_batches = False
    from fairseq import tasks

    sorted_task = tasks.setup_task(cfg.task)
    sorted_task.load_dataset("train")
    # fairseq's length-sorted batches hold the same captions every epoch
    s1, s2 = _epochs(sorted_task)
    assert sorted(map(tuple, s1)) == sorted(map(tuple, s2))


def test_pad_to_max_sample_size_pads_every_caption_with_its_mask(vgs_data):
    cfg, task = vgs_task(vgs_data)
    cfg.task.pad_to_max_sample_size = True
    from fairseq import tasks

    padded = tasks.setup_task(cfg.task)
    padded.load_dataset("valid")
    plain, fixed = vgs_batch(task), vgs_batch(padded)
    src, mask = fixed["net_input"]["source"], fixed["net_input"]["padding_mask"]
    assert src.size(1) == cfg.task.max_sample_size
    t = plain["net_input"]["source"].size(1)
    torch.testing.assert_close(src[:, :t], plain["net_input"]["source"])
    assert bool(mask[:, t:].all()) and not bool(src[:, t:].any())
    plain_mask = plain["net_input"].get("padding_mask")
    assert torch.equal(mask[:, :t], plain_mask if plain_mask is not None else torch.zeros_like(mask[:, :t]))


def test_bert_trunk_init_covers_every_linear_of_wav2vec2():
    from fairseq.models import build_model

    import fairseq_mtssl  # noqa: F401

    cfg = vgs_config("vgs_ssl_tiny_cpu", "task.data=x", "model.trunk_init=bert", "model.encoder_embed_dim=256")
    torch.manual_seed(0)
    model = build_model(cfg.model, None)
    linears = {n: m for n, m in model.w2v.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "quantizer.weight_proj" in linears and "final_proj" in linears and "project_q" in linears
    for name, lin in linears.items():
        if lin.weight.numel() >= 4096:
            assert abs(float(lin.weight.std()) - 0.02) < 0.004, name
        assert lin.bias is None or not bool(lin.bias.any()), name
    cfg.model.trunk_init = "fairseq"
    torch.manual_seed(0)
    fairseq_init = build_model(cfg.model, None)
    assert float(fairseq_init.w2v.quantizer.weight_proj.weight.std()) > 0.5  # fairseq's N(0, 1)


def test_unmasked_vgs_input_embeds_the_caption_as_retrieval_does(vgs_data):
    from fairseq.models import build_model

    for vgs_input, equal in (("unmasked", True), ("masked", False)):
        cfg, task = vgs_task(vgs_data, vgs_input=vgs_input)
        torch.manual_seed(0)
        model = build_model(cfg.model, task).eval()
        batch = vgs_batch(task)
        with torch.no_grad():
            out = model(**batch["net_input"])  # the training forward: masked, with the SSL outputs
            alone = model.embed_speech(batch["net_input"]["source"], batch["net_input"].get("padding_mask"))
        assert "x" in out  # wav2vec 2.0's logits are there for its loss
        assert torch.allclose(out["speech_emb"], alone, atol=1e-5) == equal, vgs_input


def test_chance_recall_equals_exhaustive_enumeration_of_rankings():
    from fairseq_mtssl.evaluation.retrieval import chance_recall

    caption_image = torch.tensor([0, 0, 1, 1, 1, 2])  # 6 captions, 3 images, uneven
    n, m = len(caption_image), 3
    perms = list(itertools.permutations(range(n)))
    got = chance_recall(caption_image, m, ks=(1, 2, 4))
    for k in (1, 2, 4):
        hits = [any(int(caption_image[j]) == img for j in p[:k]) for p in perms for img in range(m)]
        assert got[f"i2s_r{k}"] == pytest.approx(100 * np.mean(hits), abs=0.01)
        assert got[f"s2i_r{k}"] == pytest.approx(100 * min(k, m) / m, abs=0.01)


def test_documented_vgs_overrides_are_in_the_configs():
    for name in ("vgs_ssl_tiny_cpu", "vgs_ssl_base_spokencoco"):
        cfg = vgs_config(
            name, "task.data=x", "task.audio_only_manifest=/a/train.tsv", "task.image_features=/f",
            "task.random_batches=false", "task.pad_to_max_sample_size=true", "model.trunk_init=bert",
            "model.vgs_input=unmasked",
        )  # fmt: skip
        assert cfg.task.audio_only_manifest == "/a/train.tsv" and cfg.task.image_features == "/f"


def test_best_r1_handover_picks_the_best_mean_valid_r1_and_the_earliest_of_equals(monkeypatch, tmp_path):
    from fairseq_mtssl.evaluation import retrieval
    from fairseq_mtssl.jobs.vgs_scenarios import _update_of, best_r1_checkpoint

    r1 = {"checkpoint_1_10.pt": (10, 30), "checkpoint_2_20.pt": (30, 20), "checkpoint_3_30.pt": (20, 30)}
    asked = []

    def recall(ck, split):
        asked.append(split)
        return dict(zip(("s2i_r1", "i2s_r1"), r1[ck.split("/")[-1]]))

    monkeypatch.setattr(retrieval, "retrieval_of_checkpoint", recall)
    paths = sorted((tmp_path / n for n in r1), key=_update_of)
    choice = best_r1_checkpoint(paths)
    assert choice["chosen"] == str(tmp_path / "checkpoint_2_20.pt") and set(asked) == {"valid"}  # 25 ties 25: first
    assert _update_of(tmp_path / "checkpoint_last.pt") > _update_of(tmp_path / "checkpoint_9_1000.pt")


def test_unmasked_pass_reuses_the_conv_features_exactly(vgs_data, monkeypatch):
    """The second (unmasked) pass takes the masked pass's conv features: same values and gradients as
    running the front end twice."""
    import contextlib

    from fairseq.models import build_model

    from fairseq_mtssl.models import wav2vec2_vgs

    cfg, task = vgs_task(vgs_data, vgs_input="unmasked")
    torch.manual_seed(0)
    model = build_model(cfg.model, task).eval()
    batch = vgs_batch(task)
    with torch.no_grad():
        frames = model.w2v.feature_extractor(batch["net_input"]["source"]).size(-1)
    mask = torch.zeros(len(batch["id"]), frames, dtype=torch.bool)
    mask[:, 3:13] = mask[:, 20:30] = True  # one fixed mask for both runs
    calls = []
    model.w2v.feature_extractor.register_forward_hook(lambda m, a, y: calls.append(1))

    def run():
        model.zero_grad()
        torch.manual_seed(0)  # the negatives
        out = model(**batch["net_input"], mask_indices=mask)
        (out["speech_emb"].sum() + out["x"].float().sum() + out["image_emb"].sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out["speech_emb"].detach(), grads

    shared, shared_grads = run()
    assert len(calls) == 1  # one conv front end pass for both
    monkeypatch.setattr(wav2vec2_vgs, "_reusing_conv_features", lambda w2v, f: contextlib.nullcontext())
    twice, twice_grads = run()
    assert len(calls) == 3
    torch.testing.assert_close(shared, twice)
    assert shared_grads.keys() == twice_grads.keys() and any("feature_extractor" in n for n in shared_grads)
    for n, g in twice_grads.items():  # summed in another order: float32 rounding, relative to the tensor's scale
        scale = float(g.abs().max())
        torch.testing.assert_close(shared_grads[n], g, rtol=1e-3, atol=1e-5 * scale, msg=lambda m: f"{n}: {m}")
