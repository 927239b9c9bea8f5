"""Golden vectors: what the Python pipeline produces for a few probe frames, for other platforms
(the Android demo's Kotlin core) to reproduce and be checked against.

A golden folder holds ``index.json`` and one ``.npy`` file per array (NumPy format 1.0,
little-endian, C order: a 10-byte magic/version/length prefix, a Python-dict header, raw data;
trivial to parse without NumPy). For every frame ``i`` and every output size ``S``:

- ``frame_i.npy``          uint8 (H, W): the raw probe frame, H != W (exercises the padding)
- ``gray_i_S.npy``         uint8 (S, S): ``transforms.preprocess_gray`` (pad bottom/right, resize)
- ``input_i_S.npy``        float32 (3, S, S): ``transforms.preprocess_frame`` (only at the model
                           input size, to keep the committed set small)
- ``cv2_i_S.npy``          uint8 (S, S): ``cv2.resize(INTER_LINEAR)`` of the padded frame, an
                           independent reference for ports that reproduce OpenCV itself
                           (model input size only)
- ``prob_i.npy``           float32 (S, S): the fused bone probability (model input size only)
- ``mask_i.npy``           uint8 (S, S): 1 where the probability passes the threshold
- ``frame_mask_i.npy``     uint8 (H, W): the mask at frame resolution (probability resized back
                           to the padded side, padding cropped, then thresholded), as the
                           runtime draws and saves it

plus ``threshold_probe_prob.npy``/``threshold_probe_mask.npy``: values at and next to the
threshold, so a port that uses ``>=`` where Python uses ``>`` (or the reverse) fails.

Each case with a probability also holds ``risk``: the frame's per-frame risk
(``index.json``'s ``risk_formula``: a student's self disagreement, the fused pair's branch
disagreement, or an exported graph's own ``risk`` output). ``drift_probe`` in the index is the
drift alarm's reference: a model card's ``risk`` entry (threshold and band), a short synthetic
risk sequence that leaves the band upwards and downwards (``null`` = a non-finite risk), and
what the runtime makes of it frame by frame (:class:`pocus_edge.runtime.drift.DriftMonitor`:
the EWMA, the alarm, the traffic-light level, the alarm intervals).

The mask rule is the project's one rule, ``pocus_edge.metrics.MASK_RULE`` (``prob >
threshold``, the threshold from the model card, 0.5), used alike by scoring, export parity and
the streaming runtime. ``index.json`` states the rule and threshold so a port reads them
instead of guessing.

Probabilities come from the inference backend (:mod:`pocus_edge.inference`) of an exported model when one is given (onnxruntime
for an ONNX file: a student's ``prob`` or the fused graph's output); otherwise from a seeded
random-weight ``tiny`` model in PyTorch: a compact student (``student=NAME``, what the Android app
ships; the committed set is made this way) or the ``FusedSegmenter`` over two TransUNets (the
numbers are not a trained model's, but a port's post-processing is checked on them just the
same).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from ..data import transforms
from ..errors import DataError
from ..io import read_json, write_bytes_atomic, write_json_atomic
from ..metrics import MASK_RULE, THRESHOLD, binarize

GOLDEN_FORMAT = "pocus-edge-golden/1"
# Raw frame sizes (H, W): wide and tall, down- and upscaled, one padded side of exactly 2x the
# tiny model's 64 (OpenCV switches to area averaging at exact 2x), one smaller than 64.
SYNTHETIC_FRAME_SHAPES = ((120, 160), (97, 75), (128, 100), (45, 61), (150, 211), (88, 64))
PAPER_SIZE = 224


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def save_npy(path: str | Path, arr: np.ndarray) -> Path:
    """Write one array as a .npy file atomically (little-endian dtypes only)."""
    arr = np.asarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return write_bytes_atomic(path, _npy_bytes(arr))


def synthetic_frame(height: int, width: int, seed: int, phase: float | None = None) -> np.ndarray:
    """A deterministic ultrasound-like uint8 frame: Rayleigh speckle, a bright curved bone
    surface with an acoustic shadow below it, depth attenuation. Sharp edges and noise make
    any change of interpolation visible in the resized output. ``phase`` (default: the seed)
    shifts the bone curve, for a slowly moving clip."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    speckle = rng.rayleigh(scale=0.35, size=(height, width))
    shift = float(seed if phase is None else phase)
    surface = height * (0.45 + 0.15 * np.sin(2 * np.pi * xx / max(width, 2) + shift))
    bone = np.exp(-0.5 * ((yy - surface) / max(height * 0.02, 1.0)) ** 2)
    shadow = np.where(yy > surface, 0.25, 1.0)
    attenuation = np.exp(-1.2 * yy / height)
    img = 255.0 * np.clip(0.6 * speckle * shadow * attenuation + 0.9 * bone, 0.0, 1.0)
    return img.astype(np.uint8)


def site_frames(site_dir: str | Path, n: int) -> list[tuple[np.ndarray, str]]:
    """``n`` frames spread over a site's manifest. Square frames are cropped to their top 80%
    of rows (documented in the index) so the bottom/right padding is always exercised."""
    from ..data.layout import load_site

    site = load_site(site_dir, check_masks=False)
    if not site.records:
        raise DataError(f"{site_dir}: the site manifest lists no frames")
    picks = np.linspace(0, len(site.records) - 1, num=min(n, len(site.records))).round().astype(int)
    out = []
    for k in dict.fromkeys(picks.tolist()):
        rec = site.records[k]
        img = site.read_image(rec)
        note = f"site {site.name or Path(site_dir).name}: {rec.filename}"
        if img.shape[0] == img.shape[1]:
            img = np.ascontiguousarray(img[: max(1, (img.shape[0] * 4) // 5)])
            note += " (top 80% of rows, to make it non-square)"
        out.append((img, note))
    return out


class _ArtifactProbabilities:
    """Bone probability from an exported model, run by the inference backend its suffix names
    (onnxruntime for .onnx; float (N,3,S,S) or uint8 (N,1,S,S) input)."""

    def __init__(self, model_path: Path):
        from ..inference import backend_spec, open_backend

        self.backend = open_backend(model_path, "auto")
        self.card = self.backend.card or None
        self.img_size = int(self.backend.img_size)
        self.description = {
            "kind": backend_spec(self.backend.name).engine,
            "file": model_path.name,
            "input": "uint8 (1,1,S,S)" if self.backend.input_dtype == "uint8" else "float32 (1,3,S,S)",
            "card": self.card,
        }

        risk = (self.card or {}).get("risk")
        self.risk_formula = risk.get("formula") if isinstance(risk, dict) else None
        self.last_risk: float | None = None

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        out = self.backend.run(self.backend.prepare(frame)[None])
        risk = out.get("risk")
        self.last_risk = float(np.asarray(risk).reshape(-1)[0]) if risk is not None else None
        return np.asarray(out["prob"], dtype=np.float32).reshape(self.img_size, self.img_size)


class _RandomProbabilities:
    """Bone probability from a seeded random-weight ``tiny`` model run in PyTorch (no exported
    model given): the fused teacher over two TransUNets, or, with ``student``, that compact
    student in its reparameterized inference form (what the app ships)."""

    def __init__(self, seed: int, student: str | None = None):
        import torch

        from ..config import model_preset
        from ..models.fused import FusedSegmenter, SingleSegmenter

        torch.manual_seed(seed)
        if student is None:
            from ..models.transunet import TransUNet

            cfg = model_preset("tiny")
            self.model = FusedSegmenter(TransUNet(cfg), TransUNet(cfg)).eval()
            self.heads = [self.model.generative, self.model.contrastive]
            self.description = {
                "kind": "torch FusedSegmenter over two random-weight tiny TransUNets",
                "seed": seed,
                "fusion": self.model.fusion_settings,
            }
        else:
            from ..models.students import build_student

            network = build_student(student, "tiny").eval().reparameterize()
            self.model = SingleSegmenter(network).eval()
            self.heads = [network]
            self.description = {
                "kind": f"torch student {student} (random-weight tiny, reparameterized)",
                "seed": seed,
                "student": network.cfg.to_dict(),
            }
        self.img_size = int(self.model.img_size)

    def calibrate(self, frames: list[np.ndarray]) -> None:
        """Rescale each network's output layer so its logits on these frames have median 0 and
        standard deviation 3 (:func:`.parity.spread_head_logits`): random weights alone give
        probabilities bunched just under 0.5 and an empty mask, which would not test a port's
        thresholding at all."""
        from .parity import spread_head_logits

        x = np.stack([transforms.preprocess_frame(f, self.img_size) for f in frames])
        for network in self.heads:
            spread_head_logits(network, x, std=3.0)
        self.description["calibrated"] = "output layers rescaled: logits median 0, standard deviation 3"

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        import torch

        from ..models.risk import branch_disagreement_np, self_disagreement_np

        x = torch.from_numpy(transforms.preprocess_frame(frame, self.img_size)[None])
        with torch.no_grad():
            if len(self.heads) == 2:
                fused, p_g, p_c = self.model.branch_outputs(x)[:3]
                self.last_risk = float(branch_disagreement_np(p_g.numpy()[0, 0], p_c.numpy()[0, 0]))
            else:
                fused = self.model(x)
        prob = fused.numpy().astype(np.float32).reshape(self.img_size, self.img_size)
        if len(self.heads) != 2:
            self.last_risk = float(self_disagreement_np(prob, self.threshold))
        return prob

    threshold = THRESHOLD  # the mask threshold of the self-disagreement risk (no card: the default)
    last_risk: float | None = None

    @property
    def risk_formula(self) -> str:
        from ..models.risk import RISK_FORMULA_SINGLE, RISK_FORMULA_TWO_BRANCH

        return RISK_FORMULA_TWO_BRANCH if len(self.heads) == 2 else RISK_FORMULA_SINGLE


def _probability_model(model: str | Path | None, seed: int, student: str | None = None):
    if model is not None:
        if student is not None:
            raise DataError("give --model (an exported model) or --student (a random-weight student), not both")
        return _ArtifactProbabilities(Path(model))
    try:
        return _RandomProbabilities(seed, student)
    except ImportError:
        # The model code is optional for the preprocessing goldens (e.g. a stripped install).
        return None


DEFAULT_THRESHOLD = THRESHOLD  # docs/method.md; exported model cards carry it as "threshold"


def threshold_probe(threshold: float) -> np.ndarray:
    """float32 values at, just below and just above the threshold, and the extremes."""
    t = np.float32(threshold)
    vals = [0.0, 1.0, t, np.nextafter(t, np.float32(0)), np.nextafter(t, np.float32(1)), t - 1e-3, t + 1e-3]
    return np.array(vals, dtype=np.float32).reshape(1, -1)


def mask_of(prob: np.ndarray, threshold: float) -> np.ndarray:
    """The project's mask rule (MASK_RULE) as uint8: 1 where prob > threshold."""
    return binarize(np.asarray(prob), np.float32(threshold)).astype(np.uint8)


def probability_at_frame(prob: np.ndarray, frame_shape: tuple[int, int]) -> np.ndarray:
    """(S, S) probability -> (H, W): bilinear to the padded side, then crop the padding; the
    runtime's own display/mask computation (``pocus_edge.inference.to_frame_resolution``)."""
    from ..inference import to_frame_resolution

    return np.ascontiguousarray(to_frame_resolution(np.asarray(prob, dtype=np.float32), frame_shape))


def write_golden(
    out_dir: str | Path,
    *,
    model: str | Path | None = None,
    site: str | Path | None = None,
    n: int = 4,
    seed: int = 0,
    extra_sizes: tuple[int, ...] = (PAPER_SIZE,),
    student: str | None = None,
) -> dict[str, Any]:
    """Write a golden folder (see the module docstring) and return its index.

    ``model``: an exported model (probabilities by its inference backend); None: a random-weight
    tiny model in PyTorch: the fused teacher, or the compact ``student`` of that name.
    ``site``: take the frames from this site folder; None: synthetic frames.
    ``extra_sizes``: output sizes besides the model's input size (preprocessing only).
    """
    if n < 1:
        raise DataError(f"--frames must be at least 1, got {n}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if site is not None:
        frames = site_frames(site, n)
    else:
        shapes = [SYNTHETIC_FRAME_SHAPES[i % len(SYNTHETIC_FRAME_SHAPES)] for i in range(n)]
        frames = [(synthetic_frame(h, w, seed + i), f"synthetic seed {seed + i}") for i, (h, w) in enumerate(shapes)]

    prob_model = _probability_model(model, seed, student)
    card = getattr(prob_model, "card", None) or {}
    threshold = float(card.get("threshold", DEFAULT_THRESHOLD))
    if isinstance(prob_model, _RandomProbabilities):
        prob_model.calibrate([f for f, _ in frames])
    input_size = prob_model.img_size if prob_model is not None else 64
    sizes = sorted({input_size, *map(int, extra_sizes)})

    import cv2

    cases = []
    for i, (frame, note) in enumerate(frames):
        save_npy(out / f"frame_{i}.npy", frame)
        case: dict[str, Any] = {
            "id": i,
            "source": note,
            "frame": f"frame_{i}.npy",
            "height": int(frame.shape[0]),
            "width": int(frame.shape[1]),
            "sizes": [],
        }
        padded = transforms.pad_to_square(frame)
        for size in sizes:
            entry: dict[str, Any] = {"size": size, "gray": f"gray_{i}_{size}.npy"}
            save_npy(out / entry["gray"], transforms.preprocess_gray(frame, size))
            if size == input_size and padded.shape[0] != size:
                entry["cv2"] = f"cv2_{i}_{size}.npy"
                save_npy(out / entry["cv2"], cv2.resize(padded, (size, size), interpolation=cv2.INTER_LINEAR))
            if size == input_size:
                entry["input"] = f"input_{i}_{size}.npy"
                save_npy(out / entry["input"], transforms.preprocess_frame(frame, size))
            case["sizes"].append(entry)
        if prob_model is not None:
            prob = prob_model(frame)
            case["prob"] = f"prob_{i}.npy"
            case["mask"] = f"mask_{i}.npy"
            case["prob_size"] = input_size
            save_npy(out / case["prob"], prob)
            save_npy(out / case["mask"], mask_of(prob, threshold))
            case["frame_mask"] = f"frame_mask_{i}.npy"
            save_npy(out / case["frame_mask"], mask_of(probability_at_frame(prob, frame.shape), threshold))
            if prob_model.last_risk is not None:
                case["risk"] = prob_model.last_risk
        cases.append(case)

    probe = threshold_probe(threshold)
    save_npy(out / "threshold_probe_prob.npy", probe)
    save_npy(out / "threshold_probe_mask.npy", mask_of(probe, threshold))

    # Latency statistics reference: numpy's percentiles (linear interpolation) of a fixed,
    # skewed sample, so a port's p50/p95/p99 are checked against a second implementation.
    latency_samples = np.random.default_rng(seed).gamma(shape=2.0, scale=7.0, size=257).round(3)
    latency_probe = {
        "samples_ms": latency_samples.tolist(),
        "percentiles": {str(q): float(np.percentile(latency_samples, q)) for q in (50, 95, 99)},
        "mean_ms": float(latency_samples.mean()),
    }

    index = {
        "format": GOLDEN_FORMAT,
        "interpolation": transforms.INTERPOLATION,
        "threshold": threshold,
        "mask_rule": MASK_RULE,
        "input_size": input_size,
        "sizes": sizes,
        "probabilities": prob_model.description if prob_model is not None else None,
        "threshold_probe": {"prob": "threshold_probe_prob.npy", "mask": "threshold_probe_mask.npy"},
        "latency_probe": latency_probe,
        "risk_formula": getattr(prob_model, "risk_formula", None) if any("risk" in c for c in cases) else None,
        "drift_probe": drift_probe(),
        "cases": cases,
    }
    write_json_atomic(out / "index.json", index)
    return index


# The drift probe: a band and threshold as a card would hold them, and a risk sequence that sits
# in the band, rises above the threshold and out of the band (alarm), comes back (cleared by the
# hysteresis), falls out of the band below (the alarm is two-sided), holds one non-finite risk,
# and settles. Fixed numbers, no seed: every golden set carries the same probe.
DRIFT_PROBE_BAND = {"center": 0.2, "half_width": 0.05, "lam": 0.2, "hysteresis": 0.5, "k": 5.0}
DRIFT_PROBE_THRESHOLD = 0.3


def drift_probe_risks() -> list[float]:
    wiggle = [0.01, -0.008, 0.004, -0.012, 0.006]
    calm = [0.2 + wiggle[i % 5] for i in range(15)]
    return (calm + [0.32] * 3 + [0.36] * 17 + [0.21] * 20 + [0.05] * 12 + [float("nan")] + [0.05] * 3
            + [0.19 + wiggle[i % 5] for i in range(12)])


def drift_probe() -> dict[str, Any]:
    """The drift alarm's reference sequence (see :data:`DRIFT_PROBE_BAND`), computed here from
    the alarm's definition (docs/streaming.md, "Risk and drift alarm"), written out on its own
    so that the runtime's :class:`~pocus_edge.runtime.drift.DriftMonitor` (which the export
    layer does not import) and the app's port are both held to it (tests/test_golden.py, the
    Kotlin core tests)."""
    b, t = DRIFT_PROBE_BAND, DRIFT_PROBE_THRESHOLD
    risks = drift_probe_risks()
    z, on, intervals, nonfinite = float(b["center"]), False, [], 0
    ewma, alarm, levels = [], [], []
    for i, r in enumerate(risks):
        if np.isfinite(r):
            z = b["lam"] * r + (1.0 - b["lam"]) * z  # z_t = lam r_t + (1 - lam) z_{t-1}
            deviation = abs(z - b["center"])
            if not on and deviation > b["half_width"]:  # leaves the band: the alarm starts here
                on = True
                intervals.append([i, i])
            elif on and deviation <= b["hysteresis"] * b["half_width"]:  # well back inside: cleared
                on = False
        else:
            nonfinite += 1  # counted; the statistic and the alarm stay as they were
        if on:
            intervals[-1][1] = i
        ewma.append(z)
        alarm.append(int(on))
        levels.append("alarm" if on else ("high" if np.isfinite(r) and r > t else "ok"))
    band = {**b, "lower": b["center"] - b["half_width"], "upper": b["center"] + b["half_width"]}
    return {
        "card": {"risk": {"formula": "golden-probe", "threshold": t, "drift": band}},
        "risks": [None if not np.isfinite(r) else r for r in risks],  # null: a non-finite risk (JSON has no NaN)
        "ewma": ewma,
        "alarm": alarm,
        "levels": levels,
        "alarm_intervals": intervals,
        "nonfinite": nonfinite,
    }


def read_npy(path: str | Path) -> np.ndarray:
    """Read one golden array (no pickles); what the app-runtime check loads golden files with."""
    try:
        return np.load(Path(path), allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: golden file not found") from None
    except ValueError as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc})") from None


def read_golden(golden_dir: str | Path) -> dict[str, Any]:
    """Load ``index.json`` of a golden folder (format-checked)."""
    path = Path(golden_dir) / "index.json"
    index = read_json(path, what="golden index (is this a golden folder?)")
    if not isinstance(index, dict) or index.get("format") != GOLDEN_FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise DataError(f"{path}: format {found!r}, expected {GOLDEN_FORMAT!r}")
    return index
