"""PyTorch, the reference: one checkpoint or the fused pair (``GEN,CON``) of safetensors files.
torch is imported when the backend is opened, never at import."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ToolchainUnavailable
from .base import Backend, split_paths, weight_map


class TorchBackend(Backend):
    """Reference backend: two fine-tuned checkpoints (``GEN,CON``) -> FusedSegmenter, or one
    checkpoint -> a SingleSegmenter. torch is imported here, when the backend is opened.

    As the reference it computes every output an export can have: the weight map (the pair)
    and the per-frame ``risk`` (two sums per frame, negligible next to the networks); its
    ``risk_card`` names the formula, with no calibrated threshold or drift band (those live in
    an exported model's card)."""

    name = "torch"

    def __init__(self, model_path: str | Path | tuple | list, *, device: str = "cpu", fusion: dict | None = None):
        try:
            import torch
        except ImportError:
            raise ToolchainUnavailable("the torch backend needs PyTorch (pip install 'pocus-edge[train]')") from None
        from ..models.fused import load_fused, load_single

        self._torch = torch
        paths = split_paths(model_path)
        self.device = device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ToolchainUnavailable(f"device {device!r} asked for, but no CUDA GPU is visible")
        if len(paths) == 2:
            model = load_fused(paths[0], paths[1], return_branches=True, risk=True, **(fusion or {}))
            self.has_weight_map = True
            self.card = {"preset": model.generative.cfg.name, "fusion": model.fusion_settings}
        elif len(paths) == 1:
            model = load_single(paths[0], risk=True)  # a student comes back reparameterized (its inference form)
            card = model.cards[model.name] or {}
            self.card = {"preset": card.get("preset"), "stage": card.get("stage"), "kind": model.kind}
            if model.kind == "student":
                # A student's checkpoint card carries its deployed GFLOPs per frame.
                self.card.update(student=card.get("student"), gflops_per_frame=card.get("gflops_per_frame"))
        else:
            raise CheckpointError(f"{model_path}: the torch backend takes one checkpoint or two (GEN,CON)")
        self.card["risk"] = {"formula": model.risk_formula, "threshold": None, "drift": None}
        self.has_risk = True
        self.img_size = int(model.img_size)
        self.model = model.eval().to(device)
        self.precision = "fp32"
        self._counted: float | None = None

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            out = [o.float().cpu().numpy() for o in self.model(x)]
            result = {"prob": out[0], "risk": out[-1]}
            if self.has_weight_map:
                result["weight"] = weight_map(out[3], out[4])
            return result

    @property
    def gflops_per_frame(self) -> float | None:
        from_card = super().gflops_per_frame
        if from_card is not None:
            return from_card
        if self._counted is None:
            from ..models.flops import count_flops

            self._counted = count_flops(self.model, (1, 3, self.img_size, self.img_size)) / 1e9
        return self._counted

