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
            lines += ["", "| pair (Wilcoxon on per-image Dice) | p |", "|---|---|"]
            lines += [f"| {k} | {v:.3g} |" for k, v in self.wilcoxon.items()]
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
    the reports to ``out_dir`` when given."""
    from ..models.fusion import fuse
    from ..models.weights import build_segmenter

    if not models:
        raise TrainingError("evaluate needs at least one --model")
    if fusion and len(models) != 2:
        raise TrainingError(f"fusion combines exactly two models (generative, contrastive), got {len(models)}")
    dev = resolve_device(device)
    site = open_one_site(site_dir, what="evaluate", check_images=True)
    if split_column == "split":
        records = site.select(split, labeled=True)
    elif split_column == "ub_split":  # the target's upper-bound train/val frames (e.g. for tuning)
        records = site.select(labeled=True, ub_split=split)
    else:
        raise TrainingError(f"split column must be split or ub_split, got {split_column!r}")
    if not records:
        raise TrainingError(f"{site.manifest_path}: {split_column} {split!r} has no labeled frames to evaluate (empty split)")

    taken: set[str] = set()
    loaded = []
    for i, path in enumerate(models):
        net, card = build_segmenter(path, device=dev)
        if card.get("out_channels", 1) != 1:
            raise CheckpointError(f"{path}: has {card.get('out_channels')} output channels; expected a 1-channel segmenter")
        name = names[i] if names and i < len(names) else model_name(Path(path), taken)
        taken.add(name)
        loaded.append((name, net, card))
    sizes = {net.cfg.img_size for _, net, _ in loaded}
    if fusion and len(sizes) != 1:
        raise TrainingError(f"fusion needs both models at one image size, got {sorted(sizes)}")
    all_names = [n for n, _, _ in loaded] + [f"fused-{m}" for m in fusion]
    dice: dict[str, list[np.ndarray]] = {n: [] for n in all_names}
    iou: dict[str, list[np.ndarray]] = {n: [] for n in all_names}
    use_amp = dev.type == "cuda"

    def predict_batch(recs: list[FrameRecord]) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
        frames = [site.read_image(r) for r in recs]
        masks_raw = [site.read_mask(r) for r in recs]
        probs: dict[str, torch.Tensor] = {}
        truths: dict[int, torch.Tensor] = {}
        for size in sizes:
            x = torch.from_numpy(np.stack([preprocess_frame(f, size) for f in frames])).to(dev)
            truths[size] = torch.from_numpy(np.stack([preprocess_mask(m, size) for m in masks_raw]))
            with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                for name, net, _ in loaded:
                    if net.cfg.img_size == size:
                        probs[name] = net.predict(x).float().cpu()
        for method in fusion:
            probs[f"fused-{method}"] = fuse(probs[loaded[0][0]], probs[loaded[1][0]], method=method,
                                            norm=fusion_norm, formula=fusion_formula)
        return probs, truths

    def size_of(name: str) -> int:
        for n, net, _ in loaded:
            if n == name:
                return net.cfg.img_size
        return next(iter(sizes))

    for start in range(0, len(records), batch_size):
        recs = records[start : start + batch_size]
        probs, truths = predict_batch(recs)
        for name in all_names:
            d, j = dice_iou_per_image(probs[name], truths[size_of(name)], threshold=THRESHOLD)
            dice[name].append(d)
            iou[name].append(j)
    dice_arr = {n: np.concatenate(v) for n, v in dice.items()}
    iou_arr = {n: np.concatenate(v) for n, v in iou.items()}
    summaries = {n: summarize(dice_arr[n], iou_arr[n]) for n in all_names}
    pvalues = {f"{a} vs {b}": wilcoxon_p(dice_arr[a], dice_arr[b]) for a, b in itertools.combinations(all_names, 2)}
    flags = {name: (card.get("hyperparameters") or {}).get("did_not_train") for name, _, card in loaded}
    result = EvaluationResult(site.name, split, all_names, records, dice_arr, iou_arr, summaries, pvalues,
                              did_not_train=flags)
    if out_dir is None:
        return result

    out = Path(out_dir)
    result.out_dir = out
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "filename", "videoname", "framenum", "dice", "iou"])
    for n in all_names:
        for r, d, j in zip(records, dice_arr[n], iou_arr[n]):
            w.writerow([n, r.filename, r.videoname, r.framenum, f"{d:.6f}", f"{j:.6f}"])
    write_text_atomic(out / "per_image.csv", buf.getvalue())
    write_json_atomic(
        out / "summary.json",
        {
            "site": site.name,
            "site_path": str(site.root.resolve()),
            "manifest_sha256": site.manifest_sha256(),
            "split": split,
            "split_column": split_column,
            "n_images": len(records),
            "fusion": {"methods": list(fusion), "norm": fusion_norm, "formula": fusion_formula} if fusion else None,
            "models": {
                n: {**asdict(summaries[n]),
                    **({"path": str(models[i]), "stage": loaded[i][2].get("stage"),
                        "did_not_train": flags.get(n)} if i < len(loaded) else {})}
                for i, n in enumerate(all_names)
            },
            "wilcoxon_dice": pvalues,
        },
    )
    write_text_atomic(out / "summary.md", f"# {site.name} / {split}: {len(records)} labeled frames\n\n" + result.table())

    if overlays > 0:
        for name in all_names:
            order = np.argsort(dice_arr[name], kind="stable")
            picks = [("worst", k, int(i)) for k, i in enumerate(order[:overlays], 1)]
            picks += [("best", k, int(i)) for k, i in enumerate(order[::-1][:overlays], 1)]
            for kind, rank, idx in picks:
                rec = records[idx]
                probs, truths = predict_batch([rec])
                size = size_of(name)
                gray = (preprocess_frame(site.read_image(rec), size)[0] * 255.0 + 0.5).astype(np.uint8)
                truth = truths[size][0, 0].numpy() > 0.5
                pred = probs[name][0, 0].numpy() > THRESHOLD
                stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(rec.filename).stem)
                path = out / "overlays" / f"{name}_{kind}{rank}_{stem}_dice{dice_arr[name][idx]:.3f}.png"
                write_bytes_atomic(path, _overlay(gray, truth.astype(np.uint8), pred.astype(np.uint8)))
                result.overlays.append(path)
    return result
