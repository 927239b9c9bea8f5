"""Typed configs and presets.

A *preset* fixes the model shape (``paper`` = TransUNet R50-ViT-B/16 at 224x224, exactly the
published network; ``small`` = CPU-trainable; ``tiny`` = unit tests) and the image size the
data pipeline resizes to. Stage hyperparameters default to METHOD.md (the paper / released
code) and every field can be overridden from the CLI (``--set key=value``) or a YAML file.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


@dataclass
class ModelConfig:
    """Shape of one TransUNet branch (hybrid ResNetV2 + ViT encoder, cascaded upsampler)."""

    name: str = "paper"
    img_size: int = 224
    in_chans: int = 3
    # ResNetV2 (weight-standardized convs, GroupNorm): root conv to `resnet_width` channels,
    # stages of `resnet_layers` bottleneck units with 4*width, 8*width, 16*width output channels.
    resnet_width: int = 64
    resnet_layers: tuple[int, ...] = (3, 4, 9)
    # GroupNorm groups in the ResNetV2 (32 in timm/TransUNet; must divide resnet_width).
    gn_groups: int = 32
    # ViT on the 1/16 feature map (1x1 patch embedding -> hidden_size), learned position embeddings.
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    # Dropout on the embeddings and the MLP/projection outputs (released code: 0.1).
    dropout: float = 0.1
    # Decoder "cup": conv to decoder_head_channels, then upsample blocks with these outputs.
    decoder_head_channels: int = 512
    decoder_channels: tuple[int, ...] = (256, 128, 64, 16)
    # Contrastive projection head: hidden_size -> proj_hidden -> proj_dim.
    proj_hidden: int = 768
    proj_dim: int = 128

    @property
    def grid_size(self) -> int:
        """Tokens per side: total encoder stride is 16 (root /2, pool /2, two strided stages)."""
        return self.img_size // 16


def _paper() -> ModelConfig:
    return ModelConfig()


def _small() -> ModelConfig:
    return ModelConfig(
        name="small",
        img_size=128,
        resnet_width=16,
        resnet_layers=(1, 2, 2),
        gn_groups=8,
        hidden_size=192,
        num_layers=4,
        num_heads=3,
        mlp_dim=384,
        # Thin decoder: on CPU the full-resolution convs cost per pixel, not per FLOP.
        decoder_head_channels=64,
        decoder_channels=(32, 16, 8, 4),
        proj_hidden=192,
        proj_dim=64,
    )


def _tiny() -> ModelConfig:
    return ModelConfig(
        name="tiny",
        img_size=64,
        resnet_width=8,
        resnet_layers=(1, 1, 1),
        gn_groups=4,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        mlp_dim=64,
        decoder_head_channels=32,
        decoder_channels=(16, 8, 8, 4),
        proj_hidden=32,
        proj_dim=16,
    )


PRESETS = {"paper": _paper, "small": _small, "tiny": _tiny}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """Return the named preset with ``overrides`` applied (unknown names/fields raise ConfigError)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    return apply_overrides(cfg, overrides) if overrides else cfg


@dataclass
class MIMConfig:
    """SimMIM-style pretraining (METHOD.md, generative branch)."""

    mask_cell: int = 32  # pixels per mask cell at the model's img_size
    mask_ratio: float = 0.6
    speckle_fraction: float = 0.2  # share of masked cells that get x + x*N(0,1) instead of 0
    optimizer: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.05
    batch_size: int = 128
    epochs: int = 1200


@dataclass
class ContrastiveConfig:
    """Contrastive pretraining with MT-NXent (METHOD.md, contrastive branch)."""

    temperature: float = 0.5
    min_frame_gap: int = 15  # delta_t; 0 = plain NT-Xent (SimCLR)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: float = 0.4
    jitter_p: float = 0.8
    optimizer: str = "adam"
    lr: float = 1e-5
    weight_decay: float = 0.05
    batch_size: int = 512  # pairs per global batch (1024 views)
    epochs: int = 400


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning with DiceBCE (METHOD.md); also the lower/upper-bound baselines."""

    optimizer: str = "sgd"
    lr: float = 2e-4
    momentum: float = 0.99
    weight_decay: float = 0.05  # 0.05 for the MIM branch, 0.1 for the contrastive branch
    batch_size: int = 512
    epochs: int = 200


@dataclass
class TrainConfig:
    """Engine settings shared by every stage."""

    seed: int = 0
    schedule: str = "cosine"  # cosine | constant
    warmup_epochs: int = 0
    grad_clip: float | None = 1.0
    amp: bool = True  # bf16 autocast on CUDA only
    grad_checkpointing: bool = False
    num_workers: int = 0
    log_every: int = 10
    max_steps: int | None = None  # stop early (tests, smoke runs)


# ---------------------------------------------------------------------------------------------
# Overrides and YAML round trip


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the field's annotated type."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {**typing.__dict__, "tuple": tuple})  # noqa: S307 (our own annotations)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{name}: None is not allowed")
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], name)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, name) for v in value)
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in {"1", "true", "yes", "on"}:
                    return True
                if value.lower() in {"0", "false", "no", "off"}:
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation in (int, float, str):
            return annotation(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot read {value!r} as {annotation.__name__}") from None
    return value


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of dataclass ``cfg`` with ``overrides`` (field -> value) applied and typed."""
    known = {f.name: f for f in fields(cfg)}
    changes = {}
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(
                f"unknown field {key!r} for {type(cfg).__name__}; known: {', '.join(sorted(known))}"
            )
        changes[key] = _coerce(value, known[key].type, key)
    return dataclasses.replace(cfg, **changes)


def parse_set_options(items: list[str] | None) -> dict[str, str]:
    """Parse CLI ``--set key=value`` items."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data dict (tuples become lists) suitable for YAML/JSON."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build ``cls`` from a dict, typing every value and refusing unknown keys."""
    return apply_overrides(cls(), data)


def save_yaml(cfg: Any, path: str | Path) -> None:
    from .io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump({"kind": type(cfg).__name__, **to_dict(cfg)}, sort_keys=False))


CONFIG_CLASSES = {c.__name__: c for c in (ModelConfig, MIMConfig, ContrastiveConfig, FinetuneConfig, TrainConfig)}


def load_yaml(path: str | Path) -> Any:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("kind") not in CONFIG_CLASSES:
        raise ConfigError(f"{p}: expected a mapping with 'kind' in {sorted(CONFIG_CLASSES)}")
    kind = data.pop("kind")
    return from_dict(CONFIG_CLASSES[kind], data)
