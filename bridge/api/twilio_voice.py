"""``POST /twilio/voice``: Twilio's voice webhook. Checks the signature, picks the agent,
registers the call and answers ``<Connect action><Stream>`` TwiML with a single-use stream
token. ``POST /twilio/stream-ended/{call_id}``: Twilio asks what to do once the stream ended
(``<Connect action>``): a hang-up after a normal ending, the fallback message after a failure,
the drain message after the drain's deadline. ``signed_form`` checks every Twilio callback
(voice, stream ended, status, AMD).

Every answer here comes within ``twilio_request_timeout_s`` (the caller waits; Twilio gives up
after 15 s and plays its own error): the fallback when the database does not answer in time.
What Twilio sends is stored whatever it holds (SIP URIs, ``client:`` identities), control
characters replaced and over-long values cut, each with a note on the call."""

from __future__ import annotations

import asyncio
import logging
import re
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request, Response
from starlette.exceptions import HTTPException
from starlette.datastructures import ImmutableMultiDict
from twilio.request_validator import RequestValidator, get_signature_algorithm
from twilio.twiml.voice_response import VoiceResponse

from .. import logs
from ..calls import DRAIN_DETAIL, STORE_UNAVAILABLE, Outcome
from ..calls.registrar import RegistrationError
from ..models import MAX_PARTY_CHARS, CallStatus, Direction, is_call_id
from ..protocol.twilio import ACTION_PARAMETER, CALL_PARAMETER, MEDIA_PATH, STREAM_ENDED_PATH, TOKEN_PARAMETER
from .deps import MAX_FORM_BYTES, call_service
from .twilio_docs import CONNECT_EXAMPLE, HANGUP_EXAMPLE, twilio_callback

log = logging.getLogger(__name__)
router = APIRouter(tags=["twilio"])


def _twiml(response: VoiceResponse) -> Response:
    return Response(str(response), media_type="application/xml")


def fallback_twiml(message: str) -> Response:
    response = VoiceResponse()
    response.say(message)
    response.hangup()
    return _twiml(response)


def hangup_twiml() -> Response:
    response = VoiceResponse()
    response.hangup()
    return _twiml(response)


#: Twilio's ids: a call SID and an account SID (two letters and 32 hex digits)
CALL_SID = re.compile(r"CA[0-9a-fA-F]{32}")
ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def party(form, field: str, notes: list[str]) -> str | None:
    """A caller or callee as Twilio sent it (``From``, ``To``: an E.164 number, a SIP URI, a
    ``client:`` identity...), fit to store: control characters replaced (PostgreSQL stores no
    NUL), cut at MAX_PARTY_CHARS; each change is said in ``notes``."""
    value = form.get(field)
    if not value:
        return None
    if CONTROL_CHARACTERS.search(value):
        value = CONTROL_CHARACTERS.sub("\ufffd", value)
        notes.append(f"Twilio's {field} had control characters: replaced")
    if len(value) > MAX_PARTY_CHARS:
        notes.append(f"Twilio's {field} was {len(value)} characters: the first {MAX_PARTY_CHARS} are kept")
        value = value[:MAX_PARTY_CHARS]
    return value


def sid_problem(form) -> str | None:
    """Why the form's ``CallSid`` / ``AccountSid`` are not Twilio's, or None."""
    for field, pattern in (("CallSid", CALL_SID), ("AccountSid", ACCOUNT_SID)):
        value = form.get(field)
        if value is not None and not pattern.fullmatch(value):
            return f"its {field} {value[:40]!r}{'...' if len(value) > 40 else ''} is not a Twilio {'call' if field == 'CallSid' else 'account'} SID"
    return None




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


VOICE_ANSWER = (
    "TwiML: <Connect action><Stream> to the bridge's media stream for a registered call; <Say> the fallback message "
    "and <Hangup> when no agent takes the number or the call database does not answer in time; <Redirect> to the "
    "public URL while this replica drains"
)
VOICE_FIELDS = {
    "Caller": "the same as From",
    "Called": "the same as To",
    "AnsweredBy": "for an outbound call with answering-machine detection: human, machine_start, fax...",
}


@router.post(
    "/twilio/voice", summary="Twilio voice webhook: the agent is chosen by the number called (agents' numbers, else the default agent)",
    **twilio_callback(VOICE_FIELDS, twiml=CONNECT_EXAMPLE, answers=VOICE_ANSWER),
)  # fmt: skip
async def voice_webhook(request: Request) -> Response:
    """Paste ``BRIDGE_PUBLIC_URL`` + ``/twilio/voice`` into the number's "A call comes in"
    (HTTP POST). Twilio retrying the webhook for the same CallSid gets the same call."""
    return await _voice(request, None)


@router.post(
    "/twilio/voice/{agent_id}", summary="Twilio voice webhook for one agent, whatever number was called",
    **twilio_callback(VOICE_FIELDS, twiml=CONNECT_EXAMPLE, answers=VOICE_ANSWER),
)  # fmt: skip
async def voice_webhook_for_agent(request: Request, agent_id: str) -> Response:
    """For a number (or a TwiML app) that always goes to one agent; also the URL the bridge
    dials outbound calls with (``?call_id=`` names the call it registered)."""
    return await _voice(request, agent_id)


async def _voice(request: Request, agent_id: str | None) -> Response:
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
    settings = call_service(request).settings
    if problem := sid_problem(form):
        log.error("voice webhook refused: %s", problem)
        return fallback_twiml(settings.fallback_message)
    try:
        async with asyncio.timeout(settings.twilio_request_timeout_s):
            return await _answer(request, form, agent_id)
    except TimeoutError:  # (a database that drops packets, rather than refusing)
        log.error(
            "voice webhook for %s: the call database did not answer within %g s: the fallback",
            form.get("CallSid"), settings.twilio_request_timeout_s,
        )  # fmt: skip
        return fallback_twiml(settings.fallback_message)
    except STORE_UNAVAILABLE as e:  # the caller hears a sentence and a hang-up, not Twilio's error
        log.error("voice webhook for %s: the call database is unavailable: %s: %s", form.get("CallSid"), type(e).__name__, e)
        return fallback_twiml(settings.fallback_message)


async def _answer(request: Request, form, agent_id: str | None) -> Response:
    calls = call_service(request)
    settings = calls.settings
    call_sid = form.get("CallSid")
    planned = request.query_params.get("call_id")  # an outbound call the API registered and dialed
    if planned is not None:
        existing = await calls.find(planned)
        if existing is None:
            log.warning("voice webhook for %s names call %r, which is unknown: the fallback", call_sid, planned[:64])
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
    notes: list[str] = []
    try:
        record = await calls.register_phone_call(
            agent,
            from_number=party(form, "From", notes),
            to_number=party(form, "To", notes),
            direction=direction,
            twilio_call_sid=call_sid,
            twilio_account_sid=form.get("AccountSid"),
            notes=notes,
        )
    except RegistrationError as e:
        log.error("registration of %s failed: %s", call_sid, e)
        return fallback_twiml(settings.fallback_message)
    return _connect(request, record.call_id)


def _connect(request: Request, call_id: str) -> Response:
    """``<Connect action><Stream>`` for a registered call, with a fresh single-use stream token:
    when the stream ends Twilio asks ``STREAM_ENDED_PATH`` what to do next."""
    logs.CALL_ID.set(call_id)  # the request's log lines name the call
    calls = call_service(request)
    base = calls.public_base(request.headers, str(request.base_url))
    response = VoiceResponse()
    connect = response.connect(action=f"{base}{STREAM_ENDED_PATH}{call_id}", method="POST")
    stream = connect.stream(url=f"{base.replace('http', 'ws', 1)}{MEDIA_PATH}")
    stream.parameter(name=CALL_PARAMETER, value=call_id)
    stream.parameter(name=TOKEN_PARAMETER, value=calls.stream_token(call_id))
    stream.parameter(name=ACTION_PARAMETER, value="1")
    return _twiml(response)


@router.post(
    STREAM_ENDED_PATH + "{call_id}", summary="Twilio: the call's stream ended (<Connect action>): what the caller hears next",
    **twilio_callback(
        {}, twiml=HANGUP_EXAMPLE,
        answers="TwiML: <Hangup> after a normal ending; <Say> the fallback message after a failure, or the drain message; "
        "a transfer's <Dial> or a voicemail's <Say>/<Play>",
    ),
)  # fmt: skip
async def stream_ended(request: Request, call_id: str) -> Response:
    """What Twilio does once a call's stream has ended follows from how the call ended: a
    hang-up after a normal ending (the agent or the API ended it, the caller was silent...),
    the drain message after the drain's deadline, the fallback message after a failure (the
    agent could not be reached, failed or sent garbage; the call never started; its replica
    went away)."""
    form = await signed_form(request)
    calls = call_service(request)
    settings = calls.settings
    try:
        async with asyncio.timeout(settings.twilio_request_timeout_s):
            outcome = await calls.stream_outcome(call_id, max(0.5, settings.twilio_request_timeout_s - 1))
    except (TimeoutError, *STORE_UNAVAILABLE) as e:
        outcome = Outcome(None, f"the call database did not answer: {type(e).__name__}")
    logs.CALL_ID.set(call_id if is_call_id(call_id) else None)
    reason, detail = outcome.reason, outcome.detail
    if outcome.next_twiml and reason is not None and not reason.is_error:  # (a transfer's <Dial>, a voicemail's <Say>)
        return Response(outcome.next_twiml, media_type="application/xml")
    if reason is None or reason.is_error:
        log.info("stream of %s ended (%s): Twilio plays the fallback message", form.get("CallSid"), reason.value if reason else detail)
        return fallback_twiml(settings.fallback_message)
    if detail.startswith(DRAIN_DETAIL):
        return fallback_twiml(settings.drain_message)
    return hangup_twiml()
