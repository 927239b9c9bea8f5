"""The one preprocessing function, shared by training, evaluation, export parity and the runtime.

Released-code preprocessing (METHOD.md): grayscale frame, zero-padded at the bottom/right to a
square, resized to ``size`` x ``size``, repeated to 3 channels, scaled to [0, 1]; no mean/std
normalization. Masks: binarize (label >= 1 is bone), resize, threshold at 0.5.

Resizing uses OpenCV bilinear interpolation with half-pixel centres (``cv2.INTER_LINEAR``,
no antialiasing): a fully specified formula that the Android demo's Kotlin core reproduces
exactly and checks against golden vectors. ``INTERPOLATION`` names it for the model card.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

INTERPOLATION = "bilinear-half-pixel (cv2.INTER_LINEAR)"


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


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize (half-pixel centres) of a square image to size x size."""
    import cv2

    if img.shape[0] == size and img.shape[1] == size:
        return img
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)


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
