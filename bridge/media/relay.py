"""The relay of a live call: the caller's socket on one side, the agent's audio websocket on the
other, one code path for every kind of call (docs/protocol.md):

- ``/twilio/media``: Twilio's media stream of a call the bridge's own voice webhook answered
  (a signed stream, then a ``start`` naming the call and its single-use stream token);
- ``/audio-websocket/{call_id}``: the seeds' audio websocket of a call registered through the
  API (``register-call``, ``register-phone-call``). The call id is the credential, single use,
  while the call is ``registered``. On a call registered with protocol ``twilio`` only Twilio's
  signed media stream is let in; on ``web``, any client speaking the ``web`` protocol in the
  registered format (the browser's ``retell-client-js-sdk`` 1.x);
- ``/web-call/{access_token}/{call_id}`` or ``/web-call/{call_id}?access_token=...``: a web call
  from create-web-call, opened with its single-use access token (the first form is a
  ``customEndpoint`` the browser's web client completes with the call id).

A thin asyncio layer: it checks the socket and starts the call, opens the agent socket, then
moves frames between the two sockets through ``CallSession`` until either side ends, and records
how the call ended. After set-up the relay runs on callbacks: a frame from either socket is
converted and written on in the same ``data_received`` call, with no task, queue or future per
frame. Sends never block; a peer that stops reading for ``send_timeout_s`` ends its own call and
never stalls another.

How a call ends (``disconnection_reason``), and how each side's socket is closed:

=====================================  ==================================================
Twilio sends ``stop``; the web         ``user_hangup``; agent socket closed with 1000
client closes (or its socket is lost)
agent closes with 1000 / 1001          ``agent_hangup``; the agent's last words play out,
                                       the call is hung up through Twilio REST, then the
                                       caller's socket is closed with 1000
the caller is silent for               ``inactivity``; hung up through Twilio REST
``end_call_after_silence_ms``
the call reaches                       ``max_duration_reached``; hung up through Twilio REST
``max_call_duration_ms``
agent socket cannot open               ``error_llm_websocket_open``; caller hears the fallback
agent socket lost (no close frame,     ``error_llm_websocket_lost_connection``; fallback
stops reading, stops answering pings)
agent closes with another code         ``error_llm_websocket_runtime``; fallback
(e.g. 1011), or is not configured
agent sends garbage (or breaks the     ``error_llm_websocket_corrupt_payload``; fallback
websocket protocol)
the caller sends garbage               ``error_frontend_corrupted_payload``; closed with
                                       1007 (bad JSON or base64), 1003 (binary frames
                                       from Twilio, unknown text from a web client), 1008
                                       (a frame only servers send), 1002 (broken
                                       websocket framing); a web client that closes
                                       with one of those codes, or 1009
Twilio socket lost without ``stop``,   ``error_twilio`` (a web client that stops reading:
or stops reading                       ``user_hangup``)
nothing from the caller for            ``error_no_audio_received``; closed with 1008
``no_audio_timeout_s`` (10 s)
the bridge shuts down                  ``error_unknown`` ("the bridge shut down"); 1001
=====================================  ==================================================

"Fallback" = the bridge closes the Twilio socket (with 1011 unless said otherwise) and Twilio
plays the TwiML after </Connect>: the fallback message is heard only when something failed. A
web client's socket is closed with the same codes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote

from twilio.request_validator import RequestValidator

from audio import TWILIO_FORMAT, AudioFormat
from audio.filters import plan

from ..calls import DRAIN_DETAIL, STORE_UNAVAILABLE, CallRefused, CallService, ProviderUnreachable, not_startable
from ..models import CallRecord, CallStatus, Direction, Encoding, Protocol
from ..models import DisconnectionReason as Reason
from ..protocol import twilio as tf
from ..protocol.hosted.providers import TRANSLATORS
from ..settings import AgentProtocol
from ..protocol import web as wf
from ..protocol import control as c
from ..protocol.media_clock import MediaClock
from ..protocol.session import TO_BRIDGE, TO_CALLER, CallSession
from ..protocol.twilio import CALL_PARAMETER, TOKEN_PARAMETER
from ..protocol.websocket import (
    GOING_AWAY, INTERNAL_ERROR, INVALID_PAYLOAD, MAX_MESSAGE_BYTES, MESSAGE_TOO_BIG, NORMAL, OK_CLOSE_CODES,
    POLICY_VIOLATION, PROTOCOL_ERROR, UNSUPPORTED_DATA,
)  # fmt: skip
from ..logs import CALL_ID
from ..metrics import DELAY_SAMPLE_EVERY, FLUSH_INTERVAL_S, CallMetrics
from . import connection
from .file_writer import FileWriter
from .control import CallControl
from .hosted import HostedLink
from .listen import ListenTap
from .observer import CallObserver, Recording, measured_fields

log = logging.getLogger(__name__)

AUDIO_WEBSOCKET_PREFIX = "/audio-websocket/"
WEB_CALL_PREFIX = "/web-call/"
SHUTDOWN_DETAIL = "the bridge shut down"
RECORDING_FLUSH_TIMEOUT_S = 10.0
#: the first ping to a web agent this long after its socket opens (then every keepalive_interval_s):
#: a call shorter than the interval still has the agent link's round trip on its record
FIRST_PING_S = 1.0
#: a refused socket's note on the call's record is given this long (the database may not answer)
NOTE_WAIT_S = 1.0
#: Close codes of a web client's socket that ended because of what the client sent (the bridge
#: closes with these when the client breaks RFC 6455; a client may send them too)
CLIENT_FAULTS = {
    PROTOCOL_ERROR: "broke the websocket protocol",
    UNSUPPORTED_DATA: "sent data the web protocol does not carry",
    INVALID_PAYLOAD: "sent text that is not valid UTF-8",
    MESSAGE_TOO_BIG: f"sent a message over {MAX_MESSAGE_BYTES} bytes",
}


@dataclass(frozen=True)
class CallerLeg:
    """The caller's side of a call's relay."""

    protocol: Protocol  # twilio: Twilio's media stream; web: a web client
    format: AudioFormat
    #: Twilio's ``start`` (for a web caller, one made up for a ``twilio``-protocol agent)
    start: tf.Start
    updates: bool = False  # a web client that asked for the agent's ``update`` events
    #: Twilio asks the bridge what to do once the stream ends (the bridge's own TwiML,
    #: ``<Connect action>``): no REST hang-up is needed for a clean ending
    asks_after_stream: bool = False
    #: how Twilio reaches the bridge (a warm transfer's callbacks)
    public_base: str = ""


def web_caller(audio_format: AudioFormat, updates: bool) -> CallerLeg:
    start = tf.Start(f"MZ{uuid.uuid4().hex}", None, None, tracks=("inbound",))
    return CallerLeg(Protocol.web, audio_format, start, updates)


def socket_url(calls: CallService, websocket: connection.ServerConnection) -> str:
    """The URL Twilio signed for a media websocket (wss, no query)."""
    base = calls.public_base(websocket.headers, websocket.base_url)
    return base.replace("http", "ws", 1) + websocket.path



def _twilio_signature_problem(calls: CallService, websocket: connection.ServerConnection) -> str | None:
    signature = websocket.headers.get("x-twilio-signature")
    validator = RequestValidator(calls.settings.twilio_auth_token or "")
    if signature and validator.validate(socket_url(calls, websocket), {}, signature):
        return None
    return "bad X-Twilio-Signature" if signature else "no X-Twilio-Signature"


async def handle_media_stream(websocket: connection.ServerConnection, calls: CallService, files: FileWriter) -> None:
    """One Twilio media stream on ``/twilio/media``, from the upgrade to the call's record."""
    if problem := _twilio_signature_problem(calls, websocket):
        log.warning("media websocket refused: %s", problem)
        websocket.refuse(403)
        return
    if not _accept(websocket, "media websocket"):
        return
    public_base = calls.public_base(websocket.headers, websocket.base_url)
    try:
        start = await _read_start(websocket, calls.settings.stream_start_timeout_s)
        params = start.custom_parameters
        record = await _store_bound(
            calls, calls.start_stream(params.get(CALL_PARAMETER), params.get(TOKEN_PARAMETER), start.call_sid, start.account_sid, public_base)
        )
    except CallRefused as e:
        await _refused(websocket, calls, e, "media stream")
        return
    asks = params.get(tf.ACTION_PARAMETER) == "1"
    caller = CallerLeg(Protocol.twilio, TWILIO_FORMAT, start, asks_after_stream=asks, public_base=public_base)
    await _relay(websocket, calls, files, caller, record)


def _accept(websocket: connection.ServerConnection, what: str) -> bool:
    """Complete the upgrade; False (logged) if it was no valid websocket handshake."""
    try:
        websocket.accept()
    except connection.ConnectionClosed as e:
        log.warning("%s refused: %s", what, e)
        return False
    return True


def _bad_handshake(websocket: connection.ServerConnection) -> bool:
    """An upgrade that is no websocket handshake is answered with its HTTP error before it can
    start (and spend) a call."""
    if websocket.handshake.error:
        log.warning("%s: not a websocket handshake: %s", websocket.path.split("/")[1], websocket.handshake.error[1])
        websocket.refuse(*websocket.handshake.error)
        return True
    return False


async def handle_audio_websocket(websocket: connection.ServerConnection, calls: CallService, files: FileWriter) -> None:
    """``/audio-websocket/{call_id}``: the audio websocket of a call registered through the API,
    from Twilio (protocol ``twilio``) or a web client (``web``)."""
    if _bad_handshake(websocket):
        return
    call_id = unquote(websocket.path[len(AUDIO_WEBSOCKET_PREFIX) :])
    try:
        record = await _store_bound(calls, calls.find(call_id))
    except CallRefused as e:
        await _refused(websocket, calls, e, "audio websocket")
        return
    if record is None:
        await _refused(websocket, calls, CallRefused("unknown call"), "audio websocket")
        return
    signed = "x-twilio-signature" in websocket.headers
    public_base = calls.public_base(websocket.headers, websocket.base_url)
    if record.audio_websocket_protocol is Protocol.twilio:
        if problem := _twilio_signature_problem(calls, websocket):
            if not signed:
                problem = "a client that is not Twilio's media stream (no X-Twilio-Signature) on a call registered with protocol twilio"
            await _refused(websocket, calls, CallRefused(problem, call_id), "audio websocket", status=403)
            return
        if record.call_status is not CallStatus.registered:  # said at once, not after a start
            await _refused(websocket, calls, CallRefused(not_startable(record), call_id), "audio websocket")
            return
        if not _accept(websocket, "audio websocket"):
            return
        try:
            start = await _read_start(websocket, calls.settings.stream_start_timeout_s)
            record = await _store_bound(
                calls, calls.start_call(call_id, public_base, twilio_call_sid=start.call_sid, twilio_account_sid=start.account_sid)
            )
        except CallRefused as e:
            e.call_id = call_id
            await _refused(websocket, calls, e, "audio websocket")
            return
        caller = CallerLeg(Protocol.twilio, TWILIO_FORMAT, start, public_base=public_base)
    else:
        if record.access_token is not None:  # create-web-call's: only its access token opens it
            problem = "a call from create-web-call opens at /web-call/ with its access token"
            await _refused(websocket, calls, CallRefused(problem, call_id), "audio websocket", status=403)
            return
        if signed:
            problem = "Twilio's media stream on a call registered with protocol web"
            await _refused(websocket, calls, CallRefused(problem, call_id), "audio websocket", status=403)
            return
        query = parse_qs(websocket.query)
        caller = web_caller(AudioFormat(record.audio_encoding.value, record.sample_rate), query.get("enable_update") == ["true"])
        try:
            record = await _store_bound(calls, calls.start_call(call_id, public_base))
        except CallRefused as e:
            await _refused(websocket, calls, e, "audio websocket")
            return
        if not await _accept_started(websocket, calls, call_id):
            return
    await _relay(websocket, calls, files, caller, record)


async def handle_web_call(websocket: connection.ServerConnection, calls: CallService, files: FileWriter) -> None:
    """A create-web-call's socket: ``/web-call/{access_token}/{call_id}`` or
    ``/web-call/{call_id}?access_token=...``, with ``encoding`` and ``sample_rate`` in the query
    to choose another format than the call's."""
    if _bad_handshake(websocket):
        return
    token, _, call_id = unquote(websocket.path[len(WEB_CALL_PREFIX) :]).rpartition("/")
    query = parse_qs(websocket.query)
    token = token or (query.get("access_token") or [""])[0]
    try:
        record = await _store_bound(calls, calls.check_web_call(call_id, token))
        client = _client_format(query, record)  # before the token is spent
        fields = {"audio_encoding": Encoding(client.encoding), "sample_rate": client.sample_rate}
        record = await _store_bound(calls, calls.start_call(call_id, calls.public_base(websocket.headers, websocket.base_url), **fields))
    except CallRefused as e:
        await _refused(websocket, calls, e, "web call socket")
        return
    if not await _accept_started(websocket, calls, call_id):
        return
    await _relay(websocket, calls, files, web_caller(client, True), record)


#: The rates a web-call client may ask for in its query (an odd rate costs a long filter design)
CLIENT_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)


def _client_format(query: dict[str, list[str]], record: CallRecord) -> AudioFormat:
    """The format a web-call client asked for in the query string (default: the call's)."""
    rate = (query.get("sample_rate") or [""])[0]
    encoding = (query.get("encoding") or [""])[0] or record.audio_encoding.value
    if rate and (not rate.isdigit() or int(rate) not in CLIENT_RATES):
        raise CallRefused(f"bad format in the query: sample_rate {rate[:12]!r} is not one of {CLIENT_RATES}", record.call_id)
    try:
        return AudioFormat(encoding, int(rate) if rate else record.sample_rate)
    except ValueError as e:
        raise CallRefused(f"bad format in the query: {e}", record.call_id) from None


async def _accept_started(websocket: connection.ServerConnection, calls: CallService, call_id: str) -> bool:
    """Accept a web client's upgrade for a call already started; a client gone meanwhile ends it."""
    try:
        websocket.accept()
    except connection.ConnectionClosed as e:
        await calls.end(call_id, Reason.user_hangup, f"the client left before its socket opened ({e})")
        return False
    if websocket.closed:
        await calls.end(call_id, Reason.user_hangup, "the client left before its socket opened")
        return False
    return True


class DatabaseDown(CallRefused):
    """A socket refused because the call database did not answer (closed with 1011)."""


async def _store_bound(calls: CallService, step):
    """Await ``step`` (a store operation a caller waits on: its socket is open) within
    ``twilio_request_timeout_s``. Raises ``CallRefused`` saying why when the database does not
    answer in time, or at all; the caller then hears the fallback."""
    limit = calls.settings.twilio_request_timeout_s
    try:
        async with asyncio.timeout(limit):
            return await step
    except TimeoutError:
        raise DatabaseDown(f"the call database did not answer within {limit:g} s") from None
    except STORE_UNAVAILABLE as e:
        raise DatabaseDown(f"the call database is unavailable: {type(e).__name__}") from None


async def _refused(websocket: connection.ServerConnection, calls: CallService, e: CallRefused, what: str, status: int = 0) -> None:
    """Say no to a socket: on the call's record if the call exists (within NOTE_WAIT_S: the
    peer never waits long for it), in the log, and to the peer (an HTTP ``status`` before the
    upgrade, else a close with the reason: 1008, or 1011 when the database failed us)."""
    log.warning("%s refused%s: %s", what, f" for call {e.call_id}" if e.call_id else "", e)
    if e.call_id and not isinstance(e, DatabaseDown):
        try:
            async with asyncio.timeout(NOTE_WAIT_S):
                await calls.note(e.call_id, f"{what} refused: {e}")
        except Exception:  # the database may be gone; the log has it
            log.exception("call %s: could not note the refusal", e.call_id)
    if status:
        websocket.refuse(status)
    else:
        accepted = websocket.accepted
        if not accepted:
            try:
                websocket.accept()
                accepted = True
            except connection.ConnectionClosed:
                pass
        if accepted:
            await websocket.close(INTERNAL_ERROR if isinstance(e, DatabaseDown) else POLICY_VIOLATION, str(e)[:120])


async def _read_start(websocket: connection.ServerConnection, timeout_s: float) -> tf.Start:
    """Twilio's ``connected`` and ``start``. Raises ``CallRefused``."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    text = await websocket.recv()
                except connection.ConnectionClosed:
                    raise CallRefused("closed before start") from None
                if type(text) is not str:
                    raise CallRefused("binary frame before start")
                try:
                    event = tf.parse(text)
                except tf.FrameError as e:
                    raise CallRefused(f"bad frame before start: {e}") from None
                if type(event) is tf.Connected:
                    continue
                if type(event) is not tf.Start:
                    raise CallRefused(f"expected start, got {type(event).__name__.lower()}")
                return event
    except TimeoutError:
        raise CallRefused(f"no start within {timeout_s:g} s") from None


async def _relay(caller_ws: connection.ServerConnection, calls: CallService, files: FileWriter, caller: CallerLeg, record: CallRecord) -> None:
    settings = calls.settings
    call_id = record.call_id
    CALL_ID.set(call_id)  # every log line of this task names the call
    agent_config = calls.agent(record)
    private = calls.is_private(record)
    loop = asyncio.get_running_loop()
    observer = None
    start = caller.start
    try:
        observer = _observe(calls, files, record, loop.time(), private, caller.format, caller.protocol is Protocol.twilio)
        if caller.protocol is Protocol.twilio:
            observer.event(observer.started, "stream_start", call_sid=start.call_sid, stream_sid=start.stream_sid)
        else:
            observer.event(observer.started, "web_client_start", encoding=caller.format.encoding, sample_rate=caller.format.sample_rate)
        twilio_agent = agent_config is not None and agent_config.protocol is AgentProtocol.twilio
        agent_protocol = Protocol.twilio if twilio_agent else Protocol.web  # (a hosted model: as a web agent)
        agent_in, agent_format = agent_config.formats if agent_config else (caller.format, caller.format)
        for agent_rate in {agent_in.sample_rate, agent_format.sample_rate} - {caller.format.sample_rate}:
            # a filter pair not designed yet takes up to a second of CPU (odd rates): designed off
            # the loop, then cached (every other call waits)
            await asyncio.to_thread(_design_filters, caller.format.sample_rate, agent_rate)
        session = CallSession(
            agent_protocol,
            agent_format,
            start.stream_sid,
            frame_ms=settings.media_frame_ms,
            mark_interval_ms=settings.mark_interval_ms,
            observer=observer,
            caller=caller.protocol,
            caller_format=caller.format,
            caller_updates=caller.updates,
            agent_in_format=agent_in,
        )
    except Exception as e:  # a bug setting the call up ends it on the record, never leaves it ongoing
        log.exception("call %s could not be set up", call_id)
        if observer is not None:
            observer.close()
        await caller_ws.close(1011, Reason.error_unknown.value)
        await calls.end(call_id, Reason.error_unknown, f"set-up failed: {type(e).__name__}: {e}")
        return
    if not private:  # live listening (a private call has no listeners: refused with 403)

        def on_listener(kind: str, **details) -> None:  # on the public log and in the metrics
            observer.event(loop.time(), kind, **details)
            calls.metrics.listener_events.labels(kind.removeprefix("listener_")).inc()
            calls.metrics.listeners.inc(1 if kind == "listener_joined" else -1)

        rate = caller.format.sample_rate
        observer.tap = calls.listen_taps[call_id] = ListenTap(
            call_id, rate, settings.listen_max_lag_s, lambda: int((loop.time() - observer.started) * rate), on_listener
        )  # fmt: skip
    agent = None
    relay: MediaRelay | None = None
    call_metrics = calls.metrics.call() if settings.metrics else None
    set_up_from = loop.time()

    def stop(reason: Reason, detail: str) -> None:  # stop-call through the API, a machine answered...
        session.end(reason, detail, now=True)
        if relay is not None:
            relay.finish()

    calls.attach(record, stop)
    caller_ws.on_shutdown = lambda: stop(Reason.error_unknown, SHUTDOWN_DETAIL)

    def send(actions) -> None:  # (the control's writes, once the relay runs)
        if relay is not None and actions:
            relay._send(actions)

    def finish() -> None:
        if relay is not None:
            relay.finish()

    control = CallControl(session, calls, record, agent_config, caller.public_base, caller.asks_after_stream, send, finish, loop)
    calls.attach_control(call_id, control.handle, control.transfer_event)
    try:
        if agent_config is None:
            session.end(Reason.error_llm_websocket_runtime, f"agent {record.agent_id} is not configured")
        elif agent_config.hosted:
            agent = await _open_hosted(session, calls, record, agent_config, settings)
        else:
            agent = await _open_agent(session, calls.agent_url(record), calls.agent_headers(record), settings)
            if agent is None:
                calls.metrics.agent_connect_failures.labels(record.agent_id).inc()
        if agent is not None and session.ending is None:
            calls.metrics.call_setup.observe(loop.time() - set_up_from)
            agent_leg = session.agent_format if session.protocol is Protocol.web else TWILIO_FORMAT
            observer.event(
                loop.time(), "agent_connected", protocol=agent_config.protocol.value, encoding=agent_leg.encoding,
                sample_rate=agent_leg.sample_rate, **({"sample_rate_in": agent_in.sample_rate} if agent_in != agent_leg else {}),
            )  # fmt: skip
            if session.protocol is Protocol.twilio:
                agent.send_text(tf.connected_frame())
                agent.send_text(tf.start_frame(start, drop_parameters=tf.BRIDGE_PARAMETERS, extra=calls.agent_context(record)))
            elif agent_config.send_call_details:
                agent.send_text(
                    wf.call_details_event(
                        calls.call_details(record), wf.audio_leg(caller.protocol.value, caller.format),
                        wf.audio_leg("web", agent_leg, agent_in),
                    )
                )  # fmt: skip
            if isinstance(agent, HostedLink):
                agent.control = control
                control.tell_model = agent.tell_model
            elif session.protocol is Protocol.web:
                control.tell_agent = lambda result, agent=agent: agent.send_text(c.result_event(result["action"], result["ok"], result["reason"]))
            limits = Limits(
                silence_ms=record.end_call_after_silence_ms or agent_config.end_call_after_silence_ms,
                max_duration_ms=agent_config.max_call_duration_ms,
            )
            relay = MediaRelay(caller_ws, agent, session, settings, limits, loop, call_metrics, call_id)
            relay.control = control
            control.running = True
            await relay.run()
    except Exception as e:  # a bug must end this call cleanly, never the process
        log.exception("call %s failed", call_id)
        session.end(Reason.error_unknown, f"{type(e).__name__}: {e}")
    finally:
        calls.detach(call_id)
        await _finish(caller_ws, agent, session, calls, files, record, caller.asks_after_stream, control)
        if call_metrics is not None:
            _flush(call_metrics, session, ended=True)


def _design_filters(a: int, b: int) -> None:
    plan(a, b), plan(b, a)


def _observe(
    calls: CallService, files: FileWriter, record: CallRecord, started: float, private: bool, caller_format: AudioFormat, timed: bool = True
):
    """The call's observer, with its recording and public log unless the call is private. Both
    files are opened on the writer thread; one that cannot be (a full disk, a read-only volume)
    costs that file only, never the call, and is found when the call ends
    (``CallObserver.unwritten``)."""
    recording = None
    if not private:
        recording = Recording(calls.recording_path(record.call_id), files.open, caller_format.sample_rate)
    log_path = None if private else calls.log_path(record.call_id)
    clock = MediaClock(caller_format.sample_rate) if timed else None  # (Twilio's timestamps; a web caller has none)
    observer = CallObserver(
        started=started, recording=recording, log_path=log_path, log_opener=files.open, private=private, caller_format=caller_format, clock=clock
    )  # fmt: skip
    return observer


async def _open_agent(session: CallSession, url: str, headers, settings) -> connection.WsConnection | None:
    try:
        async with asyncio.timeout(settings.agent_connect_timeout_s):
            return await connection.connect(url, headers=headers)
    except (OSError, TimeoutError, connection.HandshakeError, ValueError) as e:
        session.end(Reason.error_llm_websocket_open, f"cannot open {url.partition('?')[0]}: {type(e).__name__}: {e}")
        return None


async def _open_hosted(session: CallSession, calls: CallService, record: CallRecord, agent_config, settings) -> HostedLink | None:
    spec = agent_config.hosted
    outbound = record.direction is Direction.outbound
    translator = TRANSLATORS[spec.protocol](agent_config.hosted_setup(outbound, calls.dynamic_variables(record)))
    link = HostedLink(translator, session, calls, record, settings.agent_connect_timeout_s)
    try:
        await link.open()
    except (OSError, TimeoutError, connection.HandshakeError, ValueError, ProviderUnreachable) as e:
        url = agent_config.websocket_url(record.call_id, settings.internal_base).partition("?")[0]
        session.end(Reason.error_llm_websocket_open, f"cannot open {spec.name} at {url}: {type(e).__name__}: {e}")
        return None
    return link


@dataclass(frozen=True)
class Limits:
    silence_ms: int | None  # end_call_after_silence_ms: inactivity
    max_duration_ms: int  # max_duration_reached


class MediaRelay:
    """Moves frames between the two open sockets of one call through its ``CallSession``, on
    the sockets' callbacks, until the session has an ending. A timer (``tick``) keeps the
    watchdogs, limits and pings; another sends a partial frame or a burst's mark when the agent
    goes quiet (``CallSession.idle_timeout``)."""

    def __init__(
        self, caller: connection.WsConnection, agent: connection.WsConnection, session: CallSession, settings, limits: Limits, loop,
        call_metrics: CallMetrics | None = None, call_id: str | None = None,
    ):  # fmt: skip
        self.caller, self.agent, self.session = caller, agent, session
        self.control: CallControl | None = None
        self.call_id = call_id  # (the sockets' callbacks run outside the call's task: logs name it)
        self.metrics = call_metrics  # None: metrics are off
        self._sampled_in = self._sampled_out = 0
        self._next_flush = loop.time() + FLUSH_INTERVAL_S
        self.settings, self.limits, self.loop = settings, limits, loop
        self.agent_twilio = session.protocol is Protocol.twilio
        self.caller_name = "the web client" if session.web_caller else "Twilio"
        self.done = loop.create_future()
        self.last_from_caller = loop.time()
        self._idle_deadline: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_at = 0.0
        self._tick_timer: asyncio.TimerHandle | None = None
        self._next_ping = 0.0
        self._last_latency = 0.0
        self._tick_s = min(settings.keepalive_interval_s, settings.no_audio_timeout_s / 4, settings.limits_tick_s, settings.send_timeout_s / 2)

    async def run(self) -> None:
        self._next_ping = self.loop.time() + FIRST_PING_S  # (a short call has a round trip too)
        observer = self.session.observer
        if observer is not None:
            observer.reading(backlog=True)
        self.caller.listen(self._from_caller, self._caller_closed)  # (what queued during set-up, handed over now)
        if observer is not None:
            observer.reading(backlog=False)
        self.agent.listen(self._from_agent, self._agent_closed)
        # the first tick at a random point of the period: calls started together tick apart
        self._tick_timer = self.loop.call_later(random.uniform(0, self._tick_s), self._tick)
        try:
            await self.done
        finally:
            for timer in (self._tick_timer, self._idle_timer):
                if timer is not None:
                    timer.cancel()

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    # --- frames -------------------------------------------------------------------------------

    def _send(self, actions) -> None:
        caller, agent = [], []
        for target, message in actions:
            if target == TO_CALLER:
                caller.append(self.caller.frame_text(message) if type(message) is str else self.caller.frame_binary(message))
            elif target == TO_BRIDGE:  # the agent asks the bridge to control the call
                if self.control is not None:
                    self.control.from_agent(message)
            elif type(message) is str:
                agent.append(self.agent.frame_text(message))
            else:
                agent.append(self.agent.frame_binary(message))
        if caller:
            self.caller.send_many(caller)
        if agent:
            self.agent.send_many(agent)

    def _from_caller(self, message) -> None:
        session = self.session
        self.last_from_caller = now = self.loop.time()
        timed = None
        if self.metrics is not None:
            self._sampled_in += 1
            if self._sampled_in == DELAY_SAMPLE_EVERY:
                self._sampled_in, timed = 0, time.perf_counter()
        try:
            actions = session.from_caller(message, now)
            if actions:
                self._send(actions)
            if timed is not None:
                self.metrics.delay(True, time.perf_counter() - timed)
        except Exception as e:  # a bug ends this call (and says so), never the connection silently
            self._failed(e)
        if session.ending is not None:
            self.finish()

    def _from_agent(self, message) -> None:
        session = self.session
        now = self.loop.time()
        timed = None
        if self.metrics is not None:
            self._sampled_out += 1
            if self._sampled_out == DELAY_SAMPLE_EVERY:
                self._sampled_out, timed = 0, time.perf_counter()
        try:
            actions = session.from_agent(message, now)
            if actions:
                self._send(actions)
            if timed is not None:
                self.metrics.delay(False, time.perf_counter() - timed)
            if session.ending is None:
                wait = session.idle_timeout(now)
                if wait is None:
                    self._idle_deadline = None
                else:
                    self._idle_deadline = deadline = now + wait
                    if self._idle_timer is None or deadline < self._idle_at:
                        self._arm_idle(deadline)
        except Exception as e:
            self._failed(e)
        if session.ending is not None:
            self.finish()

    def _failed(self, error: Exception) -> None:
        log.exception("call %s: relay failed", self.call_id, extra={"call_id": self.call_id})
        self.session.end(Reason.error_unknown, f"{type(error).__name__}: {error}")

    def _arm_idle(self, deadline: float) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_at = deadline
        self._idle_timer = self.loop.call_at(deadline, self._idle)

    def _idle(self) -> None:
        """The agent has been quiet: re-arm if more audio moved the deadline, else flush."""
        self._idle_timer = None
        deadline = self._idle_deadline
        if deadline is None or self.session.ending is not None:
            return
        now = self.loop.time()
        if now < deadline:
            self._arm_idle(deadline)
            return
        try:
            self._send(self.session.agent_idle(now))
            wait = self.session.idle_timeout(now)
        except Exception as e:
            self._failed(e)
            self.finish()
            return
        self._idle_deadline = None if wait is None else now + wait
        if wait is not None:
            self._arm_idle(now + wait)

    def _caller_closed(self) -> None:
        t = self.caller
        if self.session.web_caller:
            self._web_client_closed(t)
        elif t.overflowed:
            self.session.end(Reason.error_twilio, f"Twilio stopped reading: over {connection.MAX_WRITE_BUFFER} bytes unread")
        elif t.protocol_error:
            self.session.end(
                Reason.error_frontend_corrupted_payload, f"Twilio broke the websocket protocol: {t.protocol_error}", PROTOCOL_ERROR
            )
        else:
            code = t.close_code if t.close_code is not None else 1006
            self.session.end(Reason.error_twilio, f"Twilio socket closed without stop (code {code})")
        self.finish()

    def _web_client_closed(self, c: connection.WsConnection) -> None:
        if c.overflowed:
            self.session.end(Reason.user_hangup, f"the web client stopped reading: over {connection.MAX_WRITE_BUFFER} bytes unread")
        elif c.protocol_error:
            self.session.end(
                Reason.error_frontend_corrupted_payload, f"the web client broke the websocket protocol: {c.protocol_error}", PROTOCOL_ERROR
            )
        elif c.close_code in CLIENT_FAULTS:
            self.session.end(Reason.error_frontend_corrupted_payload, f"the web client {CLIENT_FAULTS[c.close_code]} (close {c.close_code})")
        elif c.close_code is None:
            self.session.end(Reason.user_hangup, "the web client's socket was lost (no close frame)")
        else:
            self.session.end(Reason.user_hangup, f"the web client closed the socket ({c.close_code})")
        self.finish()

    def _agent_closed(self) -> None:
        a = self.agent
        if a.overflowed:
            self.session.end(Reason.error_llm_websocket_lost_connection, f"agent stopped reading: over {connection.MAX_WRITE_BUFFER} bytes unread")
        elif a.protocol_error:
            self.session.end(Reason.error_llm_websocket_corrupt_payload, f"agent broke the websocket protocol: {a.protocol_error}")
        elif a.close_code is None:
            self.session.end(Reason.error_llm_websocket_lost_connection, "agent socket lost (no close frame)")
        elif a.close_code in OK_CLOSE_CODES:
            self.session.end(Reason.agent_hangup, f"agent closed the socket ({a.close_code})")
        else:
            self.session.end(Reason.error_llm_websocket_runtime, f"agent closed with {a.close_code} {a.close_reason}".rstrip())
        self.finish()

    # --- the tick: watchdogs, limits, pings ---------------------------------------------------

    def _tick(self) -> None:
        self._tick_timer = None
        if self.session.ending is None:
            try:
                self._check(self.loop.time())
            except Exception as e:  # a bug ends this call, never the loop
                self._failed(e)
        if self.session.ending is not None:
            self.finish()
            return
        self._tick_timer = self.loop.call_later(self._tick_s, self._tick)

    def _check(self, now: float) -> None:
        session, settings, limits = self.session, self.settings, self.limits
        observer = session.observer
        send_timeout = settings.send_timeout_s
        if self.caller.stalled_for() > send_timeout:
            reason = Reason.user_hangup if session.web_caller else Reason.error_twilio
            session.end(reason, f"{self.caller_name} stopped reading for over {send_timeout:g} s")
            return
        if self.agent.stalled_for() > send_timeout:
            session.end(Reason.error_llm_websocket_lost_connection, f"agent stopped reading for over {send_timeout:g} s")
            return
        if self.agent.ping_outstanding_s > settings.agent_ping_timeout_s:
            session.end(Reason.error_llm_websocket_lost_connection, f"agent answered no ping for {settings.agent_ping_timeout_s:g} s")
            return
        if now - self.last_from_caller > settings.no_audio_timeout_s:
            session.end(Reason.error_no_audio_received, f"nothing from {self.caller_name} for {now - self.last_from_caller:.1f} s")
            return
        silent_ms = observer.silent_for(now) * 1000
        if limits.silence_ms and silent_ms >= limits.silence_ms:
            session.end(Reason.inactivity, f"the caller was silent for {silent_ms / 1000:.1f} s")
            return
        if (now - observer.started) * 1000 >= limits.max_duration_ms:
            session.end(Reason.max_duration_reached, f"the call reached {limits.max_duration_ms / 1000:g} s")
            return
        latency = self.agent.latency
        if self.agent_twilio and latency and latency != self._last_latency:
            self._last_latency = latency  # the websocket ping's round trip
            session.stats.rtt_ms.append(latency * 1000)
        if self.metrics is not None and now >= self._next_flush:
            self._next_flush = now + FLUSH_INTERVAL_S
            _flush(self.metrics, session)
        if now >= self._next_ping:
            self._next_ping = now + settings.keepalive_interval_s
            self.agent.ping()
            self._send(session.ping(now))


async def _finish(
    caller: connection.ServerConnection, agent, session: CallSession, calls: CallService, files: FileWriter, record: CallRecord,
    asks_after_stream: bool = False, control: CallControl | None = None,
) -> None:
    if control is not None and control.voicemail is not None and session.ending and session.ending.reason is Reason.agent_hangup:
        # (the agent hung up after leaving its voicemail message: the call reached a voicemail)
        session.ending = dataclasses.replace(session.ending, reason=Reason.voicemail_reached)
    ending = session.ending
    reason = ending.reason if ending else Reason.error_unknown
    stats = session.stats
    loop = asyncio.get_running_loop()
    # said before the caller's socket closes: Twilio's stream-ended callback (on any replica)
    # answers from it, and a stop-call waiting on another replica knows the call is ending here
    calls.ending(record.call_id, reason, ending.detail if ending else "", ending.next_twiml if ending else None)
    if ending is not None and ending.now and not (caller.closed or caller.close_code is not None):
        _send_to(caller, session.drop_agent_audio(loop.time()))  # a stop: what is queued is not heard
    if session.web_caller:
        session.update_played(loop.time())
    # a file the writer thread could not open (it tried at the set-up: known by now but for the
    # shortest calls), on the record and in the log before the end
    unavailable = await _note_unwritten(calls, record, session.observer, {})
    session.observer.event(
        loop.time(), "end", reason=reason.value, detail=ending.detail if ending else "",
        frames_from_caller=stats.inbound_frames, frames_to_caller=stats.outbound_frames,
        agent_audio_ms=round(stats.sent_ms), heard_ms=round(stats.played_ms), clears=stats.clears,
    )  # fmt: skip
    # The agent's close handshake runs beside the caller's side: an agent that stopped reading
    # (its close answer never comes; we drop it after 2 s) must not delay the caller's fallback.
    agent_closed = None
    if agent is not None:  # 1000 for a normal end, 1011 when something failed
        if reason is Reason.user_hangup:
            for _, message in session.agent_stop():  # a web caller left: Twilio's stop, for a twilio agent
                agent.send_text(message)
        agent_closed = asyncio.ensure_future(agent.close(code=1011 if reason.is_error else 1000, reason=reason.value))
    try:
        drained = ending is not None and ending.detail.startswith(DRAIN_DETAIL)
        played_out = reason is Reason.agent_hangup and not ending.now  # the agent's last words are heard
        if session.web_caller:
            if played_out:  # the web client plays what it got, then is closed
                await _web_play_out(caller, session)
            if drained:  # the drain's deadline: the client is told why, in the close frame
                await caller.close(GOING_AWAY, calls.settings.drain_message[:120])
        elif reason in HUNG_UP_BY_BRIDGE and record.twilio_call_sid:
            # let the caller hear the agent's last words (audio is sent ahead of playback)
            if played_out:
                await _play_out(caller, session)
            # Twilio then asks the bridge's stream-ended callback what to do (a hang-up, the drain
            # message); a stream of the user's own TwiML is hung up here, or Twilio would go on
            # to the TwiML after </Connect>, meant for failures ("Sorry, we could not connect")
            if not asks_after_stream:
                if ending.next_twiml:  # (a transfer's <Dial>, a voicemail's message: the call's new TwiML)
                    problem, action = await calls.twilio_rest.update_twiml(record.twilio_call_sid, record.twilio_account_sid, ending.next_twiml), "update"
                else:
                    problem, action = await calls.hang_up(record, say=calls.settings.drain_message if drained else None, note=False), "hang_up"
                if problem:
                    session.observer.event(loop.time(), "twilio_rest_failed", action=action, reason=problem)
        if asks_after_stream and reason is not Reason.user_hangup:  # (a caller that hung up asks nothing more)
            calls.expect_stream_ended(record.call_id)
        await caller.close(twilio_close_code(ending), reason.value)
    finally:
        tap = calls.listen_taps.pop(record.call_id, None)
        if tap is not None:
            tap.end(reason.value)
        if agent_closed is not None:
            await agent_closed
        session.observer.close()
        try:  # the recording is complete on disk before the record says the call ended
            await asyncio.wait_for(asyncio.wrap_future(files.barrier()), RECORDING_FLUSH_TIMEOUT_S)
        except TimeoutError:
            log.error("call %s: the recording's writes are still queued after %g s", record.call_id, RECORDING_FLUSH_TIMEOUT_S)
        unavailable.update(await _note_unwritten(calls, record, session.observer, unavailable))  # (a call too short to know before)
        measured = measured_fields(session.observer, session)
        measured.update(dict.fromkeys(unavailable))  # no URL for a file that was never written
        if control is not None:
            await control.close()
            measured.update(control.ended())
        if ending is not None and ending.next_twiml:  # (for a stream-ended question that reaches the record first)
            measured["next_twiml"] = ending.next_twiml
        await calls.end(record.call_id, reason, ending.detail if ending else "", measured)


async def _note_unwritten(calls: CallService, record: CallRecord, observer: CallObserver, known: dict[str, str]) -> dict[str, str]:
    """The call's files the writer thread could not open, beyond ``known``: {record field: why},
    each logged and noted on the record (a database that does not answer costs only the note)."""
    problems = {k: v for k, v in observer.unwritten().items() if k not in known}
    for problem in problems.values():
        log.error("call %s: %s", record.call_id, problem)
        try:
            async with asyncio.timeout(NOTE_WAIT_S):
                await calls.note(record.call_id, problem)
        except Exception:  # the database too: the ending still says the URL is gone
            log.exception("call %s: could not note it", record.call_id)
    return problems


def _send_to(caller: connection.ServerConnection, actions) -> None:
    """Write the caller's share of ``actions`` (the agent gets nothing more)."""
    frames = [caller.frame_text(m) if type(m) is str else caller.frame_binary(m) for target, m in actions if target == TO_CALLER]
    if frames:
        caller.send_many(frames)


def _flush(call_metrics: CallMetrics, session: CallSession, ended: bool = False) -> None:
    """The call's counts into the metrics (about once a second, and at its end)."""
    stats, observer = session.stats, session.observer
    turns = observer.turn_latencies_ms if observer is not None else []
    call_metrics.flush(stats.inbound_frames, stats.outbound_frames, stats.dropped_frames, stats.rtt_ms, turns)
    if observer is not None:
        call_metrics.flush_network(observer.agent_latencies_ms, observer.clock, ended)


#: Endings that are no failure, where the bridge hangs the phone call up through Twilio REST:
#: closing the stream alone makes Twilio run the TwiML after </Connect>, the fallback message
#: meant for failures ("Sorry, we could not connect your call")
HUNG_UP_BY_BRIDGE = (
    Reason.agent_hangup, Reason.machine_detected, Reason.voicemail_reached, Reason.inactivity, Reason.max_duration_reached,
    Reason.call_transfer,
)  # fmt: skip


def twilio_close_code(ending) -> int:
    """The close code for the caller's socket that says what happened: 1000 for a normal end,
    the code naming what was wrong with the caller's frames (1007, 1003, 1008, 1002), 1001 when
    the bridge shuts down, 1008 for a stream that went silent, 1011 when the bridge or the agent
    failed."""
    if ending is None:
        return INTERNAL_ERROR
    if ending.close_code is not None:
        return ending.close_code
    if not ending.reason.is_error:
        return NORMAL
    if ending.reason is Reason.error_unknown and ending.detail == SHUTDOWN_DETAIL:
        return GOING_AWAY
    if ending.reason is Reason.error_no_audio_received:
        return POLICY_VIOLATION
    return INTERNAL_ERROR
PLAY_OUT_MARK = "bridge-play-out"
MAX_PLAY_OUT_S = 60.0


async def _web_play_out(client: connection.ServerConnection, session: CallSession) -> None:
    """Wait until the web client has played the agent's last words (by the clock: it plays what
    it gets, in order), or it leaves."""
    wait_s = min(MAX_PLAY_OUT_S, session.unplayed_s(asyncio.get_running_loop().time()))
    if wait_s <= 0 or client.closed or client.close_code is not None:
        return
    left = asyncio.get_running_loop().create_future()

    def on_close() -> None:
        if not left.done():
            left.set_result(None)

    client.listen(lambda message: None, on_close)
    try:
        async with asyncio.timeout(wait_s):
            await left
    except TimeoutError:
        return


async def _play_out(twilio: connection.ServerConnection, session: CallSession) -> None:
    """Send what is left of the agent's audio and a last mark, and wait until Twilio echoes it
    (the caller heard everything), the caller hangs up, or the queued audio's time is up."""
    if twilio.closed or twilio.close_code is not None:
        return
    heard = asyncio.get_running_loop().create_future()

    def on_message(text) -> None:
        try:
            event = tf.parse(text) if type(text) is str else None
        except tf.FrameError:
            event = None
        if event is None or type(event) is tf.Stop or (type(event) is tf.Mark and event.name == PLAY_OUT_MARK):
            if not heard.done():
                heard.set_result(None)

    def on_close() -> None:
        if not heard.done():
            heard.set_result(None)

    twilio.listen(on_message, on_close)
    unplayed_s = max(0.0, session.stats.sent_ms - session.stats.played_ms) / 1000
    frames = [twilio.frame_text(message) for _, message in session.flush_agent_audio(asyncio.get_running_loop().time())]
    frames.append(twilio.frame_text(session.twilio.mark(PLAY_OUT_MARK)))
    twilio.send_many(frames)
    try:
        async with asyncio.timeout(min(MAX_PLAY_OUT_S, unplayed_s + 2.0)):
            await heard
    except TimeoutError:
        return
