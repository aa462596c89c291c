"""Outbound calls: ``POST /v2/create-phone-call`` dials through Twilio REST (the ``twilio``
package's async client), then Twilio's callbacks drive the call:

- the voice URL (``/twilio/voice/{agent}?call_id=...``) answers ``<Connect><Stream>`` when the
  callee picks up, like an inbound call;
- ``/twilio/status/{call_id}``: ``busy`` / ``failed`` / ``no-answer`` / ``canceled`` end a call
  that never connected as ``dial_busy`` / ``dial_failed`` / ``dial_no_answer`` / ``dial_failed``;
- ``/twilio/amd/{call_id}`` (async answering-machine detection, requested when the call has
  ``drop_call_if_machine_detected``): a machine ends the call through REST as
  ``voicemail_reached`` (the greeting ended: beep, silence, other) or ``machine_detected``
  (``machine_start``, ``fax``).

Requests to Twilio's API are throttled to ``twilio_calls_per_second`` per instance (Twilio's
default account limit is 1 call per second); a request that would wait longer than
``dial_queue_timeout_s`` is refused with 429."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field, field_validator
from twilio.base.exceptions import TwilioException

from .api import AUTH, ERRORS, ApiError, CallObject, _Body, _e164, services
from .models import CallRecord, CallStatus, CallType, Direction, DisconnectionReason
from .registrar import call_fields, new_call_id
from .twilio_webhook import signed_form

log = logging.getLogger(__name__)
router = APIRouter(tags=["calls"])

DIAL_FAILURES = {
    "busy": DisconnectionReason.dial_busy,
    "failed": DisconnectionReason.dial_failed,
    "no-answer": DisconnectionReason.dial_no_answer,
    "canceled": DisconnectionReason.dial_failed,
}
VOICEMAIL = {"machine_end_beep", "machine_end_silence", "machine_end_other"}
MACHINE = {"machine_start", "fax"}


class CallThrottle:
    """At most ``rate`` starts a second; waiters queue in order."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate
        self.next_slot = 0.0
        self.lock = asyncio.Lock()

    async def wait(self, max_wait: float) -> None:
        async with self.lock:
            now = time.monotonic()
            slot = max(now, self.next_slot)
            if slot - now > max_wait:
                raise ApiError(429, f"too many calls: Twilio accepts {1 / self.interval:g} a second; try again shortly")
            self.next_slot = slot + self.interval
        await asyncio.sleep(slot - now)


class CreatePhoneCall(_Body):
    from_number: str
    to_number: str
    override_agent_id: str | None = Field(None, min_length=1)
    drop_call_if_machine_detected: bool | None = None

    _numbers = field_validator("from_number", "to_number")(_e164)


@router.post(
    "/v2/create-phone-call", dependencies=AUTH, status_code=201, summary="Dial an outbound phone call",
    response_model=CallObject, responses=ERRORS,
)  # fmt: skip
async def create_phone_call(request: Request, body: CreatePhoneCall) -> Response:
    svc = services(request)
    settings = svc.settings
    if not settings.twilio_account_sid:
        raise ApiError(500, "outbound calls need the Twilio account: set BRIDGE_TWILIO_ACCOUNT_SID")
    if body.from_number not in settings.routes:
        raise ApiError(422, f"from_number {body.from_number} is not one of this bridge's numbers (agents' numbers)")
    agent_id = body.override_agent_id or settings.routes[body.from_number]
    agent = settings.agents.get(agent_id)
    if agent is None:
        raise ApiError(404, f"agent {agent_id} not found")
    record = CallRecord(
        call_id=new_call_id(),
        call_type=CallType.phone_call,
        metadata=body.metadata,
        retell_llm_dynamic_variables=body.retell_llm_dynamic_variables,
        drop_call_if_machine_detected=body.drop_call_if_machine_detected,
        **call_fields(agent, from_number=body.from_number, to_number=body.to_number, direction=Direction.outbound),
    )
    base = svc.public_base(request.headers, str(request.base_url))
    params: dict[str, Any] = dict(
        to=body.to_number,
        from_=body.from_number,
        url=f"{base}/twilio/voice/{agent.agent_id}?call_id={record.call_id}",
        method="POST",
        status_callback=f"{base}/twilio/status/{record.call_id}",
        status_callback_event=["initiated", "ringing", "answered", "completed"],
        status_callback_method="POST",
    )
    if body.drop_call_if_machine_detected:
        params.update(
            machine_detection="DetectMessageEnd",
            async_amd="true",
            async_amd_status_callback=f"{base}/twilio/amd/{record.call_id}",
            async_amd_status_callback_method="POST",
        )
    await svc.dial_throttle.wait(settings.dial_queue_timeout_s)
    await svc.store.create(record)
    try:
        call = await svc.twilio_rest.client().calls.create_async(**params)
    except TwilioException as e:
        detail = getattr(e, "msg", None) or str(e)
        await svc.store.finish(record.call_id, DisconnectionReason.dial_failed, error_detail=f"Twilio refused: {detail}")
        raise ApiError(400, f"Twilio refused the call: {detail}") from None
    record = await svc.store.update(record.call_id, twilio_call_sid=call.sid, twilio_account_sid=call.account_sid)
    return JSONResponse(record.public(), status_code=201)


@router.post("/twilio/status/{call_id}", include_in_schema=False)
async def status_callback(call_id: str, request: Request) -> Response:
    form = await signed_form(request)
    svc = services(request)
    status = form.get("CallStatus", "")
    if status in DIAL_FAILURES:
        await svc.store.finish(
            call_id, DIAL_FAILURES[status], only_if=CallStatus.registered, error_detail=f"Twilio CallStatus {status}"
        )
    elif status == "completed":  # answered, then gone before any stream (a live call ends by its stream)
        await svc.store.finish(
            call_id, DisconnectionReason.user_hangup, only_if=CallStatus.registered, error_detail="completed before the stream"
        )
    return Response(status_code=204)


@router.post("/twilio/amd/{call_id}", include_in_schema=False)
async def amd_callback(call_id: str, request: Request) -> Response:
    form = await signed_form(request)
    svc = services(request)
    answered_by = form.get("AnsweredBy", "")
    record = await svc.store.get(call_id)
    if record is None or not record.drop_call_if_machine_detected:
        return Response(status_code=204)
    if answered_by in VOICEMAIL or answered_by in MACHINE:
        reason = DisconnectionReason.voicemail_reached if answered_by in VOICEMAIL else DisconnectionReason.machine_detected
        detail = f"AnsweredBy {answered_by}"
        if not svc.stop_local_call(call_id, reason, detail):  # the relay hangs up; else do it here
            if record.twilio_call_sid:
                await svc.twilio_rest.hangup(record.twilio_call_sid, record.twilio_account_sid)
            await svc.store.finish(call_id, reason, error_detail=detail)
    return Response(status_code=204)
