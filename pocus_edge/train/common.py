"""What every stage shares: opening exactly ONE site (site isolation), resolving presets,
per-preset defaults and ``--set`` overrides into typed configs, and the run's card fields."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from ..config import (
    ContrastiveConfig,
    FinetuneConfig,
    MIMConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    model_preset,
    to_dict,
)
from ..data.layout import MANIFEST, FrameRecord, Site, check_frame_files, load_site
from ..errors import CheckpointError, ConfigError, TrainingError

STAGE_CONFIGS = {"mim": MIMConfig, "contrastive": ContrastiveConfig, "finetune": FinetuneConfig}

# The paper's batch sizes and epochs (the dataclass defaults) are for 4-8 GPUs and ~20k frames.
# ``small`` and ``tiny`` get CPU-sized defaults; every value can still be overridden.
PRESET_STAGE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    "small": {
        "mim": {"batch_size": 32, "epochs": 10},
        # lr 1e-5 is tuned for 400 epochs of 512 pairs; a short CPU run needs a larger step.
        "contrastive": {"batch_size": 32, "epochs": 10, "lr": 1e-4},
        # lr 2e-4 is tuned for ~6,600 steps of 512 frames; in a few hundred steps of 16 it barely
        # moves (tiny preset, 300 steps: val Dice 0.007 at 2e-4 vs 0.85 at 2e-3).
        "finetune": {"batch_size": 16, "epochs": 5, "lr": 2e-3},
    },
    "tiny": {
        "mim": {"batch_size": 8, "epochs": 2},
        "contrastive": {"batch_size": 8, "epochs": 2, "lr": 1e-4},
        "finetune": {"batch_size": 8, "epochs": 2, "lr": 2e-3},
    },
}


# Engine defaults that differ by stage (every preset); ``--set train.X=...`` still wins.
# Contrastive: no gradient clipping. METHOD.md gives none, and with the engine's 1.0 the loss
# sits at chance (ln(2B - 1)) for ~250 steps longer (tiny preset, batch 32, Adam 1e-4, constant
# LR: leaves chance near step 450 instead of 200; with the cosine schedule of a 500-step run it
# never leaves). benchmarks/RESULTS.md section 3 has the measurements.
STAGE_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "contrastive": {"grad_clip": None},
}


def stage_defaults(stage: str, preset: str) -> Any:
    """The stage config for a preset before user overrides (paper = METHOD.md values)."""
    cfg = STAGE_CONFIGS[stage]()
    extra = PRESET_STAGE_DEFAULTS.get(preset, {}).get(stage, {})
    return apply_overrides(cfg, extra) if extra else cfg


def resolve_configs(
    stage: str,
    preset: str,
    overrides: dict[str, Any] | None = None,
    **explicit: Any,
) -> tuple[ModelConfig, Any, TrainConfig]:
    """(model, stage, engine) configs for a run.

    ``overrides`` are ``--set`` items: ``key=value`` where key is a field of the stage config,
    TrainConfig or ModelConfig, optionally prefixed (``model.dropout``, ``train.grad_clip``,
    ``mim.mask_ratio``). ``explicit`` keyword values (``epochs=``, ``lr=``, ``seed=``...) that
    are not None win over both.
    """
    stage_cls = STAGE_CONFIGS[stage]
    owners = {"model": ModelConfig, "train": TrainConfig, stage: stage_cls}
    buckets: dict[str, dict[str, Any]] = {"model": {}, "train": {}, stage: {}}
    for key, value in (overrides or {}).items():
        if "." in key:
            prefix, name = key.split(".", 1)
            if prefix not in owners:
                raise ConfigError(f"--set {key}: unknown prefix {prefix!r} (use model., train. or {stage}.)")
        else:
            candidates = [p for p, cls in owners.items() if key in {f.name for f in fields(cls)}]
            if not candidates:
                known = sorted({f.name for cls in owners.values() for f in fields(cls)})
                raise ConfigError(f"--set {key}: unknown setting; known: {', '.join(known)}")
            if len(candidates) > 1:
                raise ConfigError(f"--set {key}: ambiguous, prefix it with one of {', '.join(candidates)}")
            prefix, name = candidates[0], key
        buckets[prefix][name] = value
    for key, value in explicit.items():
        if value is None:
            continue
        for prefix in (stage, "train"):
            if key in {f.name for f in fields(owners[prefix])}:
                buckets[prefix][key] = value
                break
        else:
            raise ConfigError(f"unknown option {key!r} for stage {stage}")
    model_cfg = model_preset(preset, **buckets["model"])
    stage_cfg = apply_overrides(stage_defaults(stage, preset), buckets[stage])
    train_cfg = apply_overrides(TrainConfig(), {**STAGE_TRAIN_DEFAULTS.get(stage, {}), **buckets["train"]})
    return model_cfg, stage_cfg, train_cfg


def open_one_site(site_dir: Any, *, what: str, check_images: bool = False) -> Site:
    """Load exactly one site folder. Refuses a list of several sites, and a folder that holds
    sites (the simulator's OUT/ with source/ and target/): data of two sites are never pooled."""
    if isinstance(site_dir, (list, tuple)):
        if len(site_dir) != 1:
            names = ", ".join(str(s) for s in site_dir)
            raise TrainingError(f"{what} reads exactly one site, got {len(site_dir)} ({names}): sites are never pooled")
        site_dir = site_dir[0]
    root = Path(site_dir)
    if root.is_dir() and not (root / MANIFEST).exists():
        inner = sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file())
        if inner:
            raise TrainingError(
                f"{root}: holds {len(inner)} sites ({', '.join(inner)}); {what} reads ONE site, e.g. {root / inner[0]}"
            )
    return load_site(root, check_images=check_images)


def check_image_files(site: Site, records: Sequence[FrameRecord]) -> None:
    """Every selected frame's image exists, is not truncated and is 8-bit (header reads, no
    decoding, no mask access)."""
    check_frame_files(site, records, masks=False)


def check_init_card(path: Any, card: dict[str, Any], model_cfg: ModelConfig, preset: str) -> None:
    """Refuse an init checkpoint made for another preset or model shape."""
    their_preset = card.get("preset") or (card.get("model") or {}).get("name")
    if their_preset and their_preset != preset:
        raise CheckpointError(f"{path}: made for preset {their_preset!r}, this run uses preset {preset!r}")
    their_model = card.get("model")
    if isinstance(their_model, dict):
        mine = to_dict(model_cfg)
        # Dropout does not change the weights' shapes; everything else must match.
        diff = sorted(k for k in mine if k != "dropout" and k in their_model and their_model[k] != mine[k])
        if diff:
            shown = ", ".join(f"{k} {their_model[k]!r} vs {mine[k]!r}" for k in diff[:4])
            raise CheckpointError(f"{path}: its model differs from this run's ({shown})")


def hyperparameters(stage_cfg: Any, train_cfg: TrainConfig, **actual: Any) -> dict[str, Any]:
    return {**to_dict(stage_cfg), **{f"train.{k}": v for k, v in to_dict(train_cfg).items()}, **actual}


def seeded_model(seed: int, build):
    """Build a model right after seeding, so its random init depends on the seed alone."""
    import torch

    torch.manual_seed(seed)
    return build()


__all__ = [
    "PRESET_STAGE_DEFAULTS",
    "check_image_files",
    "check_init_card",
    "hyperparameters",
    "open_one_site",
    "resolve_configs",
    "seeded_model",
    "stage_defaults",
]
