"""Scoring for a study (:mod:`pocus_edge.study`).

Scores: per image Dice, IoU (smoothing 1, threshold 0.5), HD95 and average surface distance
(pixels at the model's input size; an image whose prediction is empty while its truth is not, or
the reverse, gets the image diagonal, and 0 when both are empty) on the target's labeled test
frames, and Dice on the source validation frames. Where false positives fall: each test image's
false-positive pixels, and how many of them lie outside the B-mode region (in the pixels that
never change across the target's test sweeps: screen margins, depth ticks, UI text), where no
bone can be. The unit of inference is the training SEED (:mod:`.report`); within a seed the
test frames are reduced to per-patient means first.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..io import write_text_atomic
from .arms import ARMS
from .markers import read_done

if TYPE_CHECKING:
    from .arms import ArmRun
    from .folder import Study

COLUMNS = ("site", "patient", "videoname", "framenum", "filename", "dice", "iou", "hd95", "asd", "pred_empty",
           "fp_pixels", "fp_static")
# A pixel whose gray level varies by less than this (sd over the target's test frames) belongs to
# the static screen (margins, depth ticks, text), not to the B-mode image.
STATIC_SD = 1.0


# ---------------------------------------------------------------------------------------------
# Scoring one arm and seed


def _frames(study: "Study", which: str):
    """(records, gray uint8 (N, S, S), masks bool (N, S, S)) of the target test or the source
    validation subset, preprocessed once per study process."""
    if which in study._frames:
        return study._frames[which]
    from ..config import model_preset
    from ..data.transforms import preprocess_gray, preprocess_mask

    size = model_preset(study.options.preset).img_size
    if which == "test":
        site, records = study.target_site, study.target_site.select("test", labeled=True)
    else:
        site, records = study.source_site, study.source_site.select("val", labeled=True)
        limit = study.budget.val_frames
        if limit and len(records) > limit:
            records = records[:: -(-len(records) // limit)]  # the stride fine-tuning validates on
    if not records:
        from ..errors import DataError

        raise DataError(f"{site.manifest_path}: no labeled {'test' if which == 'test' else 'val'} frames to score")
    gray = np.stack([preprocess_gray(site.read_image(r), size) for r in records])
    masks = np.stack([preprocess_mask(site.read_mask(r), size)[0] > 0.5 for r in records])
    study._frames[which] = (site, records, gray, masks)
    return study._frames[which]


def static_region(gray: np.ndarray) -> np.ndarray:
    """Pixels (S, S) that hardly change across the frames ``gray`` (N, S, S): the screen around the
    B-mode image (margins, depth ticks, labels). Measured, not read from a probe profile, so it
    works on any site."""
    return gray.astype(np.float32).std(axis=0) < STATIC_SD


def _predict(predictor: Callable, gray: np.ndarray, device, batch: int = 64) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(gray), batch):
            g = torch.from_numpy(gray[start : start + batch]).to(torch.float32) / 255.0
            x = g[:, None].expand(-1, 3, -1, -1).contiguous().to(device)
            out.append(predictor(x).float().cpu().numpy()[:, 0])
    return np.concatenate(out)


def score_arm(study: "Study", run: "ArmRun", csv_path: Path) -> int:
    """Per-image scores of one arm and seed on the target test and the source validation frames,
    written to ``csv_path``; returns the number of images scored."""
    from ..metrics import THRESHOLD, dice_iou_per_image, surface_distances_per_image

    predictor = ARMS[run.arm].predictor(study, run)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    n = 0
    for which in ("test", "val"):
        site, records, gray, masks = _frames(study, which)
        prob = _predict(predictor, gray, study.device)
        dice, iou = dice_iou_per_image(prob, masks)
        pred = prob > THRESHOLD
        false_pos = pred & ~masks
        if which == "test":
            hd95, asd = surface_distances_per_image(prob, masks, empty="diagonal")
            static = static_region(gray)
            fp_static = (false_pos & static[None]).sum(axis=(1, 2))
        else:
            hd95 = asd = fp_static = np.full(len(records), np.nan)
        empty = ~pred.any(axis=(1, 2))
        fp = false_pos.sum(axis=(1, 2))
        for r, d, j, h, a, e, f, fs in zip(records, dice, iou, hd95, asd, empty, fp, fp_static):
            writer.writerow([f"{'target-test' if which == 'test' else 'source-val'}", r.patient, r.videoname,
                             r.framenum, r.filename, f"{d:.6f}", f"{j:.6f}", _num(h), _num(a), int(e), int(f),
                             _num(fs)])
        n += len(records)
    write_text_atomic(csv_path, buf.getvalue())
    return n


def _num(v: float) -> str:
    return "" if not math.isfinite(v) else f"{v:.4f}"


# ---------------------------------------------------------------------------------------------
# Collecting scores


def _read_scores(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _float(v: str) -> float:
    return float(v) if v not in ("", None) else float("nan")


def collect(study: "Study") -> dict[str, Any]:
    """Per (arm key, seed): per-patient means of the test metrics and the source-val Dice."""
    scores: dict[str, dict[int, dict[str, Any]]] = {}
    for choice in study.choices:
        for seed in study.seeds_of(choice):
            folder = study.eval_folder(study.arm_run(choice.arm, choice.recipe, seed))
            if read_done(folder) is None:
                continue
            rows = _read_scores(folder / "per_image.csv")
            test = [r for r in rows if r["site"] == "target-test"]
            val = [r for r in rows if r["site"] == "source-val"]
            per_patient: dict[str, dict[str, float]] = {}
            for patient in sorted({r["patient"] for r in test}):
                mine = [r for r in test if r["patient"] == patient]
                per_patient[patient] = {m: nanmean([_float(r[m]) for r in mine]) for m in ("dice", "iou", "hd95", "asd")}
                per_patient[patient]["empty_prediction"] = sum(int(_float(r.get("pred_empty", "0")) == 1) for r in mine)
                per_patient[patient]["fp_pixels"] = sum(_float(r.get("fp_pixels", "nan")) for r in mine)
                per_patient[patient]["fp_static"] = sum(_float(r.get("fp_static", "nan")) for r in mine)
                per_patient[patient]["frames"] = len(mine)
            trained = read_done(study.arm_run(choice.arm, choice.recipe, seed).folder) or {}
            scores.setdefault(choice.key, {})[seed] = {
                "did_not_train": trained.get("did_not_train"),
                "patients": per_patient,
                "frame_dice": float(np.mean([_float(r["dice"]) for r in test])) if test else float("nan"),
                "source_val_dice": float(np.mean([_float(r["dice"]) for r in val])) if val else float("nan"),
            }
    return scores


def nanmean(values) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")
