"""Training curves in TensorBoard through fairseq's own ``common.tensorboard_logdir`` (tensorboardX)."""

import argparse
import struct
import sys
from pathlib import Path

import pytest
from conftest import PACKAGE_DIR, REPO, run_cli


def read_scalars(logdir: Path) -> dict:
    """``{tag: [(step, value), ...]}`` of every event file under ``logdir`` (TFRecord framing:
    length u64, its crc u32, the Event protobuf, its crc u32)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict = {}
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


@pytest.mark.slow
def test_a_tiny_training_writes_its_curves_and_its_checkpoint_exports(manifest_dir, tmp_path):
    from fairseq_mtssl.convert.export import export_all

    logdir = tmp_path / "tensorboard" / "w2v2"
    run_cli(
        "fairseq-hydra-train",
        "--config-dir",
        REPO / "fairseq_mtssl/config/wav2vec2/pretraining",
        "--config-name",
        "wav2vec2_tiny_cpu",
        f"common.user_dir={PACKAGE_DIR}",
        f"task.data={manifest_dir}",
        "optimization.max_update=4",
        "common.log_interval=2",
        f"common.tensorboard_logdir={logdir}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    train = read_scalars(logdir / "train_inner")
    assert [s for s, _ in train["loss"]] == [2, 4]  # every log_interval updates
    assert all(v > 0 for _, v in train["loss"])
    assert "loss" in read_scalars(logdir / "train") and "loss" in read_scalars(logdir / "valid")  # epoch / validation

    # a real training's checkpoint (plain wav2vec2 saved with the plugin's user_dir) leaves in every format
    info = export_all(tmp_path / "run" / "checkpoints" / "checkpoint_last.pt", tmp_path / "out")
    assert info["transformers"]["class"] == "Wav2Vec2Model" and info["transformers"]["max_abs_diff"] < 1e-5


def _main_job(tmp_path):
    from fairseq_mtssl.jobs.main_job import MainJob

    a = argparse.Namespace(
        out=str(tmp_path / "main"),
        jobs=1,
        threads=1,
        force=False,
        malloc_tunables="",
        save_interval=50,
        updates=3,
        score_updates=3,
        clusters=50,
        seed=1,
        av_weight=0.5,
    )
    job = MainJob(a)
    calls = []
    job.pipeline.run = lambda stage, cmd, cwd=None: calls.append([str(c) for c in cmd])
    return job, calls


def test_the_main_job_sends_every_training_to_one_tensorboard_folder(tmp_path):
    job, calls = _main_job(tmp_path)
    job.train_hubert()
    job.train_mt4ssl("both")()
    run = job.run_dir("vgs_plus")
    run.mkdir(parents=True)
    (run / "summary.json").write_text('{"final": "x.pt", "scenario": "VGS+"}')
    job.train_vgs("vgs_plus")()
    root = Path(job.out) / "tensorboard"
    assert f"common.tensorboard_logdir={root / 'hubert'}" in calls[0]
    assert f"common.tensorboard_logdir={root / 'mt4ssl_both'}" in calls[1]
    vgs = calls[2]
    assert vgs[0] == "mtssl-vgs-train" and vgs[vgs.index("--tensorboard-logdir") + 1] == str(root / "vgs_plus")


def test_each_vgs_stage_writes_its_own_curves(tmp_path, monkeypatch):
    """Stage B restarts its update count, so each stage gets a folder of its own under the model's."""
    import fairseq_mtssl.jobs.vgs_scenarios as vs
    from fairseq_mtssl.jobs.commands import CommandRunner

    monkeypatch.setattr(vs, "handover_report", lambda *a: {})
    real_run = CommandRunner.run

    def fake_training(self, name, cmd, cwd=None):
        """Record the command as the runner does, but train nothing."""
        run_dir = Path(next(str(c) for c in cmd if str(c).startswith("hydra.run.dir=")).split("=", 1)[1])
        run_dir.mkdir(parents=True)
        real_run(self, name, [sys.executable, "-c", "pass", *map(str, cmd)], cwd)

    monkeypatch.setattr(CommandRunner, "run", fake_training)
    tb = tmp_path / "tb"
    vs.main(["--scenario", "W2V2,VGS", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--updates", "7"])
    vs.main(
        ["--scenario", "W2V2,VGS", "--data", str(tmp_path), "--out", str(tmp_path / "tb_out"), "--updates", "7"]
        + ["--tensorboard-logdir", str(tb)]
    )
    assert "tensorboard_logdir" not in (tmp_path / "out" / "commands.sh").read_text()
    commands = (tmp_path / "tb_out" / "commands.sh").read_text()
    for stage in ("stage1_w2v2", "stage2_vgs"):
        assert f"common.tensorboard_logdir={tb.resolve() / stage}" in commands
