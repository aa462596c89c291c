"""Web calls: ``POST /v2/create-web-call`` / ``/v3/create-web-call`` register a call and return a
single-use ``access_token`` that expires after ``web_call_token_ttl_s``; the token opens

    ws(s)://BRIDGE/web-call/{call_id}?access_token=...[&encoding=s16le&sample_rate=24000]

where a browser (or any client) speaks the ``web`` protocol (docs/protocol.md) in the format it
names (default: the agent's), and is relayed to the agent like a phone call: audio converted
both ways, ``clear``, ``update`` and ``metadata`` passed on to the browser, ``ping``/``pong``.

Endings: the browser closes -> ``user_hangup``; the agent closes with 1000 -> ``agent_hangup``
(the browser socket is closed with 1000); agent failures -> the ``error_llm_websocket_*``
reasons (the browser socket is closed with 1011); browser garbage ->
``error_frontend_corrupted_payload``; a token never used in time -> ``error_user_not_joined``.
"""

from __future__ import annotations

import asyncio
import logging

import websockets
from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidHandshake, InvalidURI

from audio import AudioFormat, Converter

from . import web_frames as wf
from .api import AUTH, ERRORS, CallObject, _Body, _agent, services
from .models import CallRecord, CallType, DisconnectionReason as Reason
from .registrar import call_fields, new_call_id
from .tokens import TokenError

log = logging.getLogger(__name__)
router = APIRouter(tags=["calls"])


class CreateWebCall(_Body):
    agent_id: str


async def _create(request: Request, body: CreateWebCall) -> tuple[CallRecord, str, int]:
    agent = _agent(request, body.agent_id)
    svc = services(request)
    record = CallRecord(
        call_id=new_call_id(),
        call_type=CallType.web_call,
        metadata=body.metadata,
        retell_llm_dynamic_variables=body.retell_llm_dynamic_variables,
        **call_fields(agent),
    )
    token = svc.web_tokens.issue(record.call_id)
    record.access_token = token
    await svc.store.create(record)
    expires_at = int(token.split(".", 1)[0])
    return record, token, expires_at


class WebCallV3(CallObject):  # type: ignore[valid-type, misc]
    expires_at: int
    ice_servers: list[dict]
    transport: str = "gateway"


@router.post(
    "/v2/create-web-call", dependencies=AUTH, status_code=201, summary="Create a web call", response_model=CallObject,
    responses=ERRORS,
)  # fmt: skip
async def create_web_call_v2(request: Request, body: CreateWebCall) -> JSONResponse:
    record, _, _ = await _create(request, body)
    return JSONResponse(record.public(), status_code=201)


@router.post(
    "/v3/create-web-call", dependencies=AUTH, status_code=201, summary="Create a web call (v3)", response_model=WebCallV3,
    responses=ERRORS,
)  # fmt: skip
async def create_web_call_v3(request: Request, body: CreateWebCall) -> JSONResponse:
    """The v3 answer the retell-sdk expects. ``transport`` is always ``gateway``: the bridge's
    ``/web-call/{call_id}`` websocket; there are no ICE servers (no WebRTC)."""
    record, token, expires_at = await _create(request, body)
    body = {**record.public(), "expires_at": expires_at, "ice_servers": [], "transport": "gateway"}
    return JSONResponse(body, status_code=201)


@router.websocket("/web-call/{call_id}")
async def web_call_socket(websocket: WebSocket, call_id: str, access_token: str = "", encoding: str = "", sample_rate: int = 0):
    svc = websocket.app.state.services
    record = await svc.store.get(call_id)
    reason = None
    if record is None or record.call_type is not CallType.web_call:
        reason = "unknown web call"
    else:
        try:
            svc.web_tokens.check(call_id, access_token)
        except TokenError as e:
            reason = str(e)
    try:
        browser = AudioFormat(encoding or record.audio_encoding.value, sample_rate or record.sample_rate) if not reason else None
    except ValueError as e:
        reason = str(e)
    if reason is None:
        record = await svc.store.start(call_id)
        if record is None:
            reason = "access token already used"
    if reason:
        log.warning("web call %s refused: %s", call_id, reason)
        await websocket.close(code=1008)
        return
    await websocket.accept()
    await _relay(websocket, svc, record, browser)


async def _relay(browser: WebSocket, svc, record: CallRecord, browser_format: AudioFormat) -> None:
    settings = svc.settings
    agent_format = AudioFormat(record.audio_encoding.value, record.sample_rate)
    to_agent, to_browser = Converter(browser_format, agent_format), Converter(agent_format, browser_format)
    ending: list[tuple[Reason, str]] = []
    transcript: list[dict] = []
    stopped = asyncio.Event()

    def end(reason: Reason, detail: str = "") -> None:
        if not ending:
            ending.append((reason, detail))
        stopped.set()

    svc.live_calls[record.call_id] = end
    agent = None
    agent_config = settings.agents.get(record.agent_id)
    try:
        if agent_config is None:
            end(Reason.error_llm_websocket_runtime, f"agent {record.agent_id} is not configured")
            return
        url = agent_config.websocket_url(record.call_id, settings.internal_base)
        try:
            async with asyncio.timeout(settings.agent_connect_timeout_s):
                agent = await websockets.connect(
                    url, open_timeout=None, ping_interval=settings.keepalive_interval_s,
                    ping_timeout=settings.agent_ping_timeout_s, max_size=2**22, compression=None,
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
                    end(Reason.user_hangup, f"the browser closed ({message.get('code')})")
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
        svc.live_calls.pop(record.call_id, None)
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
        fields = {"error_detail": detail} if detail else {}
        if transcript:
            fields["transcript_object"] = [{"role": u["role"], "content": u["content"], "words": []} for u in transcript]
            fields["transcript"] = "".join(f"{u['role'].capitalize()}: {u['content']}\n" for u in transcript)
        await svc.store.finish(record.call_id, reason, **fields)
