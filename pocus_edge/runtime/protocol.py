"""The raw frame protocol a probe-side app uses to push frames to ``pocus-edge stream``.

One frame on the wire = a fixed 36-byte little-endian header, then the pixels::

    offset size type     field
    0      4    bytes    magic         b"PEF1"
    4      1    uint8    version       1
    5      1    uint8    pixel_format  1 = GRAY8, 2 = RGB24, 3 = BGR24, 4 = GRAY16LE
    6      2    uint16   flags         bit 0: payload_crc32 is valid and must be checked
    8      2    uint16   width         pixels, 1..max_width
    10     2    uint16   height        pixels, 1..max_height
    12     4    uint32   sequence      sender's frame counter (informational)
    16     8    float64  timestamp_ms  acquisition time, any monotonic origin
    24     4    uint32   payload_size  must equal width * height * bytes_per_pixel
    28     4    uint32   payload_crc32 zlib CRC-32 of the payload (checked if flags bit 0)
    32     4    uint32   header_crc32  zlib CRC-32 of header bytes 0..31 (always checked)

Rows are stored top to bottom, pixels left to right, no row padding.

Receiving is a byte-stream parser with resynchronisation: anything that is not a valid
frame (garbage, a header that fails its CRC or the limits, a frame cut short by the next
frame or by the sender stopping) is skipped up to the next occurrence of the magic and
counted as *one* invalid frame. Every read has a timeout, so a sender that stops
mid-frame never hangs the receiver: after ``read_timeout`` seconds without a byte the
partial frame is dropped (counted invalid); after ``idle_timeout`` seconds without any
data the stream ends.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

from ..errors import DataError

MAGIC = b"PEF1"
VERSION = 1
HEADER = struct.Struct("<4sBBHHHIdII")  # everything before header_crc32
HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = HEADER.size + HEADER_CRC.size  # 36
assert HEADER_SIZE == 36

GRAY8, RGB24, BGR24, GRAY16LE = 1, 2, 3, 4
PIXEL_FORMATS = {GRAY8: ("GRAY8", 1), RGB24: ("RGB24", 3), BGR24: ("BGR24", 3), GRAY16LE: ("GRAY16LE", 2)}
FLAG_PAYLOAD_CRC = 0x1

DEFAULT_MAX_WIDTH = 4096
DEFAULT_MAX_HEIGHT = 4096
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024  # 64 MiB: 4096x4096 RGB24 is 48 MiB


def encode_frame(
    frame: np.ndarray,
    timestamp_ms: float,
    sequence: int = 0,
    *,
    pixel_format: int = GRAY8,
    payload_crc: bool = True,
) -> bytes:
    """Serialize one frame (uint8 HxW for GRAY8, uint8 HxWx3 for RGB24/BGR24, uint16 HxW for
    GRAY16LE) into header + payload bytes."""
    if pixel_format not in PIXEL_FORMATS:
        raise ValueError(f"unknown pixel format {pixel_format}")
    _, bpp = PIXEL_FORMATS[pixel_format]
    frame = np.ascontiguousarray(frame)
    h, w = frame.shape[:2]
    if pixel_format == GRAY16LE:
        payload = frame.astype("<u2").tobytes()
    else:
        payload = frame.astype(np.uint8).tobytes()
    if len(payload) != w * h * bpp:
        raise ValueError(f"frame shape {frame.shape} does not match pixel format {PIXEL_FORMATS[pixel_format][0]}")
    flags = FLAG_PAYLOAD_CRC if payload_crc else 0
    crc = zlib.crc32(payload) if payload_crc else 0
    head = HEADER.pack(MAGIC, VERSION, pixel_format, flags, w, h, sequence & 0xFFFFFFFF, float(timestamp_ms), len(payload), crc)
    return head + HEADER_CRC.pack(zlib.crc32(head)) + payload


def decode_pixels(payload: bytes | memoryview, pixel_format: int, width: int, height: int) -> np.ndarray:
    """Payload bytes -> uint8 HxW grayscale (colour: ITU-R BT.601 luma via OpenCV; 16-bit: top 8 bits)."""
    if pixel_format == GRAY8:
        return np.frombuffer(payload, dtype=np.uint8).reshape(height, width).copy()
    if pixel_format == GRAY16LE:
        return (np.frombuffer(payload, dtype="<u2").reshape(height, width) >> 8).astype(np.uint8)
    import cv2

    rgb = np.frombuffer(payload, dtype=np.uint8).reshape(height, width, 3)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY if pixel_format == RGB24 else cv2.COLOR_BGR2GRAY)


@dataclass
class FrameHeader:
    version: int
    pixel_format: int
    flags: int
    width: int
    height: int
    sequence: int
    timestamp_ms: float
    payload_size: int
    payload_crc32: int


class ByteReader:
    """Timeout-bounded reads from a socket, a pipe or any object with ``fileno()``.

    ``read_some(timeout)`` returns bytes, ``b""`` at end of stream, or ``None`` when nothing
    arrived within ``timeout`` seconds. Never blocks longer than the timeout.
    """

    def __init__(self, stream: socket.socket | BinaryIO | int, chunk: int = 1 << 16):
        self.chunk = chunk
        self._sock = stream if isinstance(stream, socket.socket) else None
        self._fd = stream if isinstance(stream, int) else stream.fileno()

    def read_some(self, timeout: float) -> bytes | None:
        try:
            ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        except (OSError, ValueError):  # closed underneath us
            return b""
        if not ready:
            return None
        try:
            if self._sock is not None:
                return self._sock.recv(self.chunk)
            return os.read(self._fd, self.chunk)
        except (ConnectionResetError, BrokenPipeError):
            return b""
        except BlockingIOError:
            return None


@dataclass
class StreamCounters:
    frames_ok: int = 0
    frames_invalid: int = 0  # discard events: each bad header / corrupt or truncated frame / garbage run
    bytes_skipped: int = 0
    invalid_reasons: dict | None = None

    def reject(self, reason: str, nbytes: int) -> None:
        self.frames_invalid += 1
        self.bytes_skipped += nbytes
        if self.invalid_reasons is None:
            self.invalid_reasons = {}
        self.invalid_reasons[reason] = self.invalid_reasons.get(reason, 0) + 1


class FrameParser:
    """Incremental, resynchronising parser: feed bytes, pop complete valid frames."""

    def __init__(
        self,
        *,
        max_width: int = DEFAULT_MAX_WIDTH,
        max_height: int = DEFAULT_MAX_HEIGHT,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ):
        self.max_width = max_width
        self.max_height = max_height
        self.max_payload = max_payload
        self.buf = bytearray()
        self.counters = StreamCounters()
        self._in_bad_run = False
        self.last_parse_ms = 0.0  # checksum + pixel decoding time of the last frame returned

    # -- helpers --------------------------------------------------------------------------
    def _discard_to_next_magic(self, reason: str, start: int = 1, *, keep_tail: bool = True) -> None:
        """Drop bytes up to the next magic at or after ``start`` and count one invalid frame.

        A run of bad bytes that arrives over several reads is one event: while no magic has been
        seen since the last discard, further discards only add to ``bytes_skipped``.
        """
        nxt = self.buf.find(MAGIC, start)
        found = nxt >= 0
        if not found:
            nxt = len(self.buf)
            if keep_tail:
                # Keep a trailing partial magic: the rest of it may still be arriving.
                for k in range(len(MAGIC) - 1, 0, -1):
                    if len(self.buf) - k >= start and self.buf.endswith(MAGIC[:k]):
                        nxt = len(self.buf) - k
                        break
        if self._in_bad_run:
            self.counters.bytes_skipped += nxt
        else:
            self.counters.reject(reason, nxt)
        self._in_bad_run = not found
        del self.buf[:nxt]

    def _header_problem(self, h: FrameHeader) -> str | None:
        if h.version != VERSION:
            return "unsupported version"
        if h.pixel_format not in PIXEL_FORMATS:
            return "unknown pixel format"
        if not (1 <= h.width <= self.max_width and 1 <= h.height <= self.max_height):
            return "frame size out of limits"
        bpp = PIXEL_FORMATS[h.pixel_format][1]
        if h.payload_size != h.width * h.height * bpp or h.payload_size > self.max_payload:
            return "payload size mismatch or over limit"
        if not np.isfinite(h.timestamp_ms):
            return "non-finite timestamp"
        return None

    # -- public ---------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self.buf += data

    def pending(self) -> int:
        return len(self.buf)

    def next_frame(self) -> tuple[FrameHeader, np.ndarray] | None:
        """Return the next complete valid frame in the buffer, or None if more bytes are needed."""
        t0 = time.perf_counter()
        while True:
            if not self.buf:
                return None
            if not self.buf.startswith(MAGIC[: min(len(self.buf), len(MAGIC))]):
                self._discard_to_next_magic("garbage before magic", start=1)
                continue
            if len(self.buf) >= len(MAGIC):
                self._in_bad_run = False  # a full magic starts a new candidate frame
            if len(self.buf) < HEADER_SIZE:
                return None
            head = bytes(self.buf[: HEADER.size])
            (crc_stored,) = HEADER_CRC.unpack_from(self.buf, HEADER.size)
            if zlib.crc32(head) != crc_stored:
                self._discard_to_next_magic("header checksum mismatch")
                continue
            fields = HEADER.unpack(head)
            h = FrameHeader(*fields[1:])
            problem = self._header_problem(h)
            if problem:
                self._discard_to_next_magic(problem)
                continue
            end = HEADER_SIZE + h.payload_size
            if h.flags & FLAG_PAYLOAD_CRC:
                if len(self.buf) < end:
                    return None
                payload = memoryview(self.buf)[HEADER_SIZE:end]
                ok = zlib.crc32(payload) == h.payload_crc32
                payload.release()
                if not ok:
                    # Most often a frame cut short and followed by the next frame: the next magic
                    # lies inside this "payload", so resync from just after this header.
                    self._discard_to_next_magic("payload checksum mismatch (truncated or corrupt frame)")
                    continue
            else:
                # Without a payload CRC a truncated frame is detected when a valid header of the
                # next frame shows up inside this frame's payload.
                if self._header_inside(HEADER_SIZE, min(end, len(self.buf))):
                    self._discard_to_next_magic("truncated frame (next header inside payload)", start=HEADER_SIZE)
                    continue
                if len(self.buf) < end:
                    return None
            pixels = decode_pixels(memoryview(self.buf)[HEADER_SIZE:end], h.pixel_format, h.width, h.height)
            del self.buf[:end]
            self.last_parse_ms = (time.perf_counter() - t0) * 1000.0
            self.counters.frames_ok += 1
            return h, pixels

    def _header_inside(self, start: int, stop: int) -> bool:
        pos = self.buf.find(MAGIC, start, stop)
        while pos >= 0:
            if len(self.buf) >= pos + HEADER_SIZE:
                head = bytes(self.buf[pos : pos + HEADER.size])
                (crc,) = HEADER_CRC.unpack_from(self.buf, pos + HEADER.size)
                if zlib.crc32(head) == crc:
                    return True
            pos = self.buf.find(MAGIC, pos + 1, stop)
        return False

    def drop_partial(self, reason: str) -> None:
        """The sender went quiet mid-frame: drop what is buffered (up to any later magic)."""
        if self.buf:
            self._discard_to_next_magic(reason, start=1, keep_tail=False)


def iter_raw_frames(
    reader: ByteReader,
    parser: FrameParser,
    *,
    read_timeout: float = 1.0,
    idle_timeout: float | None = 10.0,
) -> Iterator[tuple[FrameHeader, np.ndarray]]:
    """Yield valid frames until end of stream or ``idle_timeout`` seconds without any byte."""
    last_data = time.monotonic()
    while True:
        frame = parser.next_frame()
        if frame is not None:
            yield frame
            continue
        data = reader.read_some(read_timeout)
        if data is None:
            if parser.pending():
                # A partial frame waits at most read_timeout for its next byte.
                parser.drop_partial("sender stopped mid-frame (read timeout)")
                continue
            if idle_timeout is not None and time.monotonic() - last_data >= idle_timeout:
                return
            continue
        if data == b"":
            if parser.pending():
                # End of stream: a trailing complete frame may still parse; anything else is truncated.
                frame = parser.next_frame()
                while frame is not None:
                    yield frame
                    frame = parser.next_frame()
                if parser.pending():
                    parser.drop_partial("truncated frame at end of stream")
            return
        last_data = time.monotonic()
        parser.feed(data)


def parse_tcp_address(spec: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``tcp:PORT``, ``tcp://:PORT`` or ``tcp://HOST:PORT`` -> (host, port)."""
    rest = spec[len("tcp://") :] if spec.startswith("tcp://") else spec[len("tcp:") :]
    host, _, port = rest.rpartition(":")
    host = host.strip("[]") or default_host
    try:
        port_num = int(port)
    except ValueError:
        raise DataError(f"{spec}: expected tcp:PORT or tcp://HOST:PORT") from None
    if not 0 <= port_num <= 65535:
        raise DataError(f"{spec}: port {port_num} out of range")
    return host, port_num
