"""Model size: parameters and FLOPs (``torch.utils.flop_counter``; FLOPs = 2 x multiply-adds) of the
teacher (one branch, the fused two-branch model) and of the compact students.

The CPU build of PyTorch runs ``scaled_dot_product_attention`` through
``_scaled_dot_product_flash_attention_for_cpu``, which the flop counter has no formula for; it is
mapped here to the counter's own SDPA formula so attention matmuls are counted on every device
(the published 58.3 GFLOPs of the paper preset includes them).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

from ..config import ModelConfig, model_preset, to_dict
from .fusion import FusionHead
from .students import StudentConfig, build_student, student_config, student_names
from .transunet import TransUNet

__all__ = ["count_params", "count_flops", "model_report", "TwoBranchModel", "student_size", "students_report"]


def _cpu_attention_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(tuple(query.shape), tuple(key.shape), tuple(value.shape))


_cpu_attention_flops._get_raw = True  # type: ignore[attr-defined]  # takes tensors, not shapes


def _attention_flop_mapping() -> dict[Any, Any]:
    cpu_op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_op is None or cpu_op in flop_registry:
        return {}
    return {cpu_op: _cpu_attention_flops}


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass in eval mode on a zero input of ``input_shape`` (N, C, H, W)."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_attention_flop_mapping()) as counter:
            model(torch.zeros(input_shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


class TwoBranchModel(nn.Module):
    """Generative + contrastive TransUNet branches and the fusion head (size reporting only;
    the exported graph is ``pocus_edge.export.fused.FusedSegmenter``)."""

    def __init__(self, cfg: ModelConfig, method: str = "entropy", norm: str = "image", formula: str = "weighted"):
        super().__init__()
        self.generative = TransUNet(cfg, out_channels=1)
        self.contrastive = TransUNet(cfg, out_channels=1)
        self.fusion = FusionHead(method, norm, formula)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fusion(self.generative.predict(x), self.contrastive.predict(x))


class _FusionOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fusion = FusionHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fusion(x[:, :1], x[:, 1:])


def model_report(preset_or_cfg: str | ModelConfig, **overrides: Any) -> dict[str, Any]:
    """Parameters and GFLOPs of a 1-frame forward for one branch (1 output channel) and for the
    fused two-branch model, at the preset's ``img_size``.

    The two branches have the same shape, so the fused figures are 2 x branch + the fusion head
    (elementwise: 0 counted FLOPs, no parameters), which spares building a second network; the
    tests check this against a real :class:`TwoBranchModel`.
    """
    cfg = model_preset(preset_or_cfg, **overrides) if isinstance(preset_or_cfg, str) else preset_or_cfg
    shape = (1, cfg.in_chans, cfg.img_size, cfg.img_size)
    # Shapes are all the counter needs: on the meta device the paper network is built and counted
    # in about a second, without allocating its 400 MB (tests check it equals a real CPU count).
    with torch.device("meta"):
        branch = TransUNet(cfg, out_channels=1)
        fusion = _FusionOnly()
    branch_params = count_params(branch)
    branch_flops = count_flops(branch, shape)
    fusion_flops = count_flops(fusion, (1, 2, cfg.img_size, cfg.img_size))
    fused_params = 2 * branch_params
    fused_flops = 2 * branch_flops + fusion_flops
    return {
        "preset": cfg.name,
        "img_size": cfg.img_size,
        "input_shape": list(shape),
        "model": to_dict(cfg),
        "branch": {"params": branch_params, "flops": branch_flops, "gflops": branch_flops / 1e9},
        "fused": {"params": fused_params, "flops": fused_flops, "gflops": fused_flops / 1e9},
        "flop_convention": "torch.utils.flop_counter, FLOPs = 2 x multiply-adds, batch 1, eval mode",
    }


def student_size(name_or_cfg: str | StudentConfig, preset: str = "paper", **overrides: Any) -> dict[str, Any]:
    """Parameters and FLOPs of one student as deployed (reparameterized where its encoder allows),
    batch 1, at its config's ``img_size``; counted on the meta device like the teacher."""
    cfg = name_or_cfg if isinstance(name_or_cfg, StudentConfig) else student_config(name_or_cfg, preset, **overrides)
    with torch.device("meta"):
        deployed = build_student(cfg).reparameterize()
    flops = count_flops(deployed, (1, cfg.in_chans, cfg.img_size, cfg.img_size))
    return {"student": cfg.name, "preset": cfg.preset, "img_size": cfg.img_size, "encoder": cfg.encoder,
            "encoder_args": dict(cfg.encoder_args), "params": count_params(deployed), "flops": flops, "gflops": flops / 1e9}


def students_report(presets: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Every registered student at every preset (``paper`` = the 224 px deployment input), with
    its GFLOPs as a fraction of the fused teacher's at the same preset."""
    from ..config import PRESETS

    return copy.deepcopy(_students_report(tuple(presets or PRESETS)))


@functools.lru_cache(maxsize=4)
def _students_report(presets: tuple[str, ...]) -> dict[str, Any]:
    # Cached: shapes are fixed by the registry, and counting all of them takes seconds.
    teacher = {p: model_report(p)["fused"]["gflops"] for p in presets}
    rows = []
    for name in student_names():
        for preset in presets:
            row = student_size(name, preset)
            row["teacher_fraction"] = row["gflops"] / teacher[preset]
            rows.append(row)
    return {
        "form": "deployed: reparameterizable blocks fused, batch 1, eval mode",
        "teacher_fused_gflops": teacher,
        "rows": rows,
    }
