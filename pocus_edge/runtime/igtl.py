"""OpenIGTLink in and out: frames from a PLUS server or 3D Slicer, masks back to Slicer.

* :class:`IgtlSource` (``igtl://HOST:PORT``) connects, as a client, to an OpenIGTLink server
  (PLUS Server, a Slicer OpenIGTLinkIF connector in server mode, ``pyigtl.OpenIGTLinkServer``)
  and yields every IMAGE message that holds one 8-bit grayscale frame (any size). Any other
  message - another type (TRANSFORM, STATUS, ...), another pixel type, colour, a 3-D volume, a
  body that fails its CRC-64 - is counted in ``frames_invalid`` with its reason, like a bad
  frame of the other sources. The stream ends when the server closes the connection or sends
  nothing for ``idle_timeout`` seconds.
* :class:`IgtlMaskSink` (``--send igtl://HOST:PORT``) listens on HOST:PORT and sends each mask,
  to every connected client (e.g. a Slicer connector in client mode), as an IMAGE message:
  uint8 labels 0/1 at the frame's size, the frame's timestamp and image-to-world matrix, and
  its device name with ``_mask`` appended. A client that cannot keep up is disconnected; the
  stream never waits for one. When the model computes the per-frame risk, each mask message is
  sent with header version 2 and carries it as OpenIGTLink metadata (:data:`RISK_METADATA`):
  the risk, its level (ok / high / alarm) and the drift alarm.

Messages are packed and parsed by the maintained ``pyigtl`` package (``pip install
'pocus-edge[igtl]'``); the sockets are this module's own, so that every message is counted,
deadlines hold and a closed connection is seen at once (pyigtl's client and server keep only
the latest message of each device and retry closed connections forever). Hosts default to the
loopback address: pass ``0.0.0.0`` or a host explicitly to accept other machines.
"""

from __future__ import annotations

import collections
import select
import socket
import struct
import time
from typing import Any, Iterator

import numpy as np

from ..errors import DataError
from . import protocol
from .base import FrameResult, FrameSource, Sink

DEFAULT_PORT = 18944  # the port OpenIGTLink assigns itself
HEADER_SIZE = 58
MASK_SUFFIX = "_mask"
DEVICE_NAME_BYTES = 20  # the header's device-name field
MAX_BODY_BYTES = 64 << 20  # a larger message is skipped (counted), never held in memory
MIN_RATE_BYTES_PER_S = 1 << 20  # a message must arrive at least this fast (plus frame_timeout)
# Metadata keys of a mask message whose model computes the risk (values are strings, as the
# protocol's metadata are): the frame's risk, its level and the drift alarm (only with a band).
RISK_METADATA = ("pocus_edge.risk", "pocus_edge.risk_level", "pocus_edge.drift_alarm")
_FRAME_INFO_KEPT = 1024  # frames whose device/timestamp/geometry the mask sink can still look up


def parse_igtl_address(text: str, *, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``igtl://HOST:PORT``, ``igtl://HOST``, ``igtl://:PORT`` or ``igtl:PORT`` -> (host, port);
    the host defaults to ``default_host`` (loopback), the port to 18944."""
    if not text.startswith("igtl:"):
        raise DataError(f"{text}: not an OpenIGTLink address (igtl://HOST:PORT)")
    rest = text[len("igtl:"):]
    rest = rest[2:] if rest.startswith("//") else rest
    if not rest or rest.isdigit():
        rest = f":{rest or DEFAULT_PORT}"
    elif rest.endswith("]") or ":" not in rest:  # a host (or [IPv6] host) without a port
        rest = f"{rest}:{DEFAULT_PORT}"
    try:
        return protocol.parse_tcp_address(f"tcp://{rest}", default_host=default_host)
    except DataError:
        raise DataError(f"{text}: expected igtl://HOST:PORT with a port in 0-65535") from None


def _pyigtl():
    import pyigtl  # the 'igtl' extra; a missing module is reported by the CLI with its extra

    return pyigtl


# ---------------------------------------------------------------------------------------------
# Source


class _Closed(Exception):
    """The server closed the connection."""


class IgtlSource(FrameSource):
    """IMAGE messages of an OpenIGTLink server, as frames (see the module docstring)."""

    live = True

    def __init__(self, sock: socket.socket, *, name: str, frame_timeout: float = 1.0,
                 idle_timeout: float | None = 10.0, max_body_bytes: int = MAX_BODY_BYTES):
        super().__init__()
        self._pyigtl = _pyigtl()
        self._sock = sock
        self.name = name
        self.frame_timeout = float(frame_timeout)
        self.idle_timeout = idle_timeout
        self.max_body_bytes = int(max_body_bytes)
        self.messages: collections.Counter = collections.Counter()  # message type -> count
        self.devices: collections.Counter = collections.Counter()  # device of the IMAGE frames
        self.bytes_received = 0
        self.ended_by: str | None = None
        # frame index -> (device name, timestamp in s, 4x4 ijk-to-world, coordinate system)
        self.frame_info: collections.OrderedDict = collections.OrderedDict()

    @classmethod
    def connect(cls, address: str, *, connect_timeout: float = 30.0, **kw) -> "IgtlSource":
        """Connect to the server at ``address``, retrying until ``connect_timeout`` seconds have
        passed (a PLUS server may still be starting)."""
        _pyigtl()  # fail before waiting when the extra is missing
        host, port = parse_igtl_address(address)
        deadline = time.monotonic() + connect_timeout
        last: OSError | None = None
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                break
            except OSError as exc:
                last = exc
                if time.monotonic() >= deadline:
                    reason = (last.strerror or str(last)) if last else "no answer"
                    raise DataError(f"igtl://{host}:{port}: no OpenIGTLink server answered within "
                                    f"{connect_timeout:g} s ({reason})") from None
                time.sleep(0.1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, name=f"igtl://{host}:{port}", **kw)

    # -- reading ---------------------------------------------------------------------------------

    def _read(self, n: int, deadline: float | None) -> bytes:
        """Exactly ``n`` bytes before ``deadline`` (monotonic; None: the idle timeout between
        chunks). Raises _Closed at end of stream and TimeoutError when the time runs out."""
        chunks, got = [], 0
        while got < n:
            if deadline is None:
                wait = self.idle_timeout
            else:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    raise TimeoutError
            ready, _, _ = select.select([self._sock], [], [], wait)
            if not ready:
                raise TimeoutError
            try:
                chunk = self._sock.recv(min(n - got, 1 << 20))
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
                chunk = b""
            if not chunk:
                raise _Closed
            chunks.append(chunk)
            got += len(chunk)
            self.bytes_received += len(chunk)
        return b"".join(chunks)

    def _skip(self, n: int, deadline: float) -> None:
        while n > 0:
            n -= len(self._read(min(n, 1 << 20), deadline))

    def _next_message(self) -> tuple[dict, bytes | None, int] | None:
        """(header fields, body or None when skipped, header CRC-64) of the next message, or None
        at the end of the stream (``ended_by`` says why)."""
        try:
            first = self._read(1, None)  # waits up to idle_timeout for a message to start
        except _Closed:
            self.ended_by = "server closed the connection"
            return None
        except TimeoutError:
            self.ended_by = f"no message for {self.idle_timeout:g} s"
            return None
        t0 = time.monotonic()
        try:
            header = first + self._read(HEADER_SIZE - 1, t0 + self.frame_timeout)
            fields = self._pyigtl.MessageBase.parse_header(header)
            crc = struct.unpack(">Q", header[50:58])[0]
            size = int(fields["body_size"])
            deadline = t0 + self.frame_timeout + size / MIN_RATE_BYTES_PER_S
            if size > self.max_body_bytes:
                self._skip(size, deadline)
                return fields, None, crc
            return fields, self._read(size, deadline), crc
        except _Closed:
            self._reject("message cut short by the disconnect")
            self.ended_by = "server closed the connection"
        except TimeoutError:
            # Without a marker to resynchronise on, the rest of the stream cannot be framed.
            self._reject("incomplete message (not complete within its deadline)")
            self.ended_by = "a message did not arrive in time"
        except (UnicodeDecodeError, struct.error, ValueError):
            self._reject("malformed message header")
            self.ended_by = "malformed message header"
        return None

    def _frame_of(self, fields: dict, body: bytes | None, crc: int) -> tuple[np.ndarray, Any] | None:
        """(grayscale frame, pyigtl message) of an IMAGE message, or None (the reason counted)."""
        kind = fields["message_type"] or "?"
        self.messages[kind] += 1
        if body is None:
            self._reject(f"{kind} message over the {self.max_body_bytes >> 20} MiB limit")
            return None
        if kind != "IMAGE":
            self._reject(f"{kind} message (not an IMAGE)")
            return None
        if self._pyigtl.messages.CRC64(body) != crc:
            self._reject("IMAGE body fails its CRC-64")
            return None
        message = self._pyigtl.ImageMessage()
        try:
            message.unpack(fields, body)
        except Exception as exc:  # pyigtl raises several kinds for bodies it cannot read
            self._reject(f"undecodable IMAGE ({type(exc).__name__})")
            return None
        image = np.asarray(message.image)
        if image.ndim == 4:
            if image.shape[3] != 1:
                self._reject(f"IMAGE with {image.shape[3]} components (only 8-bit grayscale)")
                return None
            image = image[..., 0]
        if image.dtype != np.uint8:
            self._reject(f"IMAGE of {image.dtype} pixels (only 8-bit grayscale)")
            return None
        if image.ndim == 3 and image.shape[0] != 1:
            self._reject(f"3-D IMAGE volume of {image.shape[0]} slices (only single frames)")
            return None
        frame = np.ascontiguousarray(image.reshape(image.shape[-2:]))
        if frame.size == 0:
            self._reject("empty IMAGE")
            return None
        return frame, message

    def __iter__(self) -> Iterator[tuple[np.ndarray, float, int]]:
        index = 0
        while True:
            item = self._next_message()
            if item is None:
                return
            t_received = time.perf_counter()
            decoded = self._frame_of(*item)
            if decoded is None:
                continue
            frame, message = decoded
            self.devices[message.device_name] += 1
            self.frame_info[index] = (message.device_name, float(message.timestamp),
                                      np.array(message.ijk_to_world_matrix, dtype=np.float64),
                                      message.world_coordinate_system)
            while len(self.frame_info) > _FRAME_INFO_KEPT:
                self.frame_info.popitem(last=False)
            # Decoding is the CRC check and unpacking once the message is in (waiting for the
            # sender is not decoding).
            self.last_decode_ms = (time.perf_counter() - t_received) * 1000.0
            yield frame, float(message.timestamp) * 1000.0, index
            index += 1

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def describe(self) -> dict:
        d = super().describe()
        d.update(messages=dict(self.messages), devices=dict(self.devices.most_common(8)),
                 bytes_received=self.bytes_received, ended_by=self.ended_by)
        return d


# ---------------------------------------------------------------------------------------------
# Sink


def mask_device_name(device: str, suffix: str = MASK_SUFFIX) -> str:
    """``device`` + ``suffix``, the device part shortened so that the whole fits the header's
    20-byte field."""
    keep = DEVICE_NAME_BYTES - len(suffix.encode("utf-8"))
    base = device.encode("utf-8")[:keep].decode("utf-8", errors="ignore")
    return base + suffix


def risk_metadata(result: FrameResult) -> dict[str, str]:
    """The risk metadata of one mask message (empty when the frame has no risk)."""
    if result.risk is None:
        return {}
    key_risk, key_level, key_alarm = RISK_METADATA
    out = {key_risk: f"{float(result.risk):.6g}", key_level: str(result.risk_level or "ok")}
    if result.alarm is not None:
        out[key_alarm] = "1" if result.alarm else "0"
    return out


class IgtlMaskSink(Sink):
    """Masks as OpenIGTLink IMAGE messages to every client connected to ``address`` (a server
    socket; see the module docstring). Works with any source: frames that did not come over
    OpenIGTLink get the device name ``pocus-edge`` and an identity image-to-world matrix."""

    needs_frame_resolution = True

    def __init__(self, address: str, *, source: Any = None, bind: str = "127.0.0.1",
                 send_timeout: float = 1.0, on_listen=None):
        self._pyigtl = _pyigtl()
        host, port = parse_igtl_address(address, default_host=bind)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._server = socket.create_server((host, port), family=family, reuse_port=False)
        except OSError as exc:
            raise DataError(f"igtl://{host}:{port}: cannot listen ({exc.strerror or exc})") from None
        self._server.setblocking(False)
        self.host, self.port = self._server.getsockname()[:2]
        self.address = f"igtl://{host}:{self.port}"
        self.source = source
        self.send_timeout = float(send_timeout)
        self._clients: list[socket.socket] = []
        self.stats: dict[str, Any] = {"address": self.address, "masks_sent": 0, "messages_sent": 0,
                                      "masks_without_client": 0, "clients_connected": 0, "clients_dropped": 0}
        if on_listen is not None:
            on_listen(self.host, self.port)

    def _accept_and_prune(self) -> None:
        """Take clients waiting to connect; read and discard what clients send (so their sends
        never block); drop clients that closed."""
        while True:
            try:
                conn, _ = self._server.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._clients.append(conn)
            self.stats["clients_connected"] += 1
        if not self._clients:
            return
        readable, _, _ = select.select(self._clients, [], [], 0)
        for conn in readable:
            try:
                data = conn.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        if conn in self._clients:
            self._clients.remove(conn)
            self.stats["clients_dropped"] += 1
        try:
            conn.close()
        except OSError:
            pass

    def _frame_info(self, result: FrameResult) -> tuple[str, float, np.ndarray, str]:
        info = getattr(self.source, "frame_info", None)
        if info is not None and result.index in info:
            return info[result.index]
        return "pocus-edge", float(result.timestamp_ms) / 1000.0, np.eye(4), "lps"

    def message_for(self, result: FrameResult) -> bytes:
        device, timestamp, matrix, system = self._frame_info(result)
        labels = np.ascontiguousarray(result.mask.astype(np.uint8)[None])  # (k=1, rows, columns)
        message = self._pyigtl.ImageMessage(labels, ijk_to_world_matrix=matrix, world_coordinate_system=system,
                                            timestamp=timestamp, device_name=mask_device_name(device))
        metadata = risk_metadata(result)
        if metadata:  # metadata need header version 2 (OpenIGTLink 3); without a risk the message stays version 1
            message.header_version = 2
            message.metadata = metadata
        return message.pack()

    def write(self, result: FrameResult) -> None:
        self._accept_and_prune()
        if not self._clients:
            self.stats["masks_without_client"] += 1
            return
        data = self.message_for(result)
        sent = 0
        for conn in list(self._clients):
            try:
                conn.settimeout(self.send_timeout)
                conn.sendall(data)
                sent += 1
            except OSError:  # timed out (a client that does not read) or closed
                self._drop(conn)
        self.stats["messages_sent"] += sent
        if sent:
            self.stats["masks_sent"] += 1
        else:
            self.stats["masks_without_client"] += 1

    def close(self, ok: bool = True) -> None:
        for conn in list(self._clients):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                conn.close()
            except OSError:
                pass
        self._clients.clear()
        try:
            self._server.close()
        except OSError:
            pass
