"""Conformer (CNN branch + transformer branch, coupled in every block) with the TransCAM and
BAO heads.

One :class:`Conformer` class, configured by its constructor; named sizes live in
:data:`SIZES`. Parameter and buffer names follow the published checkpoints exactly (see
``tests/data/net_sm_state_dict.tsv``), so published TransCAM and BAO weights load strictly.

Shapes used in docstrings: B batch, S_h x S_w input size (multiples of 16), h = S_h / 16,
w = S_w / 16, N = h * w patch tokens, E embedding width, K = num_classes (background
included), c3 = 256 * channel_ratio channels of the final CNN features.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_

# Conformer sizes. `tiny` is ours, for tests and the CPU demo; the others are published.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(channel_ratio=1, embed_dim=96, num_heads=3, depth=3),
    "ti": dict(channel_ratio=1, embed_dim=384, num_heads=6, depth=12),
    "sm": dict(channel_ratio=4, embed_dim=384, num_heads=6, depth=12),
    "bs": dict(channel_ratio=6, embed_dim=576, num_heads=9, depth=12),
}

_BN_EPS = 1e-6  # the published ConvBlock / FCUUp batch norms
_LN_EPS = 1e-6  # the published transformer layer norms (trans_norm keeps the default 1e-5)
# How the TransCAM CAMs and the BAO activation map are refined: "attention" (published) or
# "none", the maps straight from their heads (an ablation for attention that does not localise).
REFINE_MODES = ("attention", "none")


class _ExpandToBatch(torch.autograd.Function):
    """``token.expand(b, -1, -1)``, (1, 1, E) -> (B, 1, E), whose gradient is always a fresh (1, 1, E) tensor.

    expand's own backward sums the gradient over the batch, but at B = 1 it hands on the slice
    of the token concatenation's gradient: a (1, 1, E) view with the strides of the (1, 1+N, E)
    tensor. DistributedDataParallel (one image per process) then warns "Grad strides do not
    match bucket view strides" and copies it at every step. The sum over the batch is the
    one expand's backward computes, so the gradient's values are the same.
    """

    @staticmethod
    def forward(ctx, token: torch.Tensor, batch: int) -> torch.Tensor:
        return token.expand(batch, -1, -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.sum(0, keepdim=True), None


class ConformerOutput(NamedTuple):
    """Forward result; unpacks like the published tuple ``(conv_logits, trans_logits, am, cams, bao)``.

    conv_logits:  (B, K) global average of the CNN class map.
    trans_logits: (B, K) class-token logits.
    am:   (B, K, h, w) BAO activation map (label-conditioned), None without labels.
    cams: (B, K, h, w) TransCAM maps (attention-refined CNN class map; the class map itself
          with ``refine="none"``).
    bao:  (B, K, h, w) channel 0 from ``am`` (learned background), 1.. from ``cams``;
          None without labels.
    """

    conv_logits: torch.Tensor
    trans_logits: torch.Tensor
    am: torch.Tensor | None
    cams: torch.Tensor
    bao: torch.Tensor | None


class Attention(nn.Module):
    """Multi-head self-attention that also returns its probabilities (B, heads, T, T)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # Identity for rate 0: a zero-rate Dropout still allocates a mask per attention map in training.
        self.attn_drop = nn.Dropout(attn_drop) if attn_drop > 0 else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, E) -> (out (B, T, E), attention probabilities (B, heads, T, T))."""
        b, t, e = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, e // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(b, t, e)
        return self.proj_drop(self.proj(out)), attn


class Block(nn.Module):
    """Pre-norm transformer block returning (tokens, attention probabilities)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, E) -> (x (B, T, E), attn (B, heads, T, T))."""
        y, attn = self.attn(self.norm1(x))
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, attn


class ConvBlock(nn.Module):
    """Bottleneck residual block; its 3x3 conv optionally adds the transformer feedback."""

    def __init__(self, inplanes: int, outplanes: int, stride: int = 1, res_conv: bool = False):
        super().__init__()
        med = outplanes // 4
        self.conv1 = nn.Conv2d(inplanes, med, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(med, eps=_BN_EPS)
        self.conv2 = nn.Conv2d(med, med, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(med, eps=_BN_EPS)
        self.conv3 = nn.Conv2d(med, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes, eps=_BN_EPS)
        self.res_conv = res_conv
        if res_conv:
            self.residual_conv = nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False)
            self.residual_bn = nn.BatchNorm2d(outplanes, eps=_BN_EPS)

    def forward(self, x: torch.Tensor, x_t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, in, H, W), x_t (B, out/4, H, W) or None -> (out (B, out, H', W'), x2 (B, out/4, H', W'))."""
        residual = x
        x = F.relu(self.bn1(self.conv1(x)))
        x2 = F.relu(self.bn2(self.conv2(x if x_t is None else x + x_t)))
        x = self.bn3(self.conv3(x2))
        if self.res_conv:
            residual = self.residual_bn(self.residual_conv(residual))
        return F.relu(x + residual), x2


class FCUDown(nn.Module):
    """CNN features -> patch tokens (1x1 conv, average pool by ``dw_stride``), class token kept in front."""

    def __init__(self, inplanes: int, outplanes: int, dw_stride: int):
        super().__init__()
        self.dw_stride = dw_stride
        self.conv_project = nn.Conv2d(inplanes, outplanes, 1)
        self.ln = nn.LayerNorm(outplanes, eps=_LN_EPS)

    def forward(self, x: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), x_t (B, 1+N, E) -> (B, 1+N, E) with N = (H/dw) * (W/dw)."""
        x = F.avg_pool2d(self.conv_project(x), self.dw_stride, self.dw_stride)
        x = F.gelu(self.ln(x.flatten(2).transpose(1, 2)))
        return torch.cat([x_t[:, :1], x], dim=1)


class FCUUp(nn.Module):
    """Patch tokens -> CNN features (1x1 conv, BN, ReLU, nearest upsampling by ``up_stride``)."""

    def __init__(self, inplanes: int, outplanes: int, up_stride: int):
        super().__init__()
        self.up_stride = up_stride
        self.conv_project = nn.Conv2d(inplanes, outplanes, 1)
        self.bn = nn.BatchNorm2d(outplanes, eps=_BN_EPS)

    def forward(self, x_t: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """x_t (B, 1+h*w, E) -> (B, C, h*up, w*up)."""
        b, _, e = x_t.shape
        x = x_t[:, 1:].transpose(1, 2).reshape(b, e, h, w)
        x = F.relu(self.bn(self.conv_project(x)))
        return F.interpolate(x, size=(h * self.up_stride, w * self.up_stride), mode="nearest")


class ConvTransBlock(nn.Module):
    """One coupled unit: CNN block, CNN->token squeeze, transformer block, token->CNN expand, fusion."""

    def __init__(self, inplanes: int, outplanes: int, res_conv: bool, stride: int, dw_stride: int,
                 embed_dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_rate: float,
                 attn_drop_rate: float, drop_path_rate: float, last_fusion: bool = False,
                 num_med_block: int = 0):
        super().__init__()
        self.dw_stride = dw_stride
        med = outplanes // 4
        self.cnn_block = ConvBlock(inplanes, outplanes, stride, res_conv)
        self.fusion_block = ConvBlock(outplanes, outplanes, 1, res_conv=last_fusion)
        self.med_block = nn.ModuleList(ConvBlock(outplanes, outplanes) for _ in range(num_med_block))
        self.squeeze_block = FCUDown(med, embed_dim, dw_stride)
        self.expand_block = FCUUp(embed_dim, med, dw_stride)
        self.trans_block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                                 drop_path_rate)

    def forward(self, x: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, in, H, W), x_t (B, 1+N, E) -> (x (B, out, H', W'), x_t (B, 1+N, E), attn (B, heads, 1+N, 1+N))."""
        x, x2 = self.cnn_block(x)
        for blk in self.med_block:
            x, _ = blk(x)
        h, w = x2.shape[2] // self.dw_stride, x2.shape[3] // self.dw_stride
        x_t, attn = self.trans_block(self.squeeze_block(x2, x_t) + x_t)
        x, _ = self.fusion_block(x, self.expand_block(x_t, h, w))
        return x, x_t, attn


class Conformer(nn.Module):
    """Conformer with TransCAM (attention-refined CAM) and BAO (learned background) heads.

    Args:
        num_classes: classes including background (21 for VOC, 81 for COCO).
        patch_size: transformer patch size in input pixels; must be 16, the stride the CNN
            branch reaches in its last stage (the two branches exchange maps of equal size).
        in_chans: input channels.
        base_channel: stem width; stage widths are ``base_channel * channel_ratio * (1, 2, 4)``.
        channel_ratio: CNN width multiplier.
        num_med_block: extra CNN blocks inside each coupled unit (0 in all published sizes).
        embed_dim: transformer width E.
        depth: number of transformer blocks (a multiple of 3: three stages of depth/3).
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / E.
        qkv_bias: bias in the qkv projection.
        drop_rate: dropout after projections / MLP.
        attn_drop_rate: dropout on attention probabilities.
        drop_path_rate: stochastic depth rate, linearly increasing over the blocks.
        refine: "attention" (published): the TransCAM CAMs and the BAO activation map are
            refined by the summed attention (:meth:`refine`); "none": they are their heads'
            maps as they are. Configures the forward only: no parameter or buffer depends on
            it, so the same checkpoints load either way.
    """

    def __init__(self, num_classes: int = 21, patch_size: int = 16, in_chans: int = 3,
                 base_channel: int = 64, channel_ratio: int = 4, num_med_block: int = 0,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, refine: str = "attention"):
        super().__init__()
        if depth % 3:
            raise ValueError(f"depth must be a multiple of 3, got {depth}")
        if num_classes < 2:
            raise ValueError("num_classes counts background plus at least one foreground class")
        if patch_size != 16:
            raise ValueError(f"patch_size must be 16, the stride of the CNN branch whose maps the tokens "
                             f"are coupled with, got {patch_size}")
        if refine not in REFINE_MODES:
            raise ValueError(f"refine must be one of {REFINE_MODES}, got {refine!r}")
        self.num_classes = num_classes
        self.refine_mode = refine
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_size = patch_size
        c1 = base_channel * channel_ratio
        c2, c3 = 2 * c1, 4 * c1
        self.feature_channels = c3
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linspace(0, rate, depth)
        trans_dw = patch_size // 4
        block_args = dict(embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                          drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, num_med_block=num_med_block)

        # Registration order below is the published state_dict order.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.label_enc = nn.Linear(num_classes - 1, c3)
        self.trans_norm = nn.LayerNorm(embed_dim)
        self.trans_cls_head = nn.Linear(embed_dim, num_classes)
        self.conv_cls_head = nn.Conv2d(c3, num_classes, 3, padding=1)
        self.classifier_x = nn.Conv2d(c3, num_classes, 3, padding=1)

        self.conv1 = nn.Conv2d(in_chans, base_channel, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channel)
        self.conv_1 = ConvBlock(base_channel, c1, stride=1, res_conv=True)
        self.trans_patch_conv = nn.Conv2d(base_channel, embed_dim, trans_dw, stride=trans_dw)
        self.trans_1 = Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[0])

        per_stage = depth // 3
        # (first block index, in channels, out channels, stride of the first block, dw_stride)
        stages = [(2, c1, c1, 1, trans_dw), (per_stage + 1, c1, c2, 2, trans_dw // 2),
                  (2 * per_stage + 1, c2, c3, 2, trans_dw // 4)]
        for stage, (first, cin, cout, stride, dw) in enumerate(stages):
            for i in range(first, (stage + 1) * per_stage + 1):
                opening = stage > 0 and i == first
                self.add_module(f"conv_trans_{i}", ConvTransBlock(
                    cin if opening else cout, cout, res_conv=opening, stride=stride if opening else 1,
                    dw_stride=dw, drop_path_rate=dpr[i - 1], last_fusion=(i == depth), **block_args))
        self.blocks = [getattr(self, f"conv_trans_{i}") for i in range(2, depth + 1)]

        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backbone.

        Args:
            x: (B, in_chans, S_h, S_w) normalised images, sides multiples of 16.
        Returns:
            feats: (B, c3, h, w) final CNN features.
            tokens: (B, 1+N, E) final transformer tokens (class token first), not normalised.
            attn: (B, N, N) attention probabilities averaged over heads and summed over all
                blocks, class token row and column removed. Accumulated block by block so
                that only one block's full attention tensor is alive outside autograd.
        """
        b, _, s_h, s_w = x.shape
        if s_h % 16 or s_w % 16:
            raise ValueError(f"input sides must be multiples of 16, got {s_h}x{s_w}")
        x_base = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x, _ = self.conv_1(x_base)
        x_t = self.trans_patch_conv(x_base).flatten(2).transpose(1, 2)
        x_t = torch.cat([_ExpandToBatch.apply(self.cls_token, b), x_t], dim=1)
        x_t, attn = self.trans_1(x_t)
        attn_sum = attn[:, :, 1:, 1:].mean(1)
        for blk in self.blocks:
            x, x_t, attn = blk(x, x_t)
            attn_sum = attn_sum + attn[:, :, 1:, 1:].mean(1)
        return x, x_t, attn_sum

    @staticmethod
    def refine(maps: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Attention-weighted refinement: out[:, k, i] = sum_j attn[:, i, j] * maps[:, k, j].

        maps (B, K, h, w), attn (B, N, N) with N = h*w -> (B, K, h, w).
        """
        b, k, h, w = maps.shape
        return torch.bmm(maps.flatten(2).to(attn.dtype), attn.transpose(1, 2)).reshape(b, k, h, w)

    def _refined(self, maps: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """maps (B, K, h, w) refined as :attr:`refine_mode` says: :meth:`refine`, or unchanged for "none"."""
        return maps if self.refine_mode == "none" else self.refine(maps, attn)

    def forward_cnn_cams(self, x: torch.Tensor) -> torch.Tensor:
        """The CNN branch's class map before attention refinement (the TransCAM ablation).

        x (B, in_chans, S_h, S_w) -> (B, K, h, w); its spatial mean is ``conv_logits``.
        """
        return self.conv_cls_head(self.forward_features(x)[0])

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> ConformerOutput:
        """Classification logits, TransCAM maps and, given image labels, the BAO maps, both
        refined as :attr:`refine_mode` says (the logits do not depend on it).

        Args:
            x: (B, in_chans, S_h, S_w) normalised images, sides multiples of 16.
            labels: (B, K-1) multi-hot foreground labels for the label-conditioned BAO
                head, or None to skip it (TransCAM use).
        Returns:
            :class:`ConformerOutput` (conv_logits, trans_logits, am, cams, bao).
        """
        feats, tokens, attn = self.forward_features(x)
        class_map = self.conv_cls_head(feats)
        conv_logits = class_map.mean(dim=(2, 3))
        trans_logits = self.trans_cls_head(self.trans_norm(tokens)[:, 0])
        cams = self._refined(class_map, attn)
        am = bao = None
        if labels is not None:
            if labels.shape != (x.shape[0], self.num_classes - 1):
                raise ValueError(f"labels must be (B, {self.num_classes - 1}), got {tuple(labels.shape)}")
            cond = self.label_enc(labels.to(feats.dtype))[:, :, None, None]
            am = self._refined(self.classifier_x(feats * cond), attn)
            bao = torch.cat([am[:, :1], cams[:, 1:]], dim=1)
        return ConformerOutput(conv_logits, trans_logits, am, cams, bao)


def build_conformer(size: str, num_classes: int = 21, **kwargs) -> Conformer:
    """Build a Conformer of a named size (:data:`SIZES`); ``kwargs`` override any argument."""
    try:
        cfg = dict(SIZES[size])
    except KeyError:
        raise ValueError(f"unknown Conformer size {size!r}; choose one of {sorted(SIZES)}") from None
    cfg.update(kwargs)
    return Conformer(num_classes=num_classes, **cfg)
