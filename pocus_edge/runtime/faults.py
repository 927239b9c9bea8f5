"""Fault injection for raw (PEF1) frame streams: what a broken probe, a flaky link or a hostile
sender puts on the wire. For testing receivers (the property-based tests and
``benchmarks/fuzz_stream.py`` use it); a probe-side developer can use it to test a sender's
peer. Every fault is one corruption event for the receiver (see docs/streaming.md).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from . import protocol

FAULT_KINDS = (
    "garbage",  # random bytes (with magics sprinkled in)
    "truncated",  # a frame cut short
    "lying_header",  # a valid header announcing pixels that never come
    "header_bitflip",  # one bit flipped in a header
    "payload_bitflip",  # one bit flipped in a CRC-checked payload
    "reserved_flags",  # a reserved flag bit set (valid header checksum)
    "bad_version",  # an unknown protocol version (valid header checksum)
    "oversize",  # a frame over the size limits (valid header checksum)
    "nonfinite_timestamp",  # NaN or infinite timestamp (valid header checksum)
)


def random_frame(rng: np.random.Generator, index: int, *, max_side: int = 12) -> tuple[bytes, float]:
    """An intact frame of random size, pixel format and payload-CRC flag: (bytes, timestamp_ms)."""
    fmt = int(rng.choice([protocol.GRAY8, protocol.RGB24, protocol.BGR24, protocol.GRAY16LE]))
    h, w = (int(v) for v in rng.integers(1, max_side + 1, size=2))
    if fmt == protocol.GRAY16LE:
        pixels = rng.integers(0, 65536, (h, w), dtype=np.uint16)
    else:
        pixels = rng.integers(0, 256, (h, w) if fmt == protocol.GRAY8 else (h, w, 3), dtype=np.uint8)
    ts = float(rng.integers(-10**6, 10**9)) / 8.0
    return protocol.encode_frame(pixels, ts, index, pixel_format=fmt, payload_crc=bool(rng.integers(0, 2))), ts


def header_bytes(*, version: int = 1, pixel_format: int = protocol.GRAY8, flags: int = 0, width: int = 2,
                 height: int = 2, timestamp_ms: float = 0.0, payload_size: int | None = None, payload_crc: int = 0) -> bytes:
    """A 36-byte header with a valid header checksum and any field values (valid or not)."""
    size = width * height if payload_size is None else payload_size
    head = protocol.HEADER.pack(protocol.MAGIC, version, pixel_format, flags, width, height, 0, timestamp_ms, size, payload_crc)
    return head + struct.pack("<I", zlib.crc32(head))


def fault_bytes(kind: str, rng: np.random.Generator) -> bytes:
    """The bytes of one fault of ``kind`` (one of FAULT_KINDS)."""
    if kind == "garbage":
        junk = bytearray(rng.bytes(int(rng.integers(1, 300))))
        for _ in range(int(rng.integers(0, 4))):  # magics without a valid header after them
            at = int(rng.integers(0, len(junk) + 1))
            junk[at:at] = protocol.MAGIC
        return bytes(junk)
    if kind == "truncated":
        frame, _ = random_frame(rng, 0)
        return frame[: int(rng.integers(1, len(frame)))]
    if kind == "lying_header":
        w, h = (int(v) for v in rng.integers(1, 4097, size=2))
        return header_bytes(flags=int(rng.integers(0, 2)) * protocol.FLAG_PAYLOAD_CRC, width=w, height=h)
    if kind == "header_bitflip":
        frame = bytearray(random_frame(rng, 0)[0])
        bit = int(rng.integers(0, protocol.HEADER_SIZE * 8))
        frame[bit // 8] ^= 1 << (bit % 8)
        return bytes(frame)
    if kind == "payload_bitflip":
        pixels = rng.integers(0, 256, (int(rng.integers(1, 9)), int(rng.integers(1, 9))), dtype=np.uint8)
        frame = bytearray(protocol.encode_frame(pixels, 1.0, payload_crc=True))
        bit = int(rng.integers(protocol.HEADER_SIZE * 8, len(frame) * 8))
        frame[bit // 8] ^= 1 << (bit % 8)
        return bytes(frame)
    if kind == "reserved_flags":
        flags = int(rng.integers(1, 0x8000)) << 1
        return header_bytes(flags=flags) + bytes(4)
    if kind == "bad_version":
        version = int(rng.choice([v for v in range(256) if v != protocol.VERSION]))
        return header_bytes(version=version) + bytes(4)
    if kind == "oversize":
        return header_bytes(width=int(rng.integers(protocol.DEFAULT_MAX_WIDTH + 1, 65536)), height=1)
    if kind == "nonfinite_timestamp":
        return header_bytes(timestamp_ms=float(rng.choice([np.nan, np.inf, -np.inf]))) + bytes(4)
    raise ValueError(f"unknown fault kind {kind!r} (known: {', '.join(FAULT_KINDS)})")


@dataclass
class FuzzStream:
    """A stream of intact frames and faults, and what a correct receiver must report."""

    data: bytes
    frames: list[tuple[bytes, float]] = field(default_factory=list)  # the intact frames, in order
    faults: list[str] = field(default_factory=list)  # kinds, in order
    separated: bool = True  # at most one fault between two intact frames

    @property
    def expected_invalid(self) -> int | None:
        """Invalid frames a correct receiver counts (exact when faults are separated)."""
        return len(self.faults) if self.separated else None


def random_stream(rng: np.random.Generator, *, max_frames: int = 12, separated: bool = True,
                  kinds: tuple[str, ...] = FAULT_KINDS) -> FuzzStream:
    """Random intact frames with faults between them (``separated``: at most one per gap)."""
    n = int(rng.integers(0, max_frames + 1))
    parts: list[bytes] = []
    out = FuzzStream(b"", separated=separated)
    for k in range(n + 1):
        for _ in range(int(rng.integers(0, 2 if separated else 4))):
            kind = str(rng.choice(kinds))
            parts.append(fault_bytes(kind, rng))
            out.faults.append(kind)
        if k < n:
            frame = random_frame(rng, k)
            parts.append(frame[0])
            out.frames.append(frame)
    out.data = b"".join(parts)
    return out
