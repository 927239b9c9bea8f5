"""The raw frame protocol: round trips, resynchronisation after bad data, and no hangs."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest

from pocus_edge.errors import DataError
from pocus_edge.runtime import protocol
from pocus_edge.runtime.sources import RawStreamSource, open_source


def _frame(rng, h=12, w=17):
    return rng.integers(0, 256, size=(h, w), dtype=np.uint8)


def test_header_layout_matches_the_documented_offsets():
    # The README documents byte offsets; a sender in another language relies on them.
    frame = np.arange(6, dtype=np.uint8).reshape(2, 3)
    data = protocol.encode_frame(frame, 123.5, 7)
    assert len(data) == 36 + 6
    assert data[0:4] == b"PEF1" and data[4] == 1 and data[5] == protocol.GRAY8
    assert struct.unpack_from("<H", data, 6)[0] == protocol.FLAG_PAYLOAD_CRC
    assert struct.unpack_from("<HH", data, 8) == (3, 2)  # width, height
    assert struct.unpack_from("<I", data, 12)[0] == 7
    assert struct.unpack_from("<d", data, 16)[0] == 123.5
    assert struct.unpack_from("<I", data, 24)[0] == 6
    assert struct.unpack_from("<I", data, 28)[0] == zlib.crc32(frame.tobytes())
    assert struct.unpack_from("<I", data, 32)[0] == zlib.crc32(data[:32])
    assert data[36:] == frame.tobytes()


@pytest.mark.parametrize("fmt", [protocol.GRAY8, protocol.RGB24, protocol.BGR24, protocol.GRAY16LE])
def test_pixel_formats_round_trip_to_gray(fmt):
    import cv2

    rng = np.random.default_rng(fmt)
    if fmt == protocol.GRAY8:
        src = _frame(rng)
        expected = src
    elif fmt == protocol.GRAY16LE:
        src = rng.integers(0, 65536, size=(5, 9), dtype=np.uint16)
        expected = (src >> 8).astype(np.uint8)
    else:
        src = rng.integers(0, 256, size=(5, 9, 3), dtype=np.uint8)
        expected = cv2.cvtColor(src, cv2.COLOR_RGB2GRAY if fmt == protocol.RGB24 else cv2.COLOR_BGR2GRAY)
    parser = protocol.FrameParser()
    parser.feed(protocol.encode_frame(src, 1.0, pixel_format=fmt))
    header, pixels = parser.next_frame()
    assert header.pixel_format == fmt
    np.testing.assert_array_equal(pixels, expected)
    assert parser.counters.frames_invalid == 0


def _bad_stream(rng, *, payload_crc=True):
    """Valid frames interleaved with every kind of damage. Returns (bytes, valid frames, n_bad)."""
    good = [(_frame(rng), 10.0 * k) for k in range(5)]
    enc = [protocol.encode_frame(f, t, k, payload_crc=payload_crc) for k, (f, t) in enumerate(good)]
    garbage = bytes(rng.integers(0, 256, size=3000, dtype=np.uint8))
    garbage = garbage.replace(b"PEF1", b"XXXX").replace(b"PEF", b"XXX")
    truncated = protocol.encode_frame(_frame(rng), 99.0, payload_crc=payload_crc)[:36 + 50]
    # A header that passes its checksum but asks for a 60000 x 60000 frame.
    head = protocol.HEADER.pack(b"PEF1", 1, protocol.GRAY8, 0, 60000, 60000, 0, 0.0, 0, 0)
    oversized = head + struct.pack("<I", zlib.crc32(head))
    bad_crc = bytearray(protocol.encode_frame(_frame(rng), 5.0))
    bad_crc[20] ^= 0xFF  # flip a timestamp byte: header CRC no longer matches
    stream = (
        enc[0] + truncated + enc[1] + garbage + enc[2] + oversized + enc[3] + bytes(bad_crc) + enc[4]
    )
    return stream, good, 4


@pytest.mark.parametrize("payload_crc", [True, False])
def test_parser_skips_bad_frames_whatever_the_chunking(payload_crc):
    rng = np.random.default_rng(0)
    stream, good, n_bad = _bad_stream(rng, payload_crc=payload_crc)
    for chunking in ("whole", "bytes", "random"):
        parser = protocol.FrameParser()
        out = []
        chunks = (
            [stream]
            if chunking == "whole"
            else [stream[i : i + 1] for i in range(len(stream))]
            if chunking == "bytes"
            else _random_chunks(stream, random.Random(1))
        )
        for c in chunks:
            parser.feed(c)
            while (f := parser.next_frame()) is not None:
                out.append(f)
        assert len(out) == len(good), chunking
        for (h, px), (frame, ts) in zip(out, good):
            np.testing.assert_array_equal(px, frame)
            assert h.timestamp_ms == ts
        # The same bad events are counted once each, however the bytes were split.
        assert parser.counters.frames_invalid == n_bad, (chunking, parser.counters.invalid_reasons)


def _random_chunks(data, r):
    i, out = 0, []
    while i < len(data):
        n = r.randint(1, 400)
        out.append(data[i : i + n])
        i += n
    return out


def test_socket_stream_with_stall_mid_frame_does_not_hang():
    rng = np.random.default_rng(1)
    stream, good, n_bad = _bad_stream(rng)
    last = _frame(rng)
    a, b = socket.socketpair()

    def sender():
        a.sendall(stream)
        partial = protocol.encode_frame(_frame(rng), 1.0)
        a.sendall(partial[: len(partial) // 2])  # then go quiet mid-frame
        time.sleep(0.6)
        a.sendall(protocol.encode_frame(last, 777.0))
        time.sleep(0.05)
        a.close()

    t = threading.Thread(target=sender, daemon=True)
    start = time.monotonic()
    t.start()
    src = RawStreamSource(b, read_timeout=0.2, idle_timeout=2.0)
    frames = list(src)
    elapsed = time.monotonic() - start
    t.join(1)
    b.close()
    assert [ts for _, ts, _ in frames] == [ts for _, ts in good] + [777.0]
    np.testing.assert_array_equal(frames[-1][0], last)
    assert [i for _, _, i in frames] == list(range(len(good) + 1))
    assert src.frames_invalid == n_bad + 1  # + the stalled partial frame
    assert any("read timeout" in r for r in src.invalid_reasons)
    assert elapsed < 2.0


def test_silent_sender_ends_at_idle_timeout_and_eof_mid_frame_is_counted():
    a, b = socket.socketpair()
    start = time.monotonic()
    assert list(RawStreamSource(b, read_timeout=0.05, idle_timeout=0.3)) == []
    assert 0.25 <= time.monotonic() - start < 1.5
    a.close(), b.close()

    r, w = os.pipe()
    data = protocol.encode_frame(np.zeros((4, 4), np.uint8), 1.0)
    os.write(w, data + data[:20])
    os.close(w)
    src = RawStreamSource(r, read_timeout=0.5, idle_timeout=1.0)
    frames = list(src)
    os.close(r)
    assert len(frames) == 1 and src.frames_invalid == 1


def test_tcp_listener_binds_loopback_by_default():
    rng = np.random.default_rng(2)
    frames = [_frame(rng) for _ in range(3)]
    bound = {}

    def on_listen(host, port):
        bound.update(host=host, port=port)

        def send():
            with socket.create_connection((host, port), timeout=5) as s:
                for k, f in enumerate(frames):
                    s.sendall(protocol.encode_frame(f, 33.3 * k, k))

        threading.Thread(target=send, daemon=True).start()

    src = open_source("tcp:0", on_listen=on_listen, read_timeout=0.5, idle_timeout=2.0, accept_timeout=5)
    with src:
        got = list(src)
    assert bound["host"] == "127.0.0.1"
    assert len(got) == 3
    for (px, ts, i), f in zip(got, frames):
        np.testing.assert_array_equal(px, f)
    assert [round(ts, 1) for _, ts, _ in got] == [0.0, 33.3, 66.6]


def test_tcp_address_parsing_and_accept_timeout():
    assert protocol.parse_tcp_address("tcp:5555") == ("127.0.0.1", 5555)
    assert protocol.parse_tcp_address("tcp://:5555", default_host="::1") == ("::1", 5555)
    assert protocol.parse_tcp_address("tcp://0.0.0.0:80") == ("0.0.0.0", 80)
    with pytest.raises(DataError, match="tcp:PORT"):
        protocol.parse_tcp_address("tcp:abc")
    with pytest.raises(DataError, match="no sender connected"):
        RawStreamSource.listen_tcp("127.0.0.1", 0, accept_timeout=0.1)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        with pytest.raises(DataError, match="cannot listen"):
            RawStreamSource.listen_tcp("127.0.0.1", busy.getsockname()[1], accept_timeout=0.1)


def test_readme_sender_example_produces_valid_frames():
    # The documented sender is what probe-side developers copy: it must match the reference encoder.
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    docs = [p.read_text() for p in (root / "docs" / "streaming.md", root / "README.md") if p.is_file()]
    readme = next((text for text in docs if "def frame_bytes(" in text), None)
    if readme is None:
        pytest.skip("the protocol's example sender (docs/streaming.md) is not in this checkout")
    start = readme.index("def frame_bytes(")
    code = readme[start : readme.index("\n\n", start)]
    namespace = {"np": np, "struct": struct, "zlib": zlib}
    exec(code, namespace)  # noqa: S102 - our own README
    gray = np.random.default_rng(0).integers(0, 256, (6, 9), dtype=np.uint8)
    assert namespace["frame_bytes"](gray, 12.5, 3) == protocol.encode_frame(gray, 12.5, 3)
