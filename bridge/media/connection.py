"""Websocket connections on asyncio protocols (the I/O edge around ``bridge.protocol.websocket``).

``WsConnection`` is one open websocket, either side. Messages arrive by callback
(``listen(on_message, on_close)``), straight from ``data_received``: no task, queue or future per
message. Before ``listen`` they queue for ``recv()``, which the set-up phase awaits. ``send_text``
/ ``send_binary`` write at once and never block; a peer that stops reading shows as
``stalled_for(now)`` (the transport's buffer over its high-water mark), which the relay's
watchdog turns into an ending.

Flow control both ways: while the peer is not reading what we send (the transport's buffer over
its high-water mark), we stop reading what it sends, and answer only its latest ping once it
reads again (RFC 6455 5.5.3); what we queue for one peer is capped at ``MAX_WRITE_BUFFER`` (over
it the connection is aborted); a closed connection whose peer does not take our last bytes
within ``CLOSE_TIMEOUT_S`` is aborted. So no peer can make the bridge hold more than a bounded
amount of memory for it, however it floods or stalls.

``connect(url)`` opens a client connection (ws:// or wss://). ``UpgradeProtocol`` is handed to
uvicorn as its websocket protocol: upgrades to the paths it owns are answered here, every other
websocket goes to uvicorn's own implementation.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

from ..protocol import websocket as wsf
from ..protocol.websocket import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, WsProtocolError

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 2.0
#: the most we queue for one peer: minutes of a call's audio (a burst of synthesized speech
#: is sent ahead of playback); a peer this far behind is not reading
MAX_WRITE_BUFFER = 8 * 1024 * 1024


class ConnectionClosed(Exception):
    pass


#: a server that refuses the upgrade: how much of its answer's body is kept (the provider's
#: "invalid API key"), and how long it is waited for
REFUSAL_BODY_BYTES = 4096
REFUSAL_BODY_WAIT_S = 0.5


class HandshakeError(Exception):
    """The websocket could not be opened (refused, bad answer, bad URL)."""


class WsConnection(asyncio.Protocol):
    """One websocket. ``client=True`` masks what it sends and expects unmasked frames.

    How it ended, once ``closed``: ``close_code`` / ``close_reason`` as received from the peer
    (None: no close frame came, the connection was lost), ``protocol_error`` if the peer broke
    the protocol (then we closed with ``error_code``)."""

    def __init__(self, *, client: bool, max_message: int = wsf.MAX_MESSAGE_BYTES):
        self.client = client
        self.reader = wsf.FrameReader(masked=not client, max_message=max_message)
        self.transport: asyncio.Transport | None = None
        self.closed = False  # the TCP connection is gone
        self.close_sent = False
        self.close_code: int | None = None  # from the peer's close frame
        self.close_reason = ""
        self.protocol_error: str | None = None
        self.latency = 0.0  # last ping round trip, s
        self._ping_sent: dict[bytes, float] = {}
        self._on_message: Callable | None = None
        self._on_close: Callable | None = None
        self._queue: deque = deque()
        self._waiter: asyncio.Future | None = None
        self._ended = asyncio.get_running_loop().create_future()  # close frame received, or TCP gone
        self._paused_at: float | None = None
        self._pong_due: bytes | None = None  # the latest ping's payload, while we may not write
        self.overflowed = False  # aborted: the peer left more than MAX_WRITE_BUFFER unread
        self.on_pong: Callable[[float], None] | None = None  # told each ping's round trip (s)

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.close_sent and self.close_code is not None:
            return
        try:
            events = self.reader.feed(data)
        except WsProtocolError as e:
            self.protocol_error = str(e)
            self._fail(e.code, str(e))
            return
        on_message = self._on_message
        for op, payload in events:
            if op == OP_TEXT or op == OP_BINARY:
                if on_message is not None:
                    on_message(payload)
                else:
                    self._queue.append(payload)
                    self._wake()
            elif op == OP_PING:
                if self._paused_at is None:
                    self._write(OP_PONG, payload)
                else:  # the peer is not reading: answer only its latest ping, once it reads again
                    self._pong_due = payload
            elif op == OP_PONG:
                sent = self._ping_sent.pop(payload, None)
                if sent is not None:
                    self.latency = time.monotonic() - sent
                    if self.on_pong is not None:
                        self.on_pong(self.latency)
            else:  # close
                self.close_code, self.close_reason = payload
                if not self.close_sent:  # echo it, then (server) drop the connection
                    self._write(OP_CLOSE, wsf.close_payload(self.close_code))
                    self.close_sent = True
                if not self.client:
                    self._drop()
                if not self._ended.done():
                    self._ended.set_result(None)
                self._notify_close()
                return
            if self.closed:
                return

    def eof_received(self):
        return False  # close the transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self._ended.done():
            self._ended.set_result(None)
        self._wake()
        self._notify_close()

    def pause_writing(self) -> None:
        """The peer is not reading what we send: stop reading what it sends (its frames stay in
        the kernel's buffers, then its own), until it catches up."""
        self._paused_at = time.monotonic()
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused_at = None
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
            if self._pong_due is not None:
                payload, self._pong_due = self._pong_due, None
                self._write(OP_PONG, payload)

    # --- use ----------------------------------------------------------------------------------

    def listen(self, on_message: Callable, on_close: Callable) -> None:
        """From now on, hand each message to ``on_message(str | bytes)``; ``on_close()`` once
        when the peer closes or the connection ends. Messages queued before are handed first."""
        self._on_message, self._on_close = on_message, on_close
        while self._queue:
            on_message(self._queue.popleft())
        if self.close_code is not None or self.closed:
            self._notify_close()

    async def recv(self) -> str | bytes:
        """The next message (before ``listen``); raises ConnectionClosed."""
        while not self._queue:
            if self.closed or self.close_code is not None:
                raise ConnectionClosed()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    def send_text(self, text: str) -> None:
        self._write(OP_TEXT, text.encode("utf-8"))

    def send_binary(self, data: bytes) -> None:
        self._write(OP_BINARY, data)

    def send_many(self, frames: list[bytes]) -> None:
        """Frames already built with ``frame_text``/``frame_binary``, in one write."""
        if not self.close_sent and self.transport is not None and not self.closed:
            self.transport.write(b"".join(frames))
            if self._paused_at is not None:  # (under the high-water mark the cap is far off)
                self._check_buffer()

    def frame_text(self, text: str) -> bytes:
        return wsf.encode(OP_TEXT, text.encode("utf-8"), self.client)

    def frame_binary(self, data: bytes) -> bytes:
        return wsf.encode(OP_BINARY, data, self.client)

    def ping(self) -> None:
        payload = time.monotonic_ns().to_bytes(8, "big")
        if len(self._ping_sent) > 16:
            self._ping_sent.clear()
        self._ping_sent[payload] = time.monotonic()
        self._write(OP_PING, payload)

    @property
    def ping_outstanding_s(self) -> float:
        """How long the oldest unanswered ping has waited (0 if none)."""
        return time.monotonic() - min(self._ping_sent.values()) if self._ping_sent else 0.0

    @property
    def buffered(self) -> int:
        """Bytes written and not yet taken by the peer's kernel (0 once closed)."""
        return self.transport.get_write_buffer_size() if self.transport is not None and not self.closed else 0

    def stalled_for(self) -> float:
        """Seconds the peer has not been reading (our send buffer over its high-water mark)."""
        return 0.0 if self._paused_at is None else time.monotonic() - self._paused_at

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame, wait (bounded) for the peer's, then drop the connection (a client
        does not wait for the server to drop it first: a peer that stopped reading must not hold
        a call's end)."""
        if self.transport is None or self.closed:
            return
        if not self.close_sent:
            self._write(OP_CLOSE, wsf.close_payload(code, reason))
            self.close_sent = True
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await asyncio.shield(self._ended)
        except TimeoutError:
            pass
        finally:
            self._drop()

    async def wait_closed(self) -> None:
        """Until the peer's close frame came or the connection is gone."""
        await asyncio.shield(self._ended)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- internals ----------------------------------------------------------------------------

    def _write(self, opcode: int, payload: bytes) -> None:
        if self.close_sent or self.transport is None or self.closed:
            return
        self.transport.write(wsf.encode(opcode, payload, self.client))
        if self._paused_at is not None:
            self._check_buffer()

    def _check_buffer(self) -> None:
        if self.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.overflowed = True
            log.warning("websocket peer %s is %d bytes behind: aborted", self.transport.get_extra_info("peername"), MAX_WRITE_BUFFER)
            self.transport.abort()

    def _drop(self) -> None:
        """Close the TCP connection once our last bytes are out, or abort it if the peer does
        not take them within CLOSE_TIMEOUT_S (a closed transport keeps its unsent data)."""
        transport = self.transport
        transport.close()
        if transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, transport.abort)

    def _fail(self, code: int, reason: str) -> None:
        self._write(OP_CLOSE, wsf.close_payload(code, reason[:120]))
        self.close_sent = True
        self._drop()
        self._notify_close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _notify_close(self) -> None:
        self._wake()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


# --- client ------------------------------------------------------------------------------------


class _ClientOpening(WsConnection):
    """A client connection during its handshake: collects the 101 head, then behaves as
    ``WsConnection`` (bytes after the head are frames)."""

    def __init__(self, handshake: wsf.ClientHandshake, max_message: int):
        super().__init__(client=True, max_message=max_message)
        self.handshake = handshake
        self.opened = asyncio.get_running_loop().create_future()
        self._head = b""
        self._refusal: str | None = None  # a refused upgrade: its status line, while its body comes
        self._body = b""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.write(self.handshake.request)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:  # (the body of a refusal: what the server says is wrong)
            self._body += data
            if len(self._body) >= REFUSAL_BODY_BYTES:
                self._refused_with_body()
            return
        if self.opened.done():
            super().data_received(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > wsf.MAX_HEADER_BYTES:
                self._refused(HandshakeError("handshake answer too long"))
            return
        head, rest = self._head[:end], self._head[end + 4 :]
        self._head = b""
        try:
            self.handshake.check(head)
        except WsProtocolError as e:
            if head.startswith(b"HTTP/") and not head.startswith(b"HTTP/1.1 101"):  # wait a moment for its body
                self._refusal, self._body = str(e), rest
                asyncio.get_running_loop().call_later(REFUSAL_BODY_WAIT_S, self._refused_with_body)
                return
            self._refused(HandshakeError(str(e)))
            return
        self.opened.set_result(None)
        if rest:
            super().data_received(rest)

    def connection_lost(self, exc) -> None:
        if self._refusal is not None:
            self._refused_with_body()
        if not self.opened.done():
            self.opened.set_exception(HandshakeError(f"connection closed during the handshake ({exc or 'EOF'})"))
        super().connection_lost(exc)

    def _refused_with_body(self) -> None:
        if self._refusal is None or self.opened.done():
            return
        body = self._body[:REFUSAL_BODY_BYTES].decode("utf-8", "replace").strip()
        self._refused(HandshakeError(f"{self._refusal}: {' '.join(body.split())[:500]}" if body else self._refusal))

    def _refused(self, error: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(error)
        self.transport.close()


async def connect(url: str, *, max_message: int = wsf.MAX_MESSAGE_BYTES, headers: list[tuple[str, str]] = ()) -> WsConnection:
    """Open a client websocket to ``ws://`` or ``wss://`` ``url`` (no proxy, no extensions).
    Raises HandshakeError, OSError, or ValueError for a bad URL. Bound it with a timeout."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    default_port = port == (443 if secure else 80)
    host = parts.hostname
    host_header = (f"[{host}]" if ":" in host else host) + ("" if default_port else f":{port}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    handshake = wsf.ClientHandshake(host_header, target, headers)
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context() if secure else None
    transport, conn = await loop.create_connection(
        lambda: _ClientOpening(handshake, max_message), host, port, ssl=context, server_hostname=host if secure else None
    )
    try:
        await conn.opened
    except BaseException:
        transport.abort()
        raise
    return conn


# --- server ------------------------------------------------------------------------------------


class ServerConnection(WsConnection):
    """The server side of an upgrade, before and after ``accept()``: the request's ``path``,
    ``query``, ``headers`` (lower-case names), ``base_url`` (http(s)://host/)."""

    def __init__(self, transport, target: str, headers: list[tuple[str, str]], handshake: wsf.ServerHandshake, secure: bool):
        super().__init__(client=False)
        self.connection_made(transport)
        self.path, _, self.query = target.partition("?")
        self.headers = dict(headers)
        self.base_url = f"{'https' if secure else 'http'}://{self.headers.get('host', 'localhost')}/"
        self.handshake = handshake
        self.accepted = False
        self.on_shutdown: Callable[[], None] | None = None  # the server is stopping

    def accept(self) -> None:
        if self.handshake.error:
            self.refuse(*self.handshake.error)
            raise ConnectionClosed(self.handshake.error[1])
        self.accepted = True
        self.transport.write(self.handshake.accept())

    def refuse(self, status: int = 403, text: str = "") -> None:
        """Answer the upgrade with an HTTP error instead (before ``accept``)."""
        if not self.accepted and not self.closed and not self.close_sent:
            self.transport.write(wsf.ServerHandshake.refuse(status, text))
            self.close_sent = True
            self.transport.close()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.accepted:
            self.refuse(403)
            return
        await super().close(code, reason)

    def shutdown(self) -> None:
        if self.on_shutdown is not None:
            self.on_shutdown()
        elif not self.close_sent:
            self._write(OP_CLOSE, wsf.close_payload(1012, "server shutting down"))
            self.close_sent = True
            self.transport.close()


class UpgradeProtocol(asyncio.Protocol):
    """uvicorn's websocket protocol (``uvicorn.Config(ws=...)``), made with ``routes``: an
    upgrade to a path in ``routes`` (or under one ending in ``/``) becomes a
    ``ServerConnection`` served by ``routes[path](connection)``; any other goes to uvicorn's
    websockets implementation and the ASGI app. uvicorn hands over the request head it has
    parsed as the first data."""

    routes: dict = {}

    @classmethod
    def with_routes(cls, routes: dict) -> type[UpgradeProtocol]:
        return type("UpgradeProtocol", (cls,), {"routes": routes})

    def route(self, path: str):
        handler = self.routes.get(path)
        if handler is None:
            for prefix, under in self.routes.items():
                if prefix.endswith("/") and path.startswith(prefix) and len(path) > len(prefix):
                    return under
        return handler

    def __init__(self, config, server_state, app_state):
        self.config, self.server_state, self.app_state = config, server_state, app_state
        self.transport = None
        self.inner: asyncio.Protocol | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server_state.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)
            return
        end = data.find(b"\r\n\r\n")
        try:
            start_line, headers = wsf.parse_head(data[: end if end >= 0 else len(data)])
            method, target, _ = start_line.split(" ", 2)
        except (WsProtocolError, ValueError):
            self.transport.write(wsf.ServerHandshake.refuse(400, "bad request"))
            self.transport.close()
            return
        handler = self.route(target.partition("?")[0])
        if handler is None:
            from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

            self.server_state.connections.discard(self)  # the inner protocol registers itself
            self.inner = WebSocketsSansIOProtocol(config=self.config, server_state=self.server_state, app_state=self.app_state)
            self.inner.connection_made(self.transport)
            self.inner.data_received(data)
            return
        secure = self._scheme_is_secure(dict(headers))
        conn = ServerConnection(self.transport, target, headers, wsf.ServerHandshake(method, dict(headers)), secure)
        self.inner = conn
        if end >= 0 and end + 4 < len(data):
            conn.data_received(data[end + 4 :])
        task = asyncio.get_running_loop().create_task(self._serve(handler, conn))
        self.server_state.tasks.add(task)
        task.add_done_callback(self.server_state.tasks.discard)

    def _scheme_is_secure(self, headers: dict[str, str]) -> bool:
        """wss or ws, as uvicorn's proxy-headers handling would tell the ASGI app: TLS here, or
        X-Forwarded-Proto from a trusted proxy (``forwarded_allow_ips``, 127.0.0.1 by default:
        ngrok's local agent)."""
        if self.transport.get_extra_info("sslcontext") is not None:
            return True
        proto = headers.get("x-forwarded-proto", "").strip()
        if not proto or not getattr(self.config, "proxy_headers", False):
            return False
        peer = self.transport.get_extra_info("peername")
        try:
            from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

            trusted = peer is not None and peer[0] in ProxyHeadersMiddleware(None, self.config.forwarded_allow_ips).trusted_hosts
        except (ImportError, AttributeError, TypeError, ValueError):  # uvicorn changed: trust loopback only
            trusted = peer is not None and peer[0] in ("127.0.0.1", "::1")
        return trusted and proto in ("https", "wss")

    @staticmethod
    async def _serve(handler, conn: ServerConnection) -> None:
        try:
            await handler(conn)
        except ConnectionClosed:
            pass
        except Exception:  # a bug ends this connection, never the server
            log.exception("websocket handler for %s failed", "/".join(conn.path.split("/")[:2]))  # (a path may hold a token)
        finally:
            if not conn.accepted:
                conn.refuse(500)  # (a no-op if the handler refused it already)
            elif not conn.closed:
                conn.transport.close()

    def connection_lost(self, exc) -> None:
        self.server_state.connections.discard(self)
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def eof_received(self):
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def shutdown(self) -> None:
        if isinstance(self.inner, ServerConnection):
            self.inner.shutdown()
        elif self.transport is not None:
            self.transport.close()
