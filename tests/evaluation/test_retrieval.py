"""Speech-image retrieval: recall at 1, 5 and 10 in both directions against brute force."""

import numpy as np
import pytest
import torch


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
