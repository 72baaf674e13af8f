"""The speech-image loss against FaST-VGS's formula one element at a time, its defaults, two gloo workers, in half."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from builders import brute_speech_image_loss

from fairseq_mtssl.losses.speech_image import speech_image_loss


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
    want = brute_speech_image_loss(speech.numpy(), image.numpy(), ids.tolist(), kind, 1.0, 0.5, similarity)
    assert float(got) == pytest.approx(want, rel=1e-10)
    # the masking matters: with every caption of its own image, the loss is a different number
    unmasked = brute_speech_image_loss(speech.numpy(), image.numpy(), list(range(7)), kind, 1.0, 0.5, similarity)
    assert abs(unmasked - want) > 1e-3


def test_speech_image_loss_defaults_are_the_authors():
    """dot similarity, margin 1, directions summed: doubling the embeddings changes the loss (no
    normalisation), and one pair of orthogonal embeddings gives 2 x (log(e^-1 + 1) + 1) - 2."""
    torch.manual_seed(2)
    s, i = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    ids = torch.arange(5)
    assert float(speech_image_loss(s, i, ids)) != pytest.approx(float(speech_image_loss(2 * s, 2 * i, ids)))
    assert float(speech_image_loss(s, i, ids)) == pytest.approx(
        5 * brute_speech_image_loss(s.numpy(), i.numpy(), list(range(5)))
    )
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
        brute_speech_image_loss(speech.numpy(), image.numpy(), ids.tolist()), rel=1e-10
    )
    torch.testing.assert_close(torch.cat([parts[0]["speech"], parts[1]["speech"]]), s.grad)
    torch.testing.assert_close(torch.cat([parts[0]["image"], parts[1]["image"]]), i.grad)


def _large_pairs(n=6, dim=768, seed=0):
    """Half embeddings near 10 in every dimension: dot products of about 76800 > 65504 (float16's max)."""
    g = torch.Generator().manual_seed(seed)
    speech = (10 + 0.05 * torch.randn(n, dim, generator=g)).half()
    image = (10 + 0.05 * torch.randn(n, dim, generator=g)).half()
    return speech, image, torch.tensor([0, 1, 1, 2, 3, 4][:n])


@pytest.mark.parametrize(
    "kind,similarity", [("margin_infonce", "dot"), ("infonce", "dot"), ("margin_infonce", "cosine")]
)
def test_speech_image_loss_on_half_embeddings_is_float32_and_matches_float64(kind, similarity):
    from fairseq_mtssl.losses.speech_image import speech_image_loss

    speech, image, ids = _large_pairs()
    assert float((speech.double() @ image.double().T).min()) > 65504
    s, i = speech.clone().requires_grad_(True), image.clone().requires_grad_(True)
    got = speech_image_loss(s, i, ids, kind, temperature=100.0, similarity=similarity)
    want = speech_image_loss(speech.double(), image.double(), ids, kind, temperature=100.0, similarity=similarity)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert float(got) == pytest.approx(float(want), rel=1e-2)
    got.backward()
    assert s.grad.dtype == torch.float16 and torch.isfinite(s.grad).all() and torch.isfinite(i.grad).all()
