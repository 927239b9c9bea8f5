"""OpenIGTLink in and out, end to end against pyigtl's own server (the frame sender, as PLUS or
Slicer) and client (the mask receiver, as a Slicer connector), including a sender that
disconnects mid-run; and the failure cases a broken sender produces."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time

import numpy as np
import pytest

pyigtl = pytest.importorskip("pyigtl")
onnx = pytest.importorskip("onnx")

from pocus_edge.data.transforms import preprocess_frame  # noqa: E402
from pocus_edge.errors import DataError  # noqa: E402
from pocus_edge.inference import open_backend  # noqa: E402
from pocus_edge.metrics import binarize  # noqa: E402
from pocus_edge.runtime.igtl import IgtlMaskSink, IgtlSource, mask_device_name, parse_igtl_address  # noqa: E402
from pocus_edge.runtime.overlay import to_frame_resolution  # noqa: E402
from pocus_edge.runtime.pipeline import FrameResult, stream  # noqa: E402

SIZE = 32
MATRIX = np.array([[0.2, 0, 0, -10.0], [0, 0.25, 0, 5.0], [0, 0, 1.0, 2.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small fused-graph stand-in written with onnx.helper: sigmoid(4 x the 3x3 local mean - 2),
    i.e. "bone" where the neighbourhood is brighter than mid-gray."""
    import json

    from onnx import TensorProto, helper, numpy_helper

    weight = np.full((1, 3, 3, 3), 4.0 / 27.0, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["frames", "w", "b"], ["logits"], pads=[1, 1, 1, 1]),
         helper.make_node("Sigmoid", ["logits"], ["fused"])],
        "tiny",
        [helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("fused", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array([-2.0], np.float32), "b")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    entry = proto.metadata_props.add()
    entry.key, entry.value = "pocus_edge_card", json.dumps({"img_size": SIZE, "threshold": 0.5, "gflops_per_frame": 0.001})
    path = tmp_path_factory.mktemp("igtl") / "tiny.onnx"
    onnx.save(proto, str(path))
    return path


def expected_mask(model_path, frame: np.ndarray) -> np.ndarray:
    backend = open_backend(model_path, "ort", threads=1)
    prob = backend.run(preprocess_frame(frame, SIZE)[None])["prob"][0, 0]
    return binarize(to_frame_resolution(prob, frame.shape), backend.threshold).astype(np.uint8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def keep_signal_handlers():
    """pyigtl's server installs its own SIGINT/SIGTERM handlers; give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def probe_frame(rng, height: int, width: int) -> np.ndarray:
    """Dark speckle with one bright block at a random place: a mask worth comparing."""
    frame = rng.integers(0, 90, (height, width), dtype=np.uint8)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    frame[top : top + height // 3, left : left + width // 3] = rng.integers(190, 256, (height // 3, width // 3))
    return frame


def image(frame: np.ndarray, ts: float, device: str = "Image_Reference"):
    return pyigtl.ImageMessage(frame[None], ijk_to_world_matrix=MATRIX, timestamp=ts, device_name=device)


def test_round_trip_through_pyigtl_server_and_client_with_a_sender_that_disconnects(model, tmp_path):
    rng = np.random.default_rng(1)
    frame_port, mask_port = free_port(), free_port()
    with keep_signal_handlers():
        server = pyigtl.OpenIGTLinkServer(port=frame_port, local_server=True)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["report"] = stream(f"igtl://127.0.0.1:{frame_port}", model, threads=1, progress=False,
                                       send=f"igtl://:{mask_port}", masks=tmp_path / "masks.npz",
                                       frame_timeout=2.0, idle_timeout=10.0, accept_timeout=10.0)
        except BaseException as exc:  # surfaced by the assertions below
            outcome["error"] = exc

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    client = None
    try:
        wait_until(server.is_connected)
        client = pyigtl.OpenIGTLinkClient(host="127.0.0.1", port=mask_port)
        wait_until(client.is_connected)
        sent = []
        # 1) Lockstep: each frame (any size), then its mask back, with the frame's timestamp,
        # geometry and device name + "_mask".
        for k in range(5):
            frame = probe_frame(rng, 40 + 3 * k, 57 - 2 * k)
            ts = 1_764_000_000.0 + 0.04 * k + 0.000123
            server.send_message(image(frame, ts), wait=True)
            sent.append(frame)
            reply = client.wait_for_message("Image_Reference_mask", timeout=15)
            assert reply is not None, f"no mask for frame {k}"
            assert reply.device_name == "Image_Reference_mask" and abs(reply.timestamp - ts) < 1e-6
            mask = np.asarray(reply.image)[0]
            assert mask.dtype == np.uint8 and mask.shape == frame.shape and set(np.unique(mask)) <= {0, 1}
            want = expected_mask(model, frame)
            assert 0.03 < want.mean() < 0.5  # a real mask, not an empty one
            assert (mask != want).mean() < 1e-3
            np.testing.assert_allclose(reply.ijk_to_world_matrix, MATRIX, atol=1e-4)
        # 2) Messages that are not an 8-bit grayscale frame: counted invalid, nothing sent back.
        server.send_message(pyigtl.TransformMessage(np.eye(4), device_name="ProbeToTracker"), wait=True)
        server.send_message(pyigtl.StringMessage("hello", device_name="Text"), wait=True)
        server.send_message(image(rng.integers(0, 4096, (20, 30), dtype=np.uint16), 1.0), wait=True)
        server.send_message(pyigtl.ImageMessage(rng.integers(0, 256, (1, 20, 30, 3), dtype=np.uint8), timestamp=2.0,
                                                device_name="Color"), wait=True)
        server.send_message(pyigtl.ImageMessage(rng.integers(0, 256, (3, 20, 30), dtype=np.uint8), timestamp=3.0,
                                                device_name="Volume"), wait=True)
        # 3) A burst, and the sender goes away without waiting for the masks.
        for k in range(3):
            frame = probe_frame(rng, 33, 44)
            server.send_message(image(frame, 1_764_000_100.0 + k), wait=True)
            sent.append(frame)
        server.stop()
        runner.join(timeout=30)
        assert not runner.is_alive(), "the stream did not end when the sender disconnected"
        assert "error" not in outcome, outcome.get("error")
        report = outcome["report"]
        assert report["frames_in"] == 13 and report["frames_processed"] == 8
        assert report["frames_dropped"] == 0 and report["frames_invalid"] == 5
        assert report["invalid_reasons"] == {
            "TRANSFORM message (not an IMAGE)": 1,
            "STRING message (not an IMAGE)": 1,
            "IMAGE of uint16 pixels (only 8-bit grayscale)": 1,
            "IMAGE with 3 components (only 8-bit grayscale)": 1,
            "3-D IMAGE volume of 3 slices (only single frames)": 1,
        }
        assert report["source"]["ended_by"] == "server closed the connection"
        assert report["source"]["live"] is True and report["source"]["devices"] == {"Image_Reference": 8}
        assert report["igtl_send"]["masks_sent"] == 8 and report["igtl_send"]["clients_connected"] == 1
        # The last mask of the burst reached the client, and every mask was written to disk.
        wait_until(lambda: client.incoming_messages.get("Image_Reference_mask") is not None
                   and abs(client.incoming_messages["Image_Reference_mask"].timestamp - (1_764_000_102.0)) < 1e-6)
        with np.load(tmp_path / "masks.npz") as masks:
            stored = [masks[name] for name in sorted(masks.files)]
        assert [m.shape for m in stored] == [f.shape for f in sent]
        assert ((stored[-1] > 0).astype(np.uint8) != expected_mask(model, sent[-1])).mean() < 1e-3
    finally:
        if client is not None:
            client.stop()
        if not getattr(server, "communication_thread_stop_requested", True):
            server.stop()


def _pair_with(wire: bytes, close: bool = True) -> socket.socket:
    a, b = socket.socketpair()

    def send() -> None:
        a.sendall(wire)
        if close:
            a.close()

    threading.Thread(target=send, daemon=True).start()
    return b


def test_corrupt_cut_and_stalled_messages_are_counted(tmp_path):
    good = image(np.full((12, 16), 7, np.uint8), 5.0).pack()
    bad_crc = bytearray(image(np.full((12, 16), 9, np.uint8), 6.0).pack())
    bad_crc[-1] ^= 0xFF  # a pixel flipped in transit
    # good, corrupted, good, then a message cut short by the disconnect
    src = IgtlSource(_pair_with(good + bytes(bad_crc) + good + good[:80]), name="pair", frame_timeout=1.0, idle_timeout=2.0)
    frames = list(src)
    assert [f.shape for f, _, _ in frames] == [(12, 16), (12, 16)]
    assert [ts for _, ts, _ in frames] == [5000.0, 5000.0]
    assert src.invalid_reasons == {"IMAGE body fails its CRC-64": 1, "message cut short by the disconnect": 1}
    assert src.ended_by == "server closed the connection"
    # A sender that stops mid-message but keeps the connection open: dropped at the deadline.
    a, b = socket.socketpair()
    a.sendall(good + good[:70])
    src = IgtlSource(b, name="stall", frame_timeout=0.3, idle_timeout=5.0)
    t0 = time.monotonic()
    frames = list(src)
    assert len(frames) == 1 and time.monotonic() - t0 < 3.0
    assert src.invalid_reasons == {"incomplete message (not complete within its deadline)": 1}
    a.close()
    # Nothing at all for idle_timeout seconds ends the stream.
    a, b = socket.socketpair()
    src = IgtlSource(b, name="idle", frame_timeout=0.3, idle_timeout=0.3)
    assert list(src) == [] and src.ended_by == "no message for 0.3 s"
    a.close()


def test_no_server_is_one_clear_error():
    port = free_port()
    with pytest.raises(DataError, match=rf"igtl://127.0.0.1:{port}: no OpenIGTLink server answered within 0.3 s"):
        IgtlSource.connect(f"igtl:{port}", connect_timeout=0.3)


def test_masks_of_other_sources_and_clients_that_do_not_read():
    sink = IgtlMaskSink("igtl://127.0.0.1:0", send_timeout=0.1)
    try:
        # A client that reads: a mask of a frame that did not come over OpenIGTLink.
        reader = socket.create_connection(("127.0.0.1", sink.port))
        mask = np.zeros((6, 9), bool)
        mask[2:4, 3:7] = True
        sink.write(FrameResult(0, 1234.5, np.zeros((6, 9), np.uint8), mask.astype(np.float32), mask))
        reader.settimeout(5)
        _, message, _ = _from_buffer(reader, b"")
        assert message.device_name == "pocus-edge_mask" and message.timestamp == pytest.approx(1.2345, abs=1e-9)
        np.testing.assert_array_equal(np.asarray(message.image)[0], mask.astype(np.uint8))
        # A client that never reads is disconnected instead of stalling the stream.
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", sink.port))
        big = np.ones((1500, 1500), bool)
        t0 = time.monotonic()
        for k in range(40):
            sink.write(FrameResult(k + 1, 0.0, np.zeros((1500, 1500), np.uint8), big.astype(np.float32), big))
            if sink.stats["clients_dropped"]:
                break
        assert sink.stats["clients_dropped"] >= 1 and time.monotonic() - t0 < 20
        reader.close()
        stuck.close()
    finally:
        sink.close()


def test_addresses_and_device_names():
    assert parse_igtl_address("igtl://10.0.0.5:18945") == ("10.0.0.5", 18945)
    assert parse_igtl_address("igtl:18946") == ("127.0.0.1", 18946)
    assert parse_igtl_address("igtl://:18947", default_host="0.0.0.0") == ("0.0.0.0", 18947)
    assert parse_igtl_address("igtl://plus-host") == ("plus-host", 18944)
    assert parse_igtl_address("igtl://[::1]:5000") == ("::1", 5000)
    for bad in ("igtl://host:port", "igtl://host:70000"):
        with pytest.raises(DataError, match="expected igtl://HOST:PORT"):
            parse_igtl_address(bad)
    assert mask_device_name("Image_Reference") == "Image_Reference_mask"
    long = mask_device_name("VeryLongDeviceName_ABCDEFG")
    assert long.endswith("_mask") and len(long.encode()) == 20


def test_mask_messages_carry_the_risk_and_the_alarm_as_metadata():
    sink = IgtlMaskSink("igtl://127.0.0.1:0", send_timeout=1.0)
    try:
        reader = socket.create_connection(("127.0.0.1", sink.port))
        reader.settimeout(5)
        mask = np.zeros((5, 7), bool)
        mask[1:3, 2:5] = True
        frames = [(0.125, False, "ok"), (0.734567891, True, "alarm"), (0.5, None, "high")]
        for k, (risk, alarm, level) in enumerate(frames):
            result = FrameResult(k, 1000.0 * k, np.zeros((5, 7), np.uint8), mask.astype(np.float32), mask)
            result.risk, result.alarm, result.risk_level = risk, alarm, level
            sink.write(result)
        # A frame of a model without the risk output: a plain version-1 message, as before.
        sink.write(FrameResult(3, 3000.0, np.zeros((5, 7), np.uint8), mask.astype(np.float32), mask))
        got, rest = [], b""
        for _ in range(4):
            fields, message, rest = _from_buffer(reader, rest)
            got.append((fields["header_version"], message))
        for k, ((version, message), (risk, alarm, level)) in enumerate(zip(got[:3], frames)):
            assert version == 2 and message.timestamp == pytest.approx(float(k), abs=1e-9)
            assert float(message.metadata["pocus_edge.risk"]) == pytest.approx(risk, rel=1e-5)
            assert message.metadata["pocus_edge.risk_level"] == level
            assert message.metadata.get("pocus_edge.drift_alarm") == (None if alarm is None else str(int(alarm)))
            np.testing.assert_array_equal(np.asarray(message.image)[0], mask.astype(np.uint8))
        assert got[3][0] == 1 and got[3][1].metadata == {}
        reader.close()
    finally:
        sink.close()


def _from_buffer(reader: socket.socket, data: bytes):
    """One IMAGE message from ``data`` (bytes already read) and the socket; returns its header
    fields, the message and the bytes after it."""
    while len(data) < 58:
        data += reader.recv(65536)
    fields = pyigtl.MessageBase.parse_header(data[:58])
    while len(data) < 58 + fields["body_size"]:
        data += reader.recv(65536)
    message = pyigtl.ImageMessage()
    message.unpack(fields, data[58:58 + fields["body_size"]])
    return fields, message, data[58 + fields["body_size"]:]
