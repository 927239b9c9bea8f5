"""Frame sources. Each is an iterable of ``(frame uint8 HxW, timestamp_ms float, index int)``.

* :class:`TvdH5Source` - TeleMED recordings in the ``.tvd.h5`` layout (schema v1) of the
  open-source ``telemed`` package, cropped to the B-mode ROI, read lazily.
* :class:`RawStreamSource` - the raw binary protocol (:mod:`.protocol`) on stdin, a pipe, a
  socket, or a TCP port bound to 127.0.0.1 unless another address is given explicitly.
* :class:`VideoSource` (OpenCV), :class:`ImageFolderSource`, :class:`DicomSource`
  (multi-frame DICOM via pydicom, one frame decoded at a time).

A source never crashes on one bad frame: it counts it in ``frames_invalid`` (with a reason
in ``invalid_reasons``) and goes on. A file that cannot be read at all raises DataError.
``live`` sources are paced by the sender, so the pipeline never adds its own pacing to them.
"""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import ConfigError, DataError
from . import protocol
from .base import Frame, FrameSource

# ---------------------------------------------------------------------------------------------
# TeleMED .tvd.h5


class TvdH5Source(FrameSource):
    """TeleMED ``.tvd.h5`` (schema v1): ``/frames/gray`` uint8 (N,H,W), ``/timing/time_ms``
    float64 (N,), root attributes ``n_frames`` and the B-mode ROI ``roi1_x1, roi1_x2, roi1_y1,
    roi1_y2`` (1-based, inclusive; x = column, y = row). Frames are cropped to the ROI and read
    ``chunk`` at a time, so a 20k-frame recording is never loaded whole. Without ROI attributes
    the whole frame is used."""

    FRAMES = "frames/gray"
    TIMES = "timing/time_ms"
    ROI_KEYS = ("roi1_x1", "roi1_x2", "roi1_y1", "roi1_y2")

    def __init__(self, path: str | Path, *, crop_roi: bool = True, chunk: int = 16):
        super().__init__()
        import h5py

        self.path = Path(path)
        self.name = str(self.path)
        self.chunk = max(1, int(chunk))
        if not self.path.is_file():
            raise DataError(f"{self.path}: file not found")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise DataError(f"{self.path}: not a readable HDF5 file ({_first_line(exc)})") from None
        try:
            self._open(crop_roi)
        except BaseException:
            self._h5.close()
            raise

    def _open(self, crop_roi: bool) -> None:
        import h5py

        h5 = self._h5
        for key in (self.FRAMES, self.TIMES):
            obj = h5.get(key)
            if not isinstance(obj, h5py.Dataset):
                raise DataError(f"{self.path}: missing dataset /{key} (not a .tvd.h5 schema v1 recording?)")
        frames, times = h5[self.FRAMES], h5[self.TIMES]
        if frames.ndim != 3 or frames.dtype != np.uint8:
            raise DataError(f"{self.path}: /{self.FRAMES} must be uint8 (N,H,W), got {frames.dtype} {frames.shape}")
        if times.ndim != 1:
            raise DataError(f"{self.path}: /{self.TIMES} must be 1-D, got shape {times.shape}")
        if times.dtype.kind not in "iuf":
            raise DataError(f"{self.path}: /{self.TIMES} must hold numbers (milliseconds), got {_dtype_words(times.dtype)}")
        n_stored = frames.shape[0]
        n = _int_attr(self.path, h5.attrs, "n_frames", minimum=0) if "n_frames" in h5.attrs else n_stored
        if n > n_stored:
            raise DataError(f"{self.path}: n_frames={n} but /{self.FRAMES} holds only {n_stored} frames (truncated recording?)")
        if times.shape[0] < n:
            raise DataError(f"{self.path}: /{self.TIMES} has {times.shape[0]} entries for {n} frames")
        if n == 0:
            raise DataError(f"{self.path}: the recording holds no frames")
        _, height, width = frames.shape
        present = [k for k in self.ROI_KEYS if k in h5.attrs]
        if crop_roi and present:
            if len(present) != 4:
                missing = [k for k in self.ROI_KEYS if k not in h5.attrs]
                raise DataError(f"{self.path}: incomplete ROI attributes (missing {', '.join(missing)})")
            x1, x2, y1, y2 = (_int_attr(self.path, h5.attrs, k, minimum=1) for k in self.ROI_KEYS)
            if not (1 <= x1 <= x2 <= width and 1 <= y1 <= y2 <= height):
                raise DataError(
                    f"{self.path}: ROI x {x1}..{x2}, y {y1}..{y2} (1-based, inclusive) out of bounds "
                    f"for {width}x{height} frames"
                )
            # 1-based inclusive -> 0-based half-open.
            self.roi = (y1 - 1, y2, x1 - 1, x2)
        else:
            self.roi = (0, height, 0, width)
        self.n_frames = n
        self._frames, self._times = frames, times
        if n >= 2:
            t = self._times[: min(n, 1000)]
            span = float(t[-1] - t[0])
            self.fps = (len(t) - 1) * 1000.0 / span if span > 0 else None

    def __len__(self) -> int:
        return self.n_frames

    def __iter__(self) -> Iterator[Frame]:
        r0, r1, c0, c1 = self.roi
        for start in range(0, self.n_frames, self.chunk):
            stop = min(start + self.chunk, self.n_frames)
            try:
                block = self._frames[start:stop, r0:r1, c0:c1]
                times = self._times[start:stop]
            except (OSError, RuntimeError) as exc:
                raise DataError(f"{self.path}: cannot read frames {start}..{stop - 1} ({_first_line(exc)}; truncated file?)") from None
            for k in range(stop - start):
                ts = float(times[k])
                if not np.isfinite(ts):
                    self._reject("non-finite timestamp")
                    continue
                yield np.ascontiguousarray(block[k]), ts, start + k

    def close(self) -> None:
        try:
            self._h5.close()
        except Exception:
            pass

    def describe(self) -> dict:
        d = super().describe()
        d.update(n_frames=self.n_frames, roi_rows=list(self.roi[:2]), roi_cols=list(self.roi[2:]))
        return d


def _dtype_words(dtype: np.dtype) -> str:
    return "text" if dtype.kind in "SUO" else f"{dtype}"


def _int_attr(path: Path, attrs, key: str, *, minimum: int) -> int:
    """An HDF5 attribute that must be one whole number >= ``minimum``; DataError otherwise
    (text, NaN, a fraction, an array of several values, a negative number)."""
    try:
        raw = attrs[key]
    except Exception as exc:  # h5py raises several types for unreadable attribute types
        raise DataError(f"{path}: attribute {key} cannot be read ({_first_line(exc)})") from None
    value = np.asarray(raw)
    if value.dtype.kind in "SUO":
        raise DataError(f"{path}: attribute {key} must be a whole number, got text {raw!r:.40}")
    if value.size != 1:
        raise DataError(f"{path}: attribute {key} must be one whole number, got an array of shape {value.shape}")
    value = value.reshape(())
    if value.dtype.kind not in "iuf":
        raise DataError(f"{path}: attribute {key} must be a whole number, got {value.dtype}")
    number = float(value)
    if not np.isfinite(number) or number != int(number):
        raise DataError(f"{path}: attribute {key} must be a whole number, got {number}")
    if int(number) < minimum:
        raise DataError(f"{path}: attribute {key} must be >= {minimum}, got {int(number)}")
    return int(number)


def write_tvd_h5(path: str | Path, frames: np.ndarray, time_ms: np.ndarray, roi: tuple[int, int, int, int] | None = None) -> Path:
    """Write a schema-v1 ``.tvd.h5`` (tests, the demo, and converting recordings).
    ``roi`` = (x1, x2, y1, y2), 1-based inclusive. Written atomically."""
    import h5py

    from ..io import atomic_path

    frames = np.asarray(frames, dtype=np.uint8)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("frames/gray", data=frames, chunks=(1,) + frames.shape[1:] if len(frames) else None)
            h5.create_dataset("timing/time_ms", data=np.asarray(time_ms, dtype=np.float64))
            h5.attrs["n_frames"] = frames.shape[0]
            h5.attrs["schema_version"] = 1
            if roi is not None:
                for key, value in zip(TvdH5Source.ROI_KEYS, roi):
                    h5.attrs[key] = int(value)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Raw protocol


class RawStreamSource(FrameSource):
    """Frames in the raw protocol (see :mod:`pocus_edge.runtime.protocol`) from a socket, a pipe
    or stdin. Bad frames are counted (``frames_invalid``) and skipped; a frame must arrive whole
    within ``frame_timeout`` seconds of its first byte; the stream ends after ``idle_timeout``
    seconds without a valid frame. A TCP source serves one sender at a time: others are refused
    (``senders_refused``)."""

    live = True

    def __init__(
        self,
        stream,
        *,
        name: str = "raw",
        frame_timeout: float | None = protocol.DEFAULT_FRAME_TIMEOUT,
        idle_timeout: float | None = protocol.DEFAULT_IDLE_TIMEOUT,
        max_width: int = protocol.DEFAULT_MAX_WIDTH,
        max_height: int = protocol.DEFAULT_MAX_HEIGHT,
        owned: list | None = None,
        listener: socket.socket | None = None,
    ):
        super().__init__()
        for flag, value in (("frame timeout", frame_timeout), ("idle timeout", idle_timeout)):
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} must be a positive number of seconds, got {value}")
        self.name = name
        self.idle_timeout = idle_timeout
        self._stream = stream
        self._owned = owned or []
        self._listener = listener
        self._reader: protocol.ByteReader | None = None
        self.parser = protocol.FrameParser(max_width=max_width, max_height=max_height, frame_timeout=frame_timeout)
        self.last_header: protocol.FrameHeader | None = None

    @property
    def frames_invalid(self) -> int:
        return self.parser.counters.frames_invalid

    @property
    def invalid_reasons(self) -> dict[str, int]:
        return dict(self.parser.counters.invalid_reasons or {})

    @property
    def senders_refused(self) -> int:
        return self._reader.refused if self._reader is not None else 0

    @classmethod
    def stdin(cls, **kw) -> "RawStreamSource":
        return cls(sys.stdin.buffer, name="stdin", **kw)

    @classmethod
    def listen_tcp(cls, host: str = "127.0.0.1", port: int = 0, *, accept_timeout: float = 30.0, on_listen=None, **kw) -> "RawStreamSource":
        """Bind ``host:port`` (loopback unless told otherwise), accept ONE sender, read its frames;
        senders that connect meanwhile are refused (reset) and counted.
        ``on_listen(host, port)`` is called once listening (port 0 picks a free port)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            server = socket.create_server((host, port), family=family)
        except OSError as exc:
            raise DataError(f"tcp://{host}:{port}: cannot listen ({exc.strerror or exc})") from None
        try:
            server.settimeout(accept_timeout)
            if on_listen is not None:
                on_listen(*server.getsockname()[:2])
            try:
                conn, _ = server.accept()
            except TimeoutError:
                raise DataError(f"tcp://{host}:{port}: no sender connected within {accept_timeout:g} s") from None
        except BaseException:
            server.close()
            raise
        conn.setblocking(True)
        return cls(conn, name=f"tcp://{host}:{server.getsockname()[1]}", owned=[conn, server], listener=server, **kw)

    def __iter__(self) -> Iterator[Frame]:
        self._reader = protocol.ByteReader(self._stream, listener=self._listener)
        index = 0
        for header, pixels in protocol.iter_raw_frames(self._reader, self.parser, idle_timeout=self.idle_timeout):
            self.last_header = header
            self.last_decode_ms = self.parser.last_parse_ms
            yield pixels, header.timestamp_ms, index
            index += 1

    def close(self) -> None:
        for obj in self._owned:
            try:
                obj.close()
            except OSError:
                pass

    def describe(self) -> dict:
        d = super().describe()
        d.update(bytes_skipped=self.parser.counters.bytes_skipped, senders_refused=self.senders_refused)
        return d


# ---------------------------------------------------------------------------------------------
# Video, image folder, DICOM


def _to_gray(img: np.ndarray, order: str = "BGR") -> np.ndarray:
    import cv2

    if img.ndim == 2:
        return img
    if img.ndim == 3 and img.shape[2] == 1:
        return img[..., 0]
    code = {"BGR": cv2.COLOR_BGR2GRAY, "RGB": cv2.COLOR_RGB2GRAY}[order]
    return cv2.cvtColor(np.ascontiguousarray(img[..., :3]), code)


class VideoSource(FrameSource):
    """Any video OpenCV can decode (mp4, avi, ...), converted to grayscale."""

    def __init__(self, path: str | Path):
        super().__init__()
        import cv2

        self.path = Path(path)
        self.name = str(self.path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: file not found")
        self._cap = cv2.VideoCapture(str(self.path))
        if not self._cap.isOpened():
            raise DataError(f"{self.path}: OpenCV cannot open this video")
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if fps > 0 else None
        n = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self._n = n if n > 0 else None

    def __len__(self) -> int:
        if self._n is None:
            raise TypeError(f"{self.name}: length unknown")
        return self._n

    def __iter__(self) -> Iterator[Frame]:
        import cv2

        index = 0
        period = 1000.0 / self.fps if self.fps else None
        while True:
            ok, img = self._cap.read()
            if not ok:
                break
            ts = index * period if period else float(self._cap.get(cv2.CAP_PROP_POS_MSEC))
            yield _to_gray(img), ts, index
            index += 1

    def close(self) -> None:
        self._cap.release()


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


class ImageFolderSource(FrameSource):
    """Every image in a folder, in natural name order (frame2 before frame10), at ``fps``."""

    def __init__(self, path: str | Path, *, fps: float = 30.0):
        super().__init__()
        self.path = Path(path)
        self.name = str(self.path)
        if not self.path.is_dir():
            raise DataError(f"{self.path}: folder not found")
        self.files = sorted((p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: _natural_key(p.name))
        if not self.files:
            raise DataError(f"{self.path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder")
        self.fps = float(fps)

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Frame]:
        from ..data.layout import read_gray_png

        period = 1000.0 / self.fps
        for index, p in enumerate(self.files):
            try:
                img = read_gray_png(p)
            except DataError:
                self._reject("unreadable image")
                continue
            yield img, index * period, index


class DicomSource(FrameSource):
    """A (multi-frame) DICOM file, decoded one frame at a time with ``pydicom.pixels.iter_pixels``.
    Timing from FrameTimeVector, FrameTime, CineRate or RecommendedDisplayFrameRate (else ``fps``)."""

    def __init__(self, path: str | Path, *, fps: float = 30.0):
        super().__init__()
        try:
            import pydicom
        except ImportError:  # the 'dicom' extra
            from ..extras import MissingExtra

            raise MissingExtra("pydicom", "dicom", f"{path}: reading DICOM") from None
        self.path = Path(path)
        self.name = str(self.path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: file not found")
        try:
            # Header only: pixel data stays on disk until iter_pixels decodes each frame.
            ds = pydicom.dcmread(self.path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises several types for non-DICOM input
            raise DataError(f"{self.path}: not a readable DICOM file ({_first_line(exc)})") from None
        if "Rows" not in ds or "Columns" not in ds:
            raise DataError(f"{self.path}: DICOM has no image (Rows/Columns missing)")
        self.n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        self.bits_stored = int(getattr(ds, "BitsStored", 8) or 8)
        self.photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
        self._times = self._frame_times(ds, fps)

    def _frame_times(self, ds, fps: float) -> np.ndarray:
        n = self.n_frames
        vec = getattr(ds, "FrameTimeVector", None)
        if vec is not None and len(vec) == n:
            # Element k is the time since frame k-1 (element 0 is 0).
            self.fps = None
            return np.cumsum(np.asarray([float(v) for v in vec]))
        frame_time = getattr(ds, "FrameTime", None)
        if frame_time:
            period = float(frame_time)
        else:
            rate = getattr(ds, "CineRate", None) or getattr(ds, "RecommendedDisplayFrameRate", None)
            period = 1000.0 / float(rate) if rate else 1000.0 / fps
        self.fps = 1000.0 / period
        return np.arange(n) * period

    def __len__(self) -> int:
        return self.n_frames

    def __iter__(self) -> Iterator[Frame]:
        from pydicom.pixels import iter_pixels

        index = 0
        try:
            for arr in iter_pixels(self.path):
                yield self._to_uint8(arr), float(self._times[min(index, len(self._times) - 1)]), index
                index += 1
        except (ValueError, RuntimeError, NotImplementedError, OSError) as exc:
            if index == 0:
                raise DataError(f"{self.path}: cannot decode DICOM pixel data ({_first_line(exc)})") from None
            # Frames that cannot be decoded after the first good one: count them, stop the file.
            self._reject("undecodable DICOM frame")

    def _to_uint8(self, arr: np.ndarray) -> np.ndarray:
        if arr.ndim == 3:
            arr = _to_gray(arr.astype(np.uint8) if arr.dtype != np.uint8 else arr, "RGB")
        if arr.dtype != np.uint8:
            shift = max(0, self.bits_stored - 8)
            arr = np.clip(arr.astype(np.int64) >> shift, 0, 255).astype(np.uint8)
        if self.photometric == "MONOCHROME1":
            arr = 255 - arr  # MONOCHROME1: 0 is white
        return arr


# ---------------------------------------------------------------------------------------------


def _open_tcp(spec: str, *, bind: str, frame_timeout, idle_timeout, accept_timeout: float, on_listen, **_) -> FrameSource:
    host, port = protocol.parse_tcp_address(spec, default_host=bind)
    return RawStreamSource.listen_tcp(host, port, accept_timeout=accept_timeout, on_listen=on_listen,
                                      frame_timeout=frame_timeout, idle_timeout=idle_timeout)


# SOURCE strings that start with a scheme -> opener(spec, **the options of open_source). Another
# network transport registers its prefix here.
def _open_igtl(spec: str, *, frame_timeout, idle_timeout, accept_timeout: float, **_) -> FrameSource:
    from .igtl import IgtlSource

    kw = {} if frame_timeout is None else {"frame_timeout": frame_timeout}
    return IgtlSource.connect(spec, connect_timeout=accept_timeout, idle_timeout=idle_timeout, **kw)


SCHEMES: dict[str, Callable[..., FrameSource]] = {"tcp:": _open_tcp, "igtl:": _open_igtl}


def open_source(
    spec: str | Path,
    *,
    bind: str = "127.0.0.1",
    fps: float = 30.0,
    frame_timeout: float | None = protocol.DEFAULT_FRAME_TIMEOUT,
    idle_timeout: float | None = protocol.DEFAULT_IDLE_TIMEOUT,
    accept_timeout: float = 30.0,
    on_listen=None,
) -> FrameSource:
    """Open a source from a command-line SOURCE string.

    ``-`` or ``stdin``: raw protocol on stdin. ``tcp:PORT`` / ``tcp://HOST:PORT`` (and any other
    prefix in :data:`SCHEMES`): a network sender, bound to ``bind`` (127.0.0.1) unless HOST is
    given. ``igtl://HOST:PORT``: IMAGE messages of an OpenIGTLink server (:mod:`.igtl`).
    ``*.h5`` / ``*.hdf5``: TeleMED ``.tvd.h5``. A folder: images. ``*.dcm`` or a file starting
    with a DICOM preamble: DICOM. Anything else: a video file via OpenCV.
    """
    text = str(spec)
    if text in ("-", "stdin"):
        return RawStreamSource.stdin(frame_timeout=frame_timeout, idle_timeout=idle_timeout)
    for prefix, opener in SCHEMES.items():
        if text.startswith(prefix):
            return opener(text, bind=bind, fps=fps, frame_timeout=frame_timeout, idle_timeout=idle_timeout,
                          accept_timeout=accept_timeout, on_listen=on_listen)
    path = Path(text)
    if path.is_dir():
        return ImageFolderSource(path, fps=fps)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    suffixes = "".join(path.suffixes).lower()
    if suffixes.endswith((".h5", ".hdf5")):
        return TvdH5Source(path)
    if suffixes.endswith((".dcm", ".dicom")) or _is_dicom(path):
        return DicomSource(path, fps=fps)
    return VideoSource(path)


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
