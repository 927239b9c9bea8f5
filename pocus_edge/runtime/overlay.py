"""Drawing and writing outputs: overlay frames (mask fill + contour, optional fusion-weight
map), the overlay video, per-frame masks (PNG folder or one NPZ), all written atomically."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..io import atomic_path

MASK_BGR = (60, 200, 255)  # warm yellow-orange: visible on gray speckle
CONTOUR_BGR = (0, 255, 255)


def to_frame_resolution(prob: np.ndarray, frame_shape: tuple[int, int]) -> np.ndarray:
    """Model-resolution map (S,S) -> frame resolution (H,W), undoing preprocess_frame's
    bottom/right zero pad and square resize."""
    import cv2

    h, w = frame_shape
    side = max(h, w)
    up = cv2.resize(prob.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    return up[:h, :w]


def render_overlay(frame: np.ndarray, mask: np.ndarray, weight: np.ndarray | None = None, *, alpha: float = 0.35) -> np.ndarray:
    """uint8 HxW frame + bool HxW mask (+ optional HxW fusion weight in [0,1]) -> BGR image.

    The weight map, when given, is drawn as a second panel to the right, blended over the
    frame: the generative branch's share of the fused probability, c_g / (c_g + c_c)
    (blue = the contrastive branch is trusted more, red = the generative branch).
    """
    import cv2

    bgr = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    out = bgr.copy()
    m = mask.astype(bool)
    if m.any():
        fill = np.empty_like(bgr)
        fill[:] = MASK_BGR
        out[m] = (bgr[m] * (1 - alpha) + fill[m] * alpha).astype(np.uint8)
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, CONTOUR_BGR, 1)
    if weight is None:
        return out
    heat = cv2.applyColorMap(np.clip(weight * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    panel = (bgr * 0.5 + heat * 0.5).astype(np.uint8)
    return np.concatenate([out, panel], axis=1)


class VideoSink:
    """MP4 (mp4v) overlay video, written to a temporary name and renamed on close."""

    def __init__(self, path: str | Path, fps: float = 30.0):
        self.path = Path(path)
        self.fps = float(fps) if fps and fps > 0 else 30.0
        self._ctx = None
        self._writer = None
        self._size: tuple[int, int] | None = None
        self.frames = 0

    def write(self, image: np.ndarray) -> None:
        import cv2

        if self._writer is None:
            self._ctx = atomic_path(self.path)
            tmp = self._ctx.__enter__()
            h, w = image.shape[:2]
            self._size = (w, h)
            self._writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self._size)
            if not self._writer.isOpened():
                self._ctx.__exit__(DataError, None, None)
                self._writer = None
                raise DataError(f"{self.path}: OpenCV cannot write an mp4v video here")
        if (image.shape[1], image.shape[0]) != self._size:
            # The frame size changed mid-stream (probe setting): keep the video's size.
            image = cv2.resize(image, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(image)
        self.frames += 1

    def close(self, ok: bool = True) -> None:
        if self._writer is None:
            return
        self._writer.release()
        self._writer = None
        if ok:
            self._ctx.__exit__(None, None, None)
        else:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


class MaskSink:
    """Per-frame binary masks (0/255 uint8 at frame resolution).

    ``*.npz``: one NumPy archive, entries ``frame_<index>`` written one at a time into the zip
    (memory stays flat), renamed into place on close. Anything else: a folder of
    ``<index>.png`` files, each written atomically.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.npz = self.path.suffix.lower() == ".npz"
        self.count = 0
        self._zip = None
        self._ctx = None
        if self.npz:
            self._ctx = atomic_path(self.path)
            tmp = self._ctx.__enter__()
            self._zip = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)
        else:
            self.path.mkdir(parents=True, exist_ok=True)

    def write(self, index: int, mask: np.ndarray) -> None:
        img = (mask.astype(bool) * 255).astype(np.uint8)
        if self._zip is not None:
            with self._zip.open(f"frame_{index:07d}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, img, allow_pickle=False)
        else:
            from ..data.layout import write_gray_png

            write_gray_png(self.path / f"{index:07d}.png", img)
        self.count += 1

    def close(self, ok: bool = True) -> None:
        if self._zip is None:
            return
        zf, self._zip = self._zip, None
        try:
            zf.close()
        except BaseException as exc:  # e.g. a full disk: discard the temporary, report the archive
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        if ok:
            self._ctx.__exit__(None, None, None)
        else:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


def save_overlay_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    import cv2

    from ..io import write_bytes_atomic

    ok, enc = cv2.imencode(".png", image)
    if not ok:
        raise DataError(f"{path}: PNG encoding failed")
    return write_bytes_atomic(path, enc.tobytes())
