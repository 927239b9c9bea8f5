"""Compact students: a timm mobile encoder (features only, random init) and a light U-Net decoder.

A student replaces the fused two-branch teacher on a phone or a laptop driving a probe. It keeps
the contract of one TransUNet branch: input ``(N, 3, S, S)`` float32 in [0, 1] from the shared
preprocessing (``data.transforms``), ``forward`` returns the bone logit ``(N, 1, S, S)`` and
``predict`` its sigmoid probability. ``S`` is any multiple of 32 (the encoders' total stride).

Encoder: ``timm.create_model(name, features_only=True, pretrained=False)``: every stage's
feature map, shallow to deep (reductions 2..32 or 4..32). Nothing is downloaded; a student
learns from the teacher's soft masks and labeled source frames.

Decoder (``StudentDecoder``): a 1x1 conv-BN-ReLU squeezes the deepest map to
``decoder_head_channels``; each block doubles the resolution (bilinear, ``align_corners=False``),
concatenates the encoder feature of that reduction when the encoder has one (at full resolution:
the grayscale input itself) and runs one separable 3x3 conv (depthwise 3x3 + BN, pointwise 1x1 +
BN + ReLU: half the decoder FLOPs of a full 3x3 conv and ~1.5 ms less per 224 px frame on two CPU
cores); a 3x3 conv head gives the logit. With
fewer blocks than the stride needs, the head runs below full resolution and its logit is
upsampled bilinearly (a cheap ending: full-resolution convs cost per pixel on a CPU). Module
names ``decoder.blocks.N`` / ``decoder.head`` match the TransUNet decoder's, so the int8
exporter's rule that keeps the last block and head in fp32 finds them.

Reparameterizable encoders (FastViT, RepViT, MobileOne) train with their multi-branch blocks and
are fused into single convolutions for inference and export by ``reparameterize`` (timm's
``reparameterize_model``); the fused network computes the same function in eval mode.

Registry: ``STUDENTS`` maps a student name to its shape at each preset (``tiny`` for tests,
``small`` for CPU training, ``paper`` for deployment at 224 px); ``build_student(name, preset)``
builds one. ``small`` and ``paper`` are the same network at different input sizes (what is
trained at ``small`` is what ships); ``tiny`` narrows the encoder so the tests stay fast.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PRESETS, apply_overrides, model_preset
from ..errors import ConfigError

__all__ = [
    "StudentConfig",
    "StudentDecoder",
    "StudentNet",
    "STUDENTS",
    "DEFAULT_STUDENT",
    "student_names",
    "student_config",
    "student_from_dict",
    "build_student",
    "is_student_config",
]

#: Total stride of every registered encoder: inputs must be a multiple of it.
STRIDE = 32


@dataclass
class StudentConfig:
    """Shape of one student network (all a checkpoint card needs to rebuild it)."""

    name: str = "mobilenetv3"
    preset: str = "paper"
    img_size: int = 224
    in_chans: int = 3
    # timm model name and extra constructor arguments (narrower widths for the tiny preset).
    encoder: str = "mobilenetv3_large_100"
    encoder_args: dict[str, Any] = field(default_factory=dict)
    # Fuse multi-branch training blocks into single convs for inference/export.
    reparameterizable: bool = False
    # 1x1 squeeze of the deepest feature map, then one 3x3 conv per x2 upsampling step.
    decoder_head_channels: int = 96
    decoder_channels: tuple[int, ...] = (64, 48, 32, 16)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a model card (JSON / YAML safe)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else copy.deepcopy(value)
        out["kind"] = "student"
        return out


def is_student_config(data: Any) -> bool:
    """Whether a card's ``model`` section describes a student (rather than a TransUNet)."""
    return isinstance(data, dict) and data.get("kind") == "student"


def student_from_dict(data: dict[str, Any]) -> StudentConfig:
    """Rebuild a :class:`StudentConfig` from :meth:`StudentConfig.to_dict` output (a card)."""
    values = {k: v for k, v in data.items() if k != "kind"}
    encoder_args = values.pop("encoder_args", {}) or {}
    if not isinstance(encoder_args, dict):
        raise ConfigError(f"student encoder_args must be a mapping, got {type(encoder_args).__name__}")
    cfg = apply_overrides(StudentConfig(), values)
    cfg = replace(cfg, encoder_args=dict(encoder_args))
    validate_student_config(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Registry: name -> shape at each preset


def _mobilenetv3(preset: str) -> StudentConfig:
    """MobileNetV3-Large 1.0 (depthwise-separable, squeeze-excite, hard-swish): the classic
    phone backbone; features at 1/2 .. 1/32. The default student."""
    if preset == "tiny":
        return StudentConfig(name="mobilenetv3", encoder="mobilenetv3_small_050",
                             decoder_head_channels=16, decoder_channels=(16, 8, 8, 8))
    return StudentConfig(name="mobilenetv3", encoder="mobilenetv3_large_100",
                         decoder_head_channels=96, decoder_channels=(64, 48, 32, 16))


def _efficientvit(preset: str) -> StudentConfig:
    """EfficientViT-B0 (MIT): MBConv stages with ReLU linear attention at 1/16 and 1/32, a
    conv/attention hybrid with global context at a mobile cost; features at 1/4 .. 1/32."""
    if preset == "tiny":
        return StudentConfig(name="efficientvit", encoder="efficientvit_b0",
                             encoder_args={"widths": [8, 8, 16, 16, 32], "depths": [1, 1, 1, 1, 1], "head_dim": 8},
                             decoder_head_channels=16, decoder_channels=(16, 8, 8, 8))
    return StudentConfig(name="efficientvit", encoder="efficientvit_b0",
                         decoder_head_channels=64, decoder_channels=(64, 48, 32, 16))


def _fastvit(preset: str) -> StudentConfig:
    """FastViT-T8: reparameterizable RepMixer stages (train multi-branch, deploy as plain convs);
    features at 1/4 .. 1/32. The largest student: more capacity, but about 60 FPS at 224 px on two
    CPU cores, so not a pick for the 60 FPS goal there (phones with an NPU are another matter)."""
    if preset == "tiny":
        return StudentConfig(name="fastvit", encoder="fastvit_t8", reparameterizable=True,
                             encoder_args={"layers": [1, 1, 1, 1], "embed_dims": [8, 16, 16, 32], "mlp_ratios": [2, 2, 2, 2]},
                             decoder_head_channels=16, decoder_channels=(16, 8, 8, 8))
    return StudentConfig(name="fastvit", encoder="fastvit_t8", reparameterizable=True,
                         decoder_head_channels=96, decoder_channels=(64, 48, 32, 16))


STUDENTS: dict[str, Callable[[str], StudentConfig]] = {
    "mobilenetv3": _mobilenetv3,
    "efficientvit": _efficientvit,
    "fastvit": _fastvit,
}

#: The default student: the classic phone backbone, well inside the 224 px size and speed goals.
DEFAULT_STUDENT = "mobilenetv3"


def student_names() -> list[str]:
    return list(STUDENTS)


def validate_student_config(cfg: StudentConfig) -> None:
    """Refuse shapes a student cannot be built with, naming the offending field."""
    label = f"student {cfg.name!r} ({cfg.preset})"
    if cfg.img_size < STRIDE or cfg.img_size % STRIDE != 0:
        raise ConfigError(f"{label}: img_size={cfg.img_size} must be a positive multiple of {STRIDE} (encoder stride)")
    if not cfg.decoder_channels or min(cfg.decoder_channels) < 1 or cfg.decoder_head_channels < 1:
        raise ConfigError(f"{label}: decoder channels must be positive, got head {cfg.decoder_head_channels}, "
                          f"blocks {cfg.decoder_channels}")
    if cfg.in_chans < 1:
        raise ConfigError(f"{label}: in_chans={cfg.in_chans} must be positive")


def student_config(name: str, preset: str = "paper", **overrides: Any) -> StudentConfig:
    """The named student's shape at ``preset`` (input size from the preset), with overrides."""
    if name not in STUDENTS:
        raise ConfigError(f"unknown student {name!r}; choose one of {', '.join(STUDENTS)}")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = replace(STUDENTS[name](preset), preset=preset, img_size=model_preset(preset).img_size)
    if overrides:
        encoder_args = overrides.pop("encoder_args", None)
        cfg = apply_overrides(cfg, overrides)
        if encoder_args is not None:
            cfg = replace(cfg, encoder_args=dict(encoder_args))
    validate_student_config(cfg)
    return cfg


def build_student(name_or_cfg: str | StudentConfig, preset: str = "paper", **overrides: Any) -> "StudentNet":
    """A randomly initialized student (no weights are downloaded)."""
    cfg = name_or_cfg if isinstance(name_or_cfg, StudentConfig) else student_config(name_or_cfg, preset, **overrides)
    return StudentNet(cfg)


# ---------------------------------------------------------------------------------------------
# Network


class ConvBnReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SeparableConvBnReLU(nn.Sequential):
    """Depthwise 3x3 conv + BN, then pointwise 1x1 conv + BN + ReLU (MobileNet's separable conv):
    about 1/8 of a full 3x3 conv's FLOPs at the decoder's widths."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DecoderBlock(nn.Module):
    """x2 bilinear upsampling, optional skip concatenation, one separable 3x3 conv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.skip_channels = skip_channels
        self.conv = SeparableConvBnReLU(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class StudentDecoder(nn.Module):
    """Light U-Net decoder over an encoder's multi-scale features (see the module docstring).

    ``feature_channels`` / ``reductions``: the encoder's maps, shallow to deep. Block ``i``
    produces reduction ``deepest / 2**(i+1)`` and uses the encoder map of that reduction as skip
    (at reduction 1: the input's first channel).
    """

    def __init__(self, feature_channels: list[int], reductions: list[int], head_channels: int,
                 channels: tuple[int, ...], in_chans: int = 1):
        super().__init__()
        deepest = reductions[-1]
        steps = int(round(math.log2(deepest)))
        if len(channels) > steps:
            raise ConfigError(f"decoder has {len(channels)} blocks but the encoder stride {deepest} allows {steps}")
        skip_at = {r: c for r, c in zip(reductions[:-1], feature_channels[:-1])}
        skip_at[1] = 1  # the grayscale input: edges at full resolution for free
        self.squeeze = ConvBnReLU(feature_channels[-1], head_channels, 1)
        self.skip_index: list[int | None] = []  # index into the encoder features, -1 = input
        blocks, width, reduction = [], head_channels, deepest
        index_of = {r: i for i, r in enumerate(reductions)}
        for out_channels in channels:
            reduction //= 2
            skip = skip_at.get(reduction, 0)
            self.skip_index.append(-1 if reduction == 1 else index_of.get(reduction))
            blocks.append(DecoderBlock(width, skip, out_channels))
            width = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(width, 1, 3, padding=1)
        self.output_reduction = reduction  # > 1: the logit is upsampled by this factor

    def forward(self, image: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.squeeze(features[-1])
        for block, index in zip(self.blocks, self.skip_index):
            skip = image[:, :1] if index == -1 else (features[index] if index is not None else None)
            x = block(x, skip)
        logit = self.head(x)
        if self.output_reduction > 1:
            logit = F.interpolate(logit, scale_factor=float(self.output_reduction), mode="bilinear", align_corners=False)
        return logit


class StudentNet(nn.Module):
    """timm encoder (features only) + :class:`StudentDecoder`; one logit channel."""

    out_channels = 1

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        import timm

        validate_student_config(cfg)
        self.cfg = cfg
        try:
            self.encoder = timm.create_model(cfg.encoder, pretrained=False, features_only=True,
                                             in_chans=cfg.in_chans, **cfg.encoder_args)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ConfigError(f"student {cfg.name!r}: timm cannot build encoder {cfg.encoder!r} "
                              f"with {cfg.encoder_args}: {exc}") from None
        info = self.encoder.feature_info
        self.feature_channels = list(info.channels())
        self.reductions = list(info.reduction())
        if self.reductions[-1] != STRIDE:
            raise ConfigError(f"student {cfg.name!r}: encoder {cfg.encoder!r} has stride {self.reductions[-1]}, "
                              f"expected {STRIDE}")
        self.decoder = StudentDecoder(self.feature_channels, self.reductions, cfg.decoder_head_channels,
                                      cfg.decoder_channels)
        self.reparameterized = False

    @property
    def img_size(self) -> int:
        return self.cfg.img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x, self.encoder(x))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(x))

    def reparameterize(self) -> "StudentNet":
        """An inference copy with multi-branch blocks fused (same function in eval mode); this
        network is left untouched so training can continue. A no-op copy for plain encoders."""
        from timm.utils import reparameterize_model

        fused = copy.deepcopy(self).eval()
        if self.cfg.reparameterizable:
            reparameterize_model(fused, inplace=True)
        fused.reparameterized = True
        return fused
