"""`pocus-edge serve` without a browser: the binary message layout, the address rules, a port in
use, and the server's behaviour towards clients that stall, disconnect or send garbage (raw
sockets and aiohttp clients stand in for pages; tests/test_serve_browser.py drives Chromium)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from pocus_edge.cli import main
from pocus_edge.export.golden import synthetic_frame
from pocus_edge.runtime import serve_wire
from pocus_edge.runtime.pipeline import StreamOptions
from pocus_edge.runtime.serve import ServeServer, serve
from pocus_edge.runtime.serve_hub import FrameHub, ServeError, check_address

pytest.importorskip("aiohttp")
pytest.importorskip("onnx")


def test_frame_message_layout_round_trips_and_matches_the_documented_bytes():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (5, 7), dtype=np.uint8)  # 35 pixels: the mask's last byte is partial
    mask = rng.random((5, 7)) > 0.5
    weight = rng.random((5, 7)).astype(np.float32)
    stats = {"frames_processed": 3, "latency_ms": {"p50": 1.5, "p95": 2.5}}
    data = serve_wire.encode_frame(12, 345.5, frame, mask, weight, stats)
    # The documented layout, read back by hand.
    assert data[:4] == b"PESV" and int.from_bytes(data[4:6], "little") == 1 and int.from_bytes(data[6:8], "little") == 1
    assert int.from_bytes(data[8:12], "little") == 12 and np.frombuffer(data[12:20], "<f8")[0] == 345.5
    assert int.from_bytes(data[20:24], "little") == 5 and int.from_bytes(data[24:28], "little") == 7
    stats_len = int.from_bytes(data[28:32], "little")
    assert json.loads(data[32 : 32 + stats_len]) == stats
    at = 32 + stats_len
    np.testing.assert_array_equal(np.frombuffer(data[at : at + 35], np.uint8).reshape(5, 7), frame)
    packed = data[at + 35 : at + 35 + 5]
    bits = [(packed[k >> 3] >> (7 - (k & 7))) & 1 for k in range(35)]  # most significant bit first
    np.testing.assert_array_equal(np.array(bits, bool).reshape(5, 7), mask)
    np.testing.assert_array_equal(np.frombuffer(data[at + 40 :], np.uint8).reshape(5, 7), np.rint(weight * 255).astype(np.uint8))
    decoded = serve_wire.decode_frame(data)
    assert decoded["index"] == 12 and decoded["stats"] == stats
    np.testing.assert_array_equal(decoded["mask"], mask)
    no_weight = serve_wire.decode_frame(serve_wire.encode_frame(1, 0.0, frame, mask, None, b"{}"))
    assert no_weight["weight"] is None and len(serve_wire.encode_frame(1, 0.0, frame, mask, None, b"{}")) == 32 + 2 + 35 + 5
    for broken in (data[:20], data[:-1], b"XXXX" + data[4:]):
        with pytest.raises(ValueError):
            serve_wire.decode_frame(broken)


def test_client_messages_other_than_ping_are_malformed():
    assert serve_wire.parse_client_message('{"type": "ping"}') == {"type": "ping"}
    for text in ("", "not json", "[1, 2]", '{"type": "shutdown"}', '{"no": "type"}'):
        with pytest.raises(ValueError):
            serve_wire.parse_client_message(text)


def test_loopback_by_default_other_addresses_need_the_flag_and_a_token():
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        check_address(host, None, False)
    with pytest.raises(ServeError, match="--allow-remote"):
        check_address("0.0.0.0", "secret", False)
    with pytest.raises(ServeError, match="--token"):
        check_address("0.0.0.0", None, True)
    check_address("0.0.0.0", "secret", True)  # refused nothing; nothing was bound either


def test_cli_refuses_a_remote_address_and_a_port_in_use_in_one_line(tmp_path, capsys):
    model = _model(tmp_path)
    folder = _frames(tmp_path / "frames", 2, (60, 80))
    assert main(["serve", str(folder), "-m", str(model), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-remote" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", str(folder), "-m", str(model), "--port", str(port), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"127.0.0.1:{port}: port already in use" in err


def test_a_token_guards_the_page_and_the_websocket(tmp_path):
    import aiohttp

    hub = FrameHub()
    server = ServeServer(hub, "127.0.0.1", 0, token="s3cret").start()
    base = f"http://127.0.0.1:{server.port}"

    async def probe():
        # unsafe: keep cookies of an IP-address host, as browsers do
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            statuses = [(await session.get(base + path)).status for path in ("/", "/info", "/ws")]
            ok = await session.get(base + "/?token=s3cret")
            page = await ok.text()
            # The cookie set with the page now admits the page's own requests.
            info = await session.get(base + "/info")
            return statuses, ok.status, page, info.status, ok.headers.get("Cross-Origin-Opener-Policy")

    try:
        statuses, ok, page, info, coop = asyncio.run(probe())
    finally:
        server.stop(0.1)
    assert statuses == [403, 403, 403] and ok == 200 and "<canvas" in page and info == 200 and coop == "same-origin"
    assert hub.counters["refused"] == 3


def _model(tmp_path: Path, size: int = 32) -> Path:
    from test_golden import _mean_channel_onnx

    path = tmp_path / "model.onnx"
    _mean_channel_onnx(path, size, 0.3)
    return path


def _frames(folder: Path, n: int, shape: tuple[int, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"frame{i:03d}.png"), synthetic_frame(*shape, seed=i))
    return folder


class _Serving:
    """serve() in a background thread; ``url`` once it listens, ``result`` when done."""

    def __init__(self, folder: Path, model: Path, **kwargs):
        self.listening = threading.Event()
        self.result = self.error = None
        self.url = None

        def on_listen(url):
            self.url = url
            self.listening.set()

        def run():
            try:
                self.result = serve(str(folder), str(model), port=0, on_listen=on_listen, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the test
                self.error = exc
                self.listening.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.listening.wait(30)

    def join(self, timeout: float = 120) -> dict:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "serve did not finish: something waited for a client"
        if self.error:
            raise self.error
        return self.result


def test_a_client_that_stops_reading_loses_frames_and_never_holds_the_pipeline(tmp_path):
    """A raw WebSocket client that completes the handshake and never reads again (tiny receive
    buffer): the stream still processes every frame (offline mode: a sink that waited would hang
    it); the frames that client could not take are counted as dropped, sent + dropped = frames."""
    n = 40
    folder = _frames(tmp_path / "frames", n, (480, 640))  # ~345 kB messages: buffers fill fast
    serving = _Serving(folder, _model(tmp_path), wait_for_browser=30, linger=0.5, client_queue=2,
                       options=StreamOptions(progress=False))
    port = int(serving.url.rsplit(":", 1)[1].strip("/"))
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", port))
    stalled.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert stalled.recv(12) == b"HTTP/1.1 101"
    try:
        result = serving.join()
    finally:
        stalled.close()
    assert result["frames_processed"] == n and result["frames_dropped"] == 0 and result["frames_in"] == n
    s = result["serve"]
    assert s["browsers"] == 1 and s["messages_dropped"] > 0
    assert s["messages_sent"] + s["messages_dropped"] == n


def test_malformed_messages_and_a_client_leaving_mid_stream_do_not_stop_the_stream(tmp_path):
    import aiohttp

    n = 30
    folder = _frames(tmp_path / "frames", n, (60, 80))
    report = tmp_path / "report.json"
    serving = _Serving(folder, _model(tmp_path), wait_for_browser=30, linger=0.5, report=report,
                       options=StreamOptions(realtime=True, drop=False, progress=False), fps=40.0)

    async def misbehave():
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(serving.url + "ws")
            hello = json.loads((await ws.receive()).data)
            await ws.send_str("{not json")
            await ws.send_bytes(b"\x00\x01binary")
            await ws.send_str('{"type": "ping"}')
            replies, frames = [], 0
            while len(replies) < 3 or frames < 3:
                message = await ws.receive(timeout=30)
                if message.type == aiohttp.WSMsgType.BINARY:
                    frames += 1
                    serve_wire.decode_frame(message.data)
                elif json.loads(message.data)["type"] in ("error", "pong"):
                    replies.append(json.loads(message.data))
            await ws.close()  # mid-stream: the recording lasts ~0.75 s at 40 FPS
            return hello, replies

    hello, replies = asyncio.run(misbehave())
    result = serving.join()
    assert hello["type"] == "hello" and hello["img_size"] == 32 and hello["threshold"] == 0.3
    assert [r["type"] for r in replies].count("error") == 2 and {"type": "pong"} in replies
    assert all("malformed" in r["message"] for r in replies if r["type"] == "error")
    assert result["frames_processed"] == n and result["frames_in"] == n
    s = result["serve"]
    assert s["malformed_messages"] == 2 and s["disconnects"] == 1 and s["browsers"] == 1
    on_disk = json.loads(report.read_text())
    assert on_disk["serve"] == s and on_disk["frames_processed"] == n
