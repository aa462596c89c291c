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

from audio import AudioFormat, Converter

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
    await websocket.accept()
    await _relay(websocket, calls, record, browser)


async def _relay(browser: WebSocket, calls: CallService, record: CallRecord, browser_format: AudioFormat) -> None:
    settings = calls.settings
    agent_format = AudioFormat(record.audio_encoding.value, record.sample_rate)
    to_agent, to_browser = Converter(browser_format, agent_format), Converter(agent_format, browser_format)
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
        url = agent_config.websocket_url(record.call_id, settings.internal_base)
        try:
            async with asyncio.timeout(settings.agent_connect_timeout_s):
                agent = await websockets.connect(
                    url, open_timeout=None, ping_interval=settings.keepalive_interval_s,
                    ping_timeout=settings.agent_ping_timeout_s, max_size=MAX_MESSAGE_BYTES, compression=None,
                )  # fmt: skip
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ValueError) as e:
            end(Reason.error_llm_websocket_open, f"cannot open {url}: {type(e).__name__}: {e}")
            return

        async def send_browser(send) -> None:
            try:
                async with asyncio.timeout(settings.send_timeout_s):
                    await send
            except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
                end(Reason.user_hangup, "the browser went away")

        async def from_browser() -> None:
            while not stopped.is_set():
                message = await browser.receive()
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
                    if audio:
                        try:
                            await agent.send(audio)
                        except ConnectionClosed:
                            return
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
                        await send_browser(browser.send_bytes(audio))
                elif event is wf.CLEAR:
                    to_browser.reset()
                    await send_browser(browser.send_text("clear"))
                elif event is wf.PING:
                    await agent.send("pong")
                elif type(event) in (wf.Update, wf.Metadata):
                    if type(event) is wf.Update:
                        transcript[:] = event.transcript
                    await send_browser(browser.send_text(message))

        tasks = [asyncio.create_task(c) for c in (from_browser(), from_agent(), stopped.wait())]
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
