"""`pocus-edge convert`: released research-code checkpoints (.pth, the reference TransUNet's module
names) -> this project's safetensors. The synthetic checkpoints here are written with the
released code's key names and shapes, independently of the converter's renaming table."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from pocus_edge.errors import CheckpointError
from pocus_edge.models.released import convert_checkpoint
from pocus_edge.models.weights import build_segmenter, load_encoder, read_checkpoint

# A small network in the reference layout: ResNetV2 width 8 with one unit per block, a ViT of
# one layer, hidden 128 (two 64-wide heads), 64x64 input (4x4 tokens), decoder (8, 8, 4, 4).
WIDTH, HIDDEN, MLP, GRID, HEAD_CH, DEC = 8, 128, 64, 4, 16, (8, 8, 4, 4)


def released_state(gen: torch.Generator, out_channels: int = 1, with_decoder: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors under the reference implementation's names (VisionTransformer ->
    transformer.embeddings.hybrid_model / transformer.encoder / decoder / segmentation_head)."""

    def t(*shape):
        return torch.randn(*shape, generator=gen)

    s: dict[str, torch.Tensor] = {}
    hy = "transformer.embeddings.hybrid_model."
    s[hy + "root.conv.weight"] = t(WIDTH, 3, 7, 7)
    s[hy + "root.gn.weight"], s[hy + "root.gn.bias"] = t(WIDTH), t(WIDTH)
    cin = WIDTH
    for block, (cout, cmid) in enumerate([(4 * WIDTH, WIDTH), (8 * WIDTH, 2 * WIDTH), (16 * WIDTH, 4 * WIDTH)], start=1):
        u = f"{hy}body.block{block}.unit1."
        s[u + "conv1.weight"], s[u + "conv2.weight"], s[u + "conv3.weight"] = t(cmid, cin, 1, 1), t(cmid, cmid, 3, 3), t(cout, cmid, 1, 1)
        for k, ch in ((1, cmid), (2, cmid), (3, cout)):
            s[u + f"gn{k}.weight"], s[u + f"gn{k}.bias"] = t(ch), t(ch)
        s[u + "downsample.weight"] = t(cout, cin, 1, 1)
        s[u + "gn_proj.weight"], s[u + "gn_proj.bias"] = t(cout), t(cout)
        cin = cout
    e = "transformer.embeddings."
    s[e + "patch_embeddings.weight"], s[e + "patch_embeddings.bias"] = t(HIDDEN, 16 * WIDTH, 1, 1), t(HIDDEN)
    s[e + "position_embeddings"] = t(1, GRID * GRID, HIDDEN)
    layer = "transformer.encoder.layer.0."
    for name in ("attention_norm", "ffn_norm"):
        s[layer + f"{name}.weight"], s[layer + f"{name}.bias"] = t(HIDDEN), t(HIDDEN)
    for name in ("query", "key", "value", "out"):
        s[layer + f"attn.{name}.weight"], s[layer + f"attn.{name}.bias"] = t(HIDDEN, HIDDEN), t(HIDDEN)
    s[layer + "ffn.fc1.weight"], s[layer + "ffn.fc1.bias"] = t(MLP, HIDDEN), t(MLP)
    s[layer + "ffn.fc2.weight"], s[layer + "ffn.fc2.bias"] = t(HIDDEN, MLP), t(HIDDEN)
    s["transformer.encoder.encoder_norm.weight"], s["transformer.encoder.encoder_norm.bias"] = t(HIDDEN), t(HIDDEN)
    if not with_decoder:
        return s

    def conv_bn(prefix: str, cin: int, cout: int) -> None:
        s[prefix + "0.weight"] = t(cout, cin, 3, 3)
        s[prefix + "1.weight"], s[prefix + "1.bias"] = t(cout), t(cout)
        s[prefix + "1.running_mean"], s[prefix + "1.running_var"] = t(cout), t(cout).abs() + 0.5
        s[prefix + "1.num_batches_tracked"] = torch.tensor(7)

    conv_bn("decoder.conv_more.", HIDDEN, HEAD_CH)
    skips = (8 * WIDTH, 4 * WIDTH, WIDTH, 0)  # n_skip = 3: the last block has none
    cin = HEAD_CH
    for i, (cout, skip) in enumerate(zip(DEC, skips)):
        conv_bn(f"decoder.blocks.{i}.conv1.", cin + skip, cout)
        conv_bn(f"decoder.blocks.{i}.conv2.", cout, cout)
        cin = cout
    s["segmentation_head.0.weight"], s["segmentation_head.0.bias"] = t(out_channels, DEC[-1], 3, 3), t(out_channels)
    return s


def reference_attention(x: torch.Tensor, w: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """The reference implementation's attention, written out: separate q/k/v projections, heads
    split from the hidden axis, scaled dot product, softmax, output projection."""
    n, t, h = x.shape
    d = h // heads

    def proj(name):
        return (x @ w[f"attn.{name}.weight"].T + w[f"attn.{name}.bias"]).view(n, t, heads, d).permute(0, 2, 1, 3)

    q, k, v = proj("query"), proj("key"), proj("value")
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    ctx = (att @ v).permute(0, 2, 1, 3).reshape(n, t, h)
    return ctx @ w["attn.out.weight"].T + w["attn.out.bias"]


@pytest.fixture
def released_pth(tmp_path):
    state = released_state(torch.Generator().manual_seed(0))
    path = tmp_path / "best_model_loss200.pth"
    # DistributedDataParallel's state_dict, as the released fine-tuning script saves it.
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    return path, state


def test_fine_tuned_checkpoint_converts_tensor_for_tensor(released_pth, tmp_path):
    src, state = released_pth
    out = tmp_path / "model.safetensors"
    converted, card = convert_checkpoint(src, out)
    model, read_card = build_segmenter(out)
    ours = model.state_dict()
    assert converted.kind == "segmenter" and converted.dropped == []
    hy, lay = "transformer.embeddings.hybrid_model.", "transformer.encoder.layer.0."
    pairs = {
        "encoder.resnet.stem.conv.weight": hy + "root.conv.weight",
        "encoder.resnet.stem.norm.bias": hy + "root.gn.bias",
        "encoder.resnet.stages.2.blocks.0.conv2.weight": hy + "body.block3.unit1.conv2.weight",
        "encoder.resnet.stages.1.blocks.0.norm3.weight": hy + "body.block2.unit1.gn3.weight",
        "encoder.resnet.stages.0.blocks.0.downsample.conv.weight": hy + "body.block1.unit1.downsample.weight",
        "encoder.resnet.stages.0.blocks.0.downsample.norm.bias": hy + "body.block1.unit1.gn_proj.bias",
        "encoder.patch_embed.weight": "transformer.embeddings.patch_embeddings.weight",
        "encoder.pos_embed": "transformer.embeddings.position_embeddings",
        "encoder.blocks.0.norm1.weight": lay + "attention_norm.weight",
        "encoder.blocks.0.norm2.bias": lay + "ffn_norm.bias",
        "encoder.blocks.0.mlp.fc2.weight": lay + "ffn.fc2.weight",
        "encoder.blocks.0.attn.proj.bias": lay + "attn.out.bias",
        "encoder.norm.weight": "transformer.encoder.encoder_norm.weight",
        "decoder.conv_more.1.running_var": "decoder.conv_more.1.running_var",
        "decoder.blocks.3.conv2.0.weight": "decoder.blocks.3.conv2.0.weight",
        "decoder.head.weight": "segmentation_head.0.weight",
    }
    for mine, theirs in pairs.items():
        assert torch.equal(ours[mine], state[theirs]), mine
    # Every released tensor is used, and no tensor of the network is left at its random init.
    assert len(ours) == len(state) - 6 + 2  # q/k/v weight+bias (6) become qkv weight+bias (2)
    # The stacked q/k/v projection computes the reference attention (two 64-wide heads).
    assert model.cfg.num_heads == 2 and model.cfg.img_size == GRID * 16 and model.cfg.gn_groups == WIDTH
    x = torch.randn(2, GRID * GRID, HIDDEN, generator=torch.Generator().manual_seed(1))
    w = {k[len(lay):]: v for k, v in state.items() if k.startswith(lay)}
    with torch.no_grad():
        got = model.encoder.blocks[0].attn(x)
    torch.testing.assert_close(got, reference_attention(x, w, heads=2), rtol=1e-4, atol=1e-4)
    # The card says where the weights come from; the file is found again by its SHA-256.
    origin = read_card["origin"]
    assert read_card["stage"] == "finetune" and read_card["out_channels"] == 1 and read_card["data"] == []
    assert origin["file"] == src.name and len(origin["sha256"]) == 64 and origin["architecture_notes"]
    assert "released" in origin["converted_from"]
    with torch.no_grad():
        prob = model.predict(torch.rand(1, 3, 64, 64))
    assert prob.shape == (1, 1, 64, 64) and torch.isfinite(prob).all()


def test_training_checkpoint_dict_and_four_channel_heads_convert(tmp_path):
    state = released_state(torch.Generator().manual_seed(2), out_channels=4)
    src = tmp_path / "latest_checkpoint.pth"
    torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.002, "params": [0, 1]}]},
                "results": {"eval_loss": [0.5, 0.4]}}, src)
    converted, _ = convert_checkpoint(src, tmp_path / "m.safetensors", stage="baseline")
    model, card = build_segmenter(tmp_path / "m.safetensors")
    assert converted.out_channels == 4 and card["stage"] == "baseline"
    assert torch.equal(model.state_dict()["decoder.head.bias"], state["segmentation_head.0.bias"])


def test_pretrained_encoder_needs_its_stage_and_feeds_finetune_init(tmp_path):
    enc = released_state(torch.Generator().manual_seed(3), with_decoder=False)
    # Pretraining saves the transformer at the top level, with a projection head beside it.
    state = {k[len("transformer."):]: v for k, v in enc.items()}
    state["projection_head.0.weight"] = torch.randn(16, HIDDEN)
    src = tmp_path / "pretrained.pth"
    torch.save({"model_state_dict": state, "epoch": 10}, src)
    with pytest.raises(CheckpointError, match="--stage pretrain-mim"):
        convert_checkpoint(src, tmp_path / "enc.safetensors")
    with pytest.raises(CheckpointError, match="takes --stage pretrain-mim or pretrain-contrastive"):
        convert_checkpoint(src, tmp_path / "enc.safetensors", stage="finetune")
    converted, _ = convert_checkpoint(src, tmp_path / "enc.safetensors", stage="pretrain-contrastive")
    assert converted.kind == "encoder" and converted.dropped == ["projection_head.0.weight"]
    written, card = read_checkpoint(tmp_path / "enc.safetensors")
    assert all(k.startswith("encoder.") for k in written) and card["out_channels"] == 0
    # The converted encoder loads into a segmenter of the same shape, as `finetune --init` does.
    from pocus_edge.models.transunet import TransUNet

    target = TransUNet(converted.model)
    load_encoder(target, tmp_path / "enc.safetensors")
    assert torch.equal(target.encoder.pos_embed, enc["transformer.embeddings.position_embeddings"])


class NotATensor:
    pass


def test_unsafe_pickles_truncated_files_and_foreign_weights_are_refused(released_pth, tmp_path):
    src, state = released_pth
    evil = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {"x": torch.zeros(1)}, "extra": NotATensor()}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        convert_checkpoint(evil, tmp_path / "a.safetensors")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(src.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        convert_checkpoint(cut, tmp_path / "b.safetensors")
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, foreign)
    with pytest.raises(CheckpointError, match="no tensor of the TransUNet encoder"):
        convert_checkpoint(foreign, tmp_path / "c.safetensors")
    broken = dict(state)
    del broken["transformer.encoder.layer.0.attn.key.weight"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="key missing"):
        convert_checkpoint(tmp_path / "broken.pth", tmp_path / "d.safetensors")
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="--overwrite"):
        convert_checkpoint(src, existing)
    assert existing.read_bytes() == b"keep me"
    assert not any(p.name.endswith(".safetensors") and p.name[0] in "abcd" for p in tmp_path.iterdir())


def test_convert_command_and_its_one_line_errors(released_pth, tmp_path):
    src, _ = released_pth
    env = {**os.environ, "COLUMNS": "200"}
    ok = subprocess.run([sys.executable, "-m", "pocus_edge", "convert", str(src), "--out", str(tmp_path / "m.safetensors")],
                        capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stdout and "stage 'finetune'" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "pocus_edge", "convert", str(tmp_path / "none.pth"), "--out", str(tmp_path / "x.safetensors")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "no such checkpoint" in bad.stderr and "Traceback" not in bad.stderr
    assert len([line for line in bad.stderr.splitlines() if line.strip()]) == 1
