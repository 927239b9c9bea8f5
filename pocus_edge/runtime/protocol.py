"""The raw frame protocol a probe-side app uses to push frames to ``pocus-edge stream``.

One frame on the wire = a fixed 36-byte little-endian header, then the pixels::

    offset size type     field
    0      4    bytes    magic         b"PEF1"
    4      1    uint8    version       1
    5      1    uint8    pixel_format  1 = GRAY8, 2 = RGB24, 3 = BGR24, 4 = GRAY16LE
    6      2    uint16   flags         bit 0: payload_crc32 is valid and must be checked;
                                       bits 1-15 reserved, must be 0
    8      2    uint16   width         pixels, 1..max_width
    10     2    uint16   height        pixels, 1..max_height
    12     4    uint32   sequence      sender's frame counter (informational)
    16     8    float64  timestamp_ms  acquisition time, any monotonic origin
    24     4    uint32   payload_size  must equal width * height * bytes_per_pixel
    28     4    uint32   payload_crc32 zlib CRC-32 of the payload (checked if flags bit 0)
    32     4    uint32   header_crc32  zlib CRC-32 of header bytes 0..31 (always checked)

Rows are stored top to bottom, pixels left to right, no row padding.

Receiving is a byte-stream parser with resynchronisation (guarantees in docs/streaming.md):

* every complete, intact frame is returned, whatever else the stream holds and however the
  bytes are split into reads, also after a frame that was cut short, a header that announced
  more bytes than followed, or garbage;
* each corruption event is counted once as an invalid frame: a run of bytes that is not a
  frame (up to the next valid header) is one event, and a valid header whose frame did not
  arrive whole (cut short, corrupt payload, past its deadline, end of stream) is one event;
* a frame must arrive whole within ``frame_timeout`` seconds of its first byte (a per-frame
  deadline, not per byte), so a slow-drip sender cannot hold the receiver;
* the work is linear in the bytes received: each byte is searched for the magic once and
  enters one running CRC once; a payload checksum is derived from two prefix checksums
  (CRC-32 arithmetic), so bytes re-examined after a resync are never checksummed again.
"""

from __future__ import annotations

import heapq
import os
import select
import socket
import struct
import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

import numpy as np

from ..errors import DataError

MAGIC = b"PEF1"
VERSION = 1
HEADER_START = MAGIC + bytes([VERSION])  # what every valid header begins with (the scan target)
HEADER = struct.Struct("<4sBBHHHIdII")  # everything before header_crc32
HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = HEADER.size + HEADER_CRC.size  # 36
assert HEADER_SIZE == 36

GRAY8, RGB24, BGR24, GRAY16LE = 1, 2, 3, 4
PIXEL_FORMATS = {GRAY8: ("GRAY8", 1), RGB24: ("RGB24", 3), BGR24: ("BGR24", 3), GRAY16LE: ("GRAY16LE", 2)}
FLAG_PAYLOAD_CRC = 0x1
RESERVED_FLAGS = 0xFFFF & ~FLAG_PAYLOAD_CRC

DEFAULT_MAX_WIDTH = 4096
DEFAULT_MAX_HEIGHT = 4096
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024  # 64 MiB: 4096x4096 RGB24 is 48 MiB
DEFAULT_FRAME_TIMEOUT = 2.0  # seconds from a frame's first byte to its last
DEFAULT_IDLE_TIMEOUT = 10.0  # seconds without a valid frame before the stream ends


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


def header_problem(
    raw: bytes | memoryview,
    *,
    max_width: int = DEFAULT_MAX_WIDTH,
    max_height: int = DEFAULT_MAX_HEIGHT,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
) -> tuple[FrameHeader | None, str | None]:
    """Check the 36 header bytes ``raw``: (header, None) when valid, (None, reason) otherwise."""
    head = bytes(raw[: HEADER.size])
    if head[:4] != MAGIC:
        return None, "no magic"
    (crc_stored,) = HEADER_CRC.unpack_from(raw, HEADER.size)
    if zlib.crc32(head) != crc_stored:
        return None, "header checksum mismatch"
    h = FrameHeader(*HEADER.unpack(head)[1:])
    if h.version != VERSION:
        return None, "unsupported version"
    if h.pixel_format not in PIXEL_FORMATS:
        return None, "unknown pixel format"
    if h.flags & RESERVED_FLAGS:
        return None, "reserved flag bits set"
    if not (1 <= h.width <= max_width and 1 <= h.height <= max_height):
        return None, "frame size out of limits"
    bpp = PIXEL_FORMATS[h.pixel_format][1]
    if h.payload_size != h.width * h.height * bpp or h.payload_size > max_payload:
        return None, "payload size mismatch or over limit"
    if not np.isfinite(h.timestamp_ms):
        return None, "non-finite timestamp"
    return h, None


# -- CRC-32 arithmetic ---------------------------------------------------------------------------
# zlib's CRC-32 is linear over GF(2): crc(A + B) = crc(A) * x^(8 len(B)) mod P  xor  crc(B), in
# the bit-reflected representation (bit 31 holds x^0). So the checksum of any byte range follows
# from the running checksums at its two ends, and every byte is checksummed only once however
# many candidate frames overlap it.

_CRC_POLY = 0xEDB88320  # reflected CRC-32 polynomial


def _gf2_mulmod(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (reflected representation)."""
    product = 0
    bit = 1 << 31  # x^0
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1  # b *= x
    return product


_X_POW2 = [1 << 30]  # _X_POW2[k] = x^(2^k) mod P
for _ in range(63):
    _X_POW2.append(_gf2_mulmod(_X_POW2[-1], _X_POW2[-1]))
_shift_cache: dict[int, int] = {}


def _x_pow_8n(n: int) -> int:
    """x^(8 n) mod P: the effect of appending n bytes on a running CRC."""
    r = _shift_cache.get(n)
    if r is None:
        r, k, m = 1 << 31, 3, n
        while m:
            if m & 1:
                r = _gf2_mulmod(_X_POW2[k], r)
            m >>= 1
            k += 1
        if len(_shift_cache) < 256:
            _shift_cache[n] = r
    return r


def crc32_of_range(crc_before: int, crc_after: int, length: int) -> int:
    """zlib CRC-32 of bytes [a, b) from crc32(stream[:a]), crc32(stream[:b]) and b - a."""
    return crc_after ^ _gf2_mulmod(_x_pow_8n(length), crc_before)


# -- reading -------------------------------------------------------------------------------------


class ByteReader:
    """Timeout-bounded reads from a socket, a pipe or any object with ``fileno()``.

    ``read_some(timeout)`` returns bytes, ``b""`` at end of stream, or ``None`` when nothing
    arrived within ``timeout`` seconds (``None``: wait as long as it takes). Never blocks longer
    than the timeout. With ``listener`` (the listening socket of a TCP source), further senders
    that connect while this one is served are refused at once (accepted and reset, so their
    next send fails with "connection reset") and counted in ``refused``.
    """

    def __init__(self, stream: socket.socket | BinaryIO | int, chunk: int = 1 << 16, *, listener: socket.socket | None = None):
        self.chunk = chunk
        self._sock = stream if isinstance(stream, socket.socket) else None
        self._fd = stream if isinstance(stream, int) else stream.fileno()
        self._listener = listener
        self.refused = 0
        if listener is not None:
            listener.setblocking(False)

    def read_some(self, timeout: float | None) -> bytes | None:
        end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            remaining = None if end is None else max(0.0, end - time.monotonic())
            watch = [self._fd] if self._listener is None else [self._fd, self._listener]
            try:
                ready, _, _ = select.select(watch, [], [], remaining)
            except (OSError, ValueError):  # closed underneath us
                return b""
            if self._listener is not None and self._listener in ready:
                self._refuse()
            if self._fd in ready:
                break
            if remaining == 0.0 or (not ready and remaining is not None):
                return None
        try:
            if self._sock is not None:
                return self._sock.recv(self.chunk)
            return os.read(self._fd, self.chunk)
        except (ConnectionResetError, BrokenPipeError):
            return b""
        except BlockingIOError:
            return None

    def _refuse(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        try:
            # Linger 0: close with a reset, so the sender learns at once that it is not being read.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        finally:
            conn.close()
        self.refused += 1


@dataclass
class StreamCounters:
    frames_ok: int = 0
    frames_invalid: int = 0  # corruption events (see the module docstring)
    bytes_skipped: int = 0  # bytes that were not part of a valid frame
    invalid_reasons: dict | None = None

    def reject(self, reason: str, nbytes: int) -> None:
        self.frames_invalid += 1
        self.bytes_skipped += nbytes
        if self.invalid_reasons is None:
            self.invalid_reasons = {}
        self.invalid_reasons[reason] = self.invalid_reasons.get(reason, 0) + 1


@dataclass
class ScanWork:
    """What the parser examined: the linear-time guarantee is stated (and tested) in these."""

    bytes_searched: int = 0  # bytes scanned for the magic
    bytes_checksummed: int = 0  # bytes fed to the running CRC
    headers_checked: int = 0  # 36-byte header validations (each magic once)


class _Candidate:
    """A valid header at absolute stream offset ``pos``, and the running CRC at its payload's
    start and end (filled in as those bytes arrive)."""

    __slots__ = ("pos", "header", "end", "crc_start", "crc_end")

    def __init__(self, pos: int, header: FrameHeader):
        self.pos = pos
        self.header = header
        self.end = pos + HEADER_SIZE + header.payload_size
        self.crc_start: int | None = None
        self.crc_end: int | None = None

    @property
    def checked(self) -> bool:
        return bool(self.header.flags & FLAG_PAYLOAD_CRC)

    def payload_ok(self) -> bool:
        return crc32_of_range(self.crc_start, self.crc_end, self.header.payload_size) == self.header.payload_crc32


class FrameParser:
    """Incremental, resynchronising parser: ``feed`` bytes, pop complete valid frames with
    ``next_frame``; ``expire`` drops what waits past its deadline, ``finish`` ends the stream.

    Positions are absolute stream offsets; ``buf`` holds the bytes from ``base`` on. A scanner
    runs once over the bytes as they arrive (magic search, header validation, running CRC);
    the resolver then walks the valid headers in order and decides frame, wait or invalid.
    ``clock`` is the time source of the per-frame deadline (tests pass a fake one).
    """

    def __init__(
        self,
        *,
        max_width: int = DEFAULT_MAX_WIDTH,
        max_height: int = DEFAULT_MAX_HEIGHT,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.limits = dict(max_width=max_width, max_height=max_height, max_payload=max_payload)
        self.frame_timeout = frame_timeout
        self.clock = clock
        self.buf = bytearray()
        self.base = 0  # absolute offset of buf[0]; everything before it is consumed
        self.received = 0  # absolute offset just past the last byte fed
        self.counters = StreamCounters()
        self.work = ScanWork()
        self.last_parse_ms = 0.0  # checksum + pixel decoding time of the last frame returned
        self._magic_from = 0  # the magic search resumes here
        self._unchecked: deque[int] = deque()  # magics whose 36 header bytes have not all arrived
        self._headers: deque[_Candidate] = deque()  # valid headers at or after base, in order
        self._crc = 0  # zlib.crc32 of stream[:_crc_pos]
        self._crc_pos = 0
        self._marks: list = []  # heap of (offset, seq, candidate, is_end) awaiting the running CRC
        self._seq = 0
        self._arrivals: deque[tuple[int, float]] = deque()  # (offset of a chunk's first byte, time)
        self._in_bad_run = False
        self._eof = False

    # -- scanning (each byte once) ------------------------------------------------------------
    def feed(self, data: bytes, now: float | None = None) -> None:
        if self._eof:
            raise RuntimeError("feed() after finish()")
        if not data:
            return
        self._arrivals.append((self.received, self.clock() if now is None else now))
        self.buf += data
        self.received += len(data)
        self._find_magics()
        self._check_headers()
        self._advance_crc()

    def _find_magics(self) -> None:
        """Candidate header starts: the magic followed by the version byte (a magic with another
        version can never start a valid header, so a payload of repeated magics costs nothing)."""
        start = max(self._magic_from, self.base)
        i = self.buf.find(HEADER_START, start - self.base)
        while i >= 0:
            self._unchecked.append(self.base + i)
            i = self.buf.find(HEADER_START, i + 1)
        self.work.bytes_searched += self.received - start
        self._magic_from = max(start, self.received - (len(HEADER_START) - 1))

    def _check_headers(self) -> None:
        buf = self.buf
        while self._unchecked and self._unchecked[0] + HEADER_SIZE <= self.received:
            pos = self._unchecked.popleft()
            if pos < self.base:
                continue
            self.work.headers_checked += 1
            off = pos - self.base
            if buf[off + 5] not in PIXEL_FORMATS or (buf[off + 6] | buf[off + 7] << 8) & RESERVED_FLAGS:
                continue  # pixel format or reserved flag bits: invalid before any checksum
            header, _ = self._header_at(pos)
            if header is None:
                continue
            cand = _Candidate(pos, header)
            self._headers.append(cand)
            for offset, is_end in ((pos + HEADER_SIZE, False), (cand.end, True)):
                self._seq += 1
                heapq.heappush(self._marks, (offset, self._seq, cand, is_end))

    def _header_at(self, pos: int) -> tuple[FrameHeader | None, str | None]:
        off = pos - self.base
        with memoryview(self.buf) as mv:
            return header_problem(mv[off : off + HEADER_SIZE], **self.limits)

    def _advance_crc(self) -> None:
        marks = self._marks
        while True:
            target = min(self.received, marks[0][0]) if marks else self.received
            if target > self._crc_pos:
                lo, hi = self._crc_pos - self.base, target - self.base
                with memoryview(self.buf) as mv:
                    self._crc = zlib.crc32(mv[lo:hi], self._crc)
                self.work.bytes_checksummed += target - self._crc_pos
                self._crc_pos = target
            if not marks or marks[0][0] > self._crc_pos:
                return
            _, _, cand, is_end = heapq.heappop(marks)
            if is_end:
                cand.crc_end = self._crc
            else:
                cand.crc_start = self._crc

    # -- resolving ------------------------------------------------------------------------------
    def pending(self) -> int:
        """Bytes buffered and not yet resolved."""
        return self.received - self.base

    def next_frame(self) -> tuple[FrameHeader, np.ndarray] | None:
        """Return the next complete valid frame, or None if more bytes (or time) are needed."""
        t0 = time.perf_counter()
        while self.base < self.received:
            c = self.base
            while self._headers and self._headers[0].pos < c:
                self._headers.popleft()
            while self._unchecked and self._unchecked[0] < c:
                self._unchecked.popleft()
            cand = self._headers[0] if self._headers else None
            start = self._first_possible_start(cand)
            if start > c:
                self._skip_junk(start)
                continue
            if cand is None or cand.pos != c:
                return None  # a header is still arriving at c
            verdict = self._judge(cand)
            if verdict is None:
                return None
            if verdict != "ok":
                self._reject_candidate(verdict)
                continue
            return self._take(cand, t0)
        return None

    def _first_possible_start(self, cand: _Candidate | None) -> int:
        """The first offset at or after base where a frame may start."""
        start = self.received
        if cand is not None:
            start = min(start, cand.pos)
        if self._unchecked:
            start = min(start, self._unchecked[0])
        if not self._eof:
            # A partial header start at the very end: the rest of it may still be arriving.
            for k in range(len(HEADER_START) - 1, 0, -1):
                if self.received - k >= self.base and self.buf.endswith(HEADER_START[:k]):
                    start = min(start, self.received - k)
                    break
        return start

    def _first_inner(self, cand: _Candidate) -> _Candidate | None:
        """The first valid header after ``cand``'s own 36 header bytes."""
        for i in range(1, len(self._headers)):
            q = self._headers[i]
            if q.pos >= cand.pos + HEADER_SIZE:
                return q
        return None

    def _judge(self, cand: _Candidate) -> str | None:
        """'ok', a reason it is invalid, or None to wait for more bytes."""
        complete = cand.end <= self.received
        inner = self._first_inner(cand)
        inner_inside = inner is not None and inner.pos < cand.end
        if cand.checked:
            if complete:
                return "ok" if cand.payload_ok() else "payload checksum mismatch (truncated or corrupt frame)"
            if inner_inside and inner.checked and inner.end <= self.received and inner.payload_ok():
                # A whole, verified frame inside the announced payload: this one was cut short.
                return "truncated frame (next frame inside payload)"
        else:
            if inner_inside:
                return "truncated frame (next header inside payload)"
            if complete and not (self._unchecked and self._unchecked[0] < cand.end):
                return "ok"
        if self._eof:
            return "truncated frame at end of stream"
        return None

    def _take(self, cand: _Candidate, t0: float) -> tuple[FrameHeader, np.ndarray]:
        h = cand.header
        lo = cand.pos + HEADER_SIZE - self.base
        with memoryview(self.buf) as mv:
            payload = mv[lo : lo + h.payload_size]
            try:
                pixels = decode_pixels(payload, h.pixel_format, h.width, h.height)
            finally:
                payload.release()
        self._consume_to(cand.end)
        self._in_bad_run = False
        self.counters.frames_ok += 1
        self.last_parse_ms = (time.perf_counter() - t0) * 1000.0
        return h, pixels

    def _skip_junk(self, stop: int) -> None:
        """Bytes [base, stop) are not a frame: one event per run (a run ends at a valid header)."""
        if self._in_bad_run:
            self.counters.bytes_skipped += stop - self.base
        else:
            self.counters.reject(self._junk_reason(), stop - self.base)
            self._in_bad_run = True
        self._consume_to(stop)

    def _junk_reason(self) -> str:
        if not self.buf.startswith(MAGIC):
            return "garbage between frames"
        if self.received - self.base < HEADER_SIZE:
            return "incomplete header"
        return self._header_at(self.base)[1] or "invalid header"

    def _reject_candidate(self, reason: str) -> None:
        """A valid header whose frame did not arrive whole: one event; resync just after its
        magic (bytes up to the next valid header join this event)."""
        self.counters.reject(reason, 1)
        self._in_bad_run = True
        self._consume_to(self.base + 1)

    def _consume_to(self, offset: int) -> None:
        del self.buf[: offset - self.base]
        self.base = offset
        while len(self._arrivals) > 1 and self._arrivals[1][0] <= offset:
            self._arrivals.popleft()

    # -- time and end of stream -------------------------------------------------------------------
    def deadline(self) -> float | None:
        """When what waits at the head of the buffer expires (None: nothing waits or no deadline)."""
        if self.base >= self.received or self.frame_timeout is None or not self._arrivals:
            return None
        return self._arrivals[0][1] + self.frame_timeout

    def expire(self, now: float | None = None) -> bool:
        """Drop the frame (or header) at the head of the buffer if its deadline has passed: it
        counts as one invalid frame, and the bytes after it are parsed. True if one was dropped."""
        d = self.deadline()
        if d is None or (self.clock() if now is None else now) < d:
            return False
        c = self.base
        head = self._headers[0] if self._headers and self._headers[0].pos == c else None
        if head is not None and not head.checked and head.end <= self.received:
            # Whole, but waiting to see whether a magic inside its payload starts a valid header:
            # past the deadline it cannot prove this frame cut short, so the frame stands.
            while self._unchecked and self._unchecked[0] < head.end:
                self._unchecked.popleft()
        elif head is not None:
            self._reject_candidate("frame deadline exceeded (sender too slow or stopped mid-frame)")
        else:
            if self._unchecked and self._unchecked[0] == c:
                self._unchecked.popleft()
            if self._in_bad_run:
                self.counters.bytes_skipped += 1
            else:
                self.counters.reject("incomplete header (deadline exceeded)", 1)
                self._in_bad_run = True
            self._consume_to(c + 1)
        return True

    def finish(self) -> None:
        """End of stream: nothing more will arrive. ``next_frame`` then returns every complete
        frame still buffered and counts the rest, until the buffer is empty."""
        self._eof = True
        self._unchecked.clear()


def iter_raw_frames(
    reader: ByteReader,
    parser: FrameParser,
    *,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
) -> Iterator[tuple[FrameHeader, np.ndarray]]:
    """Yield valid frames until end of stream, or until ``idle_timeout`` seconds pass without a
    valid frame (silence, garbage or a slow-drip sender). Frames that miss the parser's
    per-frame deadline are dropped (counted) and the bytes after them parsed."""
    clock = parser.clock
    last_frame = clock()
    while True:
        frame = parser.next_frame()
        if frame is not None:
            last_frame = clock()
            yield frame
            continue
        now = clock()
        if parser.expire(now):
            continue
        idle_end = None if idle_timeout is None else last_frame + idle_timeout
        if idle_end is not None and now >= idle_end:
            break
        waits = [t - now for t in (parser.deadline(), idle_end) if t is not None]
        data = reader.read_some(min(waits) if waits else None)
        if data is None:
            continue
        if data == b"":
            break
        parser.feed(data, clock())
    parser.finish()
    while (frame := parser.next_frame()) is not None:
        yield frame

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
