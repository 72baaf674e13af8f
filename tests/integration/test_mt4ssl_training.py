"""MT4SSL through fairseq-hydra-train: train, resume, CTC fine-tune without the labels, export."""

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import PACKAGE_DIR, REPO, run_cli

pytestmark = pytest.mark.slow  # every test here trains with fairseq-hydra-train


def _pretrain(run, manifest_dir, label_dir, updates, *extra):
    return run_cli(
        "fairseq-hydra-train",
        "--config-dir",
        REPO / "fairseq_mtssl/config/mt4ssl/pretrain",
        "--config-name",
        "mt4ssl_tiny_cpu",
        f"common.user_dir={PACKAGE_DIR}",
        f"task.data={manifest_dir}",
        f"task.label_dir={label_dir}",
        'task.labels=["km"]',
        "task.label_rate=100",
        f"optimization.max_update={updates}",
        "common.log_interval=5",
        "checkpoint.save_interval_updates=20",
        f"hydra.run.dir={run}",
        *extra,
    )


_VANILLA_FEATURES = """
import sys, numpy as np, torch
from torch.nn.utils.weight_norm import WeightNorm
from fairseq.examples.data2vec.models import data2vec_audio  # what common.user_dir=examples/data2vec does
from fairseq import checkpoint_utils

# fairseq's data2vec cannot build its EMA teacher under torch >= 2.1 (weight norm's derived weight is
# not deep-copyable), and loading any data2vec checkpoint builds it; every torch 2.13 user needs this.
make_teacher = data2vec_audio.Data2VecAudioModel.make_ema_teacher
def detached_make_teacher(self):
    for m in self.modules():
        for h in m._forward_pre_hooks.values():
            if isinstance(h, WeightNorm):
                setattr(m, h.name, getattr(m, h.name).detach())
    make_teacher(self)
data2vec_audio.Data2VecAudioModel.make_ema_teacher = detached_make_teacher

models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([sys.argv[1]])
model = models[0].eval()
assert type(model).__name__ == "Data2VecAudioModel", type(model)
assert "fairseq_mtssl" not in sys.modules
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    np.save(sys.argv[3], model.extract_features(x, None, layer=None)["x"].numpy())
"""


def test_mt4ssl_pretrain_resume_finetune_export(manifest_dir, mfcc_labels, tmp_path):
    labels = tmp_path / "labels"
    shutil.copytree(mfcc_labels, labels)
    run = tmp_path / "mt4ssl"
    first = _pretrain(run, manifest_dir, labels, 30)
    logged = re.findall(
        r"\[train_inner\].*loss_regression=([\d.]+), loss_offline_0=([\d.]+), acc_offline_0=([\d.]+)", first.stdout
    )
    assert len(logged) >= 5, first.stdout[-2000:]
    second = _pretrain(run, manifest_dir, labels, 40)
    assert "Loaded checkpoint checkpoints/checkpoint_last.pt" in second.stdout
    ckpt = run / "checkpoints" / "checkpoint_last.pt"
    state = torch.load(ckpt)
    assert "_ema" in state["model"] and state["cfg"]["model"]["offline_num_classes"] == [24]  # 20 + 4 specials

    # Fine-tuning rebuilds the pre-training model through its task: it must not need the labels.
    shutil.rmtree(labels)
    ft = run_cli(
        "fairseq-hydra-train",
        "--config-dir",
        REPO / "fairseq_mtssl/config/mt4ssl/finetune",
        "--config-name",
        "tiny_cpu",
        f"common.user_dir={PACKAGE_DIR}",
        f"task.data={manifest_dir}",
        f"model.w2v_path={ckpt}",
        "optimization.max_update=10",
        "common.log_interval=5",
        f"hydra.run.dir={tmp_path / 'ctc'}",
    )
    assert re.search(r"\[train_inner\].*num_updates=10", ft.stdout), ft.stdout[-2000:]

    # Export: vanilla fairseq loads it as data2vec_audio and computes the student's features.
    exported = tmp_path / "student_data2vec.pt"
    run_cli("mtssl-export-data2vec", ckpt, exported)
    from fairseq import checkpoint_utils

    import fairseq_mtssl  # noqa: F401

    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(ckpt)])
    x = torch.randn(2, 16000)
    np.save(tmp_path / "x.npy", x.numpy())
    with torch.no_grad():
        ours = models[0].eval().extract_features(x, None)["x"].numpy()
    subprocess.run(
        [sys.executable, "-c", _VANILLA_FEATURES, str(exported), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        check=True,
        capture_output=True,
        text=True,
    )
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ours, atol=1e-5)


def test_two_label_sets_at_different_rates(manifest_dir, mfcc_labels, tmp_path):
    labels = tmp_path / "labels"
    shutil.copytree(mfcc_labels, labels)
    for split in ("train", "valid"):  # a 50 Hz label set: every other 100 Hz label
        lines = (labels / f"{split}.km").read_text().splitlines()
        (labels / f"{split}.km50").write_text("".join(" ".join(line.split()[::2]) + "\n" for line in lines))
    shutil.copy(labels / "dict.km.txt", labels / "dict.km50.txt")
    out = _pretrain(
        tmp_path / "run",
        manifest_dir,
        labels,
        10,
        'task.labels=["km","km50"]',
        "task.label_rates=[100,50]",
        "model.offline_weights=[1.0,0.5]",
    )
    assert re.search(
        r"loss_offline_0=[\d.]+, loss_offline_1=[\d.]+, acc_offline_0=[\d.]+, acc_offline_1=[\d.]+", out.stdout
    ), out.stdout[-1500:]


def test_random_crops_start_on_the_label_hop(manifest_dir, mfcc_labels):
    from fairseq_mtssl.tasks.hubert_pretraining_checked import AlignedCropHubertDataset

    ds = AlignedCropHubertDataset(
        str(manifest_dir / "train.tsv"),
        sample_rate=16000,
        label_paths=[str(mfcc_labels / "train.km")],
        label_rates=[100.0],
        pad_list=[1],
        eos_list=[2],
        max_sample_size=16000,
        random_crop=True,
        crop_hop=320,
    )
    wav = torch.arange(40000.0)
    starts = {ds.crop_to_max_size(wav, 16000)[1] for _ in range(200)}
    assert len(starts) > 20 and all(s % 320 == 0 and s <= 24000 for s in starts)
