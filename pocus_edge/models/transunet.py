"""TransUNet (R50-ViT-B/16 hybrid encoder + cascaded upsampler), assembled from timm parts.

Encoder (``TransUNet.encoder``): timm's ``ResNetV2`` in its non-pre-activation form (weight-standardized
``StdConv2d`` + ``GroupNormAct``, as in the ViT-hybrid / BiT backbones), with the stem's
7x7/2 conv + GroupNorm + ReLU output taken as the 1/2-resolution skip *before* the max-pool, and
three stages of bottleneck units giving 4w @1/4, 8w @1/8 and 16w @1/16 channels. A 1x1 conv
embeds the 1/16 map into ``hidden_size`` tokens, learned position embeddings are added (no class
token), then pre-norm timm ViT ``Block`` s and a final LayerNorm.

Decoder (``TransUNet.decoder``): tokens reshaped to a ``grid x grid`` map, 3x3 conv-BN-ReLU to
``decoder_head_channels``, four blocks (2x bilinear upsample, concat skip, two 3x3 conv-BN-ReLU)
using the 8w/4w/w skips for the first three, and a 3x3 conv head with bias.

Everything static is taken from the config (grid size from ``cfg.img_size``), and nothing in
``forward`` depends on tensor values, so ``torch.onnx.export`` and coremltools trace one fixed
input size. Upsampling is bilinear with ``align_corners=False`` (the released code uses
``UpsamplingBilinear2d``, i.e. ``align_corners=True``; the difference is sub-pixel and
``False`` is the form every edge runtime implements natively).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import GroupNormAct, StdConv2d, trunc_normal_
from timm.models import checkpoint_seq
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError

__all__ = ["HybridEncoder", "CupDecoder", "TransUNet", "validate_model_config", "skip_channels"]


def validate_model_config(cfg: ModelConfig) -> None:
    """Refuse shapes the network cannot be built with, naming the offending field."""
    name = f"model preset {cfg.name!r}"
    if cfg.img_size % 16 != 0 or cfg.img_size < 32:
        raise ConfigError(f"{name}: img_size={cfg.img_size} must be a multiple of 16 (encoder stride), >= 32")
    if len(cfg.resnet_layers) != 3 or min(cfg.resnet_layers) < 1:
        raise ConfigError(f"{name}: resnet_layers={cfg.resnet_layers} must be three positive unit counts")
    if cfg.resnet_width % 8 != 0:
        # timm rounds bottleneck widths to multiples of 8; other widths would silently change shape.
        raise ConfigError(f"{name}: resnet_width={cfg.resnet_width} must be a multiple of 8")
    if cfg.gn_groups < 1 or cfg.resnet_width % cfg.gn_groups != 0:
        raise ConfigError(f"{name}: gn_groups={cfg.gn_groups} must divide resnet_width={cfg.resnet_width}")
    if cfg.hidden_size % cfg.num_heads != 0:
        raise ConfigError(f"{name}: hidden_size={cfg.hidden_size} not divisible by num_heads={cfg.num_heads}")
    if len(cfg.decoder_channels) != 4:
        raise ConfigError(f"{name}: decoder_channels={cfg.decoder_channels} must have 4 entries")
    if cfg.num_layers < 1 or cfg.mlp_dim < 1 or cfg.in_chans < 1:
        raise ConfigError(f"{name}: num_layers, mlp_dim and in_chans must be positive")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"{name}: dropout={cfg.dropout} must be in [0, 1)")


def skip_channels(cfg: ModelConfig) -> tuple[int, int, int]:
    """Channels of the encoder skips, deepest first: 8w @1/8, 4w @1/4, w @1/2."""
    w = cfg.resnet_width
    return (8 * w, 4 * w, w)


class HybridEncoder(nn.Module):
    """ResNetV2 (StdConv + GroupNorm) -> 1x1 patch embedding -> position embeddings -> ViT -> LayerNorm.

    ``forward(x) -> (tokens (N, grid*grid, hidden), skips [1/8, 1/4, 1/2 maps])``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model_config(cfg)
        self.cfg = cfg
        self.grid_size = cfg.grid_size
        w = cfg.resnet_width
        # eps=1e-6 as in the BiT/TransUNet GroupNorms.
        norm_layer = partial(GroupNormAct, num_groups=cfg.gn_groups, eps=1e-6)
        self.resnet = ResNetV2(
            layers=list(cfg.resnet_layers),
            channels=(4 * w, 8 * w, 16 * w),
            num_classes=0,
            global_pool="",
            in_chans=cfg.in_chans,
            stem_chs=w,
            stem_type="",  # 7x7/2 conv, then 3x3/2 max-pool with symmetric padding (exact 1/4 maps)
            preact=False,  # conv -> GN -> ReLU units, as in the ViT-hybrid backbone
            norm_layer=norm_layer,
            conv_layer=StdConv2d,
        )
        self.patch_embed = nn.Conv2d(16 * w, cfg.hidden_size, kernel_size=1)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size * self.grid_size, cfg.hidden_size))
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=cfg.hidden_size,
                    num_heads=cfg.num_heads,
                    mlp_ratio=cfg.mlp_dim / cfg.hidden_size,
                    qkv_bias=True,
                    proj_drop=cfg.dropout,
                    norm_layer=partial(nn.LayerNorm, eps=1e-6),
                )
                for _ in range(cfg.num_layers)
            ]
        )
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.grad_checkpointing = False
        trunc_normal_(self.pos_embed, std=0.02)
        for block in self.blocks:
            block.apply(init_weights_vit_timm)
        for block in self.blocks:
            # timm computes the hidden width as int(dim * ratio); make sure it is exactly mlp_dim.
            assert block.mlp.fc1.out_features == cfg.mlp_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.resnet.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        stem = self.resnet.stem
        half = stem.norm(stem.conv(x))  # 1/2 skip: conv + GN + ReLU, before the max-pool
        x = stem.pool(half)
        quarter = self.resnet.stages[0](x)
        eighth = self.resnet.stages[1](quarter)
        x = self.resnet.stages[2](eighth)
        x = self.patch_embed(x)
        tokens = x.flatten(2).transpose(1, 2) + self.pos_embed
        tokens = self.pos_drop(tokens)
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            tokens = checkpoint_seq(self.blocks, tokens)
        else:
            tokens = self.blocks(tokens)
        return self.norm(tokens), [eighth, quarter, half]


class ConvBNReLU(nn.Sequential):
    """3x3 conv without bias (BatchNorm follows) + BN + ReLU, as the released decoder;
    ``relu=False`` leaves the ReLU out (the same parameter names)."""

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True):
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
                  nn.BatchNorm2d(out_channels)]
        super().__init__(*layers, *([nn.ReLU(inplace=True)] if relu else []))


class UpBlock(nn.Module):
    """2x bilinear upsample, optional skip concat, two conv-BN-ReLU (the second without ReLU when
    ``final_relu`` is False)."""

    def __init__(self, in_channels: int, skip: int, out_channels: int, final_relu: bool = True):
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels + skip, out_channels)
        self.conv2 = ConvBNReLU(out_channels, out_channels, relu=final_relu)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class CupDecoder(nn.Module):
    """Cascaded upsampler ("cup") + 3x3 segmentation head."""

    def __init__(self, cfg: ModelConfig, out_channels: int):
        super().__init__()
        self.hidden_size = cfg.hidden_size
        self.grid_size = cfg.grid_size
        self.conv_more = ConvBNReLU(cfg.hidden_size, cfg.decoder_head_channels)
        ins = [cfg.decoder_head_channels, *cfg.decoder_channels[:-1]]
        skips = [*skip_channels(cfg), 0]  # the last block has no skip (full resolution)
        last = len(cfg.decoder_channels) - 1
        self.blocks = nn.ModuleList(
            UpBlock(i, s, o, final_relu=cfg.decoder_final_relu or k < last)
            for k, (i, s, o) in enumerate(zip(ins, skips, cfg.decoder_channels))
        )
        self.head = nn.Conv2d(cfg.decoder_channels[-1], out_channels, kernel_size=3, padding=1)

    def forward(self, tokens: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        # Static reshape from the config: no shape arithmetic on tensors, so tracing stays clean.
        x = tokens.transpose(1, 2).reshape(-1, self.hidden_size, self.grid_size, self.grid_size)
        x = self.conv_more(x)
        for index, block in enumerate(self.blocks):
            x = block(x, skips[index] if index < len(skips) else None)
        return self.head(x)


class TransUNet(nn.Module):
    """One segmentation branch. ``forward`` takes (N, in_chans, S, S) in [0, 1] (S = cfg.img_size)
    and returns logits (N, out_channels, S, S); ``predict`` returns probabilities."""

    def __init__(self, cfg: ModelConfig, out_channels: int = 1):
        super().__init__()
        if out_channels < 1:
            raise ConfigError(f"out_channels={out_channels} must be >= 1")
        self.cfg = cfg
        self.out_channels = out_channels
        self.encoder = HybridEncoder(cfg)
        self.decoder = CupDecoder(cfg, out_channels)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, skips = self.encoder(x)
        return self.decoder(tokens, skips)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)
