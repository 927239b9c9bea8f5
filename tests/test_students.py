"""Compact students (timm encoder + light decoder): registry, shapes, sizes, reparameterization,
ONNX export; the distillation loss."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pocus_edge.config import PRESETS, model_preset
from pocus_edge.errors import ConfigError
from pocus_edge.losses import dice_bce, distillation_loss, soft_bce
from pocus_edge.models.flops import count_flops, count_params, model_report, student_size, students_report
from pocus_edge.models.students import (
    STUDENTS,
    StudentNet,
    build_student,
    is_student_config,
    student_config,
    student_from_dict,
)

ALL = [(name, preset) for name in STUDENTS for preset in PRESETS]


def _randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine terms, so a wrong conv/BN fusion cannot hide behind
    the identity statistics of a fresh network."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            module.weight.data.copy_(0.5 + torch.rand(n, generator=gen))
            module.bias.data.copy_(0.1 * torch.randn(n, generator=gen))


# ---------------------------------------------------------------------------------------------
# Registry and shapes


@pytest.mark.parametrize("name,preset", ALL)
def test_student_output_contract_at_every_preset(name, preset):
    model = build_student(name, preset).eval()
    size = model_preset(preset).img_size
    assert model.img_size == size and model.cfg.preset == preset
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        prob = model.predict(x)
    assert logits.shape == (2, 1, size, size)
    assert torch.equal(prob, torch.sigmoid(logits))
    assert torch.isfinite(logits).all()
    # Frames are independent in eval mode: a frame's output does not depend on its batch mate.
    with torch.no_grad():
        alone = model(x[:1])
    torch.testing.assert_close(alone, logits[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(STUDENTS))
def test_any_multiple_of_32_builds_and_others_are_refused(name):
    for size in (32, 96):
        model = build_student(name, "tiny", img_size=size).eval()
        with torch.no_grad():
            assert model(torch.rand(1, 3, size, size)).shape == (1, 1, size, size)
    for size in (48, 100, 0):
        with pytest.raises(ConfigError, match="img_size"):
            build_student(name, "tiny", img_size=size)


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ConfigError, match="unknown student 'resnet'.*mobilenetv3"):
        build_student("resnet")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        build_student("mobilenetv3", "huge")
    with pytest.raises(ConfigError, match="timm cannot build"):
        StudentNet(student_config("mobilenetv3", "tiny", encoder="no_such_model_xyz"))


def test_students_are_built_without_downloading(monkeypatch):
    """Random init only: any attempt to fetch pretrained weights fails the build."""
    import timm.models._builder as builder

    def refuse(*args, **kwargs):
        raise AssertionError("a student tried to load pretrained weights")

    monkeypatch.setattr(builder, "load_pretrained", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    for name in STUDENTS:
        build_student(name, "tiny")


def test_same_seed_same_student_and_different_seeds_differ():
    def weights(seed):
        torch.manual_seed(seed)
        return torch.cat([p.detach().flatten() for p in build_student("efficientvit", "tiny").parameters()])

    assert torch.equal(weights(3), weights(3))
    assert not torch.equal(weights(3), weights(4))


def test_config_round_trips_through_a_card():
    cfg = student_config("fastvit", "tiny", decoder_channels="16,8,8")
    card = json.loads(json.dumps(cfg.to_dict()))  # what a checkpoint / ONNX card stores
    assert is_student_config(card) and not is_student_config({"name": "paper", "img_size": 224})
    rebuilt = student_from_dict(card)
    assert rebuilt == cfg and rebuilt.decoder_channels == (16, 8, 8)
    torch.manual_seed(0)
    a = build_student(cfg)
    torch.manual_seed(0)
    b = build_student(rebuilt)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_decoder_resolution_follows_its_block_count():
    """4 blocks from stride 32 end at 1/2 (logit upsampled x2); 5 end at full resolution with the
    input as the last skip; 6 cannot exist."""
    four = build_student("mobilenetv3", "tiny")
    assert four.decoder.output_reduction == 2 and four.decoder.skip_index == [3, 2, 1, 0]
    five = build_student("mobilenetv3", "tiny", decoder_channels=(16, 8, 8, 8, 4))
    assert five.decoder.output_reduction == 1 and five.decoder.skip_index[-1] == -1
    assert five.decoder.blocks[-1].conv[0].in_channels == 8 + 1  # previous width + grayscale input
    # EfficientViT's first map is at 1/4: no encoder skip at 1/2.
    vit = build_student("efficientvit", "tiny")
    assert vit.reductions == [4, 8, 16, 32] and vit.decoder.skip_index == [2, 1, 0, None]
    with pytest.raises(ConfigError, match="allows 5"):
        build_student("mobilenetv3", "tiny", decoder_channels=(8,) * 6)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert five.eval()(x).shape == (1, 1, 64, 64)


# ---------------------------------------------------------------------------------------------
# Reparameterization


@pytest.mark.parametrize("name", list(STUDENTS))
def test_reparameterized_student_computes_the_same_function(name):
    torch.manual_seed(0)
    model = build_student(name, "tiny")
    _randomize_batchnorm(model)
    model.eval()
    fused = model.reparameterize()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
    assert fused.reparameterized and not model.reparameterized
    if model.cfg.reparameterizable:
        # Multi-branch blocks are gone from the copy (fewer tensors), the original keeps them.
        assert len(fused.state_dict()) < len(model.state_dict())
        assert count_params(fused) < count_params(model)
        model.train()(x).mean().backward()  # the training form still trains


# ---------------------------------------------------------------------------------------------
# Sizes


def _decoder_flops_by_hand(model: StudentNet) -> int:
    """FLOPs (2 x MACs) of the decoder's convolutions from the config alone."""
    cfg, size = model.cfg, model.cfg.img_size
    side = size // model.reductions[-1]
    macs = model.feature_channels[-1] * cfg.decoder_head_channels * side * side  # 1x1 squeeze
    width = cfg.decoder_head_channels
    skip_at = dict(zip(model.reductions[:-1], model.feature_channels[:-1]))
    skip_at[1] = 1
    reduction = model.reductions[-1]
    for out in cfg.decoder_channels:
        reduction //= 2
        side *= 2
        cin = width + skip_at.get(reduction, 0)
        macs += cin * 9 * side * side + cin * out * side * side  # depthwise 3x3 + pointwise 1x1
        width = out
    macs += width * 9 * side * side  # 3x3 head to one channel
    return 2 * macs


@pytest.mark.parametrize("name", list(STUDENTS))
def test_flop_count_is_encoder_plus_decoder_by_hand(name):
    model = build_student(name, "small").eval()
    shape = (1, 3, 128, 128)
    encoder_flops = count_flops(model.encoder, shape)
    assert count_flops(model, shape) == encoder_flops + _decoder_flops_by_hand(model)
    # The report counts the deployed form on the meta device: the same figure as a CPU count.
    report = student_size(name, "small")
    assert report["flops"] == count_flops(model.reparameterize(), shape)
    assert report["params"] == count_params(model.reparameterize())


def test_students_meet_the_size_goals_and_tiny_stays_tiny():
    """At 224 px: <= 1/30 of the fused teacher's GFLOPs and <= 10 M weights (an int8 artifact
    stores about one byte per weight: the 10 MB goal). At tiny: cheaper than the tiny teacher."""
    report = students_report()
    teacher = report["teacher_fused_gflops"]
    assert teacher["paper"] == pytest.approx(model_report("paper")["fused"]["gflops"])
    rows = {(r["student"], r["preset"]): r for r in report["rows"]}
    assert set(rows) == set(ALL)
    for name in STUDENTS:
        paper = rows[(name, "paper")]
        assert paper["img_size"] == 224
        assert paper["gflops"] <= teacher["paper"] / 30
        assert paper["params"] <= 10_000_000
        assert rows[(name, "small")]["params"] == paper["params"]  # small trains what ships
        assert rows[(name, "tiny")]["gflops"] < teacher["tiny"]
        assert rows[(name, "tiny")]["params"] < 300_000
        assert rows[(name, "tiny")]["teacher_fraction"] == pytest.approx(rows[(name, "tiny")]["gflops"] / teacher["tiny"])


def test_flops_command_lists_the_students(capsys):
    from pocus_edge.cli import main

    assert main(["flops", "--preset", "tiny", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["students"] == json.loads(json.dumps(students_report()))
    assert main(["flops", "--preset", "tiny"]) == 0
    table = capsys.readouterr().out
    for name in STUDENTS:
        assert name in table
    assert f"{student_size('mobilenetv3', 'paper')['params']:,}" in table
    assert main(["flops", "--preset", "tiny", "--json", "--no-students"]) == 0
    assert "students" not in json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------
# ONNX


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STUDENTS))
def test_deployed_student_exports_to_onnx_and_runs_in_onnxruntime(name, tmp_path):
    import onnxruntime as ort

    class Probability(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.predict(x)

    torch.manual_seed(0)
    model = build_student(name, "tiny")
    _randomize_batchnorm(model)
    deployed = model.eval().reparameterize()
    graph = Probability(deployed).eval()
    x = torch.rand(1, 3, 64, 64)
    path = tmp_path / f"{name}.onnx"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        program = torch.onnx.export(graph, (x,), dynamo=True, opset_version=18,
                                    input_names=["frames"], output_names=["prob"])
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"frames": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model.predict(x).numpy(), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Distillation loss


def _soft_bce_brute_force(p: np.ndarray, t: np.ndarray, w: np.ndarray | None = None) -> float:
    total, weight_sum = 0.0, 0.0
    for pi, ti, wi in zip(p.ravel(), t.ravel(), (np.ones(p.size) if w is None else w.ravel())):
        log_p = max(math.log(pi), -100.0) if pi > 0 else -100.0
        log_q = max(math.log(1.0 - pi), -100.0) if pi < 1 else -100.0
        total += wi * -(ti * log_p + (1.0 - ti) * log_q)
        weight_sum += wi
    return total / weight_sum


def _maps(seed: int, shape=(2, 1, 5, 6)):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen), torch.rand(shape, generator=gen), torch.rand(shape, generator=gen))


def test_soft_bce_matches_the_formula_pixel_by_pixel():
    p, t, w = _maps(0)
    p[0, 0, 0, 0], p[0, 0, 0, 1] = 0.0, 1.0  # saturated pixels: the -100 clamp
    assert soft_bce(p, t).item() == pytest.approx(_soft_bce_brute_force(p.numpy(), t.numpy()), rel=1e-5)
    assert soft_bce(p, t, w).item() == pytest.approx(_soft_bce_brute_force(p.numpy(), t.numpy(), w.numpy()), rel=1e-5)
    # A per-frame weight broadcasts over the pixels.
    per_frame = torch.tensor([0.25, 1.0]).view(2, 1, 1, 1)
    expected = _soft_bce_brute_force(p.numpy(), t.numpy(), per_frame.expand_as(p).numpy())
    assert soft_bce(p, t, per_frame).item() == pytest.approx(expected, rel=1e-5)
    assert soft_bce(p, t, torch.ones_like(p)).item() == pytest.approx(soft_bce(p, t).item(), rel=1e-6)


def test_soft_bce_with_hard_targets_is_pytorchs_bce_and_dice_bces_bce_term():
    p, _, _ = _maps(1)
    y = (torch.rand(p.shape, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    assert soft_bce(p, y).item() == pytest.approx(F.binary_cross_entropy(p, y).item(), rel=1e-6)
    dice = 1.0 - (2.0 * (p * y).sum() + 1.0) / (p.sum() + y.sum() + 1.0)
    assert (dice_bce(p, y) - dice).item() == pytest.approx(soft_bce(p, y).item(), rel=1e-5)


def test_soft_bce_gradient_on_the_logit_is_the_weighted_error():
    """d loss / d z = w (sigmoid(z) - t) / sum(w): zero exactly where the student equals the teacher."""
    _, t, w = _maps(3)
    z = torch.randn(t.shape, generator=torch.Generator().manual_seed(4), requires_grad=True)
    soft_bce(torch.sigmoid(z), t, w).backward()
    expected = w * (torch.sigmoid(z.detach()) - t) / w.sum()
    torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-7)
    # Student = teacher: stationary point.
    z_star = torch.logit(t).clone().requires_grad_(True)
    soft_bce(torch.sigmoid(z_star), t, w).backward()
    assert z_star.grad.abs().max() < 1e-6


def test_soft_bce_is_minimal_where_the_student_equals_the_teacher():
    targets = torch.tensor([0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
    grid = torch.linspace(0.0005, 0.9995, 1999)
    for t in targets:
        losses = torch.stack([soft_bce(g.view(1), t.view(1)) for g in grid])
        best = grid[int(losses.argmin())]
        assert abs(float(best) - min(max(float(t), 0.0005), 0.9995)) < 1e-3
    # And its value there is the teacher's binary entropy, not 0.
    t = torch.tensor([0.2, 0.7])
    entropy = -(t * t.log() + (1 - t) * (1 - t).log()).mean()
    assert soft_bce(t, t).item() == pytest.approx(entropy.item(), rel=1e-6)


def test_soft_bce_weights_silence_pixels_and_never_divide_by_zero():
    p, t, _ = _maps(5)
    p.requires_grad_(True)
    w = torch.ones_like(t)
    w[:, :, :2] = 0.0
    soft_bce(p, t, w).backward()
    assert (p.grad[:, :, :2] == 0).all() and (p.grad[:, :, 2:] != 0).any()
    zero = soft_bce(p, t, torch.zeros_like(t))
    assert zero.item() == 0.0 and torch.isfinite(zero)
    teacher = t.clone().requires_grad_(True)
    soft_bce(p.detach().requires_grad_(True), teacher).backward()
    assert teacher.grad is None  # the teacher is a target, never trained


def test_soft_bce_refuses_mismatched_shapes():
    p, t, _ = _maps(6)
    with pytest.raises(ValueError, match="differ in shape"):
        soft_bce(p, t[:1])
    with pytest.raises(ValueError, match="does not broadcast"):
        soft_bce(p, t, torch.ones(3, 1, 1, 1))


def test_distillation_loss_is_the_weighted_sum_of_its_terms():
    p_target, teacher, conf = _maps(7)
    p_source, _, _ = _maps(8)
    mask = (p_source > 0.6).float()
    total = distillation_loss(p_target, teacher, p_source, mask, teacher_weight=conf, soft_weight=0.5)
    expected = 0.5 * _soft_bce_brute_force(p_target.numpy(), teacher.numpy(), conf.numpy()) + dice_bce(p_source, mask).item()
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert distillation_loss(p_target, teacher).item() == pytest.approx(soft_bce(p_target, teacher).item())
    with pytest.raises(ValueError, match="both or neither"):
        distillation_loss(p_target, teacher, p_source)
    with pytest.raises(ValueError, match="soft_weight"):
        distillation_loss(p_target, teacher, soft_weight=-1.0)


def test_a_tiny_student_learns_a_teacher_map():
    """A few Adam steps on the soft loss alone move a random student towards a fixed teacher map."""
    torch.manual_seed(0)
    student = build_student("mobilenetv3", "tiny")
    x = torch.rand(4, 3, 64, 64)
    yy = torch.linspace(0, 1, 64).view(1, 1, 64, 1)
    teacher = torch.sigmoid(8 * (yy - 0.5)).expand(4, 1, 64, 64)  # a soft horizontal edge
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = soft_bce(torch.sigmoid(student(x)), teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    floor = soft_bce(teacher, teacher).item()
    assert losses[-1] - floor < 0.5 * (losses[0] - floor)
