"""VgsSslCriterion: exactly fairseq's wav2vec 2.0 loss at av_weight 0, the papers' alpha mix, VGS alone with images."""

import numpy as np
import pytest
import torch
from builders import brute_speech_image_loss, vgs_batch, vgs_task


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
    assert pairs == 4 and float(only) / pairs == pytest.approx(brute_speech_image_loss(speech, image, ids), rel=1e-5)
    no_images = dict(sample, image_ids=torch.full_like(sample["image_ids"], -1))
    with pytest.raises(ValueError, match="no images, and av_weight=1"):
        VgsSslCriterion(task, av_weight=1.0, **kw)(model, no_images)
    with pytest.raises(ValueError, match="criterion.alpha=0.5: renamed to criterion.av_weight"):
        VgsSslCriterion(task, alpha=0.5, **kw)
