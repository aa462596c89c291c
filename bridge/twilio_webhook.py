"""``POST /twilio/voice``: Twilio's voice webhook. Checks the signature, picks the agent,
registers the call and answers ``<Connect><Stream>`` TwiML with a single-use stream token."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from twilio.request_validator import RequestValidator, get_signature_algorithm
from twilio.twiml.voice_response import VoiceResponse

from .models import Direction
from .registrar import RegistrationError, register_call
from .relay import CALL_PARAMETER, TOKEN_PARAMETER

log = logging.getLogger(__name__)
router = APIRouter(tags=["twilio"])


def _twiml(response: VoiceResponse) -> Response:
    return Response(str(response), media_type="application/xml")


def fallback_twiml(message: str) -> Response:
    response = VoiceResponse()
    response.say(message)
    response.hangup()
    return _twiml(response)


async def signed_form(request: Request):
    """The POSTed form if ``X-Twilio-Signature`` matches it and the public URL, else None."""
    services = request.app.state.services
    form = await request.form()
    signature = request.headers.get("x-twilio-signature")
    if not signature:
        return None
    url = services.public_base(request.headers, str(request.base_url)) + request.url.path
    if request.url.query:
        url += "?" + request.url.query
    algorithm = get_signature_algorithm(request.headers.get("x-twilio-webhooks-signature-settings"))
    validator = RequestValidator(services.settings.twilio_auth_token or "")
    return form if validator.validate(url, form, signature, algorithm) else None


@router.post("/twilio/voice", include_in_schema=True, summary="Twilio voice webhook (routes by called number)")
@router.post("/twilio/voice/{agent_id}", summary="Twilio voice webhook for one agent")
async def voice_webhook(request: Request, agent_id: str | None = None) -> Response:
    services = request.app.state.services
    settings = services.settings
    form = await signed_form(request)
    if form is None:
        return Response("invalid or missing X-Twilio-Signature", status_code=403, media_type="text/plain")
    if form.get("AnsweredBy"):
        # an answering-machine-detection callback for a call that is already registered
        return _twiml(VoiceResponse())
    agent = settings.agents.get(agent_id) if agent_id else settings.agent_for_number(form.get("To"))
    if agent is None:
        log.warning("no agent for %s (path agent %r)", form.get("To"), agent_id)
        return fallback_twiml(settings.fallback_message)
    call_sid = form.get("CallSid")
    direction = Direction.inbound if form.get("Direction", "inbound") == "inbound" else Direction.outbound
    try:
        record = await register_call(
            services.store,
            agent,
            from_number=form.get("From"),
            to_number=form.get("To"),
            direction=direction,
            twilio_call_sid=call_sid,
            twilio_account_sid=form.get("AccountSid"),
            http=services.http,
        )
    except RegistrationError as e:
        log.error("registration of %s failed: %s", call_sid, e)
        return fallback_twiml(settings.fallback_message)
    stream_url = services.public_base(request.headers, str(request.base_url)).replace("http", "ws", 1)
    response = VoiceResponse()
    connect = response.connect()
    stream = connect.stream(url=f"{stream_url}/twilio/media")
    stream.parameter(name=CALL_PARAMETER, value=record.call_id)
    stream.parameter(name=TOKEN_PARAMETER, value=services.tokens.issue(record.call_id))
    response.say(settings.fallback_message)  # played only if the stream ends abnormally
    response.hangup()
    return _twiml(response)
