"""What every stage shares: opening exactly ONE site (site isolation), resolving presets,
per-preset defaults and ``--set`` overrides into typed configs, and the run's card fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import yaml

from ..config import (
    ContrastiveConfig,
    DistillConfig,
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
from .recipes import get_recipe, pretrain_recipe_values

if TYPE_CHECKING:
    import torch

    from ..data.datasets import SegmentationDataset

PRETRAIN_STAGES = ("mim", "contrastive")
STAGE_CONFIGS = {"mim": MIMConfig, "contrastive": ContrastiveConfig, "finetune": FinetuneConfig,
                 "distill": DistillConfig}
DEFAULT_PRESET = "small"

# The paper's batch sizes and epochs (the dataclass defaults) are for 4-8 GPUs and ~20k frames.
# ``small`` and ``tiny`` get CPU-sized defaults; every value can still be overridden. Fine-tuning
# learning rates belong to the recipes (pocus_edge.train.recipes).
PRESET_STAGE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    # The paper preset's frames (224 px, ~20k target frames) would make a teacher cache of GBs.
    "paper": {"distill": {"teacher_cache": False}},
    "small": {
        "mim": {"batch_size": 32, "epochs": 10},
        # lr 1e-5 is tuned for 400 epochs of 512 pairs; a short CPU run needs a larger step.
        "contrastive": {"batch_size": 32, "epochs": 10, "lr": 1e-4},
        "finetune": {"batch_size": 16, "epochs": 5},
        "distill": {"batch_size": 16, "epochs": 5},
    },
    "tiny": {
        "mim": {"batch_size": 8, "epochs": 2},
        "contrastive": {"batch_size": 8, "epochs": 2, "lr": 1e-4},
        "finetune": {"batch_size": 8, "epochs": 2},
        "distill": {"batch_size": 8, "epochs": 2},
    },
}


# Engine defaults that differ by stage (every preset); ``--set train.X=...`` still wins.
# Contrastive: no gradient clipping and, after a short warm-up, a constant learning rate.
# docs/method.md gives neither clipping nor a schedule, and both lengthen the plateau at chance
# (ln(2B - 1)) that the loss sits on until the network has learned the augmentation invariance:
# clipping at 1.0 by ~250 steps (tiny preset, batch 32, Adam 1e-4); a cosine fitted to a few
# hundred steps has halved the lr before the escape starts (benchmarks/notes/contrastive_plateau.md).
# Distillation: the default fine-tuning recipe's schedule (5 % warm-up, cosine, no clipping).
STAGE_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "contrastive": {"grad_clip": None, "schedule": "constant", "warmup_fraction": 0.05},
    "distill": {"grad_clip": None, "schedule": "cosine", "warmup_fraction": 0.05, "warmup_epochs": 0},
}


@dataclass
class RunOptions:
    """What every training stage accepts besides its own settings (the CLI's shared flags).

    ``preset`` None: the config file's, else ``small``. ``epochs``/``batch_size``/``lr``/
    ``max_steps``/``seed``/``num_workers`` None: the preset's (or recipe's) default. ``overrides``
    are ``--set`` items; ``config_file`` a YAML run config (``RUN/config.yaml`` of an earlier run
    works). Precedence: defaults < recipe < config file < ``--set`` < the explicit options here.
    """

    preset: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    max_steps: int | None = None
    seed: int | None = None
    device: str = "auto"
    resume: bool = False
    overrides: dict[str, Any] | None = None
    config_file: str | Path | None = None
    num_workers: int | None = None
    preload: bool = False
    progress: bool = True
    tensorboard: bool = True
    checkpoint_every: int = 0
    on_step: Callable[[int, float], None] | None = None
    time_limit_s: float | None = None

    @classmethod
    def build(cls, options: "RunOptions | None" = None, **kwargs: Any) -> "RunOptions":
        """``options`` with ``kwargs`` (RunOptions fields) applied; unknown names are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(options or cls(), **kwargs)

    def explicit(self) -> dict[str, Any]:
        """The stage/engine values given explicitly (None = not given)."""
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "max_steps": self.max_steps,
                "seed": self.seed, "num_workers": self.num_workers}


@dataclass
class ResolvedConfig:
    """The configs one run trains with, and where they came from."""

    stage: str
    preset: str
    model: ModelConfig
    stage_cfg: Any
    train: TrainConfig

    def record(self) -> dict[str, Any]:
        """What ``RUN/config.yaml`` holds (and ``--config`` reads back)."""
        return {"stage": self.stage, "preset": self.preset, "model": to_dict(self.model),
                self.stage: to_dict(self.stage_cfg), "train": to_dict(self.train)}


def stage_defaults(stage: str, preset: str, recipe: str | None = None) -> Any:
    """The stage config for a preset and a recipe (fine-tuning: :data:`.recipes.RECIPES`;
    pretraining: :data:`.recipes.PRETRAIN_RECIPES`) before user overrides."""
    cfg = STAGE_CONFIGS[stage]()
    extra = dict(PRESET_STAGE_DEFAULTS.get(preset, {}).get(stage, {}))
    if stage == "finetune":
        extra.update(get_recipe(recipe or cfg.recipe).finetune_values(preset))
    elif stage in PRETRAIN_STAGES:
        extra.update(pretrain_recipe_values(stage, recipe or cfg.recipe))
    return apply_overrides(cfg, extra) if extra else cfg


def read_config_file(path: str | Path, stage: str) -> dict[str, Any]:
    """A run config YAML: top-level ``stage``, ``preset``, ``recipe`` and sections ``model``,
    ``train`` and one per stage (sections of other stages are ignored, so one file can serve
    every stage). A ``stage`` other than this one is refused."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, expected a YAML config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config is a mapping (stage, preset, model, train, {', '.join(STAGE_CONFIGS)})")
    allowed = {"stage", "preset", "recipe", "model", "train", *STAGE_CONFIGS}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}")
    if data.get("stage") not in (None, stage):
        raise ConfigError(f"{path}: written for stage {data['stage']!r}, this command runs {stage!r}")
    for section in ("model", "train", *STAGE_CONFIGS):
        if not isinstance(data.get(section) or {}, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
    return data


def _bucket_overrides(stage: str, overrides: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``--set`` items sorted into model / train / stage buckets (prefix or unique field name)."""
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
    return buckets


def _choose_recipe(given: str | None, file: dict[str, Any], config_file: Any, stage: str = "finetune") -> str | None:
    """The recipe named on the command line, else the config file's; the two must agree (a
    config file holds the recipe's resolved values, which would silently beat another recipe)."""
    in_file = file.get("recipe") or (file.get(stage) or {}).get("recipe")
    if given and in_file and given != in_file:
        raise ConfigError(f"{config_file}: written for recipe {in_file!r}, but recipe {given!r} was asked for")
    return given or in_file


def _model_values(section: dict[str, Any], preset: str, config_file: Any) -> dict[str, Any]:
    """A config file's model section minus its ``name``, which must be the run's preset."""
    values = dict(section)
    name = values.pop("name", None)
    if name is not None and name != preset:
        raise ConfigError(f"{config_file}: its model is preset {name!r}, this run uses preset {preset!r}")
    return values


def resolve_configs(
    stage: str,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    config_file: str | Path | None = None,
    recipe: str | None = None,
    defaults: dict[str, Any] | None = None,
    **explicit: Any,
) -> ResolvedConfig:
    """The (model, stage, engine) configs of a run.

    Precedence, lowest first: the dataclass defaults, the preset's, the recipe's (fine-tuning),
    the stage's engine defaults, ``defaults`` (stage values a caller derives, e.g. the ``paper``
    recipe's weight decay after a contrastive encoder), the config file, ``overrides`` (``--set``
    items ``key=value``, key a field of the stage config, TrainConfig or ModelConfig, optionally
    prefixed: ``model.dropout``, ``train.grad_clip``, ``mim.mask_ratio``), then ``explicit``
    keyword values that are not None (``epochs=``, ``lr=``, ``seed=``...).
    """
    stage_cls = STAGE_CONFIGS[stage]
    file = read_config_file(config_file, stage) if config_file is not None else {}
    buckets = _bucket_overrides(stage, overrides)
    preset = preset or file.get("preset") or DEFAULT_PRESET
    if stage == "finetune" or stage in PRETRAIN_STAGES:
        recipe = _choose_recipe(recipe or buckets[stage].get("recipe"), file, config_file, stage)
    elif recipe is not None:
        raise ConfigError(f"--recipe applies to pretraining and fine-tuning, not to stage {stage}")
    for key, value in explicit.items():
        if value is None:
            continue
        for prefix in (stage, "train"):
            if key in {f.name for f in fields(STAGE_CONFIGS[stage] if prefix == stage else TrainConfig)}:
                buckets[prefix][key] = value
                break
        else:
            raise ConfigError(f"unknown option {key!r} for stage {stage}")
    where = f" (from {config_file})" if config_file is not None else ""
    try:
        model_cfg = model_preset(preset, **_model_values(file.get("model") or {}, preset, config_file),
                                 **buckets["model"])
        stage_cfg = apply_overrides(stage_defaults(stage, preset, recipe),
                                    {**(defaults or {}), **(file.get(stage) or {}), **buckets[stage]})
        recipe_train = get_recipe(stage_cfg.recipe).train_values(preset) if stage_cls is FinetuneConfig else {}
        train_cfg = apply_overrides(TrainConfig(), {**recipe_train, **STAGE_TRAIN_DEFAULTS.get(stage, {}),
                                                    **(file.get("train") or {}), **buckets["train"]})
    except ConfigError as exc:
        raise ConfigError(f"{exc}{where}") from None
    return ResolvedConfig(stage, preset, model_cfg, stage_cfg, train_cfg)


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


# ---------------------------------------------------------------------------------------------
# Labeled data and source validation, shared by fine-tuning and distillation

SPLIT_COLUMNS = ("auto", "split", "ub_split")


def select_labeled_splits(site, split_column: str = "auto"):
    """(column, train records, val records) of labeled frames, refusing unlabeled sites and empty
    splits. ``auto``: the ``split`` column when it has labeled train and val frames (a source
    site), else ``ub_split`` (the target's upper-bound split)."""
    if split_column not in SPLIT_COLUMNS:
        raise TrainingError(f"split column must be one of {', '.join(SPLIT_COLUMNS)}, got {split_column!r}")
    if not site.select(labeled=True):
        raise TrainingError(
            f"{site.root}: no labeled frames (no masks); fine-tuning needs a labeled site (pretrain on unlabeled ones)"
        )

    def pick(column: str, name: str):
        if column == "split":
            return site.select(name, labeled=True)
        return site.select(labeled=True, ub_split=name)

    if split_column == "auto":
        if pick("split", "train") and pick("split", "val"):
            split_column = "split"
        elif pick("ub_split", "train") or pick("ub_split", "val"):
            split_column = "ub_split"
        else:
            split_column = "split"
    train, val = pick(split_column, "train"), pick(split_column, "val")
    for name, recs in (("train", train), ("val", val)):
        if not recs:
            raise TrainingError(
                f"{site.manifest_path}: {split_column} '{name}' has no labeled frames (empty split; run `pocus-edge split`?)"
            )
    return split_column, train, val


def per_image_dice_bce(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DiceBCE of each image separately (N,), so validation does not depend on batch grouping."""
    import torch

    from ..losses import dice_bce

    return torch.stack([dice_bce(prob[i : i + 1], target[i : i + 1]) for i in range(prob.shape[0])])


def labeled_datasets(site, split_column: str, max_val_frames: int | None, size: int, ft_cfg, train_cfg, preload: bool):
    """(split column, train dataset, validation dataset); ``max_val_frames`` keeps an evenly
    spaced, deterministic subset of the validation frames (validation cost matters on CPUs)."""
    from ..data.datasets import SegmentationDataset
    from ..data.transforms import make_augmentation

    column, train_recs, val_recs = select_labeled_splits(site, split_column)
    if max_val_frames is not None and len(val_recs) > max_val_frames > 0:
        val_recs = val_recs[:: -(-len(val_recs) // max_val_frames)]
    threads = max(1, train_cfg.num_workers or 4)
    train_ds = SegmentationDataset(site, train_recs, size, seed=train_cfg.seed, preload=preload,
                                   preload_threads=threads, augment=make_augmentation(ft_cfg.augment))
    val_ds = SegmentationDataset(site, val_recs, size, seed=train_cfg.seed, preload=preload, preload_threads=threads)
    return column, train_ds, val_ds


def validation_fn(val_ds: SegmentationDataset, ctx, batch: int):
    """Source-validation DiceBCE and Dice of a model: each rank scores every world_size-th image
    and the sums are all-reduced (the result does not depend on the number of processes)."""
    import torch

    from ..metrics import dice_iou_per_image

    def val_fn(net) -> dict[str, float]:
        idx = list(range(ctx.rank, len(val_ds), ctx.world_size))
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        dice_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for start in range(0, len(idx), batch):
            items = [val_ds[i] for i in idx[start : start + batch]]
            images = torch.stack([a for a, _ in items]).to(ctx.device)
            masks = torch.stack([b for _, b in items]).to(ctx.device)
            prob = torch.sigmoid(net(images).float())
            loss_sum += per_image_dice_bce(prob, masks).double().sum()
            dice_sum += float(dice_iou_per_image(prob, masks)[0].sum())
        if ctx.distributed:
            import torch.distributed as dist

            dist.all_reduce(loss_sum)
            dist.all_reduce(dice_sum)
        n = len(val_ds)
        return {"val_loss": float(loss_sum / n), "val_dice": float(dice_sum / n)}

    return val_fn


__all__ = [
    "PRESET_STAGE_DEFAULTS",
    "ResolvedConfig",
    "RunOptions",
    "read_config_file",
    "check_image_files",
    "check_init_card",
    "hyperparameters",
    "labeled_datasets",
    "open_one_site",
    "per_image_dice_bce",
    "resolve_configs",
    "seeded_model",
    "select_labeled_splits",
    "stage_defaults",
    "validation_fn",
]
