"""The media websocket: Twilio on one side, the agent's audio websocket on the other.

A thin asyncio layer: it checks the stream (signature, registered call, single-use token), opens
the agent socket, then moves frames between the two sockets through ``CallSession`` until either
side ends, and records how the call ended. Every send has a deadline, so a half-dead socket ends
its own call and never stalls another.

How a call ends (``disconnection_reason``):

=====================================  ==================================================
Twilio sends ``stop``                  ``user_hangup``; agent socket closed with 1000
agent closes with 1000 / 1001          ``agent_hangup``; call hung up through Twilio REST,
                                       then the Twilio socket is closed
agent socket cannot open               ``error_llm_websocket_open``; caller hears the fallback
agent socket lost (no close frame,     ``error_llm_websocket_lost_connection``; fallback
or a send to it times out)
agent closes with another code         ``error_llm_websocket_runtime``; fallback
(e.g. 1011), or is not configured
agent sends garbage                    ``error_llm_websocket_corrupt_payload``; fallback
Twilio sends garbage (bad JSON, bad    ``error_frontend_corrupted_payload``
base64, binary frames)
Twilio socket lost without ``stop``,   ``error_twilio``
or a send to Twilio times out
nothing from Twilio for                ``error_no_audio_received``
``no_audio_timeout_s`` (10 s)
=====================================  ==================================================

"Fallback" = the bridge closes the Twilio socket and Twilio plays the TwiML after </Connect>.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import websockets
from starlette.websockets import WebSocketDisconnect

from .asgi_socket import AsgiWebSocket as WebSocket
from twilio.request_validator import RequestValidator
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidHandshake, InvalidURI

from audio import AudioFormat

from . import twilio_frames as tf
from .models import DisconnectionReason as Reason
from .models import Protocol
from .observer import CallObserver, Recording
from .session import TO_TWILIO, CallSession
from .tokens import TokenError

if TYPE_CHECKING:
    from .app import Services

log = logging.getLogger(__name__)

TOKEN_PARAMETER = "token"
CALL_PARAMETER = "call_id"


class StreamRejected(Exception):
    """The stream is not accepted (closed with 1008); ``call_id`` if one was named."""

    def __init__(self, reason: str, call_id: str | None = None):
        super().__init__(reason)
        self.call_id = call_id


def media_url(services: Services, websocket: WebSocket) -> str:
    """The URL Twilio signed for the media websocket (wss, no query)."""
    base = services.public_base(websocket.headers, str(websocket.base_url))
    return base.replace("http", "ws", 1) + websocket.url.path


async def handle_media_stream(websocket: WebSocket, services: Services) -> None:
    settings = services.settings
    signature = websocket.headers.get("x-twilio-signature")
    validator = RequestValidator(settings.twilio_auth_token or "")
    if not signature or not validator.validate(media_url(services, websocket), {}, signature):
        log.warning("media websocket refused: %s X-Twilio-Signature", "bad" if signature else "no")
        await websocket.close(code=1008)  # before accept: the upgrade is refused (HTTP 403)
        return
    try:
        await websocket.accept()
    except (WebSocketDisconnect, OSError):  # gone before the upgrade completed
        return
    public_base = services.public_base(websocket.headers, str(websocket.base_url))
    try:
        start, record = await _accept_stream(websocket, services, public_base)
    except StreamRejected as e:
        log.warning("media stream rejected: %s", e)
        if e.call_id:
            await services.note(e.call_id, f"stream rejected: {e}")
        await _close(websocket, 1008, str(e)[:120])
        return
    await _relay(websocket, services, start, record)


def is_private(record, agent_config) -> bool:
    """opt_out_sensitive_data_storage, on the call or its agent."""
    return bool(record.opt_out_sensitive_data_storage or (agent_config and agent_config.opt_out_sensitive_data_storage))


async def _accept_stream(websocket: WebSocket, services: Services, public_base: str):
    """Read ``connected`` and ``start``; check the call and its single-use token."""
    try:
        event = await _read_start(websocket, services.settings.stream_start_timeout_s)
    except TimeoutError:
        raise StreamRejected(f"no start within {services.settings.stream_start_timeout_s:g} s") from None
    return await _check_start(event, event.custom_parameters.get(CALL_PARAMETER), services, public_base)


async def _read_start(websocket: WebSocket, timeout_s: float) -> tf.Start:
    async with asyncio.timeout(timeout_s):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                raise StreamRejected("closed before start")
            text = message.get("text")
            if text is None:
                raise StreamRejected("binary frame before start")
            try:
                event = tf.parse(text)
            except tf.FrameError as e:
                raise StreamRejected(f"bad frame before start: {e}") from None
            if type(event) is tf.Connected:
                continue
            if type(event) is not tf.Start:
                raise StreamRejected(f"expected start, got {type(event).__name__.lower()}")
            return event


async def _check_start(event: tf.Start, call_id: str | None, services: Services, public_base: str):
    if not call_id:
        raise StreamRejected("start without a call_id parameter")
    record = await services.store.get(call_id)
    if record is None:
        raise StreamRejected("unknown call", None)
    try:
        services.tokens.check(call_id, event.custom_parameters.get(TOKEN_PARAMETER))
    except TokenError as e:
        raise StreamRejected(str(e), call_id) from None
    files = {}
    if not is_private(record, services.settings.agents.get(record.agent_id)):
        files = {
            "recording_url": f"{public_base}/v2/recordings/{call_id}.wav",
            "public_log_url": f"{public_base}/v2/public-logs/{call_id}.jsonl",
        }
    started = await services.store.start(  # one write: ongoing, Twilio's ids, where the files will be
        call_id,
        twilio_call_sid=record.twilio_call_sid or event.call_sid,
        twilio_account_sid=record.twilio_account_sid or event.account_sid,
        **files,
    )
    if started is None:
        raise StreamRejected(f"stream token already used (call is {record.call_status.value})", call_id)
    return event, started


async def _relay(twilio: WebSocket, services: Services, start: tf.Start, record) -> None:
    settings = services.settings
    call_id = record.call_id
    agent_config = settings.agents.get(record.agent_id)
    private = is_private(record, agent_config)
    started = asyncio.get_running_loop().time()
    try:
        observer = CallObserver(
            started=started,
            recording=None if private else Recording(services.recording_path(call_id)),
            log_path=None if private else services.log_path(call_id),
            private=private,
        )
    except OSError as e:  # a full disk must not cost the call: go on without recording or log
        log.error("call %s: no recording or log: %s", call_id, e)
        observer = CallObserver(started=started, private=private)
    observer.event(observer.started, "stream_start", call_sid=start.call_sid, stream_sid=start.stream_sid)
    session = CallSession(
        record.audio_websocket_protocol,
        AudioFormat(record.audio_encoding.value, record.sample_rate),
        start.stream_sid,
        frame_ms=settings.media_frame_ms,
        mark_interval_ms=settings.mark_interval_ms,
        observer=observer,
    )
    agent = None
    stopped = asyncio.Event()

    def stop(reason: Reason, detail: str) -> None:  # stop-call through the API, a machine answered...
        session.end(reason, detail)
        stopped.set()

    services.live_calls[call_id] = stop
    try:
        if agent_config is None:
            session.end(Reason.error_llm_websocket_runtime, f"agent {record.agent_id} is not configured")
        else:
            agent = await _open_agent(session, agent_config.websocket_url(call_id, settings.internal_base), settings)
        if agent is not None:
            observer.event(asyncio.get_running_loop().time(), "agent_connected", protocol=session.protocol.value)
            if session.protocol is Protocol.twilio:
                await agent.send(tf.connected_frame())
                await agent.send(tf.start_frame(start, drop_parameters=(TOKEN_PARAMETER,)))
            limits = Limits(
                silence_ms=record.end_call_after_silence_ms or agent_config.end_call_after_silence_ms,
                max_duration_ms=agent_config.max_call_duration_ms,
            )
            await _pump_until_end(twilio, agent, session, settings, stopped, limits)
    except Exception as e:  # a bug must end this call cleanly, never the process
        log.exception("call %s failed", call_id)
        session.end(Reason.error_unknown, f"{type(e).__name__}: {e}")
    finally:
        services.live_calls.pop(call_id, None)
        await _finish(twilio, agent, session, services, record)


async def _open_agent(session: CallSession, url: str, settings):
    try:
        async with asyncio.timeout(settings.agent_connect_timeout_s):
            return await websockets.connect(
                url,
                open_timeout=None,
                ping_interval=settings.keepalive_interval_s,
                ping_timeout=settings.agent_ping_timeout_s,
                max_size=2**22,
                compression=None,
            )
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ValueError) as e:
        session.end(Reason.error_llm_websocket_open, f"cannot open {url}: {type(e).__name__}: {e}")
        return None


@dataclass(frozen=True)
class Limits:
    silence_ms: int | None  # end_call_after_silence_ms: inactivity
    max_duration_ms: int  # max_duration_reached


async def _pump_until_end(
    twilio: WebSocket, agent, session: CallSession, settings, stopped: asyncio.Event, limits: Limits
) -> None:
    send_timeout = settings.send_timeout_s
    # sends that have not finished: (started, side). The tick ends the call when one is older
    # than send_timeout_s; a per-send asyncio.timeout cost ~10 % of the CPU under load
    sending: dict[int, tuple[float, str]] = {}

    async def send(actions) -> None:
        key = id(asyncio.current_task())
        for target, message in actions:
            if target == TO_TWILIO:
                sending[key] = (loop.time(), "twilio")
                try:
                    await twilio.send_text(message)
                except (WebSocketDisconnect, RuntimeError, OSError) as e:
                    session.end(Reason.error_twilio, f"send to Twilio failed: {type(e).__name__}")
                    return
                finally:
                    sending.pop(key, None)
            else:
                sending[key] = (loop.time(), "agent")
                try:
                    await agent.send(message)
                except (ConnectionClosed, OSError):
                    # the receiving side says how the agent's socket ended (its close frame, or
                    # none: lost); a write failing first on a closed socket must not decide it.
                    # A socket dead without a close is caught by the ping timeout.
                    return
                finally:
                    sending.pop(key, None)

    loop = asyncio.get_running_loop()
    last_from_twilio = loop.time()

    async def from_twilio() -> None:
        nonlocal last_from_twilio
        while session.ending is None:
            message = await twilio.receive()
            last_from_twilio = now = loop.time()
            if message["type"] == "websocket.disconnect":
                session.end(Reason.error_twilio, f"Twilio socket closed without stop (code {message.get('code')})")
                return
            text = message.get("text")
            if text is None:
                session.end(Reason.error_frontend_corrupted_payload, "binary frame from Twilio")
                return
            await send(session.from_twilio(text, now))

    async def from_agent() -> None:
        while session.ending is None:
            wait = session.idle_timeout(loop.time())
            try:
                if wait is None:
                    message = await agent.recv()
                else:  # a partial frame or an unmarked burst waits for more audio this long
                    async with asyncio.timeout(wait):
                        message = await agent.recv()
            except TimeoutError:
                await send(session.agent_idle(loop.time()))
                continue
            except ConnectionClosedOK:
                session.end(Reason.agent_hangup, f"agent closed the socket ({agent.close_code})")
                return
            except ConnectionClosed as e:
                if e.rcvd is None:  # no close frame: the connection died
                    session.end(Reason.error_llm_websocket_lost_connection, f"agent socket lost: {e}")
                else:
                    session.end(Reason.error_llm_websocket_runtime, f"agent closed with {e.rcvd.code} {e.rcvd.reason}")
                return
            await send(session.from_agent(message, loop.time()))

    async def keepalive() -> None:
        """Web-protocol ping to the agent (and the websocket ping's round trip on the twilio
        protocol), the call's limits, and the watchdog on Twilio's side: a stream that stops
        sending (a half-dead socket) ends the call instead of hanging it."""
        observer = session.observer
        tick = min(settings.keepalive_interval_s, settings.no_audio_timeout_s / 4, settings.limits_tick_s, send_timeout / 2)
        next_ping = loop.time() + settings.keepalive_interval_s
        last_latency = 0.0
        while session.ending is None:
            await asyncio.sleep(tick)
            now = loop.time()
            for started, side in list(sending.values()):
                if now - started > send_timeout:
                    if side == "twilio":
                        session.end(Reason.error_twilio, "send to Twilio failed: TimeoutError")
                    else:
                        session.end(Reason.error_llm_websocket_lost_connection, "send to agent failed: TimeoutError")
                    return
            if now - last_from_twilio > settings.no_audio_timeout_s:
                session.end(Reason.error_no_audio_received, f"nothing from Twilio for {now - last_from_twilio:.1f} s")
                return
            silent_ms = observer.silent_for(now) * 1000
            if limits.silence_ms and silent_ms >= limits.silence_ms:
                session.end(Reason.inactivity, f"the caller was silent for {silent_ms / 1000:.1f} s")
                return
            if (now - observer.started) * 1000 >= limits.max_duration_ms:
                session.end(Reason.max_duration_reached, f"the call reached {limits.max_duration_ms / 1000:g} s")
                return
            if session.protocol is Protocol.twilio and agent.latency and agent.latency != last_latency:
                last_latency = agent.latency  # the round trip of websockets' own keepalive ping
                session.stats.rtt_ms.append(last_latency * 1000)
            if now >= next_ping:
                next_ping = now + settings.keepalive_interval_s
                await send(session.ping(now))

    tasks = [asyncio.create_task(coro) for coro in (from_twilio(), from_agent(), keepalive(), stopped.wait())]
    try:
        while session.ending is None:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
            if session.ending is None and all(t.done() for t in tasks):
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _finish(twilio: WebSocket, agent, session: CallSession, services: Services, record) -> None:
    ending = session.ending
    reason = ending.reason if ending else Reason.error_unknown
    stats = session.stats
    session.observer.event(
        asyncio.get_running_loop().time(), "end", reason=reason.value, detail=ending.detail if ending else "",
        frames_from_caller=stats.inbound_frames, frames_to_caller=stats.outbound_frames,
        agent_audio_ms=round(stats.sent_ms), heard_ms=round(stats.played_ms), clears=stats.clears,
    )  # fmt: skip
    try:
        if agent is not None:
            try:
                async with asyncio.timeout(2):  # 1000 for a normal end, 1011 when something failed
                    await agent.close(code=1011 if reason.is_error else 1000, reason=reason.value)
            except (TimeoutError, ConnectionClosed, OSError):
                pass
        if reason in HUNG_UP_BY_BRIDGE and record.twilio_call_sid:
            # let the caller hear the agent's last words (audio is sent ahead of playback), then
            # hang up: closing the stream alone would make Twilio play the fallback after </Connect>
            if reason is Reason.agent_hangup:
                await _play_out(twilio, session)
            await services.twilio_rest.hangup(record.twilio_call_sid, record.twilio_account_sid)
        await _close(twilio, 1011 if reason.is_error else 1000, reason.value)
    finally:
        await services.end_call(record.call_id, reason, ending.detail if ending else "", session)


#: Endings where the bridge hangs the phone call up through Twilio REST (no fallback TwiML)
HUNG_UP_BY_BRIDGE = (Reason.agent_hangup, Reason.machine_detected, Reason.voicemail_reached)
PLAY_OUT_MARK = "bridge-play-out"
MAX_PLAY_OUT_S = 60.0


async def _play_out(twilio: WebSocket, session: CallSession) -> None:
    """Send what is left of the agent's audio and a last mark, and wait until Twilio echoes it
    (the caller heard everything), the caller hangs up, or the queued audio's time is up."""
    unplayed_s = max(0.0, session.stats.sent_ms - session.stats.played_ms) / 1000
    try:
        async with asyncio.timeout(min(MAX_PLAY_OUT_S, unplayed_s + 2.0)):
            for _, message in session.flush_agent_audio(asyncio.get_running_loop().time()):
                await twilio.send_text(message)
            await twilio.send_text(session.twilio.mark(PLAY_OUT_MARK))
            while True:
                message = await twilio.receive()
                text = message.get("text")
                if message["type"] == "websocket.disconnect" or text is None:
                    return
                try:
                    event = tf.parse(text)
                except tf.FrameError:
                    return
                if type(event) is tf.Stop or (type(event) is tf.Mark and event.name == PLAY_OUT_MARK):
                    return
    except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
        return


async def _close(websocket: WebSocket, code: int, reason: str = "") -> None:
    if websocket.closed:
        return
    try:
        async with asyncio.timeout(2):
            await websocket.close(code=code, reason=reason)
    except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
        pass
