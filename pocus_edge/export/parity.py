"""Parity report written next to every export: the exported graph versus PyTorch on the same
frames (real frames of a site where one is given, otherwise random frames, and the report says
so). Max/mean absolute difference of the fused probability and the Dice between the masks
thresholded at 0.5; for a graph with the per-frame ``risk`` output, its largest absolute
difference too. An export fails (ExportError) below its precision's bars."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ExportError, ParityFailed
from ..io import write_json_atomic, write_text_atomic
from ..metrics import THRESHOLD, binarize


@dataclass
class ParityBars:
    """Pass bars. fp32 is judged on the probabilities, reduced precisions on the masks (their
    probabilities are expected to move; what the app shows is the thresholded mask)."""

    fp32_max_abs: float = 1e-4
    fp16_min_dice: float = 0.98
    bf16_min_dice: float = 0.95  # 8 significant bits against fp16's 11
    int8_min_dice: float = 0.95
    # The risk output (one number per frame in [0, 1]) is judged on its absolute difference at
    # every precision: unlike a probability it is not thresholded into something the app shows,
    # it is compared with a threshold and a drift band calibrated on the fp32 score, so what
    # matters is how far a reduced precision shifts it. It is a ratio of per-frame sums over
    # all pixels, computed fp32 in every graph (the fp16 and int8 passes keep the output tail
    # fp32), so per-pixel probability errors average out instead of adding up. Bars: fp32 the
    # probability's 1e-4 (measured ~1e-6: only summation order differs); reduced precisions
    # about ten times what was measured on random-weight tiny graphs (fp16 ~2e-4, int8 ~5e-3,
    # see tests/test_risk_export.py) and well under a drift band's half width (several 0.01).
    risk_fp32_max_abs: float = 1e-4
    risk_fp16_max_abs: float = 5e-3
    risk_bf16_max_abs: float = 2e-2
    risk_int8_max_abs: float = 2e-2

    def risk_max_abs(self, precision: str) -> float:
        """The risk output's bar at ``precision``."""
        return {"fp32": self.risk_fp32_max_abs, "fp16": self.risk_fp16_max_abs,
                "bf16": self.risk_bf16_max_abs}.get(precision, self.risk_int8_max_abs)


def parity_frames(
    site_dir: str | os.PathLike | None,
    img_size: int,
    *,
    n: int = 8,
    uint8_input: bool = False,
    seed: int = 0,
) -> tuple[np.ndarray, str]:
    """Frames for a parity check and a description of where they came from.

    With a site: ``n`` frames spread evenly over its test split (or over all frames when it has
    none), preprocessed by the one shared function. Images only: masks are never opened.
    Without a site: seeded random frames (smooth blobs plus noise, so the model's output is
    not constant), labelled as such in the report.
    """
    from ..data.transforms import preprocess_gray

    if site_dir is not None:
        from ..data.layout import load_site

        site = load_site(site_dir, check_masks=False)
        records = site.select("test") or site.records
        idx = np.unique(np.linspace(0, len(records) - 1, num=min(n, len(records))).round().astype(int))
        chosen = [records[i] for i in idx]
        gray = np.stack([preprocess_gray(site.read_image(r), img_size) for r in chosen])
        split = "test" if site.select("test") else "all"
        source = f"site {site.name} ({split} split, {len(chosen)} frames, evenly spaced)"
    else:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:img_size, 0:img_size] / img_size
        frames = []
        for _ in range(n):
            img = np.zeros((img_size, img_size))
            for _ in range(3):
                cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.25)
                img += rng.uniform(0.3, 1.0) * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
            img = img / max(img.max(), 1e-6) * 200 + rng.normal(0, 12, img.shape)
            frames.append(np.clip(img, 0, 255).astype(np.uint8))
        gray = np.stack(frames)
        source = f"random frames (no site given; {n} seeded synthetic blobs, seed {seed})"
    if uint8_input:
        return gray[:, None].copy(), source
    scaled = gray.astype(np.float32) / np.float32(255.0)
    return np.repeat(scaled[:, None], 3, axis=1), source


def dice_per_image(a: np.ndarray, b: np.ndarray, smooth: float = 1.0) -> np.ndarray:
    """Dice (smoothing 1, docs/method.md metric) between two binary mask batches, one value per image."""
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    inter = (a * b).sum(1)
    return (2 * inter + smooth) / (a.sum(1) + b.sum(1) + smooth)


def backend_runner(artifact: str | os.PathLike, backend: str = "auto", *, outputs: bool = False,
                   **options: Any) -> Callable[[np.ndarray], Any]:
    """``frames -> probability`` through the inference backend that runs ``artifact`` (the one
    runner of exported artifacts, :func:`pocus_edge.inference.open_backend`); with ``outputs``,
    ``frames -> {"prob", "risk", ...}`` (every output the backend returns)."""
    from ..inference import open_backend

    opened = open_backend(artifact, backend, **options)
    return opened.infer_outputs if outputs else opened.infer


# Below this sum of the two normalized confidences the released fusion formula
# (p_g c_g + p_c c_c) / (c_g + c_c + 1e-6) is a ratio of near-zero numbers: both branches are
# at their least confident there (p ~ 0.5), and a rounding difference of 1e-7 in c moves the
# output by up to |p_g - p_c| / (c_g + c_c + 1e-6). Measured on the paper preset: a correct fp32
# ONNX differs from PyTorch by 5e-4 (one pixel of 100k, c_g + c_c = 7e-6) to 1.2e-2 there.
# The fp32 bar is judged on the other pixels; the excluded ones are counted in the report.
WELL_CONDITIONED_MIN_WEIGHT = 1e-3


def torch_reference_with_weights(model, frames: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray | None]:
    """(probability, c_g + c_c per pixel) from an exportable model in one pass
    (``reference_outputs``); the weight sum is None where the output is well conditioned
    everywhere (a single network, or the fusion formula "paper")."""
    prob, weight, _ = torch_reference_outputs(model, frames, batch_size)
    return prob, weight


def torch_reference_outputs(model, frames: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(probability, c_g + c_c per pixel or None, per-frame risk (N, 1) or None) from an
    exportable model in one pass (``reference_with_risk``); the risk is None when the model has
    no risk output."""
    import torch

    probs, weights, risks = [], [], []
    with torch.no_grad():
        for i in range(0, len(frames), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(frames[i : i + batch_size]))
            prob, weight, risk = model.reference_with_risk(x)
            probs.append(prob.float().numpy())
            if weight is not None:
                weights.append(weight.float().numpy())
            if risk is not None:
                risks.append(risk.float().numpy())
    return np.concatenate(probs), (np.concatenate(weights) if weights else None), (np.concatenate(risks) if risks else None)


def compare_risk(reference: np.ndarray, candidate: np.ndarray | None) -> dict[str, Any]:
    """The risk output against PyTorch's: largest and mean absolute difference per frame."""
    if candidate is None:
        raise ExportError("parity: the artifact has no 'risk' output, but the model exports one")
    candidate = np.asarray(candidate)
    if reference.shape != candidate.shape:
        raise ExportError(f"parity: risk output shape {candidate.shape} != PyTorch {reference.shape}")
    nonfinite = int((~np.isfinite(candidate)).sum())
    diff = np.abs(reference.astype(np.float64) - np.nan_to_num(candidate.astype(np.float64), nan=2.0))
    return {
        "risk_max_abs_diff": float(diff.max()),
        "risk_mean_abs_diff": float(diff.mean()),
        "risk_reference_min": float(reference.min()),
        "risk_reference_max": float(reference.max()),
        "risk_nonfinite_outputs": nonfinite,
    }


def compare(reference: np.ndarray, candidate: np.ndarray, *, threshold: float = THRESHOLD,
            weight_sum: np.ndarray | None = None) -> dict[str, Any]:
    if reference.shape != candidate.shape:
        raise ExportError(f"parity: output shape {candidate.shape} != PyTorch {reference.shape}")
    nonfinite = int((~np.isfinite(candidate)).sum())
    diff = np.abs(reference.astype(np.float64) - np.nan_to_num(candidate.astype(np.float64), nan=0.5))
    mask_ref, mask_cand = binarize(reference, threshold), binarize(candidate, threshold)
    dice = dice_per_image(mask_ref, mask_cand)
    conditioned = np.ones(diff.shape, dtype=bool) if weight_sum is None else weight_sum >= WELL_CONDITIONED_MIN_WEIGHT
    return {
        "max_abs_diff": float(diff.max()),
        "max_abs_diff_well_conditioned": float(diff[conditioned].max()) if conditioned.any() else 0.0,
        "ill_conditioned_pixels": int((~conditioned).sum()),
        "mean_abs_diff": float(diff.mean()),
        "mask_dice_mean": float(dice.mean()),
        "mask_dice_min": float(dice.min()),
        "mask_pixel_disagreement": float((mask_ref != mask_cand).mean()),
        "foreground_fraction_reference": float(mask_ref.mean()),
        "nonfinite_outputs": nonfinite,
    }


def parity_report(
    artifact: str | os.PathLike,
    model,
    frames: np.ndarray,
    *,
    precision: str,
    source: str,
    runner: Callable[[np.ndarray], np.ndarray] | None = None,
    bars: ParityBars | None = None,
    backend: str = "onnxruntime-cpu",
    reference: np.ndarray | None = None,
    weight_sum: np.ndarray | None = None,
    reference_risk: np.ndarray | None = None,
) -> dict[str, Any]:
    """Compare ``artifact`` (run by ``runner``, by default the inference backend its suffix names)
    with ``model`` on ``frames``; the returned dict says whether it passed its precision's bars.

    ``runner`` returns the probability, or a dict of outputs (``prob``, and ``risk`` for a model
    with the risk output, which is then held to ``bars.risk_max_abs(precision)`` as well)."""
    bars = bars or ParityBars()
    with_risk = bool(getattr(model, "risk", False))
    runner = runner or backend_runner(artifact, outputs=with_risk)
    if reference is None or (with_risk and reference_risk is None):
        reference, weight_sum, reference_risk = torch_reference_outputs(model, frames)
    cand = runner(frames)
    cand_risk = None
    if isinstance(cand, dict):
        cand, cand_risk = cand["prob"], cand.get("risk")
    stats = compare(reference, cand, weight_sum=weight_sum)
    if precision == "fp32":
        bar = {"metric": "max_abs_diff_well_conditioned", "max": bars.fp32_max_abs,
               "note": f"pixels with c_g + c_c < {WELL_CONDITIONED_MIN_WEIGHT:g} excluded (ill-conditioned fusion ratio)"}
        passed = stats["max_abs_diff_well_conditioned"] <= bars.fp32_max_abs
    else:
        minimum = {"fp16": bars.fp16_min_dice, "bf16": bars.bf16_min_dice}.get(precision, bars.int8_min_dice)
        bar = {"metric": "mask_dice_mean", "min": minimum}
        passed = stats["mask_dice_mean"] >= minimum
    # A NaN/inf anywhere fails every precision (a masked NaN would otherwise hide in the Dice).
    passed = passed and stats["nonfinite_outputs"] == 0
    if with_risk:
        stats.update(compare_risk(reference_risk, cand_risk))
        risk_bar = {"metric": "risk_max_abs_diff", "max": bars.risk_max_abs(precision)}
        stats["risk_bar"] = risk_bar
        stats["risk_passed"] = bool(stats["risk_max_abs_diff"] <= risk_bar["max"] and stats["risk_nonfinite_outputs"] == 0)
        passed = passed and stats["risk_passed"]
    return {
        "artifact": Path(artifact).name,
        "precision": precision,
        "backend": backend,
        "reference": f"PyTorch {type(model).__name__} (fp32, eval)",
        "frames": {"count": int(len(frames)), "source": source, "dtype": str(frames.dtype), "shape": list(frames.shape)},
        "threshold": THRESHOLD,
        **stats,
        "bar": bar,
        "passed": bool(passed),
    }


def parity_markdown(report: dict[str, Any]) -> str:
    bar = report["bar"]
    bar_text = f"{bar['metric']} <= {bar['max']:g}" if "max" in bar else f"{bar['metric']} >= {bar['min']:g}"
    lines = [
        f"# Parity: {report['artifact']} ({report['precision']}, {report['backend']})",
        "",
        f"Reference: {report['reference']}. Frames: {report['frames']['source']}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| max abs diff (fused probability) | {report['max_abs_diff']:.3g} |",
        f"| max abs diff where c_g + c_c >= {WELL_CONDITIONED_MIN_WEIGHT:g} | {report['max_abs_diff_well_conditioned']:.3g} |",
        f"| ill-conditioned pixels (c_g + c_c < {WELL_CONDITIONED_MIN_WEIGHT:g}), excluded from the fp32 bar | {report['ill_conditioned_pixels']} |",
        f"| mean abs diff | {report['mean_abs_diff']:.3g} |",
        f"| mask Dice, mean over frames (threshold {report['threshold']}) | {report['mask_dice_mean']:.5f} |",
        f"| mask Dice, worst frame | {report['mask_dice_min']:.5f} |",
        f"| pixels whose mask label differs | {100 * report['mask_pixel_disagreement']:.3f}% |",
        f"| foreground fraction (PyTorch mask) | {100 * report['foreground_fraction_reference']:.1f}% |",
        f"| non-finite outputs | {report['nonfinite_outputs']} |",
    ]
    if "risk_bar" in report:
        lines += [
            f"| risk (per frame): max abs diff | {report['risk_max_abs_diff']:.3g} |",
            f"| risk: mean abs diff | {report['risk_mean_abs_diff']:.3g} |",
            f"| risk: PyTorch range over the frames | {report['risk_reference_min']:.4f} .. {report['risk_reference_max']:.4f} |",
            f"| risk: non-finite outputs | {report['risk_nonfinite_outputs']} |",
        ]
        bar_text += f"; risk_max_abs_diff <= {report['risk_bar']['max']:g}"
    lines += [
        "",
        f"Bar: {bar_text}: **{'PASS' if report['passed'] else 'FAIL'}**",
        "",
    ]
    return "\n".join(lines)


def parity_paths(artifact: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(artifact)
    return p.with_name(p.name + ".parity.json"), p.with_name(p.name + ".parity.md")


def failed_parity_paths(artifact: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(artifact)
    return p.with_name(p.name + ".parity-failed.json"), p.with_name(p.name + ".parity-failed.md")


def write_parity(report: dict[str, Any], artifact: str | os.PathLike) -> tuple[Path, Path]:
    """Write the report next to ``artifact`` (its final name): ``<name>.parity.json/.md`` when it
    passed; ``<name>.parity-failed.json/.md`` when it failed, so the report of a good artifact
    already there is not replaced by that of one that was refused."""
    json_path, md_path = parity_paths(artifact) if report["passed"] else failed_parity_paths(artifact)
    write_json_atomic(json_path, report)
    write_text_atomic(md_path, parity_markdown(report))
    if report["passed"]:
        for stale in failed_parity_paths(artifact):
            stale.unlink(missing_ok=True)
    return json_path, md_path


def enforce(report: dict[str, Any]) -> None:
    """Raise ParityFailed (an ExportError; one line, exit 1) when the report failed its bar."""
    if report["passed"]:
        return
    bar = report["bar"]
    metric = bar["metric"]
    if report.get("nonfinite_outputs"):
        raise ParityFailed(
            f"{report['artifact']}: {report['precision']} parity failed: {report['nonfinite_outputs']} NaN/inf "
            f"output values (frames: {report['frames']['source']})"
        )
    value = report[metric]
    probability_passed = value <= bar["max"] if "max" in bar else value >= bar["min"]
    if report.get("risk_passed") is False and probability_passed:
        risk_bar = report["risk_bar"]
        what = (f"{report['risk_nonfinite_outputs']} NaN/inf risk values" if report["risk_nonfinite_outputs"]
                else f"risk_max_abs_diff = {report['risk_max_abs_diff']:.4g}, bar <= {risk_bar['max']:g}")
        raise ParityFailed(
            f"{report['artifact']}: {report['precision']} parity failed: {what} (frames: {report['frames']['source']}); "
            f"nothing written under that name; see {failed_parity_paths(report['artifact'])[1].name}"
        )
    limit = f"<= {bar['max']:g}" if "max" in bar else f">= {bar['min']:g}"
    raise ParityFailed(
        f"{report['artifact']}: {report['precision']} parity failed: {metric} = {report[metric]:.4g}, "
        f"bar {limit} (frames: {report['frames']['source']}); nothing written under that name; see {failed_parity_paths(report['artifact'])[1].name}"
    )


def spread_head_logits(branch, frames, std: float = 3.0) -> None:
    """Rescale a random-weight branch's output head so its logits on ``frames`` have median 0
    and standard deviation ``std``: about half the pixels foreground, most of them confident and
    a few near the threshold, as in a trained model. Raw random heads put every probability
    within a few hundredths of 0.5, so every mask is empty and any two graphs "agree"; parity
    tests, speed benchmarks and the Android golden set use this on random weights, never on
    trained ones. ``frames`` (N, C, S, S) float32, numpy or torch; the head is a linear 1x1
    convolution, so logits' = gain * (logits - median) is exact."""
    import torch

    head = getattr(getattr(branch, "decoder", None), "head", None)
    if not isinstance(head, torch.nn.Conv2d) or head.bias is None:
        raise TypeError(f"{type(branch).__name__} has no biased 1x1 output head (decoder.head) to rescale")
    x = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))
    x = x.to(head.weight.device)
    with torch.no_grad():
        logits = branch(x).double()
        gain = std / (float(logits.std()) or 1.0)
        centre = float(logits.median())
        head.weight.mul_(gain)
        head.bias.sub_(centre).mul_(gain)
