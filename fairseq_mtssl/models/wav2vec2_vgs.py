"""wav2vec 2.0 with a visually grounded speech (VGS) branch (FaST-VGS+ / Khorrami et al., EUSIPCO 2023).

Registered as ``wav2vec2_vgs``. Composes fairseq's ``Wav2Vec2Model`` (``self.w2v``: its masked
contrastive forward, quantiser and diversity loss) with an audio and an image head into one joint
space. The audio head reads wav2vec 2.0 layer ``vgs_layer`` *of the same masked forward* the SSL loss
uses (FaST-VGS+ reads layer 8 of 12; layers above it serve the SSL loss only). ``vgs_arch``:

- ``fast_vgs_plus`` (default; the authors' DualEncoder, jasonppy/FaST-VGS-Family ``models/fast_vgs.py``
  as khazarkhorrami/scheduled_SSL_XSL trains it): a learned CLS token is prepended to the wav2vec 2.0
  transformer input (:class:`ClsTransformerEncoder`: it passes the positional convolution and every
  layer; the frame outputs, SSL loss and hidden states are those of the other positions); its state at
  ``vgs_layer``, through a 2-layer GELU MLP, becomes the CLS of the audio head.
  Audio head: a ResDAVEnet branch on the layer's frames (Linear ``C -> 128`` + BatchNorm + ReLU, 4
  stages x 2 residual blocks, kernel 9, BatchNorm, widths ``audio_widths`` 128/256/512/768, each stage
  stride 2: 16x fewer frames), ``[CLS; frames]`` through ``audio_layers`` post-LN transformer layers
  (``vgs_heads`` 12, FFN ``vgs_ffn_dim`` 3072), a Linear of the CLS output.
  Image head: the region feature (first ``image_dim - 4`` columns, 2048) and its box (last 4) each
  through Linear + LayerNorm, averaged, dropout, a learned CLS prepended, ``image_layers`` (6) post-LN
  transformer layers, a 2-layer GELU MLP on the CLS output.
- ``light`` (the CPU-scale heads, used by ``vgs_ssl_tiny_cpu``): the layer's frames (batch-normalised,
  ``audio_feature_norm``) through ``audio_downsample`` stride-2 convolutions; each head a fresh CLS,
  pre-LN layers, CLS or attention pooling, a Linear; the image head one Linear over feature and box.

Embeddings are not normalised here: the criterion's ``similarity`` (dot, or cosine) decides. With the
SSL loss off (VGS only), the forward is unmasked and stops at ``vgs_layer``. Retrieval and downstream
evaluation use :meth:`embed_speech` / :meth:`embed_images` and :meth:`speech_encoder`.
"""

import contextlib
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import ChoiceEnum
from fairseq.models import BaseFairseqModel, register_model
from fairseq.models.wav2vec.wav2vec2 import (
    TransformerEncoder,
    TransformerSentenceEncoderLayer,
    Wav2Vec2Config,
    Wav2Vec2Model,
)

from ..upstream.layers import record_layers

POOLING = ChoiceEnum(["cls", "attention"])
FEATURE_NORM = ChoiceEnum(["none", "instance", "batch"])
VGS_ARCH = ChoiceEnum(["fast_vgs_plus", "light"])
TRUNK_INIT = ChoiceEnum(["fairseq", "bert"])
VGS_INPUT = ChoiceEnum(["masked", "unmasked"])


@dataclass
class Wav2Vec2VgsConfig(Wav2Vec2Config):
    vgs_arch: VGS_ARCH = field(
        default="fast_vgs_plus",
        metadata={
            "help": "fast_vgs_plus: the authors' FaST-VGS+ heads and a CLS token inside wav2vec 2.0; "
            "light: small CPU-scale heads without it (see the module doc)"
        },
    )
    vgs_layer: int = field(
        default=8, metadata={"help": "wav2vec 2.0 layer (1-based) whose output feeds the audio head"}
    )
    vgs_dim: int = field(default=768, metadata={"help": "width of both heads and of the joint embedding space"})
    vgs_heads: int = field(default=12, metadata={"help": "attention heads in the heads' transformer layers"})
    vgs_ffn_dim: int = field(
        default=3072,
        metadata={"help": "fast_vgs_plus: FFN width of the heads' transformer layers (light: 4 x vgs_dim)"},
    )
    audio_widths: List[int] = field(
        default_factory=lambda: [128, 256, 512, 768],
        metadata={
            "help": "fast_vgs_plus: channels of the ResDAVEnet branch's 4 stages (each 2 residual blocks, stride 2); "
            "the first is also the width of its input projection, the last must equal vgs_dim"
        },
    )
    audio_kernel: int = field(default=9, metadata={"help": "fast_vgs_plus: ResDAVEnet convolution width"})
    audio_downsample: int = field(
        default=2,
        metadata={"help": "light: stride-2 convolutions before the audio head's transformer (2**n downsampling)"},
    )
    audio_layers: int = field(default=1, metadata={"help": "transformer layers of the audio head"})
    image_dim: int = field(
        default=2052, metadata={"help": "region feature size (Faster R-CNN 2048 + 4 box coordinates)"}
    )
    image_layers: int = field(default=6, metadata={"help": "transformer layers of the image head"})
    pooling: POOLING = field(default="cls", metadata={"help": "light: cls token or attention pooling"})
    audio_feature_norm: FEATURE_NORM = field(
        default="batch",
        metadata={
            "help": "light (fast_vgs_plus has its own BatchNorm after its input projection): normalise each channel of the wav2vec 2.0 layer features over the valid frames before the audio head: "
            "instance (per utterance) or batch (per batch, running statistics at eval, as ResDAVEnet's BatchNorm). "
            "Without it the features' large common component makes every pooled speech embedding nearly the same "
            "(cosine 0.9997 on the embedded corpus) and the speech-image loss does not learn at small scale"
        },
    )
    vgs_dropout: float = field(default=0.1, metadata={"help": "dropout in the heads"})
    freeze_shared_layers: int = field(
        default=0, metadata={"help": "freeze the conv front end and wav2vec 2.0 layers 1..n (sequential stage 2)"}
    )
    vgs_input: VGS_INPUT = field(
        default="masked",
        metadata={
            "help": "with the SSL loss on (VGS+): the audio head reads layer vgs_layer of the masked forward the SSL "
            "loss uses (masked: FaST-VGS+, one forward) or of a second, unmasked pass up to vgs_layer on the same conv "
            "features (unmasked: the caption the head sees is the one retrieval embeds; costs layers 1..vgs_layer again)"
        },
    )
    trunk_init: TRUNK_INIT = field(
        default="fairseq",
        metadata={
            "help": "fairseq: wav2vec 2.0 as fairseq initialises it (quantiser projection N(0, 1), torch's default for "
            "post_extract_proj, project_q, final_proj); bert: every nn.Linear of the trunk N(0, 0.02) with zero bias "
            "and LayerNorms 1 / 0, as FaST-VGS's DualEncoder.apply(init_weights) (convolutions, mask embedding, "
            "codebook and CLS token keep theirs)"
        },
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


class ClsTransformerEncoder(TransformerEncoder):
    """fairseq's wav2vec 2.0 encoder with a learned token prepended to its input ``(B, T, C)``: the token
    passes the positional convolution and every layer (FaST-VGS+'s ``Wav2Vec2Model_cls``); the output
    and ``layer_results`` are those of the ``T`` frames, so the SSL loss and feature readers see no
    extra frame. Forward hooks on ``layers`` see ``1 + T`` positions, the token first
    (``prefix_tokens``)."""

    prefix_tokens = 1

    def __init__(self, args: Wav2Vec2Config):
        super().__init__(args)
        self.cls_token = nn.Parameter(torch.randn(args.encoder_embed_dim))  # the authors' init: N(0, 1)

    def forward(self, x, padding_mask=None, layer=None, corpus_key=None):
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.size(0), 1, -1), x], 1)
        if padding_mask is not None:
            padding_mask = F.pad(padding_mask, (1, 0), value=False)
        x, layer_results = super().forward(x, padding_mask, layer, corpus_key)
        layer_results = [(h[1:], z, lr[1:] if lr is not None else lr) for h, z, lr in layer_results]
        return x[:, 1:], layer_results


class Wav2Vec2ClsModel(Wav2Vec2Model):
    """fairseq's ``Wav2Vec2Model`` whose encoder is a :class:`ClsTransformerEncoder`."""

    def __init__(self, cfg: Wav2Vec2Config):
        if cfg.layer_type != "transformer":
            raise ValueError(f"vgs_arch=fast_vgs_plus needs layer_type=transformer, got {cfg.layer_type}")
        super().__init__(cfg)
        self.encoder = ClsTransformerEncoder(cfg)  # replaces the plain encoder fairseq built


def _mlp(dim: int) -> nn.Sequential:
    """FaST-VGS's CLS projection: ``Linear(d, 2d) -> GELU -> Linear(2d, d)``."""
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


def _post_ln_layers(n: int, dim: int, ffn: int, heads: int, dropout: float) -> nn.ModuleList:
    """BERT layers (post-LN, GELU): fairseq's encoder layer with ``layer_norm_first=False`` has BERT's
    structure and parameters (q, k, v, output projection, two LayerNorms, FFN); no dropout between
    the FFN's two Linears, as in BERT."""
    return nn.ModuleList(
        TransformerSentenceEncoderLayer(dim, ffn, heads, dropout, dropout, 0.0, "gelu", layer_norm_first=False)
        for _ in range(n)
    )


def _run_layers(layers: nn.ModuleList, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B, T, C) -> (B, T, C)`` through fairseq encoder layers (time-first inside)."""
    h = x.transpose(0, 1)
    for layer in layers:
        h, _ = layer(h, self_attn_padding_mask=padding_mask)
    return h.transpose(0, 1)


def _zero_beyond(x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """``x (B, C, T)`` with the frames at or after ``lengths (B,)`` set to 0."""
    if lengths is None:
        return x
    return x * (torch.arange(x.size(-1), device=x.device)[None, :] < lengths[:, None]).to(x.dtype)[:, None]


def _strided_lengths(lengths: Optional[torch.Tensor], kernel: int, stride: int) -> Optional[torch.Tensor]:
    if lengths is None:
        return None
    return torch.div(lengths + 2 * (kernel // 2) - kernel, stride, rounding_mode="floor") + 1


class _ResBlock(nn.Module):
    """ResDAVEnet's basic block over time: conv(k, stride) -> BN -> ReLU -> conv(k) -> BN, plus the
    input (a strided 1x1 conv + BN where the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv1 = nn.Conv1d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, kernel, padding=kernel // 2, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv1d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm1d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None):
        """``(B, C, T)``, valid frames ``(B,)`` -> ``(B, C', T')``, their valid frames."""
        lengths = _strided_lengths(lengths, self.kernel, self.stride)
        out = _zero_beyond(F.relu(self.bn1(self.conv1(x))), lengths)
        out = self.bn2(self.conv2(out))
        return _zero_beyond(F.relu(out + (x if self.downsample is None else self.downsample(x))), lengths), lengths


class ResDavenetBranch(nn.Module):
    """FaST-VGS's ResDAVEnet on wav2vec 2.0 frames: ``(B, T, C) -> (B, ~T / 2**len(widths), widths[-1])``.

    One departure from the authors' code: frames past a caption's end are zeroed after every block,
    so a caption embeds as it does alone whatever it is batched with (the authors pad every caption to
    a fixed 8 s, which makes theirs batch-independent too; fairseq pads to the batch's longest)."""

    def __init__(self, in_dim: int, widths: List[int], kernel: int = 9, blocks: int = 2):
        super().__init__()
        self.linear = nn.Linear(in_dim, widths[0])
        self.bn = nn.BatchNorm1d(widths[0])
        self.blocks = nn.ModuleList()
        cin = widths[0]
        for w in widths:
            self.blocks.extend(_ResBlock(cin if b == 0 else w, w, kernel, 2 if b == 0 else 1) for b in range(blocks))
            cin = w
        self.kernel, self.stages = kernel, len(widths)
        for m in self.modules():  # the authors' init: He-normal convolutions (fan-out), BN at 1 / 0
            if isinstance(m, nn.Conv1d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.out_channels)))

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = _zero_beyond(F.relu(self.bn(self.linear(x).transpose(1, 2))), lengths)
        for block in self.blocks:
            h, lengths = block(h, lengths)
        return h.transpose(1, 2)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid output frames of ``lengths`` valid input frames (each stage's first conv: stride 2, pad k//2)."""
        for _ in range(self.stages):
            lengths = _strided_lengths(lengths, self.kernel, 2)
        return lengths


class _Precomputed(nn.Module):
    """Stands in for a conv front end whose output ``(B, C, T)`` is already computed (and in the graph)."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.features = features

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return self.features


@contextlib.contextmanager
def _reusing_conv_features(w2v: nn.Module, features: Optional[torch.Tensor]):
    """Within the block, ``w2v``'s conv front end returns ``features`` instead of recomputing them (the same
    values: the front end has no dropout), so a second pass over the same audio costs only the transformer;
    its gradient reaches the front end through ``features``. ``None``: the front end runs as usual."""
    if features is None:
        yield
        return
    extractor = w2v.feature_extractor
    w2v.feature_extractor = _Precomputed(features)
    try:
        yield
    finally:
        w2v.feature_extractor = extractor


def _bert_init(module: nn.Module) -> None:
    """FaST-VGS's ``init_weights`` (heads, and the trunk with ``trunk_init=bert``): Linear N(0, 0.02) with
    zero bias, LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        module.weight.data.normal_(0.0, 0.02)
        if module.bias is not None:
            module.bias.data.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.data.fill_(1.0)
        module.bias.data.zero_()


@register_model("wav2vec2_vgs", dataclass=Wav2Vec2VgsConfig)
class Wav2Vec2VgsModel(BaseFairseqModel):
    def __init__(self, cfg: Wav2Vec2VgsConfig):
        super().__init__()
        self.cfg = cfg
        self.arch = str(cfg.vgs_arch)
        self.w2v = Wav2Vec2ClsModel(cfg) if self.arch == "fast_vgs_plus" else Wav2Vec2Model(cfg)
        n_layers = len(self.w2v.encoder.layers)
        if not 1 <= cfg.vgs_layer <= n_layers:
            raise ValueError(f"vgs_layer={cfg.vgs_layer} but wav2vec 2.0 has {n_layers} layers")
        if self.arch == "fast_vgs_plus":
            self._build_fast_vgs_plus(cfg)
        else:
            self._build_light(cfg)
        if cfg.trunk_init == "bert":
            self.w2v.apply(_bert_init)
        self.freeze_shared(cfg.freeze_shared_layers)

    def _build_fast_vgs_plus(self, cfg: Wav2Vec2VgsConfig) -> None:
        c, d = cfg.encoder_embed_dim, cfg.vgs_dim
        widths = list(cfg.audio_widths)
        if widths[-1] != d:
            raise ValueError(f"audio_widths ends with {widths[-1]}, but the audio head's width vgs_dim is {d}")
        if cfg.image_dim <= 4:
            raise ValueError(
                f"image_dim={cfg.image_dim}: fast_vgs_plus expects region features followed by 4 box values"
            )
        self.audio_cls_mlp = _mlp(c) if c == d else nn.Sequential(nn.Linear(c, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.audio_branch = ResDavenetBranch(c, widths, cfg.audio_kernel)
        self.audio_transformer = _post_ln_layers(cfg.audio_layers, d, cfg.vgs_ffn_dim, cfg.vgs_heads, cfg.vgs_dropout)
        self.audio_out = nn.Linear(d, d)
        self.image_feat_in = nn.Sequential(nn.Linear(cfg.image_dim - 4, d), nn.LayerNorm(d, eps=1e-12))
        self.image_box_in = nn.Sequential(nn.Linear(4, d), nn.LayerNorm(d, eps=1e-12))
        self.image_dropout = nn.Dropout(cfg.vgs_dropout)
        self.image_cls = nn.Parameter(torch.randn(d))  # the authors' init: N(0, 1)
        self.image_transformer = _post_ln_layers(cfg.image_layers, d, cfg.vgs_ffn_dim, cfg.vgs_heads, cfg.vgs_dropout)
        self.image_out = _mlp(d)
        for m in (self.audio_cls_mlp, self.audio_transformer, self.audio_out, self.image_feat_in, self.image_box_in,
                  self.image_transformer, self.image_out):  # fmt: skip
            m.apply(_bert_init)
        self.audio_branch.linear.apply(_bert_init)

    def _build_light(self, cfg: Wav2Vec2VgsConfig) -> None:
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
        if isinstance(self.w2v.encoder, ClsTransformerEncoder):  # an input of the frozen layers
            self.w2v.encoder.cls_token.requires_grad_(False)
        self.w2v.feature_grad_mult = 0.0

    def unreached_by(self, av_weight: float) -> List[str]:
        """Names of the trainable parameters that the ``vgs_ssl`` loss at ``av_weight`` cannot reach: at 0 the
        two heads, at 1 what only the SSL loss uses (wav2vec 2.0 layers above ``vgs_layer``, a pre-LN model's
        final LayerNorm, ``final_proj``, ``project_q``, the quantiser, ``mask_emb``)."""
        names = [n for n, p in self.named_parameters() if p.requires_grad]
        if av_weight == 0:
            return [n for n in names if not n.startswith("w2v.")]
        if av_weight == 1:
            above = tuple(f"w2v.encoder.layers.{i}." for i in range(self.cfg.vgs_layer, len(self.w2v.encoder.layers)))
            ssl_only = above + ("w2v.final_proj.", "w2v.project_q.", "w2v.quantizer.", "w2v.mask_emb")
            if self.w2v.encoder.layer_norm_first:
                ssl_only += ("w2v.encoder.layer_norm.",)
            return [n for n in names if n.startswith(ssl_only)]
        return []

    def freeze_unreached(self, av_weight: float) -> List[str]:
        """Freeze :meth:`unreached_by` (torch DDP's c10d refuses a trainable parameter without a gradient; a
        frozen one is also left alone by weight decay, so one GPU and several train the same); returns them."""
        names = self.unreached_by(av_weight)
        params = dict(self.named_parameters())
        for n in names:
            params[n].requires_grad_(False)
        return names

    # ------------------------------------------------------------------ speech side

    def _layer_output(self, run):
        """Run ``run()`` while recording the output of wav2vec 2.0 layer ``vgs_layer``: returns
        ``(run's result, frames (B, T, C), the CLS token's state (B, C) or None)``.
        Under LayerDrop a skipped layer passes its input on, so the latest output of layers
        ``1..vgs_layer`` (or the first layer's input) is what layer ``vgs_layer`` hands upward."""
        encoder = self.w2v.encoder
        frames: List[int] = []  # the encoder's input length: the frames, before any prefix token
        hook = encoder.register_forward_pre_hook(lambda m, args: frames.append(args[0].size(1)))
        try:
            with record_layers(encoder.layers, upto=self.cfg.vgs_layer) as seen:
                result = run()
        finally:
            hook.remove()
        h = seen[-1].transpose(0, 1)  # (B, prefix + T + padding to a multiple, C)
        prefix = getattr(encoder, "prefix_tokens", 0)
        return result, h[:, prefix : prefix + frames[0]], (h[:, 0] if prefix else None)

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

    def _audio_embedding(
        self, h: torch.Tensor, frame_mask: Optional[torch.Tensor], cls: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``(B, E)`` from layer ``vgs_layer``'s frames ``h (B, T, C)`` (and, fast_vgs_plus, its CLS state ``(B, C)``)."""
        if self.arch == "fast_vgs_plus":
            return self._fast_vgs_plus_audio(h, frame_mask, cls)
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

    def _fast_vgs_plus_audio(
        self, h: torch.Tensor, frame_mask: Optional[torch.Tensor], cls: Optional[torch.Tensor]
    ) -> torch.Tensor:
        if cls is None:
            raise ValueError("fast_vgs_plus needs the CLS state of wav2vec 2.0 layer vgs_layer")
        lengths = None if frame_mask is None else (~frame_mask).sum(1)
        if frame_mask is not None:
            h = h.masked_fill(frame_mask[..., None], 0.0)
        x = self.audio_branch(h, lengths)
        mask = None
        if frame_mask is not None:
            out_lengths = self.audio_branch.output_lengths(lengths)
            mask = torch.arange(x.size(1), device=x.device)[None, :] >= out_lengths[:, None]
            mask = F.pad(mask, (1, 0), value=False)
        x = torch.cat([self.audio_cls_mlp(cls)[:, None], x], 1)
        return self.audio_out(_run_layers(self.audio_transformer, x, mask)[:, 0])

    def embed_speech(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, E)`` caption embeddings from an unmasked forward up to ``vgs_layer``."""
        return self.forward(source, padding_mask, ssl=False)["speech_emb"]

    def embed_images(
        self, image_feats: torch.Tensor, image_padding_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``(B, E)`` image embeddings from region features ``(B, R, image_dim)`` (the last 4 columns a box)."""
        if image_feats.size(-1) != self.cfg.image_dim:
            raise ValueError(
                f"image features have {image_feats.size(-1)} dims, the model expects image_dim={self.cfg.image_dim}"
            )
        if self.arch == "light":
            return self.image_out(self.image_pool(self.image_in(image_feats), image_padding_mask))
        x = (self.image_feat_in(image_feats[..., :-4]) + self.image_box_in(image_feats[..., -4:])) / 2
        x = torch.cat([self.image_cls.to(x.dtype).expand(x.size(0), 1, -1), self.image_dropout(x)], 1)
        mask = None if image_padding_mask is None else F.pad(image_padding_mask, (1, 0), value=False)
        return self.image_out(_run_layers(self.image_transformer, x, mask)[:, 0])

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
        if ssl and self.cfg.vgs_input == "masked":
            out, h, cls = self._layer_output(lambda: self.w2v(source, padding_mask=padding_mask, mask=True, **kwargs))
            frame_mask = out.get("padding_mask")
        else:
            conv: List[torch.Tensor] = []
            out = {}
            if ssl:  # the masked forward for the SSL loss; its conv features serve the unmasked pass too
                hook = self.w2v.feature_extractor.register_forward_hook(lambda m, args, y: conv.append(y))
                try:
                    out = self.w2v(source, padding_mask=padding_mask, mask=True, **kwargs)
                finally:
                    hook.remove()
            with _reusing_conv_features(self.w2v, conv[0] if conv else None):
                feats, h, cls = self._layer_output(
                    lambda: self.w2v.extract_features(source, padding_mask, mask=False, layer=self.cfg.vgs_layer - 1)
                )
            frame_mask = feats["padding_mask"]
        out = dict(out)
        out["speech_emb"] = self._audio_embedding(h, frame_mask, cls)
        if image_feats is not None:
            out["image_emb"] = self.embed_images(image_feats, image_padding_mask)
        return out

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        if self.arch == "fast_vgs_plus" and any(k.startswith("audio_pool.") for k in state_dict):
            raise ValueError(
                "this checkpoint has the light VGS heads (it predates model.vgs_arch, whose default is now "
                "fast_vgs_plus): load it with the override model.vgs_arch=light"
            )
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

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
