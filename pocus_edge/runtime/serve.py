"""`pocus-edge serve`: the stream pipeline plus a page in the browser next to the probe.

The pipeline runs as in ``pocus-edge stream``; a :class:`~.serve_hub.BrowserSink` hands every
processed frame (frame, mask, fusion-weight map, stats; :mod:`.serve_wire`) to an aiohttp server
running its own event loop in a background thread, which pushes it over a WebSocket to each
connected page (docs/serve.md). The pipeline never waits for a browser. The page
(``runtime/web/``) can also run a student model in the browser with onnxruntime-web (WASM),
served from the npm package that ``make web`` installs; nothing is fetched from elsewhere.

The server listens on loopback unless told otherwise; any other address needs ``allow_remote``
and a token, which the first page request presents as ``?token=`` (then a same-site cookie).
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

from .serve_hub import WEB_DIR, BrowserSink, FrameHub, ServeError, check_address, ort_web_dir

PAGE_FILES = {"": "index.html", "index.html": "index.html", "app.js": "app.js", "preprocess.js": "preprocess.js",
              "style.css": "style.css"}
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
                 ".wasm": "application/wasm", ".onnx": "application/octet-stream"}
# Cross-origin isolation lets the page use SharedArrayBuffer, hence onnxruntime-web's WASM threads.
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
                     "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
TOKEN_COOKIE = "pocus_edge_token"
MAX_CLIENT_MESSAGE = 4096  # bytes; the page sends small JSON messages only

__all__ = ["BrowserSink", "FrameHub", "ServeError", "ServeServer", "check_address", "serve"]


class ServeServer:
    """The HTTP + WebSocket server on its own event loop in a daemon thread."""

    def __init__(self, hub: FrameHub, host: str = "127.0.0.1", port: int = 8765, *, token: str | None = None,
                 model_file: Path | None = None, info: dict[str, Any] | None = None):
        self.hub, self.host, self.port, self.token = hub, host, int(port), token
        self.model_file = model_file
        self.info = dict(info or {})
        self._thread: threading.Thread | None = None
        self._runner = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> "ServeServer":
        """Bind and serve; ServeError (one line) when the address cannot be used."""
        started: dict[str, Any] = {}
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start())
                self.loop = self.hub.loop = loop
            except BaseException as exc:  # reported to the caller below
                started["error"] = exc
                loop.close()
                return
            finally:
                ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="pocus-edge-serve", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise ServeError(f"{self.host}:{self.port}: the server did not start within {timeout:.0f} s")
        if "error" in started:
            raise self._address_error(started["error"]) from None
        return self

    def _address_error(self, exc: BaseException) -> ServeError:
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            return ServeError(f"{self.host}:{self.port}: port already in use; choose another with --port (0 picks a free one)")
        if isinstance(exc, OSError):
            return ServeError(f"{self.host}:{self.port}: cannot listen here ({exc.strerror or exc})")
        return ServeError(f"{self.host}:{self.port}: the server failed to start ({type(exc).__name__}: {exc})")

    async def _start(self) -> None:
        from aiohttp import web

        app = web.Application(middlewares=[self._guard], client_max_size=MAX_CLIENT_MESSAGE)
        app.router.add_get("/ws", self._websocket)
        app.router.add_get("/info", self._info)
        app.router.add_get("/model.onnx", self._model)
        app.router.add_get("/ort/{name}", self._ort)
        app.router.add_get("/{name:[^/]*}", self._page)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=False)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self.hub.counters["url"] = self.url.split("?")[0]

    def stop(self, linger: float = 2.0) -> None:
        """Let each browser receive what is queued (at most ``linger`` s), close, stop the loop."""
        if self.loop is None or self.loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.hub.close_all(linger), self.loop).result(timeout=linger + 5.0)
        except Exception:  # a browser that will not close must not keep the command alive
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10.0)

    # -- handlers ----------------------------------------------------------------------------

    def _authorized(self, request) -> bool:
        if not self.token:
            return True
        given = request.query.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
        return hmac.compare_digest(given.encode(), self.token.encode())

    @property
    def _guard(self):
        from aiohttp import web

        @web.middleware
        async def guard(request, handler):
            if not self._authorized(request):
                self.hub.counters["refused"] += 1
                return web.Response(status=403, text="403: this page needs its token (?token=...)\n")
            response = await handler(request)
            if not isinstance(response, web.WebSocketResponse):
                response.headers.update(ISOLATION_HEADERS)
                if self.token and request.query.get("token"):
                    response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="Strict")
            return response

        return guard

    async def _websocket(self, request):
        from aiohttp import web

        ws = web.WebSocketResponse(compress=False, max_msg_size=MAX_CLIENT_MESSAGE, timeout=2.0)
        await ws.prepare(request)
        await self.hub.handle(ws)
        return ws

    async def _info(self, request):
        from aiohttp import web

        return web.json_response({**self.info, "ort_web": ort_web_dir() is not None,
                                  "model_url": "model.onnx" if self.model_file is not None else None})

    async def _model(self, request):
        from aiohttp import web

        if self.model_file is None:
            raise web.HTTPNotFound(text="the served model is not an ONNX file; pick a student .onnx in the page")
        return web.FileResponse(self.model_file, headers={"Content-Type": CONTENT_TYPES[".onnx"]})

    async def _ort(self, request):
        from aiohttp import web

        folder = ort_web_dir()
        name = request.match_info["name"]
        if folder is None:
            raise web.HTTPNotFound(text="onnxruntime-web is not installed here: run `make web` (npm)")
        path = folder / name
        if not name.startswith("ort") or Path(name).suffix not in (".js", ".mjs", ".wasm") or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Content-Type": CONTENT_TYPES[Path(name).suffix]})

    async def _page(self, request):
        from aiohttp import web

        name = PAGE_FILES.get(request.match_info["name"])
        if name is None:
            raise web.HTTPNotFound()
        return web.FileResponse(WEB_DIR / name, headers={"Content-Type": CONTENT_TYPES[Path(name).suffix]})


def _model_info(model, backend, source_name: str) -> dict[str, Any]:
    card = getattr(backend, "card", None) or {}
    return {"model": Path(str(model)).name, "img_size": backend.img_size, "input_dtype": backend.input_dtype,
            "threshold": backend.threshold, "has_weight_map": bool(backend.has_weight_map), "kind": card.get("kind"),
            "precision": backend.precision, "source": source_name}


def serve(
    source: str | os.PathLike,
    model: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    allow_remote: bool = False,
    wait_for_browser: float = 0.0,
    linger: float = 2.0,
    client_queue: int = 2,
    backend: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    options=None,
    report: str | os.PathLike | None = None,
    fps: float = 30.0,
    bind: str = "127.0.0.1",
    on_listen: Callable[[str], None] | None = None,
    on_waiting: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Stream SOURCE through MODEL and show it in browsers; return the stream report (its
    ``serve`` entry: browsers, messages sent and dropped, malformed messages, disconnects).
    ``options``: :class:`~.pipeline.StreamOptions`. ``wait_for_browser``: hold the stream up to
    this many seconds until a page connects. ``linger``: after the stream, seconds left for the
    pages to receive what is queued and the final report."""
    import aiohttp  # noqa: F401  - the 'serve' extra; missing, the CLI names it in one line

    from ..inference import open_backend
    from .pipeline import StreamOptions, check_stream_outputs, run_stream
    from .sources import open_source
    from .stats import RunStats

    check_address(host, token, allow_remote)
    check_stream_outputs(source, model, report=report)
    opts = options or StreamOptions()
    be = open_backend(model, backend, device=device, threads=threads)
    try:
        hub = FrameHub(client_queue)
        model_file = Path(str(model)) if str(model).lower().endswith(".onnx") and Path(str(model)).is_file() else None
        server = ServeServer(hub, host, port, token=token, model_file=model_file, info=_model_info(model, be, str(source)))
        hub.hello = json.dumps({"type": "hello", **server.info})
        server.start()
        try:
            if on_listen is not None:
                on_listen(server.url)
            src = open_source(source, bind=bind, fps=fps)
            try:
                if wait_for_browser > 0 and not hub.connected.wait(wait_for_browser) and on_waiting is not None:
                    on_waiting(wait_for_browser)
                stats = RunStats()
                extra = {"model": str(model), "serve": hub.counters}
                result = run_stream(src, be, options=opts, sinks=[BrowserSink(hub, stats)], report_path=report,
                                    extra_report=extra, stats=stats)
            finally:
                src.close()
            hub.publish(json.dumps({"type": "end", "report": result}, default=str))
        finally:
            server.stop(linger)
    finally:
        be.close()
    # The pages' last deliveries and losses are known only now that they are closed.
    result["serve"] = dict(hub.counters)
    if report is not None:
        from ..io import write_json_atomic

        write_json_atomic(report, result)
    return result
