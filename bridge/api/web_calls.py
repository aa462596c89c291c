"""Web calls: ``POST /v2/create-web-call`` / ``/v3/create-web-call`` register a call and return a
single-use ``access_token`` that expires after ``web_call_token_ttl_s``; the token opens

    ws(s)://BRIDGE/web-call/{access_token}/{call_id}      (the browser's retell-client-js-sdk 1.x:
                                                           customEndpoint = ws(s)://BRIDGE/web-call/{access_token}/)
    ws(s)://BRIDGE/web-call/{call_id}?access_token=...[&encoding=s16le&sample_rate=24000]

relayed by ``bridge.media.relay``. The call's ``audio_encoding`` and ``sample_rate`` are the
browser's: ``s16le`` at the agent's rate (24000 for a ``twilio``-protocol agent) unless the
body says otherwise.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from pydantic import Field

from ..calls.registrar import new_call_id
from ..models import CallRecord, CallType, Encoding, Protocol
from ..settings import AgentProtocol
from .deps import AUTH, call_service, find_agent
from .errors import ERRORS
from .schemas import CallBody, CallObject

WEB_CLIENT_RATE = 24000  # the web client's rate when the agent's is mu-law 8 kHz

log = logging.getLogger(__name__)
router = APIRouter(tags=["calls"])


class CreateWebCall(CallBody):
    agent_id: str
    #: the browser's format (a bridge extension; the seed has the client choose it)
    audio_encoding: Encoding = Encoding.s16le
    sample_rate: int | None = Field(None, ge=8000, le=48000)


async def _create(request: Request, body: CreateWebCall) -> tuple[CallRecord, str, int]:
    agent = find_agent(request, body.agent_id)
    record = CallRecord(
        call_id=new_call_id(),
        call_type=CallType.web_call,
        metadata=body.metadata,
        retell_llm_dynamic_variables=body.retell_llm_dynamic_variables,
        agent_id=agent.agent_id,
        audio_websocket_protocol=Protocol.web,
        audio_encoding=body.audio_encoding,
        sample_rate=body.sample_rate or (agent.sample_rate if agent.protocol is AgentProtocol.web else WEB_CLIENT_RATE),
        end_call_after_silence_ms=agent.end_call_after_silence_ms,
    )
    return await call_service(request).register_web_call(record)


class WebCallV3(CallObject):  # type: ignore[valid-type, misc]
    expires_at: int
    ice_servers: list[dict]
    transport: str = "gateway"


@router.post(
    "/v2/create-web-call", dependencies=AUTH, status_code=201, summary="Create a web call", response_model=CallObject,
    responses=ERRORS,
)  # fmt: skip
async def create_web_call_v2(request: Request, body: CreateWebCall) -> JSONResponse:
    record, _, _ = await _create(request, body)
    return JSONResponse(record.public(), status_code=201)


@router.post(
    "/v3/create-web-call", dependencies=AUTH, status_code=201, summary="Create a web call (v3)", response_model=WebCallV3,
    responses=ERRORS,
)  # fmt: skip
async def create_web_call_v3(request: Request, body: CreateWebCall) -> JSONResponse:
    """The v3 answer the retell-sdk expects. ``transport`` is always ``gateway``: the bridge's
    ``/web-call/{access_token}/{call_id}`` websocket; there are no ICE servers (no WebRTC)."""
    record, token, expires_at = await _create(request, body)
    body = {**record.public(), "expires_at": expires_at, "ice_servers": [], "transport": "gateway"}
    return JSONResponse(body, status_code=201)
