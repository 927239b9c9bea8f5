"""Evaluation of one or more segmenters on ONE site's labeled split (usually the target test).

Writes ``per_image.csv`` (model, frame, Dice, IoU), ``summary.json`` and ``summary.md`` (mean
table + pairwise Wilcoxon signed-rank p-values on per-image Dice), and overlay PNGs of each
model's worst and best frames (green = ground truth outline, red = prediction outline). With two
models and ``fusion`` methods, the fused model(s) are scored too (first model = generative /
MIM branch, second = contrastive branch, as in :func:`pocus_edge.models.fusion.fuse`).
"""

from __future__ import annotations

import csv
import io
import itertools
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data.layout import FrameRecord
from ..data.transforms import preprocess_frame, preprocess_mask
from ..errors import CheckpointError, TrainingError
from ..io import write_bytes_atomic, write_json_atomic, write_text_atomic
from ..metrics import THRESHOLD, Summary, dice_iou_per_image, summarize, wilcoxon_p
from .common import open_one_site
from .distributed import resolve_device

# Printed under the p-values (docs/study.md, "No frame-level p-values"): they test frames of one
# training run per model, which are neither independent (a few patients) nor a sample of seeds.
WILCOXON_CAVEAT = (
    "p-values over the frames of one training run per model: frames of a few patients are not independent, "
    "and one run is not evidence across training seeds; `pocus-edge study` compares methods over seeds "
    "(docs/study.md)."
)


@dataclass
class EvaluationResult:
    site: str
    split: str
    names: list[str]
    records: list[FrameRecord]
    dice: dict[str, np.ndarray]
    iou: dict[str, np.ndarray]
    summaries: dict[str, Summary]
    wilcoxon: dict[str, float]
    out_dir: Path | None = None
    overlays: list[Path] = field(default_factory=list)
    # Per model: its card's "did not train" flag (source-validation Dice < 0.1 at the first
    # validation), None where the card has none (a fusion, an older checkpoint).
    did_not_train: dict[str, bool | None] = field(default_factory=dict)

    def table(self) -> str:
        """Markdown mean table (+ p-values)."""
        lines = ["| model | n | Dice (mean ± sd) | IoU (mean ± sd) |", "|---|---|---|---|"]
        for n in self.names:
            s = self.summaries[n]
            flag = " **(did not train)**" if self.did_not_train.get(n) else ""
            lines.append(f"| {n}{flag} | {s.n} | {s.dice_mean:.4f} ± {s.dice_std:.4f} | {s.iou_mean:.4f} ± {s.iou_std:.4f} |")
        if any(self.did_not_train.values()):
            lines += ["", "A model marked *did not train* had a source-validation Dice below 0.1 at its first "
                      "validation (its model card says so): it predicts (almost) empty masks, and its scores say "
                      "nothing about the method."]
        if self.wilcoxon:
            lines += ["", "| pair (Wilcoxon on per-image Dice, frames of one run each) | p |", "|---|---|"]
            lines += [f"| {k} | {v:.3g} |" for k, v in self.wilcoxon.items()]
            lines += ["", WILCOXON_CAVEAT]
        return "\n".join(lines) + "\n"


def model_name(path: Path, taken: set[str]) -> str:
    """A readable, unique name: the run folder for RUN/model.safetensors, else the file stem."""
    p = Path(path)
    base = p.parent.name if p.stem == "model" and p.parent.name else p.stem
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base) or "model"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _overlay(gray: np.ndarray, truth: np.ndarray, pred: np.ndarray, scale: int = 2) -> bytes:
    import cv2

    img = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    if scale > 1:
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        truth = cv2.resize(truth, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        pred = cv2.resize(pred, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    for mask, colour in ((truth, (0, 200, 0)), (pred, (0, 0, 255))):
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(img, contours, -1, colour, 1)
    ok, enc = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return enc.tobytes()


@dataclass
class _Model:
    name: str
    net: Any
    card: dict[str, Any]
    path: Path

    @property
    def size(self) -> int:
        return self.net.cfg.img_size


@dataclass
class _Predictions:
    """Every frame predicted once: the thresholded mask of each model (and fusion), the truth and
    the preprocessed gray frame at each input size."""

    masks: dict[str, np.ndarray]  # name -> bool (N, S, S)
    truths: dict[int, np.ndarray]  # size -> bool (N, S, S)
    grays: dict[int, np.ndarray]  # size -> uint8 (N, S, S)
    size_of: dict[str, int]


def evaluate(
    site_dir: Any,
    models: Sequence[str | Path],
    out_dir: str | Path | None = None,
    *,
    split: str = "test",
    split_column: str = "split",
    names: Sequence[str] | None = None,
    fusion: Sequence[str] = (),
    fusion_norm: str = "image",
    fusion_formula: str = "weighted",
    batch_size: int = 32,
    device: str = "auto",
    overlays: int = 3,
) -> EvaluationResult:
    """Score ``models`` (fine-tuned ``model.safetensors`` files) on the labeled frames of ``split``
    of ONE site (``split_column="ub_split"`` selects the upper-bound split's frames instead); write
    the reports to ``out_dir`` when given. Steps: check the request, select the frames, load the
    models, predict every frame once, score, write the reports and the overlays."""
    if not models:
        raise TrainingError("evaluate needs at least one --model")
    if fusion and len(models) != 2:
        raise TrainingError(f"fusion combines exactly two models (generative, contrastive), got {len(models)}")
    dev = resolve_device(device)
    site = open_one_site(site_dir, what="evaluate", check_images=True)
    records = _select_records(site, split, split_column)
    loaded = _load_models(models, names, dev)
    if fusion and len({m.size for m in loaded}) != 1:
        raise TrainingError(f"fusion needs both models at one image size, got {sorted({m.size for m in loaded})}")
    preds = _predict(site, records, loaded, fusion, fusion_norm, fusion_formula, batch_size, dev)
    result = _score(site, split, records, loaded, preds)
    if out_dir is None:
        return result
    result.out_dir = Path(out_dir)
    _write_reports(result, site, split, split_column, loaded, fusion, fusion_norm, fusion_formula)
    if overlays > 0:
        result.overlays = _write_overlays(result, preds, overlays)
    return result


def _select_records(site, split: str, split_column: str) -> list[FrameRecord]:
    if split_column == "split":
        records = site.select(split, labeled=True)
    elif split_column == "ub_split":  # the target's upper-bound train/val frames (e.g. for tuning)
        records = site.select(labeled=True, ub_split=split)
    else:
        raise TrainingError(f"split column must be split or ub_split, got {split_column!r}")
    if not records:
        raise TrainingError(f"{site.manifest_path}: {split_column} {split!r} has no labeled frames to evaluate (empty split)")
    return records


def _load_models(models: Sequence[str | Path], names: Sequence[str] | None, dev) -> list[_Model]:
    from ..models.weights import build_segmenter

    taken: set[str] = set()
    loaded = []
    for i, path in enumerate(models):
        net, card = build_segmenter(path, device=dev)
        if card.get("out_channels", 1) != 1:
            raise CheckpointError(f"{path}: has {card.get('out_channels')} output channels; expected a 1-channel segmenter")
        name = names[i] if names and i < len(names) else model_name(Path(path), taken)
        taken.add(name)
        loaded.append(_Model(name, net, card, Path(path)))
    return loaded


def _predict(site, records: list[FrameRecord], loaded: list[_Model], fusion: Sequence[str], fusion_norm: str,
             fusion_formula: str, batch_size: int, dev) -> _Predictions:
    """One pass over the frames: every model (and fusion) predicts each frame once."""
    from ..models.fusion import fuse

    sizes = sorted({m.size for m in loaded})
    size_of = {m.name: m.size for m in loaded} | {f"fused-{f}": sizes[0] for f in fusion}
    parts: dict[str, list[np.ndarray]] = {n: [] for n in size_of}
    truths: dict[int, list[np.ndarray]] = {s: [] for s in sizes}
    grays: dict[int, list[np.ndarray]] = {s: [] for s in sizes}
    use_amp = dev.type == "cuda"
    for start in range(0, len(records), batch_size):
        recs = records[start : start + batch_size]
        frames = [site.read_image(r) for r in recs]
        masks_raw = [site.read_mask(r) for r in recs]
        probs: dict[str, torch.Tensor] = {}
        for size in sizes:
            x = torch.from_numpy(np.stack([preprocess_frame(f, size) for f in frames])).to(dev)
            truths[size].append(np.stack([preprocess_mask(m, size)[0] > 0.5 for m in masks_raw]))
            grays[size].append((x[:, 0].cpu().numpy() * 255.0 + 0.5).astype(np.uint8))
            with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                for m in loaded:
                    if m.size == size:
                        probs[m.name] = m.net.predict(x).float().cpu()
        for method in fusion:
            probs[f"fused-{method}"] = fuse(probs[loaded[0].name], probs[loaded[1].name], method=method,
                                            norm=fusion_norm, formula=fusion_formula)
        for name, prob in probs.items():
            parts[name].append(prob[:, 0].numpy() > THRESHOLD)
    return _Predictions({n: np.concatenate(v) for n, v in parts.items()}, {s: np.concatenate(v) for s, v in truths.items()},
                        {s: np.concatenate(v) for s, v in grays.items()}, size_of)


def _score(site, split: str, records: list[FrameRecord], loaded: list[_Model], preds: _Predictions) -> EvaluationResult:
    names = list(preds.masks)
    dice, iou = {}, {}
    for name in names:
        dice[name], iou[name] = dice_iou_per_image(preds.masks[name], preds.truths[preds.size_of[name]], threshold=None)
    summaries = {n: summarize(dice[n], iou[n]) for n in names}
    pvalues = {f"{a} vs {b}": wilcoxon_p(dice[a], dice[b]) for a, b in itertools.combinations(names, 2)}
    flags = {m.name: (m.card.get("hyperparameters") or {}).get("did_not_train") for m in loaded}
    return EvaluationResult(site.name, split, names, records, dice, iou, summaries, pvalues, did_not_train=flags)


def _write_reports(result: EvaluationResult, site, split: str, split_column: str, loaded: list[_Model],
                   fusion: Sequence[str], fusion_norm: str, fusion_formula: str) -> None:
    out = result.out_dir
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "filename", "videoname", "framenum", "dice", "iou"])
    for n in result.names:
        for r, d, j in zip(result.records, result.dice[n], result.iou[n]):
            w.writerow([n, r.filename, r.videoname, r.framenum, f"{d:.6f}", f"{j:.6f}"])
    write_text_atomic(out / "per_image.csv", buf.getvalue())
    by_name = {m.name: m for m in loaded}
    write_json_atomic(
        out / "summary.json",
        {
            "site": site.name,
            "site_path": str(site.root.resolve()),
            "manifest_sha256": site.manifest_sha256(),
            "split": split,
            "split_column": split_column,
            "n_images": len(result.records),
            "fusion": {"methods": list(fusion), "norm": fusion_norm, "formula": fusion_formula} if fusion else None,
            "models": {
                n: {**asdict(result.summaries[n]),
                    **({"path": str(by_name[n].path), "stage": by_name[n].card.get("stage"),
                        "did_not_train": result.did_not_train.get(n)} if n in by_name else {})}
                for n in result.names
            },
            "wilcoxon_dice": result.wilcoxon,
        },
    )
    write_text_atomic(out / "summary.md", f"# {site.name} / {split}: {len(result.records)} labeled frames\n\n"
                      + result.table())


def _write_overlays(result: EvaluationResult, preds: _Predictions, count: int) -> list[Path]:
    """PNGs of each model's ``count`` worst and best frames, from the masks already predicted."""
    written = []
    for name in result.names:
        order = np.argsort(result.dice[name], kind="stable")
        picks = [("worst", k, int(i)) for k, i in enumerate(order[:count], 1)]
        picks += [("best", k, int(i)) for k, i in enumerate(order[::-1][:count], 1)]
        size = preds.size_of[name]
        for kind, rank, idx in picks:
            rec = result.records[idx]
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(rec.filename).stem)
            path = result.out_dir / "overlays" / f"{name}_{kind}{rank}_{stem}_dice{result.dice[name][idx]:.3f}.png"
            png = _overlay(preds.grays[size][idx], preds.truths[size][idx].astype(np.uint8),
                           preds.masks[name][idx].astype(np.uint8))
            written.append(write_bytes_atomic(path, png))
    return written
