"""The web-call socket: ``/web-call/{call_id}?access_token=...[&encoding=s16le&sample_rate=24000]``,
where a browser (or any client) speaks the ``web`` protocol (docs/protocol.md) in the format it
names (default: the agent's), and is relayed to the agent like a phone call: audio converted
both ways, ``clear``, ``update`` and ``metadata`` passed on to the browser, ``ping``/``pong``.
The call and its single-use access token come from create-web-call (``bridge.api.web_calls``).

Endings: the browser closes -> ``user_hangup``; the agent closes with 1000 -> ``agent_hangup``
(the browser socket is closed with 1000); agent failures -> the ``error_llm_websocket_*``
reasons (the browser socket is closed with 1011); browser garbage ->
``error_frontend_corrupted_payload``; a token never used in time -> ``error_user_not_joined``.
"""

from __future__ import annotations

import asyncio
import logging

import websockets
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidHandshake, InvalidURI

from audio import AudioFormat, Converter, VoiceActivityDetector, ulaw_to_pcm

from ..calls import CallRefused, CallService
from ..models import CallRecord
from ..models import DisconnectionReason as Reason
from ..protocol import web as wf
from ..protocol.websocket import (
    INVALID_PAYLOAD, MAX_MESSAGE_BYTES, MESSAGE_TOO_BIG, PROTOCOL_ERROR, UNSUPPORTED_DATA,
)  # fmt: skip
from .observer import transcript_fields

log = logging.getLogger(__name__)

WEB_CALL_PATH = "/web-call/{call_id}"
VAD_BATCH_MS = 200  # silence is a limit of 10 s or more: a fifth of a second of resolution is plenty
#: Close codes of a browser socket that ended because of what the browser sent (the server
#: closes with these when the browser breaks RFC 6455; a browser may send them too)
BROWSER_FAULTS = {
    PROTOCOL_ERROR: "broke the websocket protocol",
    UNSUPPORTED_DATA: "sent data the web protocol does not carry",
    INVALID_PAYLOAD: "sent text that is not valid UTF-8",
    MESSAGE_TOO_BIG: f"sent a message over {MAX_MESSAGE_BYTES} bytes",
}


def _browser_format(websocket: WebSocket, record: CallRecord) -> AudioFormat:
    """The format the browser asked for in the query string (default: the agent's)."""
    query = websocket.query_params
    rate = query.get("sample_rate") or ""
    if rate and not rate.isdigit():
        raise ValueError(f"sample_rate {rate[:20]!r} is not a number")
    return AudioFormat(query.get("encoding") or record.audio_encoding.value, int(rate) if rate else record.sample_rate)


async def handle_web_call(websocket: WebSocket, calls: CallService) -> None:
    call_id = websocket.path_params["call_id"]
    try:
        record = await calls.check_web_call(call_id, websocket.query_params.get("access_token"))
        browser = _browser_format(websocket, record)  # before the token is spent
        record = await calls.start_web_call(call_id)
    except (CallRefused, ValueError) as e:
        log.warning("web call %s refused: %s", call_id, e)
        if isinstance(e, ValueError) or e.call_id:  # the call exists: its record says why
            await calls.note(call_id, f"web call socket refused: {e}")
        await websocket.close(code=1008)
        return
    try:
        await websocket.accept()
    except Exception as e:  # the browser left while its token was being checked: the call is ongoing
        await calls.end(call_id, Reason.user_hangup, f"the browser left before its socket opened ({type(e).__name__})")
        return
    await _relay(websocket, calls, record, browser)


class Activity:
    """Who spoke when, on the bridge's clock (s): the browser's voice (VAD on what it sends) and
    the agent's audio as it plays in the browser. For the silence limit (``inactivity``)."""

    def __init__(self, browser_format: AudioFormat, started: float):
        self.format = browser_format
        self.vad = VoiceActivityDetector(browser_format.sample_rate)
        self.last_voice = started  # the caller's last voiced moment (or the start)
        self.agent_until = started  # when the agent audio sent so far ends playing
        # the browser's audio is analysed in batches of VAD_BATCH_MS, as the phone observer does
        whole = int(browser_format.bytes_per_ms() * VAD_BATCH_MS)
        self._batch_bytes = whole - whole % (1 if browser_format.encoding == "mulaw" else 2)
        self._unheard = bytearray()

    def heard(self, data: bytes, now: float) -> None:
        self._unheard += data
        if len(self._unheard) >= self._batch_bytes:
            batch = bytes(self._unheard)
            self._unheard.clear()
            self.vad.process(ulaw_to_pcm(batch) if self.format.encoding == "mulaw" else batch)
        if self.vad.speaking:
            self.last_voice = now

    def played(self, audio: bytes, now: float) -> None:
        self.agent_until = max(self.agent_until, now) + self.format.duration_ms(len(audio)) / 1000

    def cleared(self, now: float) -> None:
        self.agent_until = now

    def silent_for(self, now: float) -> float:
        if self.vad.speaking or now < self.agent_until:
            return 0.0
        return now - max(self.last_voice, self.agent_until)


async def _relay(browser: WebSocket, calls: CallService, record: CallRecord, browser_format: AudioFormat) -> None:
    settings = calls.settings
    agent_format = AudioFormat(record.audio_encoding.value, record.sample_rate)
    to_agent, to_browser = Converter(browser_format, agent_format), Converter(agent_format, browser_format)
    loop = asyncio.get_running_loop()
    started = last_from_browser = loop.time()
    activity = Activity(browser_format, started)
    ending: list[tuple[Reason, str]] = []
    transcript: list[dict] = []
    stopped = asyncio.Event()

    def end(reason: Reason, detail: str = "") -> None:
        if not ending:
            ending.append((reason, detail))
        stopped.set()

    calls.attach(record.call_id, end)
    agent = None
    agent_config = calls.agent(record)
    try:
        if agent_config is None:
            end(Reason.error_llm_websocket_runtime, f"agent {record.agent_id} is not configured")
            return
        url = calls.agent_url(record)
        try:
            async with asyncio.timeout(settings.agent_connect_timeout_s):
                agent = await websockets.connect(
                    url, additional_headers=calls.agent_headers(record), open_timeout=None, ping_interval=settings.keepalive_interval_s,
                    ping_timeout=settings.agent_ping_timeout_s, max_size=MAX_MESSAGE_BYTES, compression=None,
                )  # fmt: skip
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ValueError) as e:
            end(Reason.error_llm_websocket_open, f"cannot open {url.partition('?')[0]}: {type(e).__name__}: {e}")
            return
        if agent_config.send_call_details:
            await agent.send(wf.call_details_event(calls.call_details(record)))

        async def send_browser(send) -> None:
            try:
                async with asyncio.timeout(settings.send_timeout_s):
                    await send
            except TimeoutError:
                end(Reason.user_hangup, f"the browser stopped reading for over {settings.send_timeout_s:g} s")
            except (WebSocketDisconnect, RuntimeError, OSError):
                end(Reason.user_hangup, "the browser went away")

        async def send_agent(message) -> None:
            try:
                async with asyncio.timeout(settings.send_timeout_s):
                    await agent.send(message)
            except TimeoutError:
                end(Reason.error_llm_websocket_lost_connection, f"agent stopped reading for over {settings.send_timeout_s:g} s")
            except ConnectionClosed:
                pass  # from_agent records how it closed

        async def from_browser() -> None:
            nonlocal last_from_browser
            while not stopped.is_set():
                message = await browser.receive()
                last_from_browser = loop.time()
                if message["type"] == "websocket.disconnect":
                    code = message.get("code")
                    if code in BROWSER_FAULTS:
                        end(Reason.error_frontend_corrupted_payload, f"the browser {BROWSER_FAULTS[code]} (close {code})")
                    else:
                        end(Reason.user_hangup, f"the browser closed ({code})")
                    return
                data, text = message.get("bytes"), message.get("text")
                if data is not None:
                    try:
                        audio = to_agent.process(data)
                    except ValueError as e:
                        end(Reason.error_frontend_corrupted_payload, str(e))
                        return
                    activity.heard(data, last_from_browser)
                    if audio:
                        await send_agent(audio)
                elif text.strip() == "ping":
                    await send_browser(browser.send_text("pong"))
                elif text.strip() != "pong":
                    end(Reason.error_frontend_corrupted_payload, f"unexpected text from the browser: {text[:60]!r}")
                    return

        async def from_agent() -> None:
            while not stopped.is_set():
                try:
                    message = await agent.recv()
                except ConnectionClosedOK:
                    end(Reason.agent_hangup, f"agent closed the socket ({agent.close_code})")
                    return
                except ConnectionClosed as e:
                    reason = Reason.error_llm_websocket_lost_connection if e.rcvd is None else Reason.error_llm_websocket_runtime
                    end(reason, f"agent socket: {e}")
                    return
                try:
                    event = wf.parse(message)
                except ValueError as e:
                    end(Reason.error_llm_websocket_corrupt_payload, f"from agent: {e}")
                    return
                if type(event) is wf.Audio:
                    audio = to_browser.process(event.data) if event.data else b""
                    if audio:
                        activity.played(audio, loop.time())
                        await send_browser(browser.send_bytes(audio))
                elif event is wf.CLEAR:
                    to_browser.reset()
                    activity.cleared(loop.time())
                    await send_browser(browser.send_text("clear"))
                elif event is wf.PING:
                    await send_agent("pong")
                elif type(event) in (wf.Update, wf.Metadata):
                    if type(event) is wf.Update:
                        transcript[:] = event.transcript
                    await send_browser(browser.send_text(message))

        silence_ms = record.end_call_after_silence_ms or agent_config.end_call_after_silence_ms
        max_duration_ms = agent_config.max_call_duration_ms
        tick_s = min(settings.limits_tick_s, settings.no_audio_timeout_s / 4)

        async def watchdog() -> None:
            """The phone call's limits, on a web call: duration, silence, no audio."""
            while not stopped.is_set():
                await asyncio.sleep(tick_s)
                now = loop.time()
                if now - last_from_browser > settings.no_audio_timeout_s:
                    end(Reason.error_no_audio_received, f"nothing from the browser for {now - last_from_browser:.1f} s")
                elif silence_ms and (silent_s := activity.silent_for(now)) * 1000 >= silence_ms:
                    end(Reason.inactivity, f"the caller was silent for {silent_s:.1f} s")
                elif (now - started) * 1000 >= max_duration_ms:
                    end(Reason.max_duration_reached, f"the call reached {max_duration_ms / 1000:g} s")

        tasks = [asyncio.create_task(c) for c in (from_browser(), from_agent(), watchdog(), stopped.wait())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    except Exception as e:  # a bug ends this call cleanly, never the process
        log.exception("web call %s failed", record.call_id)
        end(Reason.error_unknown, f"{type(e).__name__}: {e}")
    finally:
        calls.detach(record.call_id)
        reason, detail = ending[0] if ending else (Reason.error_unknown, "")
        code = 1011 if reason.is_error else 1000
        if agent is not None:
            try:
                async with asyncio.timeout(2):
                    await agent.close(code=code, reason=reason.value)
            except (TimeoutError, ConnectionClosed, OSError):
                pass
        try:
            async with asyncio.timeout(2):
                await browser.close(code=code, reason=reason.value)
        except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
            pass
        measured = {} if calls.is_private(record) else transcript_fields(
            [{"role": u["role"], "content": u["content"]} for u in transcript]
        )
        await calls.end(record.call_id, reason, detail, measured)
