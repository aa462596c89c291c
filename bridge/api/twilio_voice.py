"""``POST /twilio/voice``: Twilio's voice webhook. Checks the signature, picks the agent,
registers the call and answers ``<Connect><Stream>`` TwiML with a single-use stream token.
``signed_form`` checks every Twilio callback (voice, status, AMD)."""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request, Response
from starlette.exceptions import HTTPException
from starlette.datastructures import ImmutableMultiDict
from twilio.request_validator import RequestValidator, get_signature_algorithm
from twilio.twiml.voice_response import VoiceResponse

from .. import logs
from ..calls import STORE_UNAVAILABLE
from ..calls.registrar import RegistrationError
from ..models import CallStatus, Direction
from ..protocol.twilio import CALL_PARAMETER, MEDIA_PATH, TOKEN_PARAMETER
from .deps import MAX_FORM_BYTES, call_service

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
    """The POSTed form, if ``X-Twilio-Signature`` matches it and the public URL; anything else
    answers 403. Only what Twilio sends is read: a url-encoded body of bounded size (no
    multipart)."""
    form = await _form_if_signed(request)
    if form is None:
        raise HTTPException(403, "invalid or missing X-Twilio-Signature")
    return form


async def _form_if_signed(request: Request):
    calls = call_service(request)
    signature = request.headers.get("x-twilio-signature")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not signature or content_type != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        form = ImmutableMultiDict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError:
        return None
    # the path exactly as requested (percent-encoding kept): that is what Twilio signed
    path = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1")
    url = calls.public_base(request.headers, str(request.base_url)) + path
    if request.url.query:
        url += "?" + request.url.query
    algorithm = get_signature_algorithm(request.headers.get("x-twilio-webhooks-signature-settings"))
    validator = RequestValidator(calls.settings.twilio_auth_token or "")
    return form if validator.validate(url, form, signature, algorithm) else None


#: The query parameter of a voice webhook a draining replica handed on: a replica that gets
#: it while draining too answers 503, so Twilio uses the number's fallback URL (never a loop)
HANDED_OVER = "bridge_handed_over"


def hand_over(request: Request) -> Response:
    """A draining replica takes no new call: ``<Redirect>`` Twilio to the public URL, where the
    load balancer picks a ready replica."""
    calls = call_service(request)
    path = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1")
    query = f"{request.url.query}&" if request.url.query else ""
    response = VoiceResponse()
    response.redirect(f"{calls.public_base(request.headers, str(request.base_url))}{path}?{query}{HANDED_OVER}=1", method="POST")
    return _twiml(response)


@router.post("/twilio/voice", include_in_schema=True, summary="Twilio voice webhook (routes by called number)")
@router.post("/twilio/voice/{agent_id}", summary="Twilio voice webhook for one agent")
async def voice_webhook(request: Request, agent_id: str | None = None) -> Response:
    form = await signed_form(request)
    if call_service(request).draining:
        if not request.query_params.get(HANDED_OVER):
            log.info("voice webhook for %s handed over: this replica drains", form.get("CallSid"))
            return hand_over(request)
        if not call_service(request).store.shared:  # one process: the redirect came back to it
            log.warning("voice webhook handed over to a draining replica again: 503 (Twilio uses the number's fallback URL)")
            return Response("draining: no replica can take the call", status_code=503, media_type="text/plain")
        # Handed over once already and back at a draining replica that shares its database (the
        # load balancer had not seen it go unready yet, or every replica drains): answer rather
        # than lose the call.
        # The stream goes to the public URL too, so it too lands on a ready replica if any.
        log.warning("voice webhook handed over to a draining replica again: answered here")
    try:
        return await _answer(request, form, agent_id)
    except STORE_UNAVAILABLE as e:  # the caller hears a sentence and a hang-up, not Twilio's error
        log.error("voice webhook for %s: the call database is unavailable: %s", form.get("CallSid"), e)
        return fallback_twiml(call_service(request).settings.fallback_message)


async def _answer(request: Request, form, agent_id: str | None) -> Response:
    calls = call_service(request)
    settings = calls.settings
    call_sid = form.get("CallSid")
    planned = request.query_params.get("call_id")  # an outbound call the API registered and dialed
    if planned:
        existing = await calls.store.get(planned)
        if existing is None:
            return fallback_twiml(settings.fallback_message)
        if call_sid and not existing.twilio_call_sid:  # Twilio asked before the dial request returned
            existing = await calls.store.update(planned, twilio_call_sid=call_sid, twilio_account_sid=form.get("AccountSid"))
    else:
        existing = await calls.store.by_twilio_sid(call_sid) if call_sid else None
    if existing is not None:
        if form.get("AnsweredBy") or existing.call_status is not CallStatus.registered:
            # an async answering-machine-detection callback, or a call already under way
            return _twiml(VoiceResponse())
        return _connect(request, existing.call_id)  # Twilio retried the webhook: same call
    agent = settings.agents.get(agent_id) if agent_id else settings.agent_for_number(form.get("To"))
    if agent is None:
        log.warning("no agent for %s (path agent %r)", form.get("To"), agent_id)
        return fallback_twiml(settings.fallback_message)
    direction = Direction.inbound if form.get("Direction", "inbound") == "inbound" else Direction.outbound
    try:
        record = await calls.register_phone_call(
            agent,
            from_number=form.get("From"),
            to_number=form.get("To"),
            direction=direction,
            twilio_call_sid=call_sid,
            twilio_account_sid=form.get("AccountSid"),
        )
    except RegistrationError as e:
        log.error("registration of %s failed: %s", call_sid, e)
        return fallback_twiml(settings.fallback_message)
    return _connect(request, record.call_id)


def _connect(request: Request, call_id: str) -> Response:
    """``<Connect><Stream>`` for a registered call, with a fresh single-use stream token."""
    logs.CALL_ID.set(call_id)  # the request's log lines name the call
    calls = call_service(request)
    settings = calls.settings
    stream_url = calls.public_base(request.headers, str(request.base_url)).replace("http", "ws", 1)
    response = VoiceResponse()
    connect = response.connect()
    stream = connect.stream(url=f"{stream_url}{MEDIA_PATH}")
    stream.parameter(name=CALL_PARAMETER, value=call_id)
    stream.parameter(name=TOKEN_PARAMETER, value=calls.stream_token(call_id))
    response.say(settings.fallback_message)  # played only if the stream ends abnormally
    response.hangup()
    return _twiml(response)
