"""Run an ASGI app with uvicorn inside the current event loop (the demo, the simulator's fake
Twilio API and the tests use it to serve on a free loopback port)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import socket

import uvicorn

from .calls import DRAIN_DETAIL
from .models import DisconnectionReason
from .protocol.websocket import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)


def ws_protocol(app):
    """The app's own websocket protocol if it has one (the bridge's media stream), else
    uvicorn's websockets implementation."""
    state = getattr(app, "state", None)
    return getattr(state, "ws_protocol", None) or "websockets-sansio"


#: query parameters that carry secrets: web-call access tokens, the echo agent's key
SECRET_PARAMETER = re.compile(r"\b(access_token|token|key)=[^&\s\"']+")
#: a web-call access token in a path: /web-call/{access_token}/{call_id}
SECRET_SEGMENT = re.compile(r"(/web-call/)[^/\s?\"']+(?=/)")


class RedactSecrets(logging.Filter):
    """Replaces secrets in logged URLs (uvicorn's access log and websocket lines name the full
    path with its query) with ``[redacted]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: leave it to logging's own report
            return True
        redacted = SECRET_SEGMENT.sub(r"\1[redacted]", SECRET_PARAMETER.sub(r"\1=[redacted]", message))
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def redact_secrets_in_logs() -> None:
    """Install ``RedactSecrets`` on uvicorn's loggers (after uvicorn has configured them)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())


def http_protocol(head_timeout_s: float = 10.0, max_waiting: int = 256):
    """uvicorn's h11 protocol with a deadline for every request head: a connection that has not
    sent a whole head ``head_timeout_s`` after it opened (or after its last answer, on a
    kept-alive connection) is dropped, and at most ``max_waiting`` connections may be waiting
    for their head at once (beyond, the one waiting longest is dropped). Bare connects, partial
    upgrades and slowloris heads then cost a bounded number of sockets for a bounded time, and
    webhooks and calls keep working; uvicorn alone keeps them open for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = None
            self._await_head()

        def _waiting(self) -> dict:
            waiting = getattr(self.server_state, "bridge_waiting_heads", None)
            if waiting is None:
                waiting = self.server_state.bridge_waiting_heads = {}
            return waiting

        def _await_head(self) -> None:
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_too_slow)
            waiting = self._waiting()
            waiting[self] = None  # (insertion order: the oldest first)
            if len(waiting) > max_waiting:
                oldest = next(iter(waiting))
                oldest._head_too_slow()

        def _head_received(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            self._waiting().pop(self, None)

        def _head_too_slow(self) -> None:
            self._head_received()
            self.transport.abort()

        def handle_events(self) -> None:
            before = self.scope
            super().handle_events()
            if self.scope is not before:  # a whole head came (a request, or an upgrade)
                self._head_received()
                # a long response (the call-events stream) can drop a reader that stopped reading,
                # and bound what the kernel holds for it
                extensions = self.scope.setdefault("extensions", {})
                extensions["bridge.abort"] = self.transport.abort
                extensions["bridge.send_buffer"] = self._send_buffer

        def _send_buffer(self, size: int) -> None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

        def on_response_complete(self) -> None:
            if not self.transport.is_closing() and self._head_timer is None:
                self._await_head()  # the next request on a kept-alive connection (armed first:
            super().on_response_complete()  # a pipelined head dispatched here cancels it)

        def connection_lost(self, exc) -> None:
            self._head_received()
            super().connection_lost(exc)

    return HeadDeadlineProtocol


def server_options(app) -> dict:
    """uvicorn's options for ``app``: its own protocol for the media stream, the media stream's
    message cap on every other websocket too (web calls; uvicorn's default is 16 MiB), and the
    request-head deadline (``http_protocol``) from the app's settings."""
    settings = getattr(getattr(app, "state", None), "settings", None)
    guard = {} if settings is None else {"head_timeout_s": settings.request_head_timeout_s, "max_waiting": settings.max_waiting_connections}
    return {"ws": ws_protocol(app), "ws_max_size": MAX_MESSAGE_BYTES, "http": http_protocol(**guard)}


DRAIN_POLL_S = 0.2
#: Once the server stops (after the drain, or at once on SIGINT): how long connections still open
#: get before uvicorn cancels them (a call-events reader that stopped reading would hold the exit
#: for ever; live calls have ended by then, and record their endings within seconds)
SHUTDOWN_GRACE_S = 10.0
#: after the drain deadline ended the last calls: how long their relays get to record the end
DEADLINE_GRACE_S = 15.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the bridge's graceful drain (docs/operations.md).

    The first SIGTERM drains: the replica is not ready (``/readyz`` 503), voice webhooks are
    handed to a ready replica (``twilio_voice.hand_over``), and live calls go on untouched (so do
    streams of calls this replica answered just before, and every other request) until none is
    left, or ``drain_timeout_s`` passes: calls still live then end as ``max_duration_reached``
    and a Twilio caller hears ``drain_message``. Then the server stops as usual (the webhook
    outbox flushed, recordings finalised) and the process exits 0.

    SIGINT, or a second SIGTERM, stops at once: live calls end as "the bridge shut down"
    (``error_unknown``), each recorded. A third signal stops without waiting for anything. The
    signal is never raised again at exit (uvicorn does that, and the process would die by it)."""

    def __init__(self, config: uvicorn.Config, calls):
        super().__init__(config)
        self.calls = calls
        self.drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and self.drain_task is None and not self.should_exit:
            asyncio.get_event_loop().call_soon_threadsafe(self._start_drain)
        elif self.should_exit:
            self.force_exit = True
        else:
            log.warning("signal %s: stopping now; live calls end as the bridge shutting down", signal.Signals(sig).name)
            self.calls.shutting_down = True  # (long-lived streams end, or uvicorn would wait for them)
            self.should_exit = True

    def _start_drain(self) -> None:
        if self.drain_task is None:
            self.drain_task = asyncio.get_running_loop().create_task(self.drain())

    async def drain(self) -> None:
        calls = self.calls
        settings = calls.settings
        calls.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.drain_timeout_s
        log.warning(
            "SIGTERM: draining (not ready; new calls go to other replicas); %d live call(s) go on for at most %g s",
            calls.live_calls, settings.drain_timeout_s,
        )  # fmt: skip
        try:
            # (every live call is served on a socket: sockets counts those still being set up too;
            # read after the streams still due, since a stream that starts here meanwhile is no
            # longer due but is a socket already)
            while (await calls.streams_still_due() or calls.sockets) and loop.time() < deadline and not self.should_exit:
                await asyncio.sleep(DRAIN_POLL_S)
            if calls.live_calls and not self.should_exit:
                ended = calls.end_live_calls(DisconnectionReason.max_duration_reached, f"{DRAIN_DETAIL} ({settings.drain_timeout_s:g} s)")
                log.warning("drain deadline: %d live call(s) ended", ended)
                grace_end = loop.time() + DEADLINE_GRACE_S
                while calls.live_calls and loop.time() < grace_end:
                    await asyncio.sleep(DRAIN_POLL_S)
            # Twilio asks what to do after each stream the bridge ended (the drain message): this
            # replica still answers, rather than leave Twilio its own error
            while (calls.sockets or calls.stream_answers_due()) and not self.should_exit:
                await asyncio.sleep(DRAIN_POLL_S)
            log.warning("drained: stopping")
        finally:
            self.should_exit = True


class BackgroundServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, lifespan: str = "on"):
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan=lifespan, timeout_graceful_shutdown=1,
            **server_options(app),
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.host = host
        self._task: asyncio.Task | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> str:
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("server stopped during start-up")
            await asyncio.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self.base_url

    async def stop(self) -> None:
        if self._task is not None:
            self.server.should_exit = True
            await self._task
            self._task = None

    async def __aenter__(self) -> BackgroundServer:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
