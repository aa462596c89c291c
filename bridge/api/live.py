"""What the dashboard watches live, through the call API (the API key, as every route):

- ``POST /v2/listen-live-call/{call_id}``: a subscribe-only token for an ongoing call's audio,
  in the answer ``retell-sdk``'s ``call.listen_live`` parses. The token opens the listen-only
  socket ``url`` (``/listen-live/{call_id}?access_token=...``, docs/protocol.md) once, within
  ``listen_token_ttl_s``, on any replica (it is passed to the one relaying the call). 409 for a
  call that is not ongoing, 403 for one that opted out of sensitive data storage.
- ``GET /v2/call-events``: server-sent events: ``snapshot`` (the live calls) first, then
  ``call`` (one call object) each time a call is created, changes status or ends, on any
  replica; a comment line every ``KEEPALIVE_S``. The stream ends when the replica drains (the
  client reconnects, through the load balancer, to another one).
- ``GET /list-agents``: the agents calls can be made with (no URLs or headers: they may hold
  secrets).
"""

from __future__ import annotations

import logging

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..calls import CallRefused
from ..protocol.listen import LISTEN_PREFIX
from .deps import AUTH, call_service, find_call
from .errors import ERRORS, ApiError

log = logging.getLogger(__name__)
router = APIRouter(tags=["live"])

KEEPALIVE_S = 15.0


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


def _event(kind: str, data) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


@router.get("/v2/call-events", dependencies=AUTH, summary="Live calls, as server-sent events", responses=ERRORS)
async def call_events(request: Request) -> StreamingResponse:
    calls = call_service(request)
    try:
        subscription = await calls.feed.subscribe()
    except ConnectionError as e:
        raise ApiError(503, str(e)) from None

    async def stream():
        try:
            yield b"retry: 2000\n" + _event("snapshot", {"calls": subscription.snapshot})
            waited = 0.0
            tick = calls.settings.feed_interval_s
            while not (calls.draining or calls.shutting_down or calls.stopping):
                try:
                    event = await subscription.next(tick)
                except OverflowError as e:  # a reader that fell behind starts again, with a snapshot
                    yield b": " + str(e).encode() + b"\n\n"
                    return
                if event is not None:
                    waited = 0.0
                    yield _event("call", event)
                else:
                    waited += tick
                    if waited >= KEEPALIVE_S:
                        waited = 0.0
                        yield b": keepalive\n\n"
        finally:
            calls.feed.unsubscribe(subscription)

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


@router.get("/list-agents", dependencies=AUTH, summary="The agents calls can be made with", responses=ERRORS)
@router.get("/v2/list-agents", dependencies=AUTH, summary="The agents calls can be made with (v2 path)", responses=ERRORS)
async def list_agents(request: Request) -> JSONResponse:
    agents = call_service(request).settings.agents.values()
    return JSONResponse([
        {
            "agent_id": a.agent_id, "agent_name": a.agent_id, "version": 0, "is_published": True,
            "audio_websocket_protocol": a.protocol.value, "audio_encoding": a.encoding.value, "sample_rate": a.sample_rate,
            "numbers": a.numbers, "default": a.default, "opt_out_sensitive_data_storage": a.opt_out_sensitive_data_storage,
            "embedded": a.url is None,
        }
        for a in agents
    ])  # fmt: skip
