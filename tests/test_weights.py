"""Checkpoint I/O: safetensors round trip with the card, all-or-nothing strict loads, encoder-only loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from pocus_edge.config import model_preset, to_dict
from pocus_edge.errors import CheckpointError
from pocus_edge.models.heads import ContrastiveModel, MIMModel, encoder_state
from pocus_edge.models.transunet import TransUNet
from pocus_edge.models.weights import (
    CARD_KEY,
    build_segmenter,
    load_encoder,
    load_strict,
    read_checkpoint,
    save_checkpoint,
)


def card_for(model: TransUNet, stage: str = "finetune") -> dict:
    return {
        "format": "pocus-edge/1",
        "preset": model.cfg.name,
        "model": to_dict(model.cfg),
        "out_channels": model.out_channels,
        "stage": stage,
        "hyperparameters": {"lr": 2e-4},
        "data": [],
        "init": None,
    }


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture()
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TransUNet(model_preset("tiny"))
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, model, card_for(model))
    return model, path


def test_round_trip_keeps_tensors_and_card_and_leaves_no_temp_files(tiny_checkpoint, tmp_path):
    model, path = tiny_checkpoint
    state, card = read_checkpoint(path)
    assert_same_state(state, model.state_dict())
    assert card == card_for(model)
    # A plain safetensors file: other tools read the tensors and the card metadata.
    with safe_open(str(path), framework="pt") as fh:
        assert json.loads(fh.metadata()[CARD_KEY]) == card_for(model)
        assert set(fh.keys()) == set(model.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]


def test_build_segmenter_rebuilds_the_same_network(tiny_checkpoint):
    model, path = tiny_checkpoint
    rebuilt, card = build_segmenter(path)
    assert not rebuilt.training and card["preset"] == "tiny"
    x = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_strict_load_of_small_into_tiny_names_every_problem_and_changes_nothing(tmp_path):
    small = TransUNet(model_preset("small"))
    path = tmp_path / "small.safetensors"
    save_checkpoint(path, small, card_for(small))
    tiny = TransUNet(model_preset("tiny"))
    before = snapshot(tiny)
    with pytest.raises(CheckpointError) as info:
        load_strict(tiny, path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    small_state, tiny_state = small.state_dict(), before
    unexpected = set(small_state) - set(tiny_state)  # small has more transformer layers than tiny
    mismatched = [k for k in set(small_state) & set(tiny_state) if small_state[k].shape != tiny_state[k].shape]
    assert unexpected and mismatched and not set(tiny_state) - set(small_state)
    assert f"{len(unexpected)} unexpected keys ({sorted(unexpected)[0]}, " in message
    assert f"{len(mismatched)} shape mismatches" in message
    first = sorted(mismatched)[0]
    assert f"{first}: checkpoint {tuple(small_state[first].shape)} vs model {tuple(tiny_state[first].shape)}" in message
    assert "missing keys" not in message
    assert "preset 'small'" in message and "preset 'tiny'" in message
    assert_same_state(before, tiny.state_dict())  # never a partial load


def test_strict_load_of_small_into_paper_fails_loudly(tmp_path):
    small = TransUNet(model_preset("small"))
    path = tmp_path / "small.safetensors"
    save_checkpoint(path, small, card_for(small))
    # Shapes are all the check needs: build the 105M-parameter paper network on the meta device.
    with torch.device("meta"):
        paper = TransUNet(model_preset("paper"))
    with pytest.raises(CheckpointError, match=r"missing keys .*shape mismatches"):
        load_strict(paper, path)


def test_missing_or_extra_keys_alone_are_refused(tiny_checkpoint, tmp_path):
    model, _ = tiny_checkpoint
    state = model.state_dict()
    dropped = {k: v for k, v in state.items() if k != "decoder.head.bias"}
    path = tmp_path / "dropped.safetensors"
    save_checkpoint(path, dropped, card_for(model))
    with pytest.raises(CheckpointError, match=r"1 missing keys \(decoder\.head\.bias\)"):
        load_strict(TransUNet(model_preset("tiny")), path)
    extra = {**state, "decoder.extra": torch.zeros(3)}
    path = tmp_path / "extra.safetensors"
    save_checkpoint(path, extra, card_for(model))
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \(decoder\.extra\)"):
        load_strict(TransUNet(model_preset("tiny")), path)


def test_truncated_missing_and_pickled_files_are_refused(tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint
    raw = path.read_bytes()
    for cut in (4, 100, len(raw) // 2, len(raw) - 1):
        truncated = tmp_path / f"cut{cut}.safetensors"
        truncated.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="truncated") as info:
            load_strict(TransUNet(model_preset("tiny")), truncated)
        assert str(truncated) in str(info.value)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "absent.safetensors")
    pickled = tmp_path / "model.pt"
    torch.save({"x": torch.zeros(1)}, pickled)
    with pytest.raises(CheckpointError, match="only .safetensors"):
        read_checkpoint(pickled)


def test_build_segmenter_needs_a_card(tiny_checkpoint, tmp_path):
    model, _ = tiny_checkpoint
    path = tmp_path / "nocard.safetensors"
    save_checkpoint(path, model, None)
    with pytest.raises(CheckpointError, match="model card"):
        build_segmenter(path)


@pytest.mark.parametrize("pretrainer", ["contrastive", "mim"])
def test_load_encoder_copies_encoder_and_leaves_decoder_untouched(pretrainer, tmp_path):
    cfg = model_preset("tiny")
    torch.manual_seed(1)
    pretrained = ContrastiveModel(cfg) if pretrainer == "contrastive" else MIMModel(cfg)
    path = tmp_path / "encoder.safetensors"
    save_checkpoint(path, encoder_state(pretrained), {"stage": f"pretrain-{pretrainer}", "preset": "tiny"})
    torch.manual_seed(2)
    segmenter = TransUNet(cfg)
    decoder_before = snapshot(segmenter.decoder)
    card = load_encoder(segmenter, path)
    assert card["stage"] == f"pretrain-{pretrainer}"
    source_encoder = pretrained.encoder if pretrainer == "contrastive" else pretrained.net.encoder
    assert_same_state(segmenter.encoder.state_dict(), source_encoder.state_dict())
    assert_same_state(decoder_before, segmenter.decoder.state_dict())


def test_load_encoder_ignores_other_keys_but_is_strict_on_encoder_keys(tmp_path):
    tiny = TransUNet(model_preset("tiny"))
    full = tmp_path / "full.safetensors"
    save_checkpoint(full, tiny, card_for(tiny))  # a whole segmenter: decoder keys are ignored
    target = TransUNet(model_preset("tiny"))
    decoder_before = snapshot(target.decoder)
    load_encoder(target, full)
    assert_same_state(target.encoder.state_dict(), tiny.encoder.state_dict())
    assert_same_state(decoder_before, target.decoder.state_dict())

    small = ContrastiveModel(model_preset("small"))
    wrong = tmp_path / "small_encoder.safetensors"
    save_checkpoint(wrong, encoder_state(small), {"preset": "small", "stage": "pretrain-contrastive"})
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="encoder does not fit"):
        load_encoder(target, wrong)
    assert_same_state(before, target.state_dict())

    decoder_only = tmp_path / "decoder.safetensors"
    save_checkpoint(decoder_only, {k: v for k, v in tiny.state_dict().items() if k.startswith("decoder.")}, {})
    with pytest.raises(CheckpointError, match="no 'encoder"):
        load_encoder(target, decoder_only)
