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

import logging
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field, field_validator

from ..calls import DialRefused, TooManyCalls
from ..calls.registrar import call_fields, new_call_id
from ..models import CallRecord, CallStatus, CallType, Direction, DisconnectionReason, is_call_id
from ..settings import voicemail_problem
from .deps import AUTH, MAX_FORM_BYTES, call_service
from .errors import ERRORS, ApiError
from .schemas import CallBody, CallObject, e164
from .twilio_docs import twilio_callback
from .twilio_voice import signed_form

log = logging.getLogger(__name__)
router = APIRouter(tags=["calls"])
twilio_router = APIRouter(tags=["twilio"])  # (its outbound calls' callbacks)

DIAL_FAILURES = {
    "busy": DisconnectionReason.dial_busy,
    "failed": DisconnectionReason.dial_failed,
    "no-answer": DisconnectionReason.dial_no_answer,
    "canceled": DisconnectionReason.dial_failed,
}
VOICEMAIL = {"machine_end_beep", "machine_end_silence", "machine_end_other"}
MACHINE = {"machine_start", "fax"}


class CreatePhoneCall(CallBody):
    from_number: str
    to_number: str
    override_agent_id: str | None = Field(None, min_length=1)
    drop_call_if_machine_detected: bool | None = None
    #: this call's voicemail handling, over its agent's (docs/protocol.md, "Voicemail")
    voicemail_detection: bool | None = None
    voicemail_action: Literal["hangup", "message", "static"] | None = None
    voicemail_message: str | None = Field(None, max_length=2000)
    voicemail_audio_url: str | None = Field(None, max_length=2000, pattern=r"^https?://\S+$")

    _numbers = field_validator("from_number", "to_number")(e164)


@router.post(
    "/v2/create-phone-call", dependencies=AUTH, status_code=201, summary="Dial an outbound phone call",
    response_model=CallObject, responses=ERRORS,
)  # fmt: skip
async def create_phone_call(request: Request, body: CreatePhoneCall) -> Response:
    calls = call_service(request)
    settings = calls.settings
    if not settings.twilio_account_sid:
        raise ApiError(422, "this bridge cannot dial: outbound calls need the Twilio account (set BRIDGE_TWILIO_ACCOUNT_SID)")
    if body.from_number not in settings.routes:
        raise ApiError(422, f"from_number {body.from_number} is not one of this bridge's numbers (agents' numbers)")
    agent_id = body.override_agent_id or settings.routes[body.from_number]
    agent = settings.agents.get(agent_id)
    if agent is None:
        raise ApiError(404, f"agent {agent_id} not found")
    if body.voicemail_action is not None and (problem := voicemail_problem(agent, body.voicemail_action)):
        raise ApiError(422, f"agent {agent_id}: {problem}")
    record = CallRecord(
        call_id=new_call_id(),
        call_type=CallType.phone_call,
        metadata=body.metadata,
        retell_llm_dynamic_variables=body.retell_llm_dynamic_variables,
        drop_call_if_machine_detected=body.drop_call_if_machine_detected,
        voicemail_options={k: v for k, v in body.model_dump(include={"voicemail_detection", "voicemail_action", "voicemail_message", "voicemail_audio_url"}).items() if v is not None} or None,
        **call_fields(agent, from_number=body.from_number, to_number=body.to_number, direction=Direction.outbound),
    )
    base = calls.public_base(request.headers, str(request.base_url))
    params: dict[str, Any] = dict(
        to=body.to_number,
        from_=body.from_number,
        url=f"{base}/twilio/voice/{agent.agent_id}?call_id={record.call_id}",
        method="POST",
        status_callback=f"{base}/twilio/status/{record.call_id}",
        status_callback_event=["initiated", "ringing", "answered", "completed"],
        status_callback_method="POST",
    )
    if body.drop_call_if_machine_detected or voicemail_detection(record, agent):
        params.update(
            machine_detection="DetectMessageEnd",
            async_amd="true",
            async_amd_status_callback=f"{base}/twilio/amd/{record.call_id}",
            async_amd_status_callback_method="POST",
        )
    try:
        record = await calls.dial(record, params)
    except TooManyCalls as e:
        raise ApiError(429, str(e)) from None
    except DialRefused as e:
        if e.unreachable:
            raise ApiError(502, f"the call was not placed: {e}") from None
        raise ApiError(400, f"Twilio refused the call: {e}") from None
    return JSONResponse(record.public(), status_code=201)


@twilio_router.post(
    "/twilio/status/{call_id}", max_body_size=MAX_FORM_BYTES,
    summary="Twilio: an outbound call's status (StatusCallback): a dial that failed or ended before its stream is recorded",
    **twilio_callback(
        {"CallDuration": "seconds, once completed", "SequenceNumber": "the callback's order", "Timestamp": "when, RFC 2822"},
        twiml=None, answers="recorded",
    ),
)  # fmt: skip
async def status_callback(call_id: str, request: Request) -> Response:
    form = await signed_form(request)
    calls = call_service(request)
    status = form.get("CallStatus", "")
    if not is_call_id(call_id):
        log.warning("status callback for %r, which is no call id: ignored", call_id[:64])
        return Response(status_code=204)
    if status in DIAL_FAILURES:
        await calls.dial_ended(call_id, DIAL_FAILURES[status], f"Twilio CallStatus {status}")
    elif status == "completed":  # answered, then gone before any stream (a live call ends by its stream)
        await calls.dial_ended(call_id, DisconnectionReason.user_hangup, "completed before the stream")
    return Response(status_code=204)


@twilio_router.post(
    "/twilio/amd/{call_id}", max_body_size=MAX_FORM_BYTES,
    summary="Twilio: answering-machine detection's result (AsyncAmdStatusCallback): a voicemail is left or the call dropped",
    **twilio_callback(
        {"AnsweredBy": "human, machine_start, machine_end_beep, machine_end_silence, machine_end_other, fax or unknown",
         "MachineDetectionDuration": "milliseconds the detection took"},
        twiml=None, answers="acted on",
    ),
)  # fmt: skip
async def amd_callback(call_id: str, request: Request) -> Response:
    form = await signed_form(request)
    calls = call_service(request)
    answered_by = form.get("AnsweredBy", "")
    record = await calls.find(call_id)
    if record is None:
        return Response(status_code=204)
    detecting = voicemail_detection(record, calls.agent(record))
    if answered_by in VOICEMAIL and detecting and record.call_status is CallStatus.ongoing:
        # (the beep: the relay leaves the message, hangs up or tells the agent, as configured)
        await calls.control_call(record, {"action": "voicemail", "answered_by": answered_by}, f"amd-{answered_by}")
    elif (answered_by in VOICEMAIL or answered_by in MACHINE) and (record.drop_call_if_machine_detected or detecting):
        reason = DisconnectionReason.voicemail_reached if answered_by in VOICEMAIL else DisconnectionReason.machine_detected
        await calls.machine_answered(record, reason, f"AnsweredBy {answered_by}")
    return Response(status_code=204)


def voicemail_detection(record: CallRecord, agent) -> bool:
    """Whether the call looks for a voicemail: its own setting, else its agent's."""
    own = (record.voicemail_options or {}).get("voicemail_detection")
    return bool(own if own is not None else (agent.voicemail_detection if agent is not None else False))
