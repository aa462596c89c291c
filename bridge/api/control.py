"""Controlling a live call from outside it (docs/protocol.md, "Controlling the call"): the
same requests a ``web``-protocol agent sends as events, for ``twilio``-protocol agents and any
control plane, on whichever replica (the relaying one does them: ``CallService.control_call``).
A request repeated with the same ``Idempotency-Key`` header is done once, and answered alike.

- ``POST /v2/transfer-call/{call_id}`` ``{"to", "mode", "caller_id", "extension", "message"}``
- ``POST /v2/press-digit/{call_id}`` ``{"digits": "1w2#"}``
- ``POST /v2/end-call/{call_id}``: after the agent's last words are heard (stop-call ends now)

Each answers 200 with the ``call_control_result`` (``ok`` false and the ``reason`` for a
refusal: a destination not allowed, a transfer under way, a target that did not answer), 409
for a call that is not ongoing, 422 for a body that breaks the rules.

And a warm transfer's target leg, as Twilio calls back (signed): ``/twilio/transfer/{call_id}/answered``
(its answering-machine detection's ``AnsweredBy``: a human hears the message, then is
joined), ``/join``, ``/status``.
"""

from __future__ import annotations

import logging
from typing import Literal

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from twilio.twiml.voice_response import VoiceResponse

from ..models import CallStatus, is_call_id
from .deps import AUTH, MAX_FORM_BYTES, call_service, find_call
from .errors import ERRORS, ApiError
from .twilio_docs import twilio_callback
from .twilio_voice import hangup_twiml, signed_form

log = logging.getLogger(__name__)
router = APIRouter(tags=["calls"])
twilio_router = APIRouter(tags=["twilio"])

MACHINE = {"machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other", "fax"}


class TransferBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = Field(description="E.164 number or SIP URI")
    mode: Literal["cold", "warm"] = "cold"
    caller_id: Literal["agent", "caller"] = "agent"
    extension: str | None = None
    message: str | None = None


class DigitsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    digits: str = Field(description="0-9 * # A-D, and w for a half-second pause")


class ControlResult(BaseModel):
    event_type: Literal["call_control_result"] = "call_control_result"
    action: str
    ok: bool
    reason: str | None = None


async def _control(request: Request, call_id: str, body: dict, idempotency_key: str | None) -> JSONResponse:
    record = await find_call(request, call_id)
    if record.call_status is not CallStatus.ongoing:
        raise ApiError(409, f"call {call_id} is {record.call_status.value}: only an ongoing call can be controlled")
    result = await call_service(request).control_call(record, body, (idempotency_key or "")[:128] or None)
    return JSONResponse(result)


@router.post("/v2/transfer-call/{call_id}", dependencies=AUTH, summary="Transfer a live call (cold or warm)", response_model=ControlResult, responses=ERRORS)
async def transfer_call(call_id: str, request: Request, body: TransferBody, idempotency_key: str | None = Header(None)) -> JSONResponse:
    return await _control(request, call_id, {"action": "transfer_call", **body.model_dump()}, idempotency_key)


@router.post("/v2/press-digit/{call_id}", dependencies=AUTH, summary="Press keys towards the callee", response_model=ControlResult, responses=ERRORS)
async def press_digit(call_id: str, request: Request, body: DigitsBody, idempotency_key: str | None = Header(None)) -> JSONResponse:
    return await _control(request, call_id, {"action": "press_digit", "digits": body.digits}, idempotency_key)


@router.post("/v2/end-call/{call_id}", dependencies=AUTH, summary="End a live call after the agent's last words", response_model=ControlResult, responses=ERRORS)
async def end_call(call_id: str, request: Request, idempotency_key: str | None = Header(None)) -> JSONResponse:
    return await _control(request, call_id, {"action": "end_call"}, idempotency_key)


# --- a warm transfer's target leg ----------------------------------------------------------------


def _xml(response: VoiceResponse) -> Response:
    return Response(str(response), media_type="application/xml")


TRANSFER_EXAMPLE = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Say>Connecting you to a caller.</Say>'
    '<Redirect method="POST">https://bridge.example.com/twilio/transfer/6f1c0e4b2a9d4c1e8b7a5d3f2e1c0b9a/join</Redirect></Response>'
)
JOIN_EXAMPLE = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Dial><Conference beep="false" endConferenceOnExit="true" '
    'startConferenceOnEnter="true">transfer-6f1c0e4b2a9d4c1e8b7a5d3f2e1c0b9a</Conference></Dial></Response>'
)


@twilio_router.post(
    "/twilio/transfer/{call_id}/answered", summary="Twilio: a warm transfer's target answered (the target leg's url)",
    **twilio_callback(
        {"AnsweredBy": "human, machine_start... (the target's voicemail sends the caller back to the agent)"}, twiml=TRANSFER_EXAMPLE,
        answers="TwiML for the target: the whisper message, then the join; <Hangup> for a voicemail or a transfer no longer asked",
    ),
)  # fmt: skip
async def transfer_answered(call_id: str, request: Request) -> Response:
    form = await signed_form(request)
    calls = call_service(request)
    record = await calls.find(call_id)
    transfer = record.transfer if record is not None else None
    if transfer is None:
        return hangup_twiml()
    answered_by = form.get("AnsweredBy", "")
    if answered_by in MACHINE:  # (the target's voicemail: the caller goes back to the agent)
        calls.transfer_event(call_id, "voicemail", answered_by, form.get("CallSid", ""))
        return hangup_twiml()
    calls.transfer_event(call_id, "answered", answered_by, form.get("CallSid", ""))
    response = VoiceResponse()
    if transfer.get("message"):
        response.say(transfer["message"])
    base = calls.public_base(request.headers, str(request.base_url))
    response.redirect(f"{base}/twilio/transfer/{call_id}/join", method="POST")
    return _xml(response)


@twilio_router.post(
    "/twilio/transfer/{call_id}/join", summary="Twilio: the transfer's target joins the caller",
    **twilio_callback({}, twiml=JOIN_EXAMPLE, answers="TwiML: <Dial><Conference> into the caller's room; <Hangup> if the caller is gone"),
)  # fmt: skip
async def transfer_join(call_id: str, request: Request) -> Response:
    form = await signed_form(request)
    calls = call_service(request)
    record = await calls.find(call_id)
    if record is None or record.transfer is None or record.call_status is not CallStatus.ongoing:
        return hangup_twiml()  # (the caller is gone: nobody to join)
    calls.transfer_event(call_id, "joined", "", form.get("CallSid", ""))
    response = VoiceResponse()
    response.dial().conference(record.transfer["room"], start_conference_on_enter=True, end_conference_on_exit=True, beep=False)
    return _xml(response)


@twilio_router.post(
    "/twilio/transfer/{call_id}/status", max_body_size=MAX_FORM_BYTES, summary="Twilio: the transfer's target leg's status",
    **twilio_callback({}, twiml=None, answers="recorded: a target busy, unanswered or failed returns the caller to the agent"),
)  # fmt: skip
async def transfer_status(call_id: str, request: Request) -> Response:
    form = await signed_form(request)
    if is_call_id(call_id):
        status = form.get("CallStatus", "")
        if status in ("busy", "no-answer", "failed", "canceled", "completed"):
            call_service(request).transfer_event(call_id, "failed", status, form.get("CallSid", ""))
    return Response(status_code=204)
