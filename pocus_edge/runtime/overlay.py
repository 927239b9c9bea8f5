"""Drawing and writing outputs: overlay frames (mask fill + contour, optional fusion-weight
map), the overlay video (H.264 MP4 that browsers play), per-frame masks (PNG folder or one
NPZ), all written atomically."""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..inference.base import to_frame_resolution  # noqa: F401  (the sinks' and users' name for it)
from ..io import atomic_path

MASK_BGR = (60, 200, 255)  # warm yellow-orange: visible on gray speckle
CONTOUR_BGR = (0, 255, 255)


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


class OverlayCodecWarning(UserWarning):
    """The overlay video falls back to a codec browsers do not play."""


class _PyAVWriter:
    """H.264 (libx264, yuv420p) in MP4 with the index at the front ("faststart"): the form every
    browser plays, progressively. Frames are padded to even sizes (4:2:0 chroma needs them)."""

    codec = "h264"

    def __init__(self, path: Path, size: tuple[int, int], fps: float):
        import av

        self._av = av
        width, height = size
        self._container = av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"})
        try:
            self._stream = self._container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            self._stream.width, self._stream.height = width + width % 2, height + height % 2
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"preset": "veryfast", "crf": "23"}
        except BaseException:
            self._container.close()
            raise
        self._pad = (height % 2, width % 2)

    def write(self, bgr: np.ndarray) -> None:
        if any(self._pad):
            bgr = np.pad(bgr, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(bgr), format="bgr24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def finish(self) -> None:
        try:
            for packet in self._stream.encode(None):  # flush the encoder's delayed frames
                self._container.mux(packet)
        finally:
            self._container.close()

    def abort(self) -> None:
        try:
            self._container.close()
        except Exception:
            pass

    @staticmethod
    def frames_in(path: Path) -> int:
        """Video frames in the file's index, read back with PyAV (-1 if it cannot be opened)."""
        import av

        try:
            with av.open(str(path)) as container:
                return int(container.streams.video[0].frames)
        except (av.error.FFmpegError, OSError, IndexError):
            return -1


class _OpenCVWriter:
    """MPEG-4 part 2 ("mp4v") through OpenCV: plays in VLC and most desktop players, not in browsers."""

    codec = "mp4v"

    def __init__(self, path: Path, size: tuple[int, int], fps: float):
        import cv2

        self._writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        if not self._writer.isOpened():
            raise DataError(f"{path.name}: OpenCV cannot write an mp4v video here")

    def write(self, bgr: np.ndarray) -> None:
        self._writer.write(bgr)

    def finish(self) -> None:
        self._writer.release()

    def abort(self) -> None:
        self._writer.release()

    @staticmethod
    def frames_in(path: Path) -> int:
        import cv2

        cap = cv2.VideoCapture(str(path))
        try:
            return int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else -1
        finally:
            cap.release()


def _pick_writer(codec: str):
    if codec not in ("auto", "h264", "mp4v"):
        raise DataError(f"unknown overlay codec {codec!r}; choose auto, h264 or mp4v")
    if codec == "mp4v":
        return _OpenCVWriter
    try:
        import av  # noqa: F401
    except ImportError:
        if codec == "h264":
            raise DataError("H.264 overlays need PyAV (pip install av)") from None
        warnings.warn(
            "PyAV is not installed: the overlay video is written as mp4v, which browsers do not play "
            "(pip install av for H.264)", OverlayCodecWarning, stacklevel=3,
        )
        return _OpenCVWriter
    return _PyAVWriter


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class VideoSink:
    """The overlay video: H.264 in MP4 through PyAV (browsers play it), or OpenCV's mp4v when PyAV
    is missing (with an :class:`OverlayCodecWarning`). Written under a temporary name; on close
    the file's frame count is read back and must equal the frames written before the file is
    renamed into place, so a full disk or a failed encoder never leaves an undecodable video
    under the final name (the error names the file; the temporary file is removed)."""

    def __init__(self, path: str | Path, fps: float = 30.0, *, codec: str = "auto"):
        self.path = Path(path)
        self.fps = float(fps) if fps and fps > 0 else 30.0
        self._writer_class = _pick_writer(codec)
        self.codec = self._writer_class.codec
        self._ctx = None
        self._tmp: Path | None = None
        self._writer = None
        self._size: tuple[int, int] | None = None
        self.frames = 0

    def write(self, image: np.ndarray) -> None:
        import cv2

        if self._writer is None:
            self._open(image.shape[1], image.shape[0])
        if (image.shape[1], image.shape[0]) != self._size:
            # The frame size changed mid-stream (probe setting): keep the video's size.
            image = cv2.resize(image, self._size, interpolation=cv2.INTER_AREA)
        try:
            self._writer.write(image)
        except Exception as exc:
            self._fail(exc, "could not write the overlay video")
        self.frames += 1

    def _open(self, width: int, height: int) -> None:
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._size = (width, height)
        try:
            self._writer = self._writer_class(self._tmp, self._size, self.fps)
        except Exception as exc:
            self._fail(exc, "could not start the overlay video")

    def _fail(self, exc: BaseException, what: str) -> None:
        """Discard the temporary file and raise one DataError naming the final path."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.abort()
        self._discard(exc)
        reason = str(exc).split(": ", 1)[-1] if isinstance(exc, DataError) else _reason(exc)
        raise DataError(f"{self.path}: {what} ({reason}); nothing was written") from None

    def _discard(self, exc: BaseException) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            # atomic_path removes the temporary file when its block ends with an exception.
            try:
                ctx.__exit__(type(exc), exc, exc.__traceback__)
            except BaseException:
                pass

    def close(self, ok: bool = True) -> None:
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        try:
            writer.finish()
        except Exception as exc:
            self._discard(exc)
            raise DataError(f"{self.path}: could not finish the overlay video ({_reason(exc)}); nothing was written") from None
        if not ok:
            self._discard(RuntimeError("aborted"))
            return
        found = writer.frames_in(self._tmp)
        if found != self.frames:
            self._discard(RuntimeError("verification failed"))
            held = "cannot be opened" if found < 0 else f"holds {found}"
            raise DataError(
                f"{self.path}: the overlay video did not verify ({self.frames} frames written, the file {held}; "
                "disk full?); nothing was written"
            )
        ctx, self._ctx = self._ctx, None
        ctx.__exit__(None, None, None)


MASK_PNG = re.compile(r"^\d{7}\.png$")  # a masks folder's files: <frame index>.png


def is_masks_folder(path: Path) -> bool:
    """A folder this sink wrote (only ``<index>.png`` files): the one kind it may replace."""
    return path.is_dir() and all(MASK_PNG.match(p.name) and p.is_file() for p in path.iterdir())


class MaskSink:
    """Per-frame binary masks (0/255 uint8 at frame resolution).

    ``*.npz``: one NumPy archive, entries ``frame_<index>`` written one at a time into the zip
    (memory stays flat), renamed into place on close. When the frames carry a risk
    (:meth:`write_risk`), the archive also gets ``risk`` (float32), ``risk_frames`` (int64, the
    frame index of each risk: the same frames as the ``frame_<index>`` entries, in the order they
    were written) and ``drift_alarm`` (uint8, 1 while the alarm was on; only with a drift band),
    spooled to a temporary file while the stream runs and added on close. Anything else: a folder of
    ``<index>.png`` files, written into a staging folder beside it and renamed into place on
    close, replacing an earlier masks folder; a failed run leaves nothing under the name.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.npz = self.path.suffix.lower() == ".npz"
        self.count = 0
        self._zip = None
        self._risk_spool = None  # (index int64, risk float32, alarm uint8) records, one per frame
        self._risk_count = 0
        self._has_alarm = False
        self._folder: Path | None = None
        if self.npz:
            self._ctx = atomic_path(self.path)
            tmp = self._ctx.__enter__()
            self._zip = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)
        else:
            self._ctx = atomic_path(self.path, suffix=".staging", kind="dir", replaces=is_masks_folder)
            self._folder = self._ctx.__enter__()
            try:
                self._folder.mkdir()
            except BaseException as exc:
                self._finish(exc)
                raise

    def write(self, index: int, mask: np.ndarray) -> None:
        img = (mask.astype(bool) * 255).astype(np.uint8)
        if self._zip is not None:
            with self._zip.open(f"frame_{index:07d}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, img, allow_pickle=False)
        else:
            from ..data.layout import write_gray_png
            from ..io import output_error

            try:
                write_gray_png(self._folder / f"{index:07d}.png", img)
            except OSError as exc:  # named by the folder the user asked for, not the staging one
                raise output_error(self.path, exc, note="nothing was written") from None
        self.count += 1

    _RISK_RECORD = np.dtype([("index", "<i8"), ("risk", "<f4"), ("alarm", "u1")])

    def write_risk(self, index: int, risk: float, alarm: bool | None) -> None:
        """The risk (and drift alarm) of the frame last written; kept in the .npz only."""
        if not self.npz:
            return
        if self._risk_spool is None:
            import tempfile

            self._risk_spool = tempfile.TemporaryFile()
        self._has_alarm = self._has_alarm or alarm is not None
        self._risk_spool.write(np.array([(index, risk, bool(alarm))], self._RISK_RECORD).tobytes())
        self._risk_count += 1

    def _write_risk_entries(self, zf: zipfile.ZipFile) -> None:
        spool, self._risk_spool = self._risk_spool, None
        if spool is None:
            return
        try:
            names = [("risk_frames", "index", "<i8"), ("risk", "risk", "<f4")] + ([("drift_alarm", "alarm", "u1")] if self._has_alarm else [])
            for entry, column, dtype in names:
                with zf.open(f"{entry}.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array_header_1_0(fh, {"descr": dtype, "fortran_order": False, "shape": (self._risk_count,)})
                    spool.seek(0)
                    while True:  # a column at a time, a block of records at a time: memory stays flat
                        block = spool.read(self._RISK_RECORD.itemsize * 65536)
                        if not block:
                            break
                        fh.write(np.ascontiguousarray(np.frombuffer(block, self._RISK_RECORD)[column]).astype(dtype).tobytes())
        finally:
            spool.close()

    def close(self, ok: bool = True) -> None:
        """Rename the archive or folder into place (``ok``) or discard it; a second call does nothing."""
        if self._ctx is None:
            return
        if self._zip is not None:
            zf, self._zip = self._zip, None
            try:
                if ok:
                    self._write_risk_entries(zf)
                zf.close()
            except BaseException as exc:  # e.g. a full disk: discard the temporary, report the archive
                try:
                    zf.close()
                except BaseException:
                    pass
                self._finish(exc)
                raise
        self._finish(None if ok else RuntimeError("aborted"))

    def _finish(self, exc: BaseException | None) -> None:
        if self._risk_spool is not None:  # discarded with the archive
            self._risk_spool.close()
            self._risk_spool = None
        ctx, self._ctx = self._ctx, None
        if exc is None:
            ctx.__exit__(None, None, None)
        else:
            ctx.__exit__(type(exc), exc, exc.__traceback__)


def save_overlay_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    import cv2

    from ..io import write_bytes_atomic

    ok, enc = cv2.imencode(".png", image)
    if not ok:
        raise DataError(f"{path}: PNG encoding failed")
    return write_bytes_atomic(path, enc.tobytes())
