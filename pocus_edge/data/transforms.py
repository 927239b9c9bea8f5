"""The one preprocessing function, shared by training, evaluation, export parity and the runtime.

Released-code preprocessing (docs/method.md): grayscale frame, zero-padded at the bottom/right to a
square, resized to ``size`` x ``size``, repeated to 3 channels, scaled to [0, 1]; no mean/std
normalization. Masks: binarize (label >= 1 is bone), resize, threshold at 0.5.

Resizing is bilinear with half-pixel centres and edge clamping, no antialiasing (the same
sampling grid as ``cv2.INTER_LINEAR``), written out here in float64 instead of calling
``cv2.resize``: OpenCV's 8-bit INTER_LINEAR uses 11-bit fixed-point weights and SIMD paths
that are not bit-exact with its own scalar path, so no other platform (the Android demo's
Kotlin core) could reproduce it exactly. The formula, for an input of n pixels resized to m
along one axis (rows first, then columns)::

    s = clamp((i + 0.5) * n / m - 0.5, 0, n - 1);  i0 = floor(s);  i1 = min(i0 + 1, n - 1)
    w = s - i0;  out[i] = in[i0] * (1 - w) + in[i1] * w

and 8-bit outputs are rounded half up: ``floor(v + 0.5)``. ``INTERPOLATION`` names it for
the model card.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

INTERPOLATION = "bilinear-half-pixel-clamped, float64, rows then columns, round-half-up"


def _check_frame(frame: np.ndarray, what: str = "frame") -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[..., 0]
    if frame.ndim != 2:
        raise DataError(f"{what}: expected a 2-D grayscale image, got shape {frame.shape}")
    if frame.shape[0] < 1 or frame.shape[1] < 1:
        raise DataError(f"{what}: empty image {frame.shape}")
    if frame.dtype != np.uint8:
        if np.issubdtype(frame.dtype, np.floating) and not np.all(np.isfinite(frame)):
            raise DataError(f"{what}: contains NaN or infinite pixels")
        raise DataError(f"{what}: expected uint8 pixels, got {frame.dtype}")
    return frame


def pad_to_square(frame: np.ndarray) -> np.ndarray:
    """Zero-pad at the bottom and right so height == width (top-left content stays in place)."""
    h, w = frame.shape[:2]
    side = max(h, w)
    if h == w:
        return frame
    out = np.zeros((side, side) + frame.shape[2:], dtype=frame.dtype)
    out[:h, :w] = frame
    return out


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices ``i0``, ``i1`` and weight ``w`` of ``i1`` for each of ``n_out`` outputs
    (half-pixel centres, clamped at both edges; see the module docstring)."""
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, pos - i0


def resize_bilinear(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a 2-D array to height x width. uint8 in -> uint8 out (rounded half
    up); float in -> float32 out."""
    if img.ndim != 2:
        raise ValueError(f"resize_bilinear expects a 2-D array, got shape {img.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"resize_bilinear: bad output size {height}x{width}")
    r0, r1, wr = bilinear_taps(img.shape[0], height)
    # Gather the needed rows before converting, so a large frame is not copied to float64 whole.
    rows = img[r0].astype(np.float64) * (1.0 - wr)[:, None] + img[r1].astype(np.float64) * wr[:, None]
    c0, c1, wc = bilinear_taps(img.shape[1], width)
    out = rows[:, c0] * (1.0 - wc)[None, :] + rows[:, c1] * wc[None, :]
    if img.dtype == np.uint8:
        return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
    return out.astype(np.float32)


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize (half-pixel centres) of a square image to size x size."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    return resize_bilinear(img, size, size)


def preprocess_gray(frame: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxW -> uint8 size x size (pad bottom/right to square, bilinear resize).

    This is the part that runs outside the graph in the uint8-input export variant: the app
    feeds this array and the graph does the [0,1] scaling and channel repeat itself.
    """
    frame = _check_frame(frame)
    return resize_square(pad_to_square(frame), size)


def preprocess_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxW grayscale -> float32 (3, size, size) in [0, 1]."""
    g = preprocess_gray(frame, size).astype(np.float32) / np.float32(255.0)
    return np.repeat(g[None], 3, axis=0)


def preprocess_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """uint8 label map HxW -> float32 (1, size, size) binary bone mask.

    Binarize (label >= 1), pad like the image, bilinear resize of the 0/1 map, threshold 0.5.
    """
    mask = _check_frame(mask, "mask")
    binary = (mask >= 1).astype(np.float32)
    resized = resize_square(pad_to_square(binary), size)
    return (resized > 0.5).astype(np.float32)[None]


def preprocess_batch(frames: list[np.ndarray], size: int) -> np.ndarray:
    """List of uint8 HxW frames (sizes may differ) -> float32 (N, 3, size, size)."""
    return np.stack([preprocess_frame(f, size) for f in frames], axis=0)


# ---------------------------------------------------------------------------------------------
# Training-time augmentation (never used at inference; preprocessing above is unaffected)


class IntensityAugment:
    """Probe-agnostic intensity augmentation of a preprocessed gray frame (float32 (S, S) in
    [0, 1]): what changes between probes and presets without changing the anatomy. Each step is
    applied with probability ``p``, in this order, with values drawn uniformly:

    * gain: x * exp(u), u in [-0.3, 0.3] (x0.74 - x1.35);
    * gamma: x ** exp(u), u in [-0.4, 0.4] (0.67 - 1.49);
    * blur: Gaussian, sigma in [0.3, 1.5] px at the model's resolution;
    * noise: additive Gaussian, sd in [0.01, 0.06];
    * black level: b + (1 - b) x, b in [0, 0.1];

    then clipped to [0, 1]. The ranges are fixed a priori, generic for B-mode ultrasound, and
    not fitted to any probe profile. ``rng`` (numpy Generator) makes a sample reproducible.
    """

    GAIN_LOG = 0.3
    GAMMA_LOG = 0.4
    BLUR_SIGMA = (0.3, 1.5)
    NOISE_SD = (0.01, 0.06)
    BLACK_LEVEL = 0.1

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augmentation probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = np.asarray(gray, dtype=np.float32)
        if rng.random() < self.p:
            x = x * np.float32(np.exp(rng.uniform(-self.GAIN_LOG, self.GAIN_LOG)))
        if rng.random() < self.p:
            x = np.clip(x, 0.0, 1.0) ** np.float32(np.exp(rng.uniform(-self.GAMMA_LOG, self.GAMMA_LOG)))
        if rng.random() < self.p:
            import cv2

            sigma = rng.uniform(*self.BLUR_SIGMA)
            x = cv2.GaussianBlur(np.ascontiguousarray(x), (0, 0), sigmaX=sigma, sigmaY=sigma,
                                 borderType=cv2.BORDER_REFLECT_101)
        if rng.random() < self.p:
            x = x + rng.normal(0.0, rng.uniform(*self.NOISE_SD), size=x.shape).astype(np.float32)
        if rng.random() < self.p:
            b = np.float32(rng.uniform(0.0, self.BLACK_LEVEL))
            x = b + (np.float32(1.0) - b) * x
        return np.clip(x, 0.0, 1.0).astype(np.float32)


class StandardAugment:
    """The augmentation every arm of a comparison shares (the ``default`` fine-tuning recipe):
    nnU-Net's published data-augmentation ranges, fixed before any probe was looked at, so it
    carries no knowledge of the target. On a preprocessed gray frame (float32 (S, S) in [0, 1])
    and its mask (float32 (S, S) of {0, 1}), each step with its own probability, in this order:

    * scale: zoom about the centre by s in [0.7, 1.4] (p 0.2), bilinear for the frame, nearest for
      the mask, black outside the frame (the geometry changes, so the mask follows);
    * Gaussian noise: variance in [0, 0.1] of the [0, 1] range, here sd in [0, 0.1] (p 0.1);
    * Gaussian blur: sigma in [0.5, 1.0] px (p 0.2);
    * brightness: x * m, m in [0.75, 1.25] (p 0.15);
    * contrast: (x - mean) * c + mean, c in [0.75, 1.25] (p 0.15);
    * gamma: x ** g, g in [0.7, 1.5] (p 0.3);

    then clipped to [0, 1]. ``rng`` (numpy Generator) makes a sample reproducible."""

    joint = True  # changes the geometry: called with (frame, mask)
    SCALE = (0.7, 1.4)
    NOISE_SD = (0.0, 0.1)
    BLUR_SIGMA = (0.5, 1.0)
    BRIGHTNESS = (0.75, 1.25)
    CONTRAST = (0.75, 1.25)
    GAMMA = (0.7, 1.5)
    P = {"scale": 0.2, "noise": 0.1, "blur": 0.2, "brightness": 0.15, "contrast": 0.15, "gamma": 0.3}

    def __call__(self, gray: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        x = np.asarray(gray, dtype=np.float32)
        m = np.asarray(mask, dtype=np.float32)
        if rng.random() < self.P["scale"]:
            s = rng.uniform(*self.SCALE)
            h, w = x.shape
            matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), 0.0, s)
            x = cv2.warpAffine(x, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            m = cv2.warpAffine(m, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if rng.random() < self.P["noise"]:
            x = x + rng.normal(0.0, rng.uniform(*self.NOISE_SD), size=x.shape).astype(np.float32)
        if rng.random() < self.P["blur"]:
            sigma = rng.uniform(*self.BLUR_SIGMA)
            x = cv2.GaussianBlur(np.ascontiguousarray(x), (0, 0), sigmaX=sigma, sigmaY=sigma,
                                 borderType=cv2.BORDER_REFLECT_101)
        if rng.random() < self.P["brightness"]:
            x = x * np.float32(rng.uniform(*self.BRIGHTNESS))
        if rng.random() < self.P["contrast"]:
            mean = np.float32(x.mean())
            x = (x - mean) * np.float32(rng.uniform(*self.CONTRAST)) + mean
        if rng.random() < self.P["gamma"]:
            x = np.clip(x, 0.0, 1.0) ** np.float32(rng.uniform(*self.GAMMA))
        return np.clip(x, 0.0, 1.0).astype(np.float32), (m > 0.5).astype(np.float32)


AUGMENTATIONS = ("none", "intensity", "standard")


def make_augmentation(name: str):
    """The training augmentation called ``name`` (None for ``none``)."""
    if name == "none":
        return None
    if name == "intensity":
        return IntensityAugment()
    if name == "standard":
        return StandardAugment()
    raise DataError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")
