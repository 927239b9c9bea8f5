"""Property-based fuzzing of the PEF1 receiver (Hypothesis).

Streams are random sequences of intact frames (random size, pixel format, with or without a
payload checksum) and faults of every kind a broken probe or a hostile sender produces
(:mod:`pocus_edge.runtime.faults`). For any such stream, split into reads in any way:

* every intact frame comes out, bit-exact and in order;
* every fault is counted as exactly one invalid frame when faults are separated by intact
  frames (adjacent faults may merge into one skipped run: at most one per fault);
* every byte is accounted for: skipped bytes + the intact frames' bytes == bytes sent.

Through the whole pipeline, every intact frame is processed or counted dropped.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the dev extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pocus_edge.errors import DataError  # noqa: E402
from pocus_edge.runtime import faults, protocol  # noqa: E402

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SEEDS = st.integers(0, 2**32 - 1)


@st.composite
def intact_frames(draw, index):
    return faults.random_frame(np.random.default_rng(draw(SEEDS)), index)


@st.composite
def fault_bytes(draw):
    kind = draw(st.sampled_from(faults.FAULT_KINDS))
    return faults.fault_bytes(kind, np.random.default_rng(draw(SEEDS)))


@st.composite
def streams(draw, *, separated: bool):
    """(bytes, [(frame bytes, timestamp)], number of faults). ``separated``: at most one fault
    between two intact frames."""
    n = draw(st.integers(0, 12))
    items, intact, n_faults = [], [], 0
    for k in range(n + 1):
        n_here = draw(st.integers(0, 1 if separated else 3))
        for _ in range(n_here):
            items.append(draw(fault_bytes()))
            n_faults += 1
        if k < n:
            data, ts = draw(intact_frames(k))
            items.append(data)
            intact.append((data, ts))
    return b"".join(items), intact, n_faults


def _chunks(draw, data: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=20))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def _parse_all(chunks: list[bytes]) -> tuple[protocol.FrameParser, list]:
    parser = protocol.FrameParser(clock=lambda: 0.0)
    out = []
    for c in chunks:
        parser.feed(c)
        while (f := parser.next_frame()) is not None:
            out.append(f)
    parser.finish()
    while (f := parser.next_frame()) is not None:
        out.append(f)
    return parser, out


def _expected_pixels(data: bytes) -> np.ndarray:
    h = protocol.FrameHeader(*protocol.HEADER.unpack(data[: protocol.HEADER.size])[1:])
    return protocol.decode_pixels(data[36:], h.pixel_format, h.width, h.height)


def _check_frames(out, intact):
    assert len(out) == len(intact), (len(out), len(intact))
    for (header, pixels), (data, ts) in zip(out, intact):
        assert header.timestamp_ms == ts
        np.testing.assert_array_equal(pixels, _expected_pixels(data))


@FUZZ
@given(st.data())
def test_every_intact_frame_parsed_and_every_fault_counted_once(data):
    stream, intact, n_faults = data.draw(streams(separated=True))
    parser, out = _parse_all(_chunks(data.draw, stream))
    _check_frames(out, intact)
    c = parser.counters
    assert c.frames_invalid == n_faults, c.invalid_reasons
    assert c.bytes_skipped == len(stream) - sum(len(d) for d, _ in intact)
    assert parser.pending() == 0


@FUZZ
@given(st.data())
def test_adjacent_faults_never_cost_an_intact_frame(data):
    stream, intact, n_faults = data.draw(streams(separated=False))
    parser, out = _parse_all(_chunks(data.draw, stream))
    # Every intact frame comes out, in order. A fault next to a fault can make an extra frame
    # without a payload checksum (a frame cut by one byte, followed by garbage, is
    # indistinguishable from a whole frame): such extras are allowed, lost frames are not.
    it = iter(out)
    for data_bytes, ts in intact:
        want = _expected_pixels(data_bytes)
        assert any(h.timestamp_ms == ts and px.shape == want.shape and np.array_equal(px, want) for h, px in it), ts
    c = parser.counters
    extra = len(out) - len(intact)
    assert c.frames_invalid + extra <= n_faults  # an extra frame is made of a fault's bytes
    assert (c.frames_invalid + extra >= 1) == (n_faults >= 1)
    taken = sum(36 + h.payload_size for h, _ in out)
    assert c.bytes_skipped == len(stream) - taken


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_pipeline_processes_or_counts_every_frame_over_a_pipe(data):
    """The real receiver (a pipe, timeouts, the pipeline's queue dropping the oldest frame):
    every intact frame is processed or counted dropped, every fault counted invalid."""
    from pocus_edge.runtime.pipeline import StreamOptions, run_stream
    from pocus_edge.runtime.sources import RawStreamSource

    stream, intact, n_faults = data.draw(streams(separated=True))
    drop = data.draw(st.booleans())
    chunks = _chunks(data.draw, stream)
    r, w = os.pipe()

    def writer():
        for c in chunks:
            os.write(w, c)
        os.close(w)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    src = RawStreamSource(r, frame_timeout=10.0, idle_timeout=10.0)
    try:
        if not intact and not n_faults:  # a stream without any frame is refused, like an empty folder
            with pytest.raises(DataError, match="ended before its first frame"):
                run_stream(src, _MeanBackend(), options=StreamOptions(realtime=drop, drop=drop, queue_size=1, progress=False))
            return
        report = run_stream(src, _MeanBackend(), options=StreamOptions(realtime=drop, drop=drop, queue_size=1, progress=False))
    finally:
        t.join(5)
        os.close(r)
    assert report["frames_processed"] + report["frames_dropped"] == len(intact)
    assert report["frames_invalid"] == n_faults
    assert report["frames_in"] == len(intact) + n_faults


class _MeanBackend:
    """A stand-in model: the probability map is the frame's normalised brightness."""

    threshold = 0.5
    name = "mean"

    def prepare(self, frame):
        return (frame.astype(np.float32) / 255.0)[None]

    def run(self, batch):
        return {"prob": batch}

    def describe(self):
        return {"backend": "mean", "precision": "fp32", "device": "cpu"}
