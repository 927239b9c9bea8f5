"""TransUNet shape, size and behaviour; MIM / contrastive wrappers; the flops report and command."""

from __future__ import annotations

import json

import pytest
import torch

from pocus_edge.config import MIMConfig, ModelConfig, load_yaml, model_preset, save_yaml
from pocus_edge.errors import ConfigError
from pocus_edge.losses import masked_l1
from pocus_edge.models.flops import TwoBranchModel, count_flops, count_params, model_report
from pocus_edge.models.heads import ContrastiveModel, MaskGenerator, MIMModel, apply_mim_mask, encoder_state
from pocus_edge.models.transunet import TransUNet

PAPER_PARAMS = 105_275_921  # docs/method.md reference size, 1 output channel
PAPER_GFLOPS = 58.3


# ---------------------------------------------------------------------------------------------
# An independent, by-hand account of the architecture in docs/method.md (conv/linear weights, norms,
# biases; multiply-adds of every conv, linear and attention product).


def reference_size(cfg: ModelConfig, out_channels: int = 1) -> tuple[int, int]:
    """(parameters, FLOPs = 2 x MACs) of TransUNet ``cfg`` at ``cfg.img_size``, batch 1."""
    w, h, s = cfg.resnet_width, cfg.hidden_size, cfg.img_size
    params = 0
    macs = 0

    def conv(cin, cout, k, out_side, bias=False):
        nonlocal params, macs
        params += cin * cout * k * k + (cout if bias else 0)
        macs += cin * cout * k * k * out_side * out_side

    def norm(c):  # GroupNorm / BatchNorm / LayerNorm: weight + bias
        nonlocal params
        params += 2 * c

    conv(cfg.in_chans, w, 7, s // 2)  # root StdConv 7x7/2, no bias
    norm(w)
    cin, side = w, s // 4  # after the 3x3/2 max-pool
    for stage, (units, cout) in enumerate(zip(cfg.resnet_layers, (4 * w, 8 * w, 16 * w))):
        mid = cout // 4
        for unit in range(units):
            stride = 2 if (stage > 0 and unit == 0) else 1
            conv(cin, mid, 1, side)
            norm(mid)
            side //= stride
            conv(mid, mid, 3, side)
            norm(mid)
            conv(mid, cout, 1, side)
            norm(cout)
            if unit == 0:  # projection shortcut
                conv(cin, cout, 1, side)
                norm(cout)
            cin = cout
    tokens = cfg.grid_size**2
    conv(16 * w, h, 1, cfg.grid_size, bias=True)  # patch embedding
    params += tokens * h  # position embeddings
    for _ in range(cfg.num_layers):
        norm(h)
        norm(h)
        params += (h * 3 * h + 3 * h) + (h * h + h) + (h * cfg.mlp_dim + cfg.mlp_dim) + (cfg.mlp_dim * h + h)
        macs += tokens * (3 * h * h + h * h + 2 * h * cfg.mlp_dim) + 2 * tokens * tokens * h  # QK^T and AV
    norm(h)
    conv(h, cfg.decoder_head_channels, 3, cfg.grid_size)
    norm(cfg.decoder_head_channels)
    cin, side = cfg.decoder_head_channels, cfg.grid_size
    skips = [8 * w, 4 * w, w, 0]
    for cout, skip in zip(cfg.decoder_channels, skips):
        side *= 2
        conv(cin + skip, cout, 3, side)
        norm(cout)
        conv(cout, cout, 3, side)
        norm(cout)
        cin = cout
    conv(cin, out_channels, 3, s, bias=True)  # head
    return params, 2 * macs


def test_reference_account_reproduces_the_published_size():
    params, flops = reference_size(model_preset("paper"))
    assert params == PAPER_PARAMS
    assert flops / 1e9 == pytest.approx(PAPER_GFLOPS, rel=0.05)


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
def test_param_and_flop_counts_match_the_reference_account(preset):
    cfg = model_preset(preset)
    with torch.device("meta"):  # shapes only: the paper network builds in a fraction of a second
        model = TransUNet(cfg)
    expected_params, expected_flops = reference_size(cfg)
    assert count_params(model) == expected_params
    assert count_flops(model, (1, 3, cfg.img_size, cfg.img_size)) == expected_flops
    if preset == "paper":
        assert count_params(model) == PAPER_PARAMS
        assert expected_flops / 1e9 == pytest.approx(PAPER_GFLOPS, rel=0.05)


def test_paper_model_on_cpu_counts_the_same_as_on_meta():
    """One real build of the 105M-parameter network: meta-device counting (used by the report)
    must agree with counting actual CPU execution, attention included."""
    cfg = model_preset("paper")
    model = TransUNet(cfg)
    assert count_params(model) == PAPER_PARAMS
    flops = count_flops(model, (1, 3, 224, 224))
    assert flops == reference_size(cfg)[1]
    assert flops / 1e9 == pytest.approx(PAPER_GFLOPS, rel=0.05)


def test_model_report_and_fused_model():
    report = model_report("tiny")
    fused = TwoBranchModel(model_preset("tiny"))
    assert report["fused"]["params"] == count_params(fused)
    assert report["fused"]["flops"] == count_flops(fused, (1, 3, 64, 64))
    assert report["branch"]["params"] == reference_size(model_preset("tiny"))[0]
    assert report["fused"]["gflops"] == pytest.approx(2 * report["branch"]["gflops"])
    overridden = model_report("tiny", num_layers=3)
    assert overridden["model"]["num_layers"] == 3
    assert overridden["branch"]["params"] == reference_size(model_preset("tiny", num_layers=3))[0]


def test_flops_command_prints_the_report(capsys):
    from pocus_edge.cli import main

    assert main(["flops", "--preset", "tiny", "--json", "--no-students", "--set", "model.num_layers=3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(model_report("tiny", num_layers=3)))
    assert main(["flops", "--preset", "tiny"]) == 0
    table = capsys.readouterr().out
    assert f"{reference_size(model_preset('tiny'))[0]:,}" in table
    assert main(["flops", "--preset", "huge"]) == 2
    assert "'huge' is not one of 'paper', 'small', 'tiny'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Behaviour


@pytest.fixture(scope="module")
def tiny_cfg() -> ModelConfig:
    return model_preset("tiny")


def test_output_skip_and_token_shapes(tiny_cfg):
    model = TransUNet(tiny_cfg, out_channels=2).eval()
    x = torch.rand(3, 3, 64, 64)
    tokens, skips = model.encode(x)
    w = tiny_cfg.resnet_width
    assert tokens.shape == (3, tiny_cfg.grid_size**2, tiny_cfg.hidden_size)
    assert [tuple(s.shape) for s in skips] == [(3, 8 * w, 8, 8), (3, 4 * w, 16, 16), (3, w, 32, 32)]
    logits = model(x)
    assert logits.shape == (3, 2, 64, 64)
    torch.testing.assert_close(model.predict(x), torch.sigmoid(logits))


def test_parameter_names_and_every_parameter_gets_a_gradient(tiny_cfg):
    model = TransUNet(tiny_cfg).train()
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("encoder.", "decoder.")) for n in names)
    assert any(n.startswith("encoder.resnet.stem.") for n in names) and "encoder.pos_embed" in names
    x = torch.rand(2, 3, 64, 64)
    model(x).square().mean().backward()
    # Every skip, block and the head is wired in: no parameter without a gradient.
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n)


def test_frames_are_independent_in_eval_mode(tiny_cfg):
    model = TransUNet(tiny_cfg).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        batched = model(x)
        alone = model(x[1:2])
    torch.testing.assert_close(alone[0], batched[1], rtol=1e-5, atol=1e-5)


def test_grad_checkpointing_gives_the_same_gradients(tiny_cfg):
    torch.manual_seed(0)
    model = TransUNet(model_preset("tiny", dropout=0.0)).train()
    x = torch.rand(2, 3, 64, 64)
    model(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert model.encoder.grad_checkpointing
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-4, atol=1e-5, msg=n)


def test_traces_with_torch_export_at_a_fixed_size(tiny_cfg):
    """No data-dependent control flow: torch.export captures one graph that reproduces the model."""
    model = TransUNet(tiny_cfg).eval()
    x = torch.rand(2, 3, 64, 64)
    program = torch.export.export(model, (x,))
    y = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(program.module()(y), model(y), rtol=1e-4, atol=1e-5)


def test_presets_round_trip_yaml_and_bad_shapes_are_refused(tmp_path):
    for name in ("paper", "small", "tiny"):
        cfg = model_preset(name)
        save_yaml(cfg, tmp_path / f"{name}.yaml")
        assert load_yaml(tmp_path / f"{name}.yaml") == cfg
    paper = model_preset("paper")
    assert (paper.resnet_width, paper.resnet_layers, paper.hidden_size, paper.num_layers) == (64, (3, 4, 9), 768, 12)
    assert (paper.num_heads, paper.mlp_dim, paper.decoder_channels, paper.img_size) == (12, 3072, (256, 128, 64, 16), 224)
    with pytest.raises(ConfigError, match="gn_groups"):
        TransUNet(model_preset("tiny", gn_groups=3))
    with pytest.raises(ConfigError, match="img_size"):
        TransUNet(model_preset("tiny", img_size=72))
    with pytest.raises(ConfigError, match="num_heads"):
        TransUNet(model_preset("tiny", num_heads=3))


# ---------------------------------------------------------------------------------------------
# Pretraining wrappers


def test_mask_generator_counts_and_cells():
    gen = MaskGenerator(224, MIMConfig())
    assert (gen.cells_per_side, gen.num_masked, gen.num_speckle) == (7, 30, 6)  # ceil(49 x 0.6), 20 %
    mask, speckle = gen(5, generator=torch.Generator().manual_seed(0))
    assert mask.shape == speckle.shape == (5, 1, 224, 224)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert bool((speckle <= mask).all())
    cells = mask[:, 0, ::32, ::32]
    speckle_cells = speckle[:, 0, ::32, ::32]
    assert cells.sum(dim=(1, 2)).tolist() == [30.0] * 5
    assert speckle_cells.sum(dim=(1, 2)).tolist() == [6.0] * 5
    # Constant within each 32-pixel cell.
    assert torch.equal(mask, cells.repeat_interleave(32, 1).repeat_interleave(32, 2).unsqueeze(1))
    again, _ = gen(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    assert not torch.equal(mask[0], mask[1])


def test_apply_mim_mask_zeroes_speckles_and_keeps():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 1, 64, 64, generator=g).repeat(1, 3, 1, 1)
    mask, speckle = MaskGenerator(64, MIMConfig(mask_cell=16, mask_ratio=0.5, speckle_fraction=0.5))(2, generator=g)
    noise = torch.randn(2, 1, 64, 64, generator=g)
    out = apply_mim_mask(x, mask, speckle, noise)
    keep = mask == 0
    zero = (mask == 1) & (speckle == 0)
    spk = speckle == 1
    expanded = lambda m: m.expand_as(x)  # noqa: E731
    assert torch.equal(out[expanded(keep)], x[expanded(keep)])
    assert bool((out[expanded(zero)] == 0).all())
    expected = (x + x * noise).clamp(0, 1)
    assert torch.equal(out[expanded(spk)], expected[expanded(spk)])
    assert torch.equal(out[:, 0], out[:, 2])  # the gray frame stays gray


def test_mim_model_loss_is_masked_l1_of_its_reconstruction(tiny_cfg):
    mim = MIMConfig(mask_cell=16)
    model = MIMModel(tiny_cfg, mim).eval()  # eval: no dropout, so the two passes below agree
    assert model.net.out_channels == 3
    x = torch.rand(2, 3, 64, 64)
    mask, speckle = model.mask_generator(2, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 1, 64, 64)
    loss, reconstruction = model(x, mask, speckle, noise)
    assert reconstruction.shape == (2, 3, 64, 64)
    assert loss.item() == pytest.approx(masked_l1(reconstruction, x, mask).item())
    direct = model.net(apply_mim_mask(x, mask, speckle, noise))
    torch.testing.assert_close(reconstruction, direct)
    loss.backward()
    assert model.net.encoder.pos_embed.grad is not None


def test_mim_linear_head_reconstructs_from_the_encoder_tokens(tiny_cfg):
    from pocus_edge.models.heads import inpainting_baseline

    model = MIMModel(tiny_cfg, MIMConfig(mask_cell=16, head="linear")).eval()
    assert not hasattr(model, "net")  # no decoder to train and throw away
    x = torch.rand(2, 3, 64, 64)
    mask, speckle = model.mask_generator(2, generator=torch.Generator().manual_seed(0))
    loss, reconstruction = model(x, mask, speckle, torch.randn(2, 1, 64, 64))
    assert reconstruction.shape == x.shape
    # Token (i, j) predicts exactly its own 16x16 pixels: the 1x1 conv output, pixel-shuffled.
    with torch.no_grad():
        tokens, _ = model.encoder(apply_mim_mask(x, mask, speckle, torch.zeros(2, 1, 64, 64)))
        grid = tokens.transpose(1, 2).reshape(2, tiny_cfg.hidden_size, 4, 4)
        conv = model.pixel_head[0](grid)  # (N, 16*16*3, 4, 4)
        out = model.reconstruct(apply_mim_mask(x, mask, speckle, torch.zeros(2, 1, 64, 64)))
    torch.testing.assert_close(out[0, 1, 16 * 2 + 5, 16 * 3 + 7], conv[0, 1 * 256 + 5 * 16 + 7, 2, 3])
    loss.backward()
    assert model.encoder.pos_embed.grad is not None
    assert set(encoder_state(model)) == set(encoder_state(TransUNet(tiny_cfg)))
    # The trivial inpainting: masked pixels = the image's mean visible pixel, visible ones unchanged.
    filled = inpainting_baseline(x, mask)
    keep = (1 - mask).expand_as(x).bool()
    assert torch.equal(filled[keep], x[keep])
    mean0 = x[0][keep[0]].mean()
    torch.testing.assert_close(filled[0][~keep[0]], mean0.expand((~keep[0]).sum()))


def test_contrastive_model_projection_and_shared_encoder_names(tiny_cfg):
    model = ContrastiveModel(tiny_cfg, projection_bn=False).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.projector)  # the released head
    with_bn = ContrastiveModel(tiny_cfg).train()
    hidden = with_bn.projector[:2](torch.randn(8, tiny_cfg.hidden_size) * 5 + 3)
    # SimCLR's head: the hidden layer is batch-normalized (zero mean, unit variance per unit in training).
    torch.testing.assert_close(hidden.mean(0), torch.zeros(tiny_cfg.proj_hidden), atol=1e-5, rtol=0)
    z = model(torch.rand(4, 3, 64, 64))
    assert z.shape == (4, tiny_cfg.proj_dim)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    linear_shapes = [tuple(m.weight.shape) for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert linear_shapes == [(tiny_cfg.proj_hidden, tiny_cfg.hidden_size), (tiny_cfg.proj_dim, tiny_cfg.proj_hidden)]
    # Mean-pooled tokens feed the projector.
    with torch.no_grad():
        x = torch.rand(2, 3, 64, 64)
        tokens, _ = model.encoder(x)
        torch.testing.assert_close(model(x), torch.nn.functional.normalize(model.projector(tokens.mean(1)), dim=1))
    segmenter_keys = set(encoder_state(TransUNet(tiny_cfg)))
    assert set(encoder_state(model)) == segmenter_keys == set(encoder_state(MIMModel(tiny_cfg)))
    assert all(k.startswith("encoder.") for k in segmenter_keys)
    with torch.device("meta"):
        paper = ContrastiveModel(model_preset("paper"))
    shapes = [tuple(m.weight.shape) for m in paper.projector if isinstance(m, torch.nn.Linear)]
    assert shapes == [(768, 768), (128, 768)]  # docs/method.md: 768-768-128


@pytest.mark.parametrize("final_relu", [True, False])
def test_a_gradient_reaches_the_head_even_when_every_last_channel_is_negative(final_relu):
    # The all-background trap: when every channel before the head is negative, a ReLU there
    # passes no gradient to the head's kernel; the CPU presets read the BatchNorm output directly.
    cfg = model_preset("tiny", decoder_final_relu=final_relu)
    assert model_preset("tiny").decoder_final_relu is False and model_preset("paper").decoder_final_relu is True
    torch.manual_seed(0)
    net = TransUNet(cfg).eval()
    last_bn = net.decoder.blocks[-1].conv2[1]
    with torch.no_grad():
        last_bn.bias.fill_(-50.0)  # every channel of the last block far below zero
    net.decoder.head.weight.grad = None
    net(torch.rand(2, 3, 64, 64)).sum().backward()
    reaches = float(net.decoder.head.weight.grad.abs().sum()) > 0
    assert reaches is (not final_relu)
    assert net.decoder.head.bias.grad is not None  # the bias always learns: that is what drives the trap
