"""What the dashboard watches live, through the call API (the API key, as every route):

- ``POST /v2/listen-live-call/{call_id}``: a subscribe-only token for an ongoing call's audio,
  in the answer ``retell-sdk``'s ``call.listen_live`` parses. The token opens the listen-only
  socket ``url`` (``/listen-live/{call_id}?access_token=...``, docs/protocol.md) once, within
  ``listen_token_ttl_s``, on any replica (it is passed to the one relaying the call). 409 for a
  call that is not ongoing, 403 for one that opted out of sensitive data storage.
- ``GET /v2/call-events``: server-sent events: ``snapshot`` (the live calls) first, then
  ``call`` (one call's summary: ``bridge.calls.feed``) each time a call is created, changes
  status or ends, on any replica; a comment line every ``KEEPALIVE_S``. The stream ends when
  the replica drains (the client reconnects, through the load balancer, to another one); a
  reader that takes no write for ``SLOW_READER_S`` is dropped.
- ``GET /list-agents``: the agents calls can be made with (no URLs or headers: they may hold
  secrets).
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..calls import CallRefused
from ..protocol.listen import LISTEN_PREFIX
from .deps import AUTH, call_service, find_call
from .errors import ERRORS, ApiError

log = logging.getLogger(__name__)
router = APIRouter(tags=["live"])

KEEPALIVE_S = 15.0
#: A call-events reader that takes no write for this long is dropped (its connection aborted)
SLOW_READER_S = 10.0
#: The most the stream writes at once (the snapshot goes in writes of this size)
WRITE_BYTES = 64 * 1024
#: The kernel's send buffer of a call-events connection: what a reader that stopped reading
#: can leave unread there before the bridge's writes block (and its SLOW_READER_S starts)
KERNEL_SEND_BUFFER = 64 * 1024


@router.post("/v2/listen-live-call/{call_id}", dependencies=AUTH, summary="Listen to an ongoing call", responses=ERRORS)
async def listen_live_call(call_id: str, request: Request) -> JSONResponse:
    calls = call_service(request)
    record = await find_call(request, call_id)
    try:
        token, expires_at, participant = calls.listen_token(record)
    except CallRefused as e:
        raise ApiError(e.status, str(e)) from None
    base = calls.public_base(request.headers, str(request.base_url).rstrip("/"))
    url = base.replace("http", "ws", 1) + LISTEN_PREFIX + call_id
    log.info("call %s: listen token for %s", call_id, participant)
    body = {
        "access_token": token,
        "expires_at": expires_at,
        "participant_id": participant,
        "room_name": call_id,
        "url": url,
        "transport": "gateway",  # as create-web-call v3: the bridge's own socket, no WebRTC
        "ice_servers": [],
    }
    return JSONResponse(body)


class EventStream(Response):
    """The call-events stream of one subscriber, written with bounded waits: each write must be
    taken within SLOW_READER_S (the network's flow control: a reader that does not read holds
    one write, at most WRITE_BYTES, never more), else the reader is dropped and its connection
    aborted (through the server's ``bridge.abort`` extension, ``bridge.server``). Ends when
    the reader leaves, falls MAX_PENDING events behind, or the replica drains or stops."""

    media_type = "text/event-stream"

    def __init__(self, calls, subscription):  # (no Response.__init__: it would declare a Content-Length)
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store"), (b"x-accel-buffering", b"no")]
        self.calls, self.subscription = calls, subscription

    async def __call__(self, scope, receive, send) -> None:
        calls, subscription = self.calls, self.subscription
        if (shrink := scope.get("extensions", {}).get("bridge.send_buffer")) is not None:
            shrink(KERNEL_SEND_BUFFER)  # (a reader that stops reading blocks our writes soon)
        left = asyncio.ensure_future(_disconnected(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            snapshot = b"retry: 2000\n" + subscription.snapshot
            for at in range(0, len(snapshot), WRITE_BYTES):  # (a large snapshot, a write at a time)
                if not await self._write(scope, send, snapshot[at : at + WRITE_BYTES], left):
                    return
            waited, tick = 0.0, calls.settings.feed_interval_s
            while not (calls.draining or calls.shutting_down or calls.stopping or left.done()):
                try:
                    event = await subscription.next(tick)
                except OverflowError as e:  # a reader that fell behind starts again, with a snapshot
                    await self._write(scope, send, b": " + str(e).encode() + b"\n\n", left)
                    return
                if event is None:
                    waited += tick
                    if waited < KEEPALIVE_S:
                        continue
                    event = b": keepalive\n\n"
                waited = 0.0
                if not await self._write(scope, send, event, left):
                    return
            if not left.done():
                await self._write(scope, send, b"", left, more=False)
        finally:
            calls.feed.unsubscribe(subscription)
            left.cancel()

    async def _write(self, scope, send, body: bytes, left: asyncio.Future, more: bool = True) -> bool:
        """Write ``body``; False when the reader is gone or was dropped for not reading."""
        if left.done():
            return False
        try:
            await asyncio.wait_for(send({"type": "http.response.body", "body": body, "more_body": more}), SLOW_READER_S)
        except TimeoutError:
            log.warning("call-events reader %s took no write for %g s: dropped", scope.get("client"), SLOW_READER_S)
            abort = scope.get("extensions", {}).get("bridge.abort")
            if abort is None:  # (another server: it closes the connection once we return unfinished)
                raise ConnectionAbortedError("call-events reader stopped reading") from None
            abort()
            return False
        except OSError:  # (the reader is gone)
            return False
        return True


async def _disconnected(receive) -> None:
    """Returns when the client has gone (``http.disconnect``)."""
    while (await receive())["type"] != "http.disconnect":
        pass


@router.get("/v2/call-events", dependencies=AUTH, summary="Live calls, as server-sent events", responses=ERRORS)
async def call_events(request: Request) -> Response:
    calls = call_service(request)
    try:
        subscription = await calls.feed.subscribe()
    except ConnectionError as e:
        raise ApiError(503, str(e)) from None
    return EventStream(calls, subscription)


@router.get("/list-agents", dependencies=AUTH, summary="The agents calls can be made with", responses=ERRORS)
@router.get("/v2/list-agents", dependencies=AUTH, summary="The agents calls can be made with (v2 path)", responses=ERRORS)
async def list_agents(request: Request) -> JSONResponse:
    agents = call_service(request).settings.agents.values()
    return JSONResponse([
        {
            "agent_id": a.agent_id, "agent_name": a.agent_id, "version": 0, "is_published": True,
            "audio_websocket_protocol": a.protocol.value, "audio_encoding": a.formats[0].encoding, "sample_rate": a.formats[0].sample_rate,
            "numbers": a.numbers, "default": a.default, "opt_out_sensitive_data_storage": a.opt_out_sensitive_data_storage,
            "embedded": a.url is None,
        }
        for a in agents
    ])  # fmt: skip
