"""The browsers of `pocus-edge serve` and the pipeline sink that feeds them.

:class:`BrowserSink` runs in the pipeline thread: it encodes each processed frame
(:mod:`.serve_wire`) and hands it to the :class:`FrameHub` without waiting. The hub lives on the
server's event loop: each browser has a bounded queue, and a browser that reads too slowly (or
not at all) loses its oldest queued messages, counted per browser and in the stream report.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import threading
import time
from pathlib import Path

from ..errors import PocusError
from .base import FrameResult, Sink
from .serve_wire import encode_frame, parse_client_message

WEB_DIR = Path(__file__).resolve().parent / "web"
STATS_PERIOD_S = 0.25  # percentiles are recomputed at most this often, not on every frame


class ServeError(PocusError):
    """The page cannot be served: a refused address, a missing token, a port in use."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_address(host: str, token: str | None, allow_remote: bool) -> None:
    """Loopback by default; another address only with ``allow_remote`` and a token."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise ServeError(f"--host {host} is not a loopback address: pass --allow-remote (with --token) to serve other machines")
    if not token:
        raise ServeError(f"--host {host} serves other machines: give --token SECRET (the page URL then carries ?token=SECRET)")


def ort_web_dir() -> Path | None:
    """onnxruntime-web's dist folder as ``make web`` installs it (POCUS_EDGE_ORT_WEB overrides)."""
    candidates = [os.environ.get("POCUS_EDGE_ORT_WEB"), WEB_DIR / "node_modules" / "onnxruntime-web" / "dist"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "ort.wasm.min.js").is_file():
            return Path(candidate)
    return None


class _Client:
    def __init__(self, ws, maxsize: int):
        self.ws = ws
        self.queue: asyncio.Queue = asyncio.Queue(maxsize)
        self.sent = 0
        self.dropped = 0


class FrameHub:
    """The browsers connected to one server, and what each was sent and lost. ``publish`` is
    called from the pipeline thread and returns at once; everything else runs on the loop."""

    def __init__(self, client_queue: int = 2):
        self.client_queue = max(1, int(client_queue))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.clients: set[_Client] = set()
        self.connected = threading.Event()
        self.finished = False  # the stream has ended: browsers leaving now are not disconnects
        self.hello: str | None = None  # the first message every browser gets (the model, the stream)
        # Read by the stream report while the loop updates it: fixed keys, values replaced.
        self.counters = {"url": None, "browsers": 0, "messages_sent": 0, "messages_dropped": 0, "malformed_messages": 0,
                         "disconnects": 0, "refused": 0}

    @property
    def has_clients(self) -> bool:
        return bool(self.clients)

    def publish(self, data: bytes | str) -> None:
        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._offer, data)
            except RuntimeError:  # the loop stopped between the check and the call
                pass

    def _offer(self, data: bytes | str) -> None:
        for client in list(self.clients):
            if client.queue.full():
                self._dropped(client, client.queue.get_nowait())
            client.queue.put_nowait(data)

    def _dropped(self, client: _Client, data: bytes | str) -> None:
        if isinstance(data, bytes):  # frame messages are counted; text ones are few and small
            client.dropped += 1
            self.counters["messages_dropped"] += 1

    async def handle(self, ws) -> None:
        """One browser: a writer task drains its queue while this coroutine reads its messages."""
        client = _Client(ws, self.client_queue)
        if self.hello is not None:
            await ws.send_str(self.hello)
        self.clients.add(client)
        self.counters["browsers"] += 1
        self.connected.set()
        writer = asyncio.ensure_future(self._write(client))
        try:
            await self._read(client)
        finally:
            writer.cancel()
            self.clients.discard(client)
            while not client.queue.empty():
                self._dropped(client, client.queue.get_nowait())
            if not self.finished:  # left before the stream ended (closed tab, lost connection)
                self.counters["disconnects"] += 1

    async def _write(self, client: _Client) -> None:
        last_delivery = 0.0
        while True:
            data = await client.queue.get()
            delivered = False
            try:
                if isinstance(data, bytes):
                    await client.ws.send_bytes(data)
                    client.sent += 1
                    self.counters["messages_sent"] += 1
                else:
                    await client.ws.send_str(data)
                delivered = True
                if time.monotonic() - last_delivery > 0.5 or not isinstance(data, bytes):
                    last_delivery = time.monotonic()
                    await client.ws.send_str(json.dumps({"type": "delivery", "sent": client.sent, "dropped": client.dropped}))
            except (ConnectionError, RuntimeError, asyncio.CancelledError):
                # The browser went away or the server is stopping: what was in hand is lost.
                if not delivered:
                    self._dropped(client, data)
                return

    async def _read(self, client: _Client) -> None:
        from aiohttp import WSMsgType

        async for message in client.ws:
            if message.type == WSMsgType.TEXT:
                try:
                    parse_client_message(message.data)
                except ValueError as exc:
                    await self._complain(client, f"malformed message ignored: {exc}")
                    continue
                await client.ws.send_str(json.dumps({"type": "pong"}))
            elif message.type == WSMsgType.BINARY:
                await self._complain(client, "malformed message ignored: the page sends text messages only")
            elif message.type == WSMsgType.ERROR:  # e.g. a message over MAX_CLIENT_MESSAGE bytes
                self.counters["malformed_messages"] += 1
                break

    async def _complain(self, client: _Client, text: str) -> None:
        self.counters["malformed_messages"] += 1
        try:
            await client.ws.send_str(json.dumps({"type": "error", "message": text}))
        except ConnectionError:
            pass

    async def close_all(self, wait_s: float) -> None:
        """Let each queue drain for up to ``wait_s``, then close every WebSocket."""
        self.finished = True
        deadline = time.monotonic() + wait_s
        while any(not c.queue.empty() for c in self.clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for client in list(self.clients):
            while not client.queue.empty():  # never delivered: lost like a dropped frame
                self._dropped(client, client.queue.get_nowait())
            await client.ws.close()


class BrowserSink(Sink):
    """Pipeline sink: encodes each frame for the browsers (only while one is connected) and
    hands it to the hub without waiting."""

    needs_frame_resolution = True

    def __init__(self, hub: FrameHub, stats):
        self.hub = hub
        self.stats = stats
        self._stats_bytes = b"{}"
        self._stats_at = -1.0

    def _stats_json(self, result: FrameResult) -> bytes:
        now = time.perf_counter()
        if now - self._stats_at >= STATS_PERIOD_S:
            self._stats_at = now
            s = self.stats
            e2e = s.end_to_end
            self._stats_bytes = json.dumps({
                "frames_in": s.frames_in, "frames_processed": s.frames_processed, "frames_dropped": s.frames_dropped,
                "frames_invalid": s.frames_invalid, "fps": round(s.fps, 2),
                "latency_ms": {"p50": _round(e2e.percentile(50)), "p95": _round(e2e.percentile(95))},
            }, separators=(",", ":")).encode()
        reliability = getattr(result, "reliability", None)
        if reliability is None:
            return self._stats_bytes
        return self._stats_bytes[:-1] + b',"reliability":' + json.dumps(float(reliability)).encode() + b"}"

    def write(self, result: FrameResult) -> None:
        if not self.hub.has_clients:
            return
        self.hub.publish(encode_frame(result.index, result.timestamp_ms, result.frame, result.mask, result.weight,
                                      self._stats_json(result)))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)

