"""Config values are validated by pydantic against each field's annotation: one error contract
(ConfigError, one line that names the field), and no silent conversion of a wrong value."""

from __future__ import annotations

import typing

import pytest

from pocus_edge.config import (
    CONFIG_CLASSES,
    ContrastiveConfig,
    DistillConfig,
    FinetuneConfig,
    MIMConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_yaml,
    save_yaml,
    to_dict,
)
from pocus_edge.errors import ConfigError


def refused(cfg, **overrides) -> str:
    with pytest.raises(ConfigError) as info:
        apply_overrides(cfg, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("value", [2, -1, "2", "maybe", 0.5])
def test_a_bool_field_refuses_what_is_not_a_truth_value(value):
    # bool(2) is True in Python; a config that says amp: 2 is a mistake, not "on".
    assert refused(TrainConfig(), amp=value).startswith("amp: cannot read")


@pytest.mark.parametrize("text, expected", [("off", False), ("no", False), ("0", False), ("on", True), ("true", True),
                                            (1, True), (0, False), (True, True)])
def test_a_bool_field_reads_the_usual_spellings(text, expected):
    assert apply_overrides(TrainConfig(), {"amp": text}).amp is expected


@pytest.mark.parametrize("cls, field, bad", [
    (TrainConfig, "schedule", "linear"),
    (MIMConfig, "optimizer", "lion"),
    (ContrastiveConfig, "optimizer", "AdamW"),
    (FinetuneConfig, "optimizer", "rmsprop"),
    (DistillConfig, "optimizer", "adamax"),
    (FinetuneConfig, "augment", "heavy"),
    (DistillConfig, "augment", "Intensity"),
])
def test_a_choice_field_refuses_other_values_and_names_the_choices(cls, field, bad):
    message = refused(cls(), **{field: bad})
    choices = typing.get_args(typing.get_type_hints(cls)[field])
    assert message.startswith(f"{field}: cannot read {bad!r} as one of") and all(c in message for c in choices)


def test_the_choices_are_the_engines_own():
    from pocus_edge.config import Augmentation, Optimizer, Schedule
    from pocus_edge.data.transforms import AUGMENTATIONS
    from pocus_edge.train.engine import OPTIMIZERS, SCHEDULES

    assert set(typing.get_args(Optimizer)) == set(OPTIMIZERS)
    assert set(typing.get_args(Schedule)) == set(SCHEDULES)
    assert set(typing.get_args(Augmentation)) == set(AUGMENTATIONS)
    for choice in OPTIMIZERS:
        assert apply_overrides(FinetuneConfig(), {"optimizer": choice}).optimizer == choice


def test_numbers_are_typed_and_a_boolean_or_a_fraction_is_not_a_number():
    cfg = apply_overrides(FinetuneConfig(), {"lr": "3e-4", "batch_size": "16", "epochs": 4.0})
    assert (cfg.lr, cfg.batch_size, cfg.epochs) == (3e-4, 16, 4)
    assert type(cfg.batch_size) is int and type(cfg.lr) is float
    assert "a boolean is not a number" in refused(FinetuneConfig(), lr=True)
    assert "a boolean is not a number" in refused(FinetuneConfig(), batch_size=False)
    assert refused(FinetuneConfig(), batch_size=2.5).startswith("batch_size: cannot read 2.5 as int")
    assert refused(FinetuneConfig(), lr="fast").startswith("lr: cannot read 'fast' as float")
    assert refused(DistillConfig(), student=5).startswith("student: cannot read 5 as str")


def test_optional_fields_take_none_and_their_type():
    cfg = apply_overrides(TrainConfig(), {"grad_clip": "none", "max_steps": "12"})
    assert cfg.grad_clip is None and cfg.max_steps == 12
    assert apply_overrides(TrainConfig(), {"grad_clip": "0.5"}).grad_clip == 0.5
    assert apply_overrides(DistillConfig(), {"source_batch_size": "null"}).source_batch_size is None
    assert refused(TrainConfig(), max_steps="soon").startswith("max_steps: cannot read 'soon' as int or none")
    assert refused(TrainConfig(), seed=None).startswith("seed: cannot read None as int")


def test_tuples_from_text_lists_and_their_length():
    cfg = apply_overrides(ModelConfig(), {"decoder_channels": "32,16,8,4", "resnet_layers": [1, 2, 2]})
    assert cfg.decoder_channels == (32, 16, 8, 4) and cfg.resnet_layers == (1, 2, 2)
    assert apply_overrides(ContrastiveConfig(), {"crop_scale": "(0.4, 1.0)"}).crop_scale == (0.4, 1.0)
    assert refused(ModelConfig(), decoder_channels="32,x,8").startswith("decoder_channels[1]: cannot read")
    assert refused(ContrastiveConfig(), crop_scale="0.5").startswith("crop_scale")  # two numbers, not one
    assert refused(ContrastiveConfig(), crop_scale=[0.1, 0.2, 0.3]).startswith("crop_scale")


def test_unknown_fields_are_refused_with_the_known_ones():
    message = refused(TrainConfig(), warmup=3)
    assert "unknown field 'warmup' for TrainConfig" in message and "warmup_epochs" in message


@pytest.mark.parametrize("cls", sorted(CONFIG_CLASSES.values(), key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_every_default_config_round_trips_through_the_validator(cls, tmp_path):
    cfg = cls()
    assert from_dict(cls, to_dict(cfg)) == cfg  # a Literal that lacks its own default would fail here
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(tmp_path / "c.yaml") == cfg


def test_a_bad_value_in_a_yaml_file_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("kind: TrainConfig\nschedule: linear\n")
    with pytest.raises(ConfigError, match=r"train\.yaml: schedule: cannot read 'linear' as one of cosine, constant"):
        load_yaml(path)
