"""The backend contract every artifact runner follows, and the helpers the runners share.

* ``prepare(frame uint8 HxW) -> model input for one frame``: the training preprocessing
  (``preprocess_frame``), or ``preprocess_gray`` for graphs exported with uint8 input (they
  scale and repeat channels inside the graph).
* ``infer(x float32 (N,3,S,S)) -> fused probability (N,1,S,S)``: the cross-team contract.
* ``run(batch) -> {"prob": (N,1,S,S), "weight": (N,1,S,S) or absent, "risk": (N,1) or absent}``
  on prepared inputs; ``weight`` is the generative branch's share of the fusion,
  c_g / (c_g + c_c), when the graph exports its branch outputs; ``risk`` is the graph's per-frame
  risk output (float32, one score per frame) when it has one.

Attributes: ``name``, ``img_size``, ``precision``, ``device``, ``input_dtype``, ``card``,
``gflops_per_frame`` (from the model card, else counted from the graph), ``has_risk`` (the graph
has the ``risk`` output) and ``risk_card`` (the card's ``risk`` entry, ``{"formula", "threshold",
"drift"}``, when the graph has the output; else None; also ``describe()["risk"]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..card import RISK_OUTPUT_NAME
from ..errors import ExportError


class Backend:
    """One opened artifact (see the module docstring). Subclasses implement ``_run``; the
    registry (:mod:`.registry`) opens them."""

    name = "backend"
    img_size: int
    precision: str = "fp32"
    device: str = "cpu"
    input_dtype: str = "float32"  # or "uint8": input (N,1,S,S) of preprocess_gray pixels
    card: dict
    threshold: float = 0.5
    has_weight_map: bool = False
    has_risk: bool = False  # the graph has the per-frame "risk" output; run() then returns it
    max_batch: int | None = None  # a graph with a fixed batch size runs in chunks of it

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        from ..data.transforms import preprocess_frame, preprocess_gray

        if self.input_dtype == "uint8":
            return preprocess_gray(frame, self.img_size)[None]
        return preprocess_frame(frame, self.img_size)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.max_batch is not None and batch.shape[0] > self.max_batch:
            parts = [self._run(batch[i : i + self.max_batch]) for i in range(0, batch.shape[0], self.max_batch)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return self._run(batch)

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def infer(self, x: np.ndarray) -> np.ndarray:
        """float32 (N,3,S,S) in [0,1] -> fused probability (N,1,S,S)."""
        return self.infer_outputs(x)["prob"]

    def infer_outputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """float32 (N,3,S,S) in [0,1] -> every output :meth:`run` returns (``prob``, and
        ``weight`` / ``risk`` where the graph has them)."""
        x = np.asarray(x)
        if self.input_dtype == "uint8" and x.dtype != np.uint8:
            # The same pixels the uint8 graph would get: undo the /255 of preprocess_frame.
            x = np.clip(np.rint(x[:, :1] * 255.0), 0, 255).astype(np.uint8)
        elif self.input_dtype == "float16":
            x = x.astype(np.float16)
        return self.run(np.ascontiguousarray(x))

    @property
    def risk_card(self) -> dict[str, Any] | None:
        """The model card's ``risk`` entry (``formula``, ``threshold``, ``drift``: the alarm
        threshold and the drift band ``pocus-edge qualify`` calibrated, each None when nothing
        calibrated it) when the graph computes the risk output; None otherwise. A graph with the
        output but a card without the entry (built by hand) gives the three keys, all None."""
        if not self.has_risk:
            return None
        entry = (self.card or {}).get("risk")
        return {"formula": None, "threshold": None, "drift": None, **(entry if isinstance(entry, dict) else {})}

    @property
    def gflops_per_frame(self) -> float | None:
        value = (self.card or {}).get("gflops_per_frame")
        return float(value) if value is not None else None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "precision": self.precision,
            "device": self.device,
            "img_size": self.img_size,
            "input_dtype": self.input_dtype,
            "gflops_per_frame": self.gflops_per_frame,
            "risk": self.risk_card,
        }

    def close(self) -> None:
        pass


# A graph whose input is a reduced-precision float computes (at least) its first layers at it.
INPUT_PRECISIONS = {"float16": "fp16", "bfloat16": "bf16"}


def precision_of(card: dict | None, input_dtype: str, default: str = "fp32") -> str:
    """The precision a backend reports: the card's, unless the graph's own input type says
    otherwise (a float16 input is an fp16 graph even when its card, copied from the fp32 export
    by a converter, still says fp32, or when it has no card); else ``default``."""
    stated = (card or {}).get("precision")
    from_input = INPUT_PRECISIONS.get(input_dtype)
    if from_input is not None and stated in (None, "", "fp32", "unknown"):
        return from_input
    return str(stated or default)


def weight_map(c_g: np.ndarray, c_c: np.ndarray) -> np.ndarray:
    return (c_g / (c_g + c_c + 1e-6)).astype(np.float32)


def check_segmenter_io(path, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], card: dict | None) -> int:
    """Refuse, with one line naming the file, a graph the runtime cannot drive: one input of
    rank 4 (N, 3, S, S) float or (N, 1, S, S) uint8, square and of the card's size, and a first
    output of rank 4 with one channel. Returns the input size S."""
    if len(inputs) != 1:
        raise ExportError(f"{path}: the graph has {len(inputs)} inputs; a segmenter takes one (N,C,S,S) frame batch")
    shape, dtype = list(inputs[0]["shape"]), inputs[0]["dtype"]
    static = [d if isinstance(d, int) and d > 0 else None for d in shape]
    if len(shape) != 4:
        raise ExportError(f"{path}: input {inputs[0]['name']!r} has rank {len(shape)}; expected 4 (N,C,S,S)")
    channels = 1 if dtype == "uint8" else 3
    if static[1] is not None and static[1] != channels:
        raise ExportError(f"{path}: input {inputs[0]['name']!r} has {static[1]} channels; a {dtype} input needs {channels}")
    if static[2] is not None and static[3] is not None and static[2] != static[3]:
        raise ExportError(f"{path}: input {inputs[0]['name']!r} is {static[2]}x{static[3]}; the runtime feeds square frames")
    size = int((card or {}).get("img_size") or static[3] or 0)
    if not size:
        raise ExportError(f"{path}: cannot tell the input size (no model card, dynamic spatial axes)")
    if static[3] is not None and static[3] != size:
        raise ExportError(f"{path}: input is {static[3]} wide but its model card says img_size {size}")
    if not outputs:
        raise ExportError(f"{path}: the graph has no outputs")
    out_shape = list(outputs[0]["shape"])
    if len(out_shape) != 4:
        raise ExportError(f"{path}: output {outputs[0]['name']!r} has rank {len(out_shape)}; expected a probability map (N,1,S,S)")
    if isinstance(out_shape[1], int) and out_shape[1] > 0 and out_shape[1] != 1:
        raise ExportError(f"{path}: output {outputs[0]['name']!r} has {out_shape[1]} channels; expected 1 (bone probability)")
    for output in outputs[1:]:
        if output["name"] != RISK_OUTPUT_NAME:
            continue
        risk_shape = list(output["shape"])
        if len(risk_shape) != 2 or (isinstance(risk_shape[1], int) and risk_shape[1] > 0 and risk_shape[1] != 1):
            raise ExportError(f"{path}: output {RISK_OUTPUT_NAME!r} has shape {risk_shape}; expected one score per frame (N,1)")
    return size


def has_risk_output(output_names: list[str]) -> bool:
    """Whether a graph's outputs include the per-frame risk (always its last output)."""
    return RISK_OUTPUT_NAME in output_names


def named_outputs(named: dict[str, Any], has_weight_map: bool) -> dict[str, np.ndarray]:
    """The backend contract from a graph's named outputs: ``prob`` = "fused" (the fused pair),
    "prob" (a single network) or else the first output; ``weight`` from the confidences;
    ``risk`` (N, 1) float32 when the graph has that output."""
    values = list(named.values())
    prob = named.get("fused", named.get("prob", values[0]))
    result = {"prob": np.asarray(prob, dtype=np.float32)}
    if has_weight_map:
        c_g = named.get("c_generative", values[3] if len(values) == 5 else None)
        c_c = named.get("c_contrastive", values[4] if len(values) == 5 else None)
        result["weight"] = weight_map(np.asarray(c_g, np.float32), np.asarray(c_c, np.float32))
    if RISK_OUTPUT_NAME in named:
        risk = np.asarray(named[RISK_OUTPUT_NAME], dtype=np.float32)
        result["risk"] = risk.reshape(risk.shape[0], 1)
    return result


def split_paths(model_path) -> list[Path]:
    """One path, two comma-separated checkpoints (``GEN,CON``), or a list of paths."""
    if isinstance(model_path, (list, tuple)):
        return [Path(p) for p in model_path]
    return [Path(p) for p in str(model_path).split(",") if p]


def to_frame_resolution(prob: np.ndarray, frame_shape: tuple[int, int]) -> np.ndarray:
    """Model-resolution map (S,S) -> frame resolution (H,W), undoing preprocess_frame's
    bottom/right zero pad and square resize."""
    import cv2

    h, w = frame_shape
    side = max(h, w)
    up = cv2.resize(prob.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    return up[:h, :w]
