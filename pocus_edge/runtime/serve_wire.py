"""The WebSocket messages of `pocus-edge serve` (docs/serve.md has the same layout).

Server -> browser, binary, one per processed frame (all integers little-endian)::

    offset  size  field
    0       4     magic b"PESV"
    4       2     layout version (1)
    6       2     flags: bit 0 = a fusion-weight map follows the mask
    8       4     frame index (uint32)
    12      8     timestamp in ms (float64)
    20      4     height H (uint32)
    24      4     width W (uint32)
    28      4     length S of the stats JSON (uint32)
    32      S     stats, UTF-8 JSON (counters, FPS, latency p50/p95, ``reliability`` when the
                  runtime gives one)
    32+S    H*W   the frame, uint8 gray, row-major
    ...     ceil(H*W/8)  the mask at frame resolution, one bit per pixel, row-major, most
                  significant bit first (``numpy.packbits``)
    ...     H*W   (flag bit 0 only) the fusion weight c_g / (c_g + c_c) as round(255 * w), uint8

Server -> browser, text: JSON objects with a ``type``: ``hello`` (the model and the stream),
``delivery`` (this browser's sent/dropped message counts), ``end`` (the final stream report),
``error`` (a one-line message, e.g. about a malformed message the browser sent).

Browser -> server, text: ``{"type": "ping"}`` (answered with ``pong``); anything else is
counted as malformed and answered with an ``error`` message; the stream goes on.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

MAGIC = b"PESV"
LAYOUT_VERSION = 1
FLAG_WEIGHT = 1
HEADER = struct.Struct("<4sHHIdIII")


def encode_frame(index: int, timestamp_ms: float, frame: np.ndarray, mask: np.ndarray, weight: np.ndarray | None,
                 stats: dict[str, Any] | bytes) -> bytes:
    """One binary frame message (layout above)."""
    frame = np.ascontiguousarray(frame, dtype=np.uint8)
    height, width = frame.shape
    if mask.shape != frame.shape or (weight is not None and weight.shape != frame.shape):
        raise ValueError(f"mask {mask.shape} / weight {None if weight is None else weight.shape} must match the frame {frame.shape}")
    stats_bytes = stats if isinstance(stats, bytes) else json.dumps(stats, separators=(",", ":")).encode()
    flags = FLAG_WEIGHT if weight is not None else 0
    parts = [HEADER.pack(MAGIC, LAYOUT_VERSION, flags, int(index) & 0xFFFFFFFF, float(timestamp_ms), height, width, len(stats_bytes)),
             stats_bytes, frame.tobytes(), np.packbits(np.asarray(mask, dtype=bool).ravel()).tobytes()]
    if weight is not None:
        parts.append(np.clip(np.rint(np.asarray(weight, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8).tobytes())
    return b"".join(parts)


def decode_frame(data: bytes) -> dict[str, Any]:
    """The fields of one binary frame message (ValueError on a malformed one)."""
    if len(data) < HEADER.size:
        raise ValueError(f"frame message of {len(data)} bytes is shorter than its {HEADER.size}-byte header")
    magic, version, flags, index, timestamp_ms, height, width, stats_len = HEADER.unpack_from(data)
    if magic != MAGIC or version != LAYOUT_VERSION:
        raise ValueError(f"not a layout-{LAYOUT_VERSION} frame message (magic {magic!r}, version {version})")
    pixels = height * width
    mask_len = (pixels + 7) // 8
    expected = HEADER.size + stats_len + pixels + mask_len + (pixels if flags & FLAG_WEIGHT else 0)
    if len(data) != expected:
        raise ValueError(f"frame message of {len(data)} bytes; its header announces {expected}")
    at = HEADER.size
    stats = json.loads(data[at : at + stats_len].decode())
    at += stats_len
    frame = np.frombuffer(data, np.uint8, pixels, at).reshape(height, width)
    at += pixels
    mask = np.unpackbits(np.frombuffer(data, np.uint8, mask_len, at))[:pixels].reshape(height, width).astype(bool)
    at += mask_len
    weight = np.frombuffer(data, np.uint8, pixels, at).reshape(height, width) if flags & FLAG_WEIGHT else None
    return {"index": index, "timestamp_ms": timestamp_ms, "frame": frame, "mask": mask, "weight": weight, "stats": stats}


def parse_client_message(text: str) -> dict[str, Any]:
    """A browser's text message as a dict with a known ``type`` (ValueError otherwise)."""
    try:
        message = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("not JSON") from None
    if not isinstance(message, dict) or message.get("type") not in ("ping",):
        raise ValueError("unknown message type (expected {\"type\": \"ping\"})")
    return message
