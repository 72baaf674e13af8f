"""wav2vec 2.0 with a visually grounded speech (VGS) branch (FaST-VGS+ / Khorrami et al., EUSIPCO 2023).

Registered as ``wav2vec2_vgs``. Composes fairseq's ``Wav2Vec2Model`` (``self.w2v``, unchanged: its
masked contrastive forward, quantiser and diversity loss) with two heads into one L2-normalised space:

- audio head: the output of wav2vec 2.0 layer ``vgs_layer`` *of the same masked forward* the SSL loss
  uses (FaST-VGS+ reads layer 8 of 12; layers above it serve the SSL loss only), downsampled by
  ``audio_downsample`` stride-2 convolutions, then ``audio_layers`` transformer layers over
  ``[CLS; frames]``, pooled (CLS or attention) and projected;
- image head: precomputed region features ``(R, image_dim)`` projected, ``image_layers`` transformer
  layers over ``[CLS; regions]``, pooled and projected.

With the SSL loss off (VGS only), the forward is unmasked and stops at ``vgs_layer``. Retrieval and
downstream evaluation use :meth:`embed_speech` / :meth:`embed_images` and :meth:`speech_encoder`.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import ChoiceEnum
from fairseq.models import BaseFairseqModel, register_model
from fairseq.models.wav2vec.wav2vec2 import TransformerSentenceEncoderLayer, Wav2Vec2Config, Wav2Vec2Model

POOLING = ChoiceEnum(["cls", "attention"])
FEATURE_NORM = ChoiceEnum(["none", "instance", "batch"])


@dataclass
class Wav2Vec2VgsConfig(Wav2Vec2Config):
    vgs_layer: int = field(
        default=8, metadata={"help": "wav2vec 2.0 layer (1-based) whose output feeds the audio head"}
    )
    vgs_dim: int = field(default=768, metadata={"help": "width of both heads and of the joint embedding space"})
    vgs_heads: int = field(default=8, metadata={"help": "attention heads in the heads' transformer layers"})
    audio_downsample: int = field(
        default=2, metadata={"help": "stride-2 convolutions before the audio head's transformer (2**n downsampling)"}
    )
    audio_layers: int = field(default=1, metadata={"help": "transformer layers of the audio head"})
    image_dim: int = field(
        default=2052, metadata={"help": "region feature size (Faster R-CNN 2048 + 4 box coordinates)"}
    )
    image_layers: int = field(default=6, metadata={"help": "transformer layers of the image head"})
    pooling: POOLING = field(default="cls", metadata={"help": "cls token or attention pooling"})
    audio_feature_norm: FEATURE_NORM = field(
        default="batch",
        metadata={
            "help": "normalise each channel of the wav2vec 2.0 layer features over the valid frames before the audio head: "
            "instance (per utterance) or batch (per batch, running statistics at eval, as ResDAVEnet's BatchNorm). "
            "Without it the features' large common component makes every pooled speech embedding nearly the same "
            "(cosine 0.9997 on the embedded corpus) and the speech-image loss does not learn at small scale"
        },
    )
    vgs_dropout: float = field(default=0.1, metadata={"help": "dropout in the heads"})
    freeze_shared_layers: int = field(
        default=0, metadata={"help": "freeze the conv front end and wav2vec 2.0 layers 1..n (sequential stage 2)"}
    )


class _Pool(nn.Module):
    """A CLS token prepended, transformer layers, then the CLS output or attention pooling: ``(B, E)``."""

    def __init__(self, dim: int, layers: int, heads: int, dropout: float, pooling: str):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(dim) * 0.02)
        self.layers = nn.ModuleList(
            TransformerSentenceEncoderLayer(
                dim, 4 * dim, heads, dropout, dropout, dropout, "gelu", layer_norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.pooling = pooling
        self.score = nn.Linear(dim, 1) if pooling == "attention" else None

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        b = x.size(0)
        x = torch.cat([self.cls.expand(b, 1, -1), x], 1)
        mask = None if padding_mask is None else F.pad(padding_mask, (1, 0), value=False)
        h = x.transpose(0, 1)
        for layer in self.layers:
            h, _ = layer(h, self_attn_padding_mask=mask)
        h = self.norm(h.transpose(0, 1))
        if self.pooling == "cls":
            return h[:, 0]
        w = self.score(h).squeeze(-1)
        if mask is not None:
            w = w.masked_fill(mask, float("-inf"))
        return torch.einsum("bt,btc->bc", F.softmax(w, -1), h)


@register_model("wav2vec2_vgs", dataclass=Wav2Vec2VgsConfig)
class Wav2Vec2VgsModel(BaseFairseqModel):
    def __init__(self, cfg: Wav2Vec2VgsConfig):
        super().__init__()
        self.cfg = cfg
        self.w2v = Wav2Vec2Model(cfg)
        n_layers = len(self.w2v.encoder.layers)
        if not 1 <= cfg.vgs_layer <= n_layers:
            raise ValueError(f"vgs_layer={cfg.vgs_layer} but wav2vec 2.0 has {n_layers} layers")
        c, d = cfg.encoder_embed_dim, cfg.vgs_dim
        convs: List[nn.Module] = []
        for i in range(cfg.audio_downsample):
            convs += [nn.Conv1d(c if i == 0 else d, d, kernel_size=3, stride=2, padding=1), nn.GELU()]
        self.audio_in = nn.Sequential(*convs) if convs else nn.Linear(c, d)
        self.audio_batch_norm = nn.BatchNorm1d(c, affine=False) if cfg.audio_feature_norm == "batch" else None
        self.audio_pool = _Pool(d, cfg.audio_layers, cfg.vgs_heads, cfg.vgs_dropout, cfg.pooling)
        self.audio_out = nn.Linear(d, d)
        self.image_in = nn.Sequential(nn.Linear(cfg.image_dim, d), nn.LayerNorm(d))
        self.image_pool = _Pool(d, cfg.image_layers, cfg.vgs_heads, cfg.vgs_dropout, cfg.pooling)
        self.image_out = nn.Linear(d, d)
        self.freeze_shared(cfg.freeze_shared_layers)

    @classmethod
    def build_model(cls, cfg: Wav2Vec2VgsConfig, task=None):
        dim = getattr(task, "image_feature_dim", None)
        if dim is not None and dim != cfg.image_dim:
            raise ValueError(f"model.image_dim={cfg.image_dim} but the task's image features have {dim} dims")
        return cls(cfg)

    def freeze_shared(self, n: int) -> None:
        if n <= 0:
            return
        if n > self.cfg.vgs_layer:
            raise ValueError(f"freeze_shared_layers={n} exceeds vgs_layer={self.cfg.vgs_layer} (the shared layers)")
        for module in [
            self.w2v.feature_extractor,
            self.w2v.layer_norm,
            self.w2v.post_extract_proj,
            self.w2v.encoder.pos_conv,
            *self.w2v.encoder.layers[:n],
        ]:
            if module is not None:
                module.requires_grad_(False)
        if not self.w2v.encoder.layer_norm_first:
            self.w2v.encoder.layer_norm.requires_grad_(False)
        self.w2v.feature_grad_mult = 0.0

    # ------------------------------------------------------------------ speech side

    def _layer_output(self, run):
        """Run ``run()`` while recording the output of wav2vec 2.0 layer ``vgs_layer`` ``(B, T, C)``.
        Under LayerDrop a skipped layer passes its input on, so the latest output of layers
        ``1..vgs_layer`` (or the first layer's input) is what layer ``vgs_layer`` hands upward."""
        seen: List[torch.Tensor] = []
        layers = self.w2v.encoder.layers
        hooks = [layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))]
        hooks += [
            layer.register_forward_hook(lambda m, args, out: seen.append(out[0]))
            for layer in layers[: self.cfg.vgs_layer]
        ]
        try:
            result = run()
        finally:
            for h in hooks:
                h.remove()
        return result, seen[-1].transpose(0, 1)

    def _normalise_features(self, h: torch.Tensor, frame_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-channel standardisation of ``h (B, T, C)`` over valid frames (see ``audio_feature_norm``)."""
        if self.cfg.audio_feature_norm == "none":
            return h
        valid = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if frame_mask is None else ~frame_mask
        if self.audio_batch_norm is not None:
            out = torch.zeros_like(h)
            out[valid] = self.audio_batch_norm(h[valid])
            return out
        w = valid[..., None].to(h.dtype)
        n = w.sum(1, keepdim=True).clamp(min=1.0)
        mean = (h * w).sum(1, keepdim=True) / n
        var = ((h - mean) ** 2 * w).sum(1, keepdim=True) / n
        return (h - mean) / torch.sqrt(var + 1e-5) * w

    def _audio_embedding(self, h: torch.Tensor, frame_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if frame_mask is not None:
            h = h[:, : frame_mask.size(1)]
        h = self._normalise_features(h, frame_mask)
        if frame_mask is not None:
            h = h.masked_fill(frame_mask[..., None], 0.0)
        if self.cfg.audio_downsample:
            h = self.audio_in(h.transpose(1, 2)).transpose(1, 2)
            if frame_mask is not None:
                lengths = (~frame_mask).sum(1)
                for _ in range(self.cfg.audio_downsample):
                    lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
                frame_mask = torch.arange(h.size(1), device=h.device)[None, :] >= lengths[:, None]
        else:
            h = self.audio_in(h)
        return self.audio_out(self.audio_pool(h, frame_mask))

    def embed_speech(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, E)`` caption embeddings from an unmasked forward up to ``vgs_layer``."""
        out = self.w2v.extract_features(source, padding_mask, mask=False, layer=self.cfg.vgs_layer - 1)
        return self._audio_embedding(out["x"], out["padding_mask"])

    def embed_images(
        self, image_feats: torch.Tensor, image_padding_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``(B, E)`` image embeddings from region features ``(B, R, image_dim)``."""
        if image_feats.size(-1) != self.cfg.image_dim:
            raise ValueError(
                f"image features have {image_feats.size(-1)} dims, the model expects image_dim={self.cfg.image_dim}"
            )
        return self.image_out(self.image_pool(self.image_in(image_feats), image_padding_mask))

    # ------------------------------------------------------------------ training forward

    def forward(
        self,
        source: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        image_feats: Optional[torch.Tensor] = None,
        image_padding_mask: Optional[torch.Tensor] = None,
        ssl: bool = True,
        **kwargs,
    ) -> dict:
        """With ``ssl``: wav2vec 2.0's masked forward (its output dict) plus ``speech_emb``; without:
        an unmasked forward to ``vgs_layer`` only. ``image_emb`` when ``image_feats`` are given."""
        if ssl:
            out, h = self._layer_output(lambda: self.w2v(source, padding_mask=padding_mask, mask=True, **kwargs))
            frame_mask = out.get("padding_mask")
        else:
            feats = self.w2v.extract_features(source, padding_mask, mask=False, layer=self.cfg.vgs_layer - 1)
            out, h, frame_mask = {}, feats["x"], feats["padding_mask"]
        out = dict(out)
        out["speech_emb"] = self._audio_embedding(h, frame_mask)
        if image_feats is not None:
            out["image_emb"] = self.embed_images(image_feats, image_padding_mask)
        return out

    # wav2vec 2.0's criterion reads these
    def get_logits(self, net_output):
        return self.w2v.get_logits(net_output)

    def get_targets(self, sample, net_output, expand_steps=True):
        return self.w2v.get_targets(sample, net_output, expand_steps)

    def get_extra_losses(self, net_output):
        return self.w2v.get_extra_losses(net_output)

    def set_num_updates(self, num_updates):
        super().set_num_updates(num_updates)
        self.w2v.set_num_updates(num_updates)

    def speech_encoder(self) -> nn.Module:
        """The wav2vec 2.0 model: what ABX, SUPERB and feature readers use."""
        return self.w2v
