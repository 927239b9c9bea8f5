"""The exportable segmenters: what every export target traces and every runtime backend runs.

* :class:`FusedSegmenter`: both fine-tuned branches plus the confidence-aware fusion head as
  ONE module. The paper runs the generative (MIM) and the contrastive TransUNet as two
  separate models and fuses their probabilities in Python; a product ships one graph, which a
  runtime loads once and a compiler (onnxruntime, TensorRT, OpenVINO, Core ML) optimizes end
  to end.
* :class:`SingleSegmenter`: one network (a single TransUNet, or a compact student) with its
  sigmoid: no fusion, one probability output. A first-class exportable model, not a special
  case of the fused pair.

Both share :class:`ExportableSegmenter`: input handling (float frames or uint8 probe pixels),
output names, the reference outputs the parity check compares against, the optional per-frame
``risk`` output (:mod:`pocus_edge.models.risk`: off by default, so a graph without it is the
graph it always was), and the provenance (checkpoint cards and hashes) that goes into the
exported model card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..card import RISK_OUTPUT_NAME
from ..errors import ExportError
from ..metrics import THRESHOLD
from .risk import RISK_FORMULA_SINGLE, RISK_FORMULA_TWO_BRANCH, branch_disagreement, self_disagreement


class ExportableSegmenter(nn.Module):
    """Common interface of the exportable models (see the module docstring).

    Input: preprocessed frames ``(N, 3, S, S)`` float32 in [0, 1]; or, with ``uint8_input``,
    padded/resized grayscale probe pixels ``(N, 1, S, S)`` uint8: the /255 scaling and the
    3-channel repeat then run inside the graph, so a mobile app feeds probe pixels directly.
    """

    kind = "segmenter"
    img_size: int
    uint8_input: bool = False
    return_branches: bool = False
    # With ``risk`` the graph gains a last output ``risk`` (N, 1) float32: one score per frame,
    # computed in the graph from this frame's own outputs (batch independent).
    risk: bool = False
    risk_formula: str = ""

    def __init__(self) -> None:
        super().__init__()
        # Filled by the loaders: each network's checkpoint card and file hash (provenance).
        self.cards: dict[str, Any] = {}
        self.checkpoint_sha256: dict[str, str | None] = {}

    @property
    def cfg(self):
        """The model config of the (first) network; None for networks that carry none."""
        return getattr(self.networks()[0], "cfg", None)

    def networks(self) -> list[nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def fusion_settings(self) -> dict[str, str] | None:
        return None

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        return (batch, 1 if self.uint8_input else 3, self.img_size, self.img_size)

    def example_input(self, batch: int = 1, *, seed: int = 0) -> torch.Tensor:
        """A random input of the right dtype and shape (tracing, smoke tests)."""
        gen = torch.Generator().manual_seed(seed)
        if self.uint8_input:
            return torch.randint(0, 256, self.input_shape(batch), generator=gen, dtype=torch.uint8)
        return torch.rand(self.input_shape(batch), generator=gen)

    def to_model_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N,1,S,S) -> float (N,3,S,S) in [0,1], exactly as preprocess_frame does it
        (float32 division by 255, then the channel repeat)."""
        if not self.uint8_input:
            return x
        scaled = x.to(torch.float32) / 255.0
        return scaled.expand(-1, 3, -1, -1)

    def output_names(self) -> list[str]:
        """The graph's outputs in order: the model's own, then ``risk`` when it is on."""
        return self._own_output_names() + ([RISK_OUTPUT_NAME] if self.risk else [])

    def _own_output_names(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def reference_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(probability, conditioning weight or None) for the parity check: the weight is the
        per-pixel sum of the fusion's normalized confidences, below which the fusion ratio is
        ill conditioned (None: the output is well conditioned everywhere)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def reference_with_risk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """:meth:`reference_outputs` plus the per-frame risk (None when ``risk`` is off), from one
        forward pass: what the parity check compares every output of the artifact with."""
        raise NotImplementedError  # pragma: no cover - abstract


class FusedSegmenter(ExportableSegmenter):
    """Generative + contrastive TransUNet and the fusion head in one forward pass.

    Output: the fused bone probability ``(N, 1, S, S)``; with ``return_branches`` the tuple
    ``(fused, p_generative, p_contrastive, c_generative, c_contrastive)`` (normalized
    confidences: the fusion weight maps users want to see). With ``risk`` the per-frame branch
    disagreement ``1 - softDice(p_generative, p_contrastive)`` ``(N, 1)`` comes last.

    ``norm="image"`` (default) min-max normalizes each frame's confidence on its own, so a
    frame's output never depends on its batch mates (needed for streaming); ``norm="batch"``
    reproduces the released code (normalization over the whole batch tensor).
    """

    kind = "fused-two-branch"

    def __init__(
        self,
        generative: nn.Module,
        contrastive: nn.Module,
        *,
        method: str = "entropy",
        norm: str = "image",
        formula: str = "weighted",
        uint8_input: bool = False,
        return_branches: bool = False,
        risk: bool = False,
    ):
        super().__init__()
        from .fusion import FusionHead

        for name, branch in (("generative", generative), ("contrastive", contrastive)):
            out_channels = getattr(branch, "out_channels", 1)
            if out_channels != 1:
                raise ExportError(
                    f"{name} branch has {out_channels} output channels; a segmenter has 1 "
                    "(is it a MIM pretraining checkpoint rather than a fine-tuned model?)"
                )
        size_g, size_c = generative.cfg.img_size, contrastive.cfg.img_size
        if size_g != size_c:
            raise ExportError(f"branches disagree on the input size ({size_g} vs {size_c}); fine-tune both on the same preset")
        self.generative = generative
        self.contrastive = contrastive
        self.fusion = FusionHead(method=method, norm=norm, formula=formula)
        self.method, self.norm, self.formula = method, norm, formula
        self.uint8_input = bool(uint8_input)
        self.return_branches = bool(return_branches)
        self.risk = bool(risk)
        self.risk_formula = RISK_FORMULA_TWO_BRANCH
        self.img_size = int(size_g)
        self.cards = {"generative": None, "contrastive": None}
        self.checkpoint_sha256 = {"generative": None, "contrastive": None}

    def networks(self) -> list[nn.Module]:
        return [self.generative, self.contrastive]

    @property
    def fusion_settings(self) -> dict[str, str]:
        return {"method": self.method, "norm": self.norm, "formula": self.formula}

    def branch_outputs(self, x: torch.Tensor):
        """``(fused, p_generative, p_contrastive, c_generative, c_contrastive)`` of ``x``: the
        ``return_branches`` outputs, whatever ``return_branches`` is set to."""
        x = self.to_model_input(x)
        p_generative = torch.sigmoid(self.generative(x))
        p_contrastive = torch.sigmoid(self.contrastive(x))
        fused, c_generative, c_contrastive = self.fusion(p_generative, p_contrastive, return_confidence=True)
        return fused, p_generative, p_contrastive, c_generative, c_contrastive

    def reference_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        prob, weight, _ = self.reference_with_risk(x)
        return prob, weight

    def reference_with_risk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        fused, p_g, p_c, c_g, c_c = self.branch_outputs(x)
        # Only the released "weighted" formula divides by the confidences' sum.
        weight = (c_g + c_c) if self.formula == "weighted" else None
        return fused, weight, (branch_disagreement(p_g, p_c) if self.risk else None)

    def forward(self, x: torch.Tensor):
        if self.return_branches:
            outputs = self.branch_outputs(x)
            return (*outputs, branch_disagreement(outputs[1], outputs[2])) if self.risk else outputs
        x = self.to_model_input(x)
        p_generative, p_contrastive = torch.sigmoid(self.generative(x)), torch.sigmoid(self.contrastive(x))
        fused = self.fusion(p_generative, p_contrastive)
        return (fused, branch_disagreement(p_generative, p_contrastive)) if self.risk else fused

    def _own_output_names(self) -> list[str]:
        if self.return_branches:
            return ["fused", "p_generative", "p_contrastive", "c_generative", "c_contrastive"]
        return ["fused"]


class SingleSegmenter(ExportableSegmenter):
    """One segmentation network (logits ``(N, 1, S, S)``) plus its sigmoid: output ``prob``.

    ``network`` needs a 1-channel logit output and either a ``cfg.img_size`` or an explicit
    ``img_size``; ``name`` labels it in the model card (e.g. "student"). A compact student
    (:class:`~pocus_edge.models.students.StudentNet`) makes this a ``kind: student`` model, whose
    export card carries the student's config. With ``risk`` a second output ``risk`` (N, 1):
    ``1 - softDice(prob, [prob > 0.5])``, how much of the predicted bone is undecided."""

    kind = "single-network"

    def __init__(self, network: nn.Module, *, img_size: int | None = None, uint8_input: bool = False, name: str = "network",
                 risk: bool = False):
        super().__init__()
        from .students import StudentNet

        if isinstance(network, StudentNet):
            self.kind = "student"
        out_channels = getattr(network, "out_channels", 1)
        if out_channels != 1:
            raise ExportError(f"{name} has {out_channels} output channels; a segmenter has 1")
        size = img_size if img_size is not None else getattr(getattr(network, "cfg", None), "img_size", None)
        if not size:
            raise ExportError(f"{name}: give img_size (the network carries no cfg.img_size)")
        self.network = network
        self.name = name
        self.img_size = int(size)
        self.uint8_input = bool(uint8_input)
        self.risk = bool(risk)
        self.risk_formula = RISK_FORMULA_SINGLE
        self.cards = {name: None}
        self.checkpoint_sha256 = {name: None}

    def networks(self) -> list[nn.Module]:
        return [self.network]

    def forward(self, x: torch.Tensor):
        prob = torch.sigmoid(self.network(self.to_model_input(x)))
        # The mask threshold of the card (0.5): the risk measures the distance to the mask shown.
        return (prob, self_disagreement(prob, THRESHOLD)) if self.risk else prob

    def reference_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        prob, _, _ = self.reference_with_risk(x)
        return prob, None

    def reference_with_risk(self, x: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor | None]:
        prob = torch.sigmoid(self.network(self.to_model_input(x)))
        return prob, None, (self_disagreement(prob, THRESHOLD) if self.risk else None)

    def _own_output_names(self) -> list[str]:
        return ["prob"]


def load_fused(
    generative_ckpt: str | Path,
    contrastive_ckpt: str | Path,
    *,
    method: str = "entropy",
    norm: str = "image",
    formula: str = "weighted",
    uint8_input: bool = False,
    return_branches: bool = False,
    risk: bool = False,
) -> FusedSegmenter:
    """Build a FusedSegmenter (eval mode) from two fine-tuned segmenter checkpoints."""
    from ..io import sha256_file
    from .weights import build_segmenter

    generative, card_g = build_segmenter(generative_ckpt)
    contrastive, card_c = build_segmenter(contrastive_ckpt)
    for path, card in ((generative_ckpt, card_g), (contrastive_ckpt, card_c)):
        _require_segmenter(path, card)
    if card_g.get("model") != card_c.get("model"):
        raise ExportError(
            f"{generative_ckpt} and {contrastive_ckpt}: the branches have different model configs "
            f"({card_g.get('preset')!r} vs {card_c.get('preset')!r}); both must share one preset"
        )
    fused = FusedSegmenter(
        generative,
        contrastive,
        method=method,
        norm=norm,
        formula=formula,
        uint8_input=uint8_input,
        return_branches=return_branches,
        risk=risk,
    )
    fused.cards = {"generative": card_g, "contrastive": card_c}
    fused.checkpoint_sha256 = {
        "generative": sha256_file(generative_ckpt),
        "contrastive": sha256_file(contrastive_ckpt),
    }
    return fused.eval()


def load_single(checkpoint: str | Path, *, uint8_input: bool = False, risk: bool = False) -> SingleSegmenter:
    """Build a SingleSegmenter (eval mode) from one checkpoint: a fine-tuned TransUNet branch, or
    a compact student (card ``kind: student``), which comes back in its reparameterized
    inference form (the same function, fewer and cheaper layers: what export and streaming run)."""
    from ..card import is_student_card
    from ..io import sha256_file
    from .weights import build_segmenter

    network, card = build_segmenter(checkpoint)
    _require_segmenter(checkpoint, card)
    student = is_student_card(card)
    if student and not getattr(network, "reparameterized", False):
        network = network.reparameterize()
    name = "student" if student else str(card.get("stage") or "network")
    model = SingleSegmenter(network, uint8_input=uint8_input, name=name, risk=risk)
    model.cards = {model.name: card}
    model.checkpoint_sha256 = {model.name: sha256_file(checkpoint)}
    return model.eval()


def _require_segmenter(path, card: dict) -> None:
    if int(card.get("out_channels", 1)) != 1:
        raise ExportError(
            f"{path}: has {card.get('out_channels')} output channels (stage {card.get('stage')!r}); "
            "export needs fine-tuned segmenters (1 output channel)"
        )
