"""Core ML: a ``.mlpackage`` predicted with coremltools (macOS only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..card import CARD_KEY, parse_card
from ..errors import ExportError, ToolchainUnavailable
from .base import Backend, has_risk_output


class CoreMLBackend(Backend):
    """A Core ML package (``.mlpackage``, grayscale image input of the probe's frame shape)
    predicted with coremltools; macOS only. ``prepare`` hands over the raw frame (the package
    pads and resizes in-graph); ``run`` predicts frame by frame, as an app does."""

    name = "coreml"
    input_dtype = "frame"

    def __init__(self, path: str | Path, *, device: str = "all"):
        import platform

        self.path = Path(path)
        if not self.path.is_dir():
            raise ExportError(f"{self.path}: Core ML package not found (a .mlpackage folder)")
        if platform.system() != "Darwin":
            raise ToolchainUnavailable(f"{self.path}: Core ML prediction needs macOS (this is {platform.system()})")
        try:
            import coremltools as ct
        except ImportError:
            raise ToolchainUnavailable(f"{self.path}: coremltools is not installed (pip install 'pocus-edge[coreml]')") from None
        self.model = ct.models.MLModel(str(self.path), compute_units=ct.ComputeUnit.ALL)
        spec = self.model.get_spec()
        self.card = parse_card(dict(spec.description.metadata.userDefined).get(CARD_KEY), self.path) or {}
        image = spec.description.input[0].type.imageType
        self.input_name = spec.description.input[0].name
        self.output_name = spec.description.output[0].name  # "fused" (the pair) or "prob" (one network)
        self.has_risk = has_risk_output([o.name for o in spec.description.output])  # then "risk" (1, 1) comes last
        self.frame_shape = (int(image.height), int(image.width))
        self.img_size = int(self.card.get("img_size") or 0) or int(spec.description.output[0].type.multiArrayType.shape[-1])
        self.precision = str(self.card.get("precision") or "fp16")
        self.threshold = float(self.card.get("threshold", 0.5))
        self.device = device

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        import cv2

        if frame.shape != self.frame_shape:
            frame = cv2.resize(frame, self.frame_shape[::-1], interpolation=cv2.INTER_LINEAR)
        return frame

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Float frames (N,3,S,S) in [0,1] at the package's frame shape (its image input)."""
        gray = np.clip(np.rint(np.asarray(x)[:, 0] * 255.0), 0, 255).astype(np.uint8)
        return self.run(gray)["prob"]

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        from PIL import Image

        predictions = [self.model.predict({self.input_name: Image.fromarray(np.asarray(f).reshape(self.frame_shape))}) for f in batch]
        out = [np.asarray(p[self.output_name], dtype=np.float32) for p in predictions]
        result = {"prob": np.concatenate(out).reshape(len(batch), 1, self.img_size, self.img_size)}
        if self.has_risk:
            result["risk"] = np.concatenate([np.asarray(p["risk"], dtype=np.float32).reshape(1, 1) for p in predictions])
        return result

