"""Builders shared by the test files, which import from here and never from each other: tiny randomly
initialised models and checkpoints of every method (HuBERT post-/pre-LN, wav2vec 2.0, MT4SSL/data2vec,
VGS+SSL), saved as fairseq saves them; the packaged configs composed as fairseq-hydra-train composes them;
the export round trip (every exported format read back in a fresh interpreter without the plugin); and the
hand-made data and brute-force references that more than one test file checks against.

fairseq and the plugin are imported inside the functions, so importing this module stays cheap.
"""

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from conftest import PACKAGE_DIR, REPO
from omegaconf import OmegaConf

CONFIG_ROOT = REPO / "fairseq_mtssl" / "config"

# ------------------------------------------------------------------------------------------------- configs


def _composed(path: Path, overrides):
    """hydra's compose of the config file ``path`` as fairseq-hydra-train composes it: the schema registered
    under the config's own name, fairseq's hydra mode (version_base 1.1)."""
    from fairseq.dataclass.initialize import hydra_init
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import fairseq_mtssl  # noqa: F401  (registers the plugin's tasks and models)

    GlobalHydra.instance().clear()
    hydra_init(path.stem)
    with initialize_config_dir(config_dir=str(path.parent), version_base="1.1"):
        cfg = compose(path.stem, overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a gloo rendezvous (``tcp://127.0.0.1:PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_config(path: Path, overrides):
    """The config (DictConfig, interpolations unresolved) fairseq-hydra-train hands to the task and model."""
    return OmegaConf.create(OmegaConf.to_container(_composed(path, overrides), resolve=False, enum_to_str=True))


def saved_config(config_dir: str, name: str, *overrides: str) -> dict:
    """The resolved config dict fairseq-hydra-train would save for the packaged config ``config_dir/name``."""
    cfg = compose_config(CONFIG_ROOT / config_dir / f"{name}.yaml", ["hydra.run.dir=x", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def training_config(path: Path, overrides):
    """The config fairseq's trainer runs (DictConfig, resolved): the plugin as ``common.user_dir`` and
    fairseq's defaults added."""
    from fairseq.dataclass.initialize import add_defaults

    cfg = _composed(path, [f"common.user_dir={PACKAGE_DIR}", "hydra.run.dir=x", *overrides])
    add_defaults(cfg)
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def vgs_config(name: str, *overrides: str):
    """The packaged VGS config ``name`` as :func:`compose_config` gives it."""
    return compose_config(CONFIG_ROOT / "vgs" / f"{name}.yaml", ["hydra.run.dir=x", *overrides])


def vgs_task(data, **model_overrides):
    """``(cfg, task)``: vgs_ssl_tiny_cpu on ``data`` (model section updated), its valid split loaded."""
    from fairseq import tasks

    cfg = vgs_config("vgs_ssl_tiny_cpu", f"task.data={data}")
    cfg.model.update(model_overrides)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("valid")
    return cfg, task


def vgs_batch(task, n=4):
    """The first ``n`` items of the task's valid split, collated."""
    ds = task.dataset("valid")
    return ds.collater([ds[i] for i in range(n)])


# --------------------------------------------------------------------------------------------- checkpoints


def fairseq_cfg(model_cfg, model_name: str, task_cfg, task_name: str) -> dict:
    """A checkpoint's ``cfg`` from the model's and the task's dataclasses. Interpolations into other groups
    (task.tpu: ${common.tpu}) are left out: saved files hold values there."""

    def plain(c, name):
        d = OmegaConf.to_container(OmegaConf.structured(c), enum_to_str=True)
        return {**{k: v for k, v in d.items() if not str(v).startswith("${")}, "_name": name}

    return {"model": plain(model_cfg, model_name), "task": plain(task_cfg, task_name), "common": {}}


def save_checkpoint(model: torch.nn.Module, cfg: dict, path, task_state=None, num_updates: int = 0) -> None:
    """``model`` as fairseq saves a checkpoint: config, weights, task state, one optimizer history entry."""
    torch.save(
        {
            "cfg": cfg,
            "model": model.state_dict(),
            "args": None,
            "task_state": task_state or {},
            "optimizer_history": [
                {
                    "criterion_name": "x",
                    "optimizer_name": "Adam",
                    "lr_scheduler_state": {"best": None},
                    "num_updates": num_updates,
                }
            ],
            "extra_state": {},
            "last_optimizer_state": None,
        },
        path,
    )


def perturb_norms(model: torch.nn.Module, seed: int = 0, weight_g: bool = True) -> None:
    """Non-trivial norms and biases (and weight-norm gains), so that a misplaced one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or (weight_g and "weight_g" in name) or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def initial_checkpoint(config: Path, overrides, path: Path) -> Path:
    """The model of the config file ``config`` at its initial weights (seed 0), saved as fairseq-hydra-train
    saves one."""
    from fairseq import tasks

    cfg = training_config(config, overrides)
    torch.manual_seed(0)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    model.set_num_updates(0)
    save_checkpoint(model, OmegaConf.to_container(cfg, resolve=True), path)
    return path


def random_hubert(**overrides):
    """A fairseq HubertModel (HuBERT Base's architecture unless overridden), random weights."""
    from fairseq.data.dictionary import Dictionary
    from fairseq.models.hubert import HubertConfig, HubertModel
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

    cfg = HubertConfig(label_rate=50.0, **overrides)
    return HubertModel(cfg, HubertPretrainingConfig(labels=["km"], label_rate=50.0), [Dictionary()])


TINY_HUBERT = dict(  # random_hubert(**TINY_HUBERT): 4 layers of 64, no dropout
    encoder_layers=4,
    encoder_embed_dim=64,
    encoder_ffn_embed_dim=128,
    encoder_attention_heads=4,
    conv_pos=16,
    conv_pos_groups=4,
    conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    dropout_input=0.0,
    final_dim=16,
)

_SMALL = dict(  # the random checkpoints' size: 3 layers of 96
    encoder_layers=3,
    encoder_embed_dim=96,
    encoder_ffn_embed_dim=192,
    encoder_attention_heads=4,
    conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
    conv_pos=16,
    conv_pos_groups=8,
    final_dim=32,
)


def _save_perturbed(path, model, model_cfg, model_name, task_cfg, task_name, task_state) -> None:
    """``model`` saved as fairseq saves a checkpoint, its norms perturbed (torch's global generator) first."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    save_checkpoint(model, fairseq_cfg(model_cfg, model_name, task_cfg, task_name), path, task_state)


def random_hubert_checkpoint(path, extractor_mode: str, layer_norm_first: bool, normalize: bool = False) -> None:
    """A randomly initialised small fairseq HuBERT (no plugin task: 3 layers of 96, 50 Hz labels, 10 classes)
    saved as fairseq saves one. ``extractor_mode`` "default" is HuBERT Base's group-normed front end,
    "layer_norm" with ``layer_norm_first`` Large's pre-LN layout."""
    from fairseq.data.dictionary import Dictionary
    from fairseq.models.hubert import HubertConfig, HubertModel
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

    torch.manual_seed(0)
    cfg = HubertConfig(extractor_mode=extractor_mode, layer_norm_first=layer_norm_first, label_rate=50.0, **_SMALL)
    task = HubertPretrainingConfig(data="unused", labels=["km"], label_rate=50.0, normalize=normalize)
    d = Dictionary()
    for i in range(10):
        d.add_symbol(str(i))
    model = HubertModel(cfg, task, [d])
    _save_perturbed(path, model, cfg, "hubert", task, "hubert_pretraining", {"dictionaries": [d]})


def random_wav2vec2_checkpoint(path, extractor_mode: str, layer_norm_first: bool, normalize: bool = False) -> None:
    """A randomly initialised small fairseq wav2vec 2.0 (the HuBERT checkpoint's size, no plugin task), saved
    as fairseq saves one."""
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model
    from fairseq.tasks.audio_pretraining import AudioPretrainingConfig

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(
        extractor_mode=extractor_mode,
        layer_norm_first=layer_norm_first,
        latent_vars=16,
        latent_groups=2,
        latent_dim=32,
        **_SMALL,
    )
    task = AudioPretrainingConfig(data="unused", normalize=normalize)
    _save_perturbed(path, Wav2Vec2Model(cfg), cfg, "wav2vec2", task, "audio_pretraining", {})


def random_vgs_checkpoint(tmp_path, **model_over):
    """``(model, cfg, checkpoint)``: vgs_ssl_tiny_cpu's Wav2Vec2VgsModel (model section overridden), norms
    perturbed and BatchNorm statistics that are not the identity, in eval mode, saved as ``tmp_path/vgs.pt``."""
    from fairseq_mtssl.models.wav2vec2_vgs import Wav2Vec2VgsConfig, Wav2Vec2VgsModel

    cfg = saved_config(
        "vgs", "vgs_ssl_tiny_cpu", "task.data=unused", *[f"++model.{k}={v}" for k, v in model_over.items()]
    )
    names = set(Wav2Vec2VgsConfig.__dataclass_fields__)
    torch.manual_seed(0)
    model = Wav2Vec2VgsModel(Wav2Vec2VgsConfig(**{k: v for k, v in cfg["model"].items() if k in names}))
    perturb_norms(model)
    model.eval()
    with torch.no_grad():  # BatchNorm running statistics that are not the identity
        model.audio_batch_norm.running_mean.normal_()
        model.audio_batch_norm.running_var.uniform_(0.5, 2.0)
    ckpt = tmp_path / "vgs.pt"
    save_checkpoint(model, cfg, ckpt)
    return model, cfg, ckpt


def random_mt4ssl_checkpoint(tmp_path, *overrides):
    """``(model, checkpoint)``: mt4ssl_tiny_cpu's MT4SSLModel (config overridden), norms perturbed, with the EMA
    teacher training builds at its first update, saved as ``tmp_path/mt4ssl.pt``."""
    from fairseq_mtssl.models.mt4ssl import MT4SSLConfig, MT4SSLModel

    cfg = saved_config(
        "mt4ssl/pretrain",
        "mt4ssl_tiny_cpu",
        "task.data=unused",
        "task.label_dir=unused",
        "task.labels=[km]",
        "task.label_rate=100",
        *overrides,
    )
    names = set(MT4SSLConfig.__dataclass_fields__)
    torch.manual_seed(2)
    model = MT4SSLModel(MT4SSLConfig(**{k: v for k, v in cfg["model"].items() if k in names}), [12], [100.0], [1])
    perturb_norms(model, seed=2)
    model.make_ema_teacher()  # what training builds at its first update: the checkpoint's ``_ema``
    save_checkpoint(model, cfg, tmp_path / "mt4ssl.pt")
    return model, tmp_path / "mt4ssl.pt"


# ----------------------------------------------------------------------------------- the export round trip

EXPORT_TOL = 1e-5  # every exported hidden state against the plugin model's


def speech_sample(manifest_dir, normalize: bool) -> torch.Tensor:
    """The first 1.5 s of the first valid utterance, layer-normalised where the task normalises."""
    root, first = (manifest_dir / "valid.tsv").read_text().splitlines()[:2]
    wav, _ = sf.read(f"{root}/{first.split(chr(9))[0]}", dtype="float32")
    wav = torch.from_numpy(wav[:24000])
    return torch.nn.functional.layer_norm(wav, wav.shape) if normalize else wav


def run_export(ckpt, out, *extra) -> dict:
    """``python -m fairseq_mtssl.convert.export CKPT OUT``; its ``export.json``."""
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_mtssl.convert.export", str(ckpt), str(out), *extra],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "export.json").read_text())


# Runs without the plugin: what a user of each toolkit does with the exported files.
_TARGETS = r"""
import json, sys, types, argparse
from pathlib import Path
import numpy as np, torch
out, wav_path, result = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
info = json.loads((out / "export.json").read_text())
wav = torch.from_numpy(np.load(wav_path))
normed = torch.nn.functional.layer_norm(wav, wav.shape)
got = {}

# fairseq
from fairseq import checkpoint_utils
from fairseq.data.dictionary import Dictionary
torch.serialization.add_safe_globals([Dictionary, argparse.Namespace])  # what any torch>=2.6 fairseq user needs
if info["fairseq"]["model"] == "data2vec_audio":
    # fairseq's data2vec cannot deep-copy weight norm under torch >= 2.1 when it builds its EMA teacher
    from torch.nn.utils.weight_norm import WeightNorm
    from fairseq.examples.data2vec.models import data2vec_audio
    make = data2vec_audio.Data2VecAudioModel.make_ema_teacher
    def make_detached(self):
        for m in self.modules():
            for h in m._forward_pre_hooks.values():
                if isinstance(h, WeightNorm):
                    setattr(m, h.name, getattr(m, h.name).detach())
        make(self)
    data2vec_audio.Data2VecAudioModel.make_ema_teacher = make_detached
models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(out / "fairseq.pt")])
model = models[0].eval()
assert type(model).__name__ == {"hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model",
                                "data2vec_audio": "Data2VecAudioModel"}[info["fairseq"]["model"]], type(model)
states = []
layers = model.encoder.layers
hooks = [layers[0].register_forward_pre_hook(lambda m, a: states.append(a[0].transpose(0, 1)[0]))]
hooks += [l.register_forward_hook(lambda m, a, o: states.append(o[0].transpose(0, 1)[0])) for l in layers]
x = normed if cfg.task.normalize else wav
with torch.no_grad():
    if info["fairseq"]["model"] == "hubert":
        final = model.extract_features(x[None], padding_mask=None, mask=False)[0][0]
    else:
        final = model.extract_features(x[None], None, mask=False)["x"][0]
t = final.shape[0]
got["fairseq"] = torch.stack([s[:t] for s in states] + [final]).numpy()

# transformers
if "transformers" in info:
    from transformers import AutoModel
    hf = AutoModel.from_pretrained(out / "transformers").eval()
    assert type(hf).__name__ == info["transformers"]["class"], type(hf)
    with torch.no_grad():
        o = hf(x[None], output_hidden_states=True)
    got["transformers"] = torch.stack([h[0] for h in o.hidden_states] + [o.last_hidden_state[0]]).numpy()

# s3prl (it layer-normalises the waveform itself when the task did)
if "s3prl" in info:
    # s3prl 0.4.18's upstream/utils imports torchaudio at module level for a pseudo-data helper that
    # the *_local upstreams never call; this environment has no torchaudio (none builds for torch 2.13).
    sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    import importlib
    name = info["s3prl"]["upstream"]
    hub = importlib.import_module(f"s3prl.upstream.{name.split('_')[0]}.hubconf")
    ups = {"s3prl": getattr(hub, name)(str(out / "s3prl.pt"))}
    if name != "data2vec_local":
        ups["s3prl_fairseq"] = getattr(hub, name)(str(out / "fairseq.pt"), fairseq=True)
    for key, up in ups.items():
        with torch.no_grad():
            o = up.eval()([wav])
        got[key] = torch.stack([h[0] for h in o["hidden_states"]]).numpy()
assert "fairseq_mtssl" not in sys.modules
np.savez(result, **got)
"""


def exported_hidden_states(out, wav, tmp_path) -> dict:
    """Every target's hidden states of ``wav`` from the export in ``out``, each read in a fresh interpreter
    without the plugin: ``{"fairseq", "transformers", "s3prl", "s3prl_fairseq": (states, T, C)}``, those exported."""
    np.save(tmp_path / "x.npy", wav.numpy())
    proc = subprocess.run(
        [sys.executable, "-c", _TARGETS, str(out), str(tmp_path / "x.npy"), str(tmp_path / "got.npz")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(tmp_path / "got.npz"))


def assert_states_match(encoder, x: torch.Tensor, got: dict, pre_ln: bool):
    """Every target's states against the plugin encoder's on ``x`` (the waveform, layer-normalised when
    the task normalises): transformers and fairseq give the first layer's input, every layer's output
    and the encoder output; s3prl the layer inputs and the encoder output."""
    from fairseq_mtssl.convert.to_transformers import fairseq_hidden_states

    ours = fairseq_hidden_states(encoder.eval(), x[None])[:, 0].numpy()  # (L + 2, T, C)
    assert pre_ln == (np.abs(ours[-1] - ours[-2]).max() > 1e-2)  # a pre-LN model's final norm really acts
    s3prl_ours = np.concatenate([ours[:-2], ours[-1:]])
    diffs = {}
    for key, states in got.items():
        ref = s3prl_ours if key.startswith("s3prl") else ours
        assert states.shape == ref.shape, (key, states.shape, ref.shape)
        diffs[key] = float(np.abs(states - ref).max())
    print("max abs differences:", diffs)
    assert all(d < EXPORT_TOL for d in diffs.values()), diffs
    return diffs


# ------------------------------------------------------------------------ SPIN: a voiced multi-speaker corpus

SPIN_SR = 16000
SPIN_SPEAKERS = {"spkA": 110.0, "spkB": 180.0, "spkC": 240.0}  # each speaker's f0


def voiced(n: int, f0: float, seed: int = 0) -> np.ndarray:
    """A harmonic tone at ``f0`` with vibrato, syllable-rate amplitude and a little noise, peak 0.5."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SPIN_SR
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / SPIN_SR
    x = sum(np.sin(h * phase) / h for h in range(1, int(6000 // f0)))
    x *= 0.35 + 0.65 * (0.5 - 0.5 * np.cos(2 * np.pi * 4 * t))
    x = 0.5 * x / np.abs(x).max() + 1e-3 * rng.standard_normal(n)
    return x.astype(np.float32)


def write_spin_corpus(root: Path) -> Path:
    """train: 6 utterances of 3 speakers (one longer than the test crop), valid: 2; {split}.spk beside each."""
    lengths = {"train": [20000, 26000, 30000, 23000, 34000, 52000], "valid": [21000, 25000]}
    for split, lens in lengths.items():
        rows, spks = [], []
        for i, n in enumerate(lens):
            spk = sorted(SPIN_SPEAKERS)[i % 3]
            rel = f"wav/{split}/{spk}/{spk}-{split}-{i}.wav"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(root / rel, voiced(n, SPIN_SPEAKERS[spk], seed=i), SPIN_SR, subtype="PCM_16")
            rows.append(f"{rel}\t{n}")
            spks.append(spk)
        (root / f"{split}.tsv").write_text(f"{root}\n" + "\n".join(rows) + "\n")
        (root / f"{split}.spk").write_text("\n".join(spks) + "\n")
    labels = root / "labels"
    labels.mkdir()
    (labels / "dict.km.txt").write_text("".join(f"{i} 1\n" for i in range(20)))
    return root


def spin_task(data, **overrides):
    """SPIN's fine-tuning task on ``data`` (seed 1, utterances of 0.5 to 2.5 s)."""
    from fairseq_mtssl.tasks.spin_finetuning import SpinFinetuningConfig, SpinFinetuningTask

    cfg = SpinFinetuningConfig(data=str(data), seed=1, max_sample_size=40000, min_sample_size=8000, **overrides)
    return SpinFinetuningTask(cfg)


# ------------------------------------------------------------------------------- soft-DTW: the recursion


def brute_soft_dtw(D: torch.Tensor, gamma: float) -> torch.Tensor:
    """The recursion cell by cell, differentiable by autograd (one item)."""
    n, m = D.shape
    inf = torch.tensor(float("inf"), dtype=D.dtype)
    R = [[inf] * (m + 1) for _ in range(n + 1)]
    R[0][0] = torch.tensor(0.0, dtype=D.dtype)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            prev = torch.stack([R[i - 1][j - 1], R[i - 1][j], R[i][j - 1]])
            R[i][j] = D[i - 1, j - 1] - gamma * torch.logsumexp(-prev / gamma, 0)
    return R[n][m]


# ---------------------------------------------------------------------------- VGS: the speech-image loss


def brute_speech_image_loss(speech, image, ids, kind="margin_infonce", margin=1.0, temperature=0.07, similarity="dot"):
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


# ----------------------------------------------------------------------------------- ABX: a hand-made set


def _unit(deg):
    """A 2-d frame at ``deg`` degrees; 0, 45 and 90 exact, so that equal angles give bitwise-equal distances."""
    exact = {0: [1.0, 0.0], 45: [1.0, 1.0], 90: [0.0, 1.0]}
    return exact.get(deg, [math.cos(math.radians(deg)), math.sin(math.radians(deg))])


def hand_example():
    """Items whose distances can be computed on paper: every frame is a 2-d direction, d = |angle difference| / 180.
    Each utterance is [junk, item frames..., junk, junk] at 10 frames/s, junk at 135 degrees; an item
    0.12-0.28 s takes frame 1 only, 0.12-0.38 s frames 1-2 (libri-light's rule), 0.12-0.14 s none (dropped).

    context c1 = p_t:  S1: a@0, a@20, b@[25, 35] (two frames)   S2: a@10, a@30, b@90   S3: a@5
    context c2 = k_s:  S1: a@0, a@100, b@90                      S2: a@45               S3: a (no frame: dropped)
    """
    from fairseq_mtssl.evaluation.abx import AbxItem

    utts, items = {}, []

    def add(spk, ctx, phone, angles, offset=None):
        name = f"u{len(utts)}"
        utts[name] = np.array([_unit(135)] + [_unit(a) for a in angles] + [_unit(135)] * 2, dtype=np.float32)
        offset = offset or (0.28 if len(angles) == 1 else 0.38)
        items.append(AbxItem(name, 0.12, offset, phone, ctx[0], ctx[1], spk))

    c1, c2 = ("p", "t"), ("k", "s")
    add("S1", c1, "a", [0]), add("S1", c1, "a", [20]), add("S1", c1, "b", [25, 35])
    add("S2", c1, "a", [10]), add("S2", c1, "a", [30]), add("S2", c1, "b", [90])
    add("S3", c1, "a", [5])
    add("S1", c2, "a", [0]), add("S1", c2, "a", [100]), add("S1", c2, "b", [90])
    add("S2", c2, "a", [45])
    add("S3", c2, "a", [10], offset=0.14)
    return items, utts


# The hand example under libri-light's definition. d(b@[25,35], x) for one frame x outside [25, 35] is the
# mean over the two cells of the 2 x 1 path: (|25 - x| + |35 - x|) / 2 / 180 = |30 - x| / 180; for x = 30
# it is (5 + 5) / 2 = 5 (in degrees below). An error is d(A,X) >= d(B,X), a tie counts 1/2.
#
# WITHIN (X from A's group, X != A); only phone a has two items in a (context, speaker):
#   (c1,S1,a,b): A=0,X=20: d(A,X)=20 vs d(b,X)=10 -> error; A=20,X=0: 20 vs 30 -> correct     -> 1/2
#   (c1,S2,a,b): A=10,X=30: 20 vs 60 -> correct; A=30,X=10: 20 vs 80 -> correct                 -> 0
#   (c2,S1,a,b): A=0,X=100: 100 vs 10 -> error; A=100,X=0: 100 vs 90 -> error                   -> 1
#   per (speaker, a, b) over contexts: S1 (1/2 + 1) / 2 = 3/4, S2 0; over speakers (3/4 + 0) / 2 = 3/8
#   (pooling the three cells at once would give 1/2.)                                   within = 3/8 = 0.375
# ACROSS (A, B from one speaker, X of phone A from another), cells (context, A/B spk, X spk, A, B):
#   (c1,S1,S2,a,b) A={0,20} B=b X={10,30}: X=10: 10 vs 20, 10 vs 20 -> 0, 0; X=30: 30 vs 5, 10 vs 5 -> 1, 1 = 1/2
#   (c1,S1,S3,a,b) X={5}: 5 vs 25, 15 vs 25 -> 0, 0                                                         = 0
#   (c1,S1,S2,b,a) A=b B={0,20} X={90}: d(A,X)=60 vs 90, 60 vs 70 -> 0, 0                                   = 0
#   (c1,S2,S1,a,b) A={10,30} B=90 X={0,20}: 10 vs 90, 30 vs 90, 10 vs 70, 10 vs 70 -> 0                     = 0
#   (c1,S2,S3,a,b) X={5}: 5 vs 85, 25 vs 85 -> 0, 0                                                         = 0
#   (c1,S2,S1,b,a) A=90 B={10,30} X=b: d(A,X)=60 vs 20, 60 vs 5 -> 1, 1                                     = 1
#   (c2,S1,S2,a,b) A={0,100} B=90 X={45}: 45 vs 45 (tie, exactly: (1,0) and (0,1) against (1,1)) -> 1/2;
#                  55 vs 45 -> 1                                                                            = 3/4
#   (S3's c2 item has no frame, so no (c2,S1,S3) cell; S2 and S3 have one phone in c2, no A/B cell there)
#   pooled over (context, X speaker) per (A/B speaker, A, B):
#     (S1,a,b): (1/2 + 0 + 3/4) / 3 = 5/12   (S2,a,b): (0 + 0) / 2 = 0   (S1,b,a): 0   (S2,b,a): 1
#   per phone pair over A/B speakers: (a,b) = (5/12 + 0) / 2 = 5/24, (b,a) = (0 + 1) / 2 = 1/2
#   over phone pairs: (5/24 + 12/24) / 2                                                 across = 17/48 = 0.3541666
#   (averaging over contexts per (A/B, X speaker) first, the former rule, gives (b,a) 1/2 and
#   (a,b) = ((1/2 + 3/4) / 2 + 0 + 0 + 0) / 4 = 5/32: (5/32 + 1/2) / 2 = 21/64.)
HAND_WITHIN, HAND_ACROSS = 3 / 8, 17 / 48
