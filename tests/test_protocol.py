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
    # docs/streaming.md documents byte offsets; a sender in another language relies on them.
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
    src = RawStreamSource(b, frame_timeout=0.2, idle_timeout=2.0)
    frames = list(src)
    elapsed = time.monotonic() - start
    t.join(1)
    b.close()
    assert [ts for _, ts, _ in frames] == [ts for _, ts in good] + [777.0]
    np.testing.assert_array_equal(frames[-1][0], last)
    assert [i for _, _, i in frames] == list(range(len(good) + 1))
    assert src.frames_invalid == n_bad + 1  # + the stalled partial frame
    assert any("deadline" in r for r in src.invalid_reasons)
    assert elapsed < 2.0


def test_silent_sender_ends_at_idle_timeout_and_eof_mid_frame_is_counted():
    a, b = socket.socketpair()
    start = time.monotonic()
    assert list(RawStreamSource(b, frame_timeout=0.05, idle_timeout=0.3)) == []
    assert 0.25 <= time.monotonic() - start < 1.5
    a.close(), b.close()

    r, w = os.pipe()
    data = protocol.encode_frame(np.zeros((4, 4), np.uint8), 1.0)
    os.write(w, data + data[:20])
    os.close(w)
    src = RawStreamSource(r, frame_timeout=0.5, idle_timeout=1.0)
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

    src = open_source("tcp:0", on_listen=on_listen, frame_timeout=0.5, idle_timeout=2.0, accept_timeout=5)
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

    readme = (Path(__file__).resolve().parents[1] / "docs" / "streaming.md").read_text()
    start = readme.index("def frame_bytes(")
    code = readme[start : readme.index("\n\n", start)]
    namespace = {"np": np, "struct": struct, "zlib": zlib}
    exec(code, namespace)  # noqa: S102 - our own docs
    gray = np.random.default_rng(0).integers(0, 256, (6, 9), dtype=np.uint8)
    assert namespace["frame_bytes"](gray, 12.5, 3) == protocol.encode_frame(gray, 12.5, 3)


# -- regressions: nothing lost, nothing hung ------------------------------------------------------


def _lying_header(flags=protocol.FLAG_PAYLOAD_CRC, w=4096, h=4096):
    """A header with a valid checksum that announces a 4096x4096 frame whose pixels never come."""
    head = protocol.HEADER.pack(b"PEF1", 1, protocol.GRAY8, flags, w, h, 0, 0.0, w * h, 0)
    return head + struct.pack("<I", zlib.crc32(head))


def _good_frames(n, *, payload_crc=True, seed=0):
    rng = np.random.default_rng(seed)
    frames = [_frame(rng, 6 + k % 5, 9 + k % 3) for k in range(n)]
    return frames, b"".join(protocol.encode_frame(f, 10.0 * k, k, payload_crc=payload_crc) for k, f in enumerate(frames))


def _pipe_source(data, **kw):
    r, w = os.pipe()

    def writer():
        os.write(w, data) if len(data) < 60000 else [os.write(w, data[i : i + 4096]) for i in range(0, len(data), 4096)]
        os.close(w)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    src = RawStreamSource(r, **kw)
    out = list(src)
    t.join(5)
    os.close(r)
    return src, out


@pytest.mark.parametrize("header_crc_flag", [protocol.FLAG_PAYLOAD_CRC, 0])
@pytest.mark.parametrize("frames_crc", [True, False])
def test_lying_header_then_twenty_good_frames_loses_none(header_crc_flag, frames_crc):
    frames, good = _good_frames(20, payload_crc=frames_crc)
    src, out = _pipe_source(_lying_header(header_crc_flag) + good, frame_timeout=5.0, idle_timeout=5.0)
    assert len(out) == 20
    for (px, ts, _), f, k in zip(out, frames, range(20)):
        np.testing.assert_array_equal(px, f)
        assert ts == 10.0 * k
    assert src.frames_invalid == 1, src.invalid_reasons
    assert src.parser.counters.bytes_skipped == 36


def test_lying_header_does_not_delay_verified_frames_of_a_live_stream():
    # No end of stream and no deadline yet: a whole, verified frame inside the announced payload
    # proves the header lied, so the frames come out now, not after 16 MiB or the deadline.
    frames, good = _good_frames(5)
    parser = protocol.FrameParser(clock=lambda: 0.0)
    parser.feed(_lying_header() + good)
    out = [parser.next_frame() for _ in range(5)]
    assert all(o is not None for o in out)
    assert parser.counters.frames_invalid == 1
    assert "next frame inside payload" in next(iter(parser.counters.invalid_reasons))


def test_frame_cut_short_before_frames_without_payload_crc_loses_none_at_end_of_stream():
    frames, good = _good_frames(6, payload_crc=False)
    cut = protocol.encode_frame(np.full((30, 30), 7, np.uint8), 1.0)[:36 + 100]  # CRC-checked, 900 bytes short
    src, out = _pipe_source(cut + good, frame_timeout=5.0, idle_timeout=5.0)
    assert len(out) == 6
    assert src.frames_invalid == 1


def test_deadline_drops_the_waiting_frame_and_parses_what_follows():
    now = [0.0]
    parser = protocol.FrameParser(frame_timeout=2.0, clock=lambda: now[0])
    frames, good = _good_frames(3, payload_crc=False)
    parser.feed(_lying_header() + good)  # waits: the CRC-checked lie might still be completed
    assert parser.next_frame() is None
    now[0] = 1.9
    assert not parser.expire() and parser.next_frame() is None
    now[0] = 2.0
    assert parser.expire()
    got = [parser.next_frame() for _ in range(3)]
    assert [h.timestamp_ms for h, _ in got] == [0.0, 10.0, 20.0]
    assert parser.counters.frames_invalid == 1
    assert "deadline" in next(iter(parser.counters.invalid_reasons))


def test_slow_drip_sender_is_bounded_by_the_per_frame_deadline():
    # One byte every 0.5 s used to reset a per-byte timeout forever. The deadline counts from the
    # frame's first byte, so the frame is dropped after frame_timeout however the bytes trickle.
    now = [0.0]
    parser = protocol.FrameParser(frame_timeout=2.0, clock=lambda: now[0])
    slow = protocol.encode_frame(np.zeros((8, 8), np.uint8), 1.0)
    fed = 0
    while not parser.expire():
        parser.feed(slow[fed : fed + 1])
        assert parser.next_frame() is None
        fed += 1
        now[0] += 0.5
    assert now[0] <= 2.0 + 0.5 and fed <= 5
    assert parser.counters.frames_invalid == 1
    # What the dripping sender sends afterwards is skipped as one run, and the next good frame parses.
    parser.feed(slow[fed:])
    parser.feed(protocol.encode_frame(np.ones((3, 3), np.uint8), 2.0))
    h, px = parser.next_frame()
    assert h.timestamp_ms == 2.0 and parser.counters.frames_invalid == 1


def test_slow_drip_tcp_sender_cannot_hold_the_receiver():
    a, b = socket.socketpair()
    stop = threading.Event()
    data = protocol.encode_frame(np.zeros((64, 64), np.uint8), 1.0) * 100

    def drip():
        for i in range(len(data)):
            if stop.wait(0.05):
                break
            try:
                a.send(data[i : i + 1])
            except OSError:
                break

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    src = RawStreamSource(b, frame_timeout=0.3, idle_timeout=1.0)
    frames = list(src)  # ends at the idle timeout although bytes keep coming
    stop.set()
    t.join(2)
    a.close(), b.close()
    assert frames == []
    assert src.frames_invalid >= 1
    assert any("deadline" in r for r in src.invalid_reasons)


@pytest.mark.parametrize("unit", [b"PEF1", b"PEF1\x01\x01\x00\x00"])
def test_resync_work_is_linear_for_a_payload_of_repeated_magics(unit):
    # A frame without payload CRC whose 1 MiB payload repeats the magic (or the magic, version,
    # format and flags of a header), arriving in 64 KiB reads. The old parser re-scanned the
    # payload for inner headers on every read: quadratic.
    w, h = 1024, 1024
    head = protocol.HEADER.pack(b"PEF1", 1, protocol.GRAY8, 0, w, h, 0, 0.0, w * h, 0)
    frame = head + struct.pack("<I", zlib.crc32(head)) + (unit * (w * h // len(unit) + 1))[: w * h]
    stream = frame * 2
    parser = protocol.FrameParser()
    got = feeds = 0
    for i in range(0, len(stream), 65536):
        feeds += 1
        parser.feed(stream[i : i + 65536])
        while parser.next_frame() is not None:
            got += 1
    parser.finish()
    while parser.next_frame() is not None:
        got += 1
    n = len(stream)
    assert got == 2 and parser.counters.frames_invalid == 0
    work = parser.work
    assert work.bytes_searched <= n + 4 * feeds  # a header start may straddle two reads
    assert work.bytes_checksummed <= n
    assert work.headers_checked <= n // len(unit) + 2


def test_nested_valid_headers_are_checksummed_once():
    # Adversarial: every 40 bytes a CRC-checked header with a valid header checksum announcing
    # (nearly) the rest of the stream as its payload, with a wrong payload checksum. Checking each
    # candidate's payload on its own would cost ~n^2/80 bytes (80 MB here); the running CRC
    # examines each byte once however many candidates overlap it.
    n_headers, step = 2000, 40
    total = n_headers * step
    blob = bytearray()
    for k in range(n_headers):
        size = (total - len(blob) - 36) // 64 * 64
        head = protocol.HEADER.pack(b"PEF1", 1, protocol.GRAY8, protocol.FLAG_PAYLOAD_CRC, 64, max(1, size // 64), k, 0.0, max(64, size), 0)
        blob += head + struct.pack("<I", zlib.crc32(head)) + b"\0" * (step - 36)
    parser = protocol.FrameParser()
    for i in range(0, len(blob), 4096):
        parser.feed(bytes(blob[i : i + 4096]))
        while parser.next_frame() is not None:
            pass
    parser.finish()
    while parser.next_frame() is not None:
        pass
    assert parser.counters.frames_ok == 0
    assert parser.counters.frames_invalid == n_headers
    assert parser.counters.bytes_skipped == len(blob)
    assert parser.work.bytes_checksummed <= len(blob)


def test_reserved_flag_bits_make_a_header_invalid():
    frame = np.arange(12, dtype=np.uint8).reshape(3, 4)
    head = protocol.HEADER.pack(b"PEF1", 1, protocol.GRAY8, 0x8000 | protocol.FLAG_PAYLOAD_CRC, 4, 3, 0, 0.0, 12, zlib.crc32(frame.tobytes()))
    bad = head + struct.pack("<I", zlib.crc32(head)) + frame.tobytes()
    parser = protocol.FrameParser()
    parser.feed(bad + protocol.encode_frame(frame, 5.0))
    h, px = parser.next_frame()
    assert h.timestamp_ms == 5.0
    assert parser.counters.invalid_reasons == {"reserved flag bits set": 1}
    assert parser.counters.bytes_skipped == len(bad)


def test_payload_crc_from_running_checksums_matches_zlib():
    rng = np.random.default_rng(3)
    for n in (0, 1, 7, 36, 4096, 100_003):
        a, b = rng.bytes(int(rng.integers(0, 50))), rng.bytes(n)
        assert protocol.crc32_of_range(zlib.crc32(a), zlib.crc32(a + b), n) == zlib.crc32(b)


def test_second_tcp_sender_is_refused_and_counted():
    rng = np.random.default_rng(4)
    frames = [_frame(rng) for _ in range(4)]
    refused = {}

    def on_listen(host, port):
        def send():
            with socket.create_connection((host, port), timeout=5) as first:
                first.sendall(protocol.encode_frame(frames[0], 0.0, 0))
                time.sleep(0.2)
                second = None
                try:  # the receiver resets it: connecting or a send fails soon
                    second = socket.create_connection((host, port), timeout=5)
                    for _ in range(50):
                        second.sendall(protocol.encode_frame(frames[3], 99.0))
                        time.sleep(0.02)
                except OSError as exc:
                    refused["error"] = exc
                finally:
                    if second is not None:
                        second.close()
                for k in (1, 2):
                    first.sendall(protocol.encode_frame(frames[k], 10.0 * k, k))

        threading.Thread(target=send, daemon=True).start()

    src = open_source("tcp:0", on_listen=on_listen, frame_timeout=1.0, idle_timeout=3.0, accept_timeout=5)
    with src:
        got = list(src)
    assert [ts for _, ts, _ in got] == [0.0, 10.0, 20.0]  # the second sender's frames never mix in
    assert src.senders_refused == 1
    assert src.describe()["senders_refused"] == 1
    assert isinstance(refused.get("error"), (ConnectionResetError, BrokenPipeError))


@pytest.mark.parametrize("kw", [dict(frame_timeout=0.0), dict(frame_timeout=-1.0), dict(idle_timeout=float("nan"))])
def test_timeouts_must_be_positive(kw):
    from pocus_edge.errors import ConfigError

    with pytest.raises(ConfigError, match="must be a positive number of seconds"):
        RawStreamSource(0, **kw)
