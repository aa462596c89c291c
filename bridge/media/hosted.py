"""A hosted voice model's socket (``bridge.protocol.hosted``), presented to the relay as an
agent on the ``web`` protocol: caller audio goes to the provider as its own messages, the
provider's audio, barge-ins and transcripts come to the call session as a web agent's audio,
``clear`` and ``update`` events. So the relay, the recording, turn latency, listening, limits
and endings are those of every call.

What only a hosted model needs happens here:

- a barge-in clears Twilio's queue only when the caller has not heard everything, and tells
  the provider how much of its response the caller heard (``HostedAgent.interrupt``);
- the model's function calls are POSTed to the agent's ``tools_url`` (``CallService.call_tool``)
  and answered, each on the call's public log, a failure answered as an error;
- a provider socket that drops mid-call is opened again, at most MAX_RECONNECTS times (the
  first at once, then RECONNECT_PAUSE_S apart), and the conversation goes on without a second
  greeting (``HostedAgent.resume``); a provider that says the connection will end (Gemini's
  ``goAway``) gets a new connection at the next pause in the conversation, before it ends.
  Meanwhile the caller's audio is held (up to HOLD_S) and sent once the new session is ready,
  so nothing the caller said is lost;
- a refused key, a provider error that ends the session, or a session past the provider's own
  cap ends the call with the reason, the provider's words on the public log.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

import orjson

from ..calls import CallService, ProviderUnreachable, ToolFailed
from ..models import CallRecord
from ..models import DisconnectionReason as Reason
from ..protocol import hosted as h
from ..protocol.session import CallSession
from ..protocol.websocket import NORMAL, POLICY_VIOLATION
from . import connection

log = logging.getLogger(__name__)

MAX_RECONNECTS = 5
RECONNECT_PAUSE_S = 0.5
READY_TIMEOUT_S = 5.0  # a new connection's set-up must be accepted within this
HOLD_S = 10.0  # caller audio held while the provider is (re)connecting, at most
#: the conversation is idle (a good moment to move to a new connection) after this long with
#: no agent audio
IDLE_S = 0.3
GO_AWAY_MARGIN_S = 1.0
MAX_LOGGED_OUTPUT = 2000  # of a tool's answer, on the public log and the record
#: no caller audio for this long: the provider gets its own keepalive (at the relay's pings)
KEEPALIVE_IDLE_S = 4.0
#: a provider's session cap (``session_cap_s``) ends the call this much before the provider would
CAP_MARGIN_S = 5.0  # a goAway's connection is left this long before its end at the latest
#: provider close codes that end the call at once (no reconnection helps): a refused policy or key
FINAL_CLOSE_CODES = {POLICY_VIOLATION, 4001, 4003}


class HostedLink:
    """One call's connection to its hosted model, with the interface of ``WsConnection`` the
    relay uses (``listen``, ``frame_text`` / ``frame_binary`` / ``send_many``, ``ping``,
    ``close``, and how it ended)."""

    def __init__(self, translator: h.HostedAgent, session: CallSession, calls: CallService, record: CallRecord, connect_timeout_s: float):
        self.translator = translator
        self.spec = translator.spec
        self.session, self.calls, self.record = session, calls, record
        self.connect_timeout_s = connect_timeout_s
        self.loop = asyncio.get_running_loop()
        self.ws: connection.WsConnection | None = None
        # how it ended, as the relay reads a WsConnection's
        self.closed = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.overflowed = False
        self.protocol_error: str | None = None
        self.latency = 0.0
        self._on_message: Callable | None = None
        self._on_close: Callable | None = None
        self._early: deque = deque()  # what came for the relay before it listened
        self._ready = False  # the current connection's set-up was accepted
        self._held: deque[str] = deque()  # messages for the provider while it is not ready
        self._held_bytes = 0
        self._held_since: float | None = None
        self._closing = False
        self._pong_wanted = False  # the session sent its keepalive "ping": answer it on the socket's pong
        self._tools: dict[str, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()
        self.transcript: list[dict[str, str]] = []
        self._last_audio = 0.0
        self._reconnecting = False
        self._switching = False
        self._lost_at: float | None = None
        self._last_caller_audio = self.loop.time()
        self._cap_timer: asyncio.TimerHandle | None = None
        #: the call's control (``bridge.media.control``): the model's built-in tools go there
        self.control = None
        self.reconnects = 0

    # --- opening ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the provider's socket and send the session's set-up. Raises what
        ``connection.connect`` raises (the relay ends the call as error_llm_websocket_open)."""
        if self.spec.local_barge_in and self.session.observer is not None:
            self.session.observer.on_caller_speech = self._caller_spoke
        ws = await self._connect()
        self._attach(ws)
        for message in self.translator.start():
            _send(ws, message)
        if cap := self.spec.session_cap_s:
            self._cap_timer = self.loop.call_later(max(0.0, cap - CAP_MARGIN_S), self._at_cap)

    async def _connect(self) -> connection.WsConnection:
        async with asyncio.timeout(self.connect_timeout_s):
            url, headers = await self.calls.provider_endpoint(self.record)
            return await connection.connect(url, headers=headers)

    def _at_cap(self) -> None:
        cap = self.spec.session_cap_s
        self._end(Reason.max_duration_reached, f"{self.spec.name} sessions last at most {cap / 60:g} minutes")

    def _attach(self, ws: connection.WsConnection) -> None:
        self.ws, self._ready = ws, False
        ws.on_pong = self._pong
        ws.listen(lambda message: self._from_provider(ws, message), lambda: self._provider_closed(ws))

    # --- the relay's side (as a web-protocol agent) ---------------------------------------------

    def listen(self, on_message: Callable, on_close: Callable) -> None:
        self._on_message, self._on_close = on_message, on_close
        while self._early:
            on_message(self._early.popleft())
        if self.closed:
            self._notify_close()

    def frame_binary(self, data: bytes) -> bytes:
        """Caller audio (in the provider's input format): one provider message."""
        message = self.translator.caller_audio(data)
        self._last_caller_audio = self.loop.time()
        if self._ready:
            return _frame(self.ws, message)
        self._hold(message)
        return b""

    def frame_text(self, text: str) -> bytes:
        """What the session sends a web agent: its keepalive ``ping`` (answered from the
        provider socket's own pong: the round trip), a key the caller pressed (told to the
        model); nothing else applies."""
        if text == "ping":
            self._pong_wanted = True
            return b""
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError:
            return b""
        if isinstance(event, dict) and event.get("event_type") == "dtmf":
            messages = self.translator.caller_text(h.dtmf_text(str(event.get("digit"))))
            if self._ready:
                return b"".join(_frame(self.ws, m) for m in messages)
            for message in messages:
                self._hold(message)
        return b""

    def send_many(self, frames: list[bytes]) -> None:
        if self.ws is not None and self._ready:
            self.ws.send_many([f for f in frames if f])

    def send_text(self, text: str) -> None:
        self.send_many([self.frame_text(text)])

    def ping(self) -> None:
        """The relay's keepalive tick: a websocket ping (its round trip), and the provider's
        own keepalive when no caller audio went for KEEPALIVE_IDLE_S (a caller on hold)."""
        if self.ws is not None and self._ready:
            self.ws.ping()
            if self.loop.time() - self._last_caller_audio > KEEPALIVE_IDLE_S:
                for message in self.translator.keepalive():
                    _send(self.ws, message)

    @property
    def ping_outstanding_s(self) -> float:
        return self.ws.ping_outstanding_s if self.ws is not None and self._ready else 0.0

    def stalled_for(self) -> float:
        return self.ws.stalled_for() if self.ws is not None else 0.0

    async def close(self, code: int = NORMAL, reason: str = "") -> None:
        """The call ended: the provider's session ends with it (never left open until the
        provider's own cap)."""
        self._closing = True
        if self._cap_timer is not None:
            self._cap_timer.cancel()
        for task in [*self._tools.values(), *self._tasks]:
            task.cancel()
        if self.ws is not None:
            await self.ws.close(code, reason[:120])
        self.closed = True

    # --- from the provider ----------------------------------------------------------------

    def _from_provider(self, ws: connection.WsConnection, message) -> None:
        if ws is not self.ws or self._closing:
            return  # (a connection being left: what it says now is not heard)
        now = self.loop.time()
        session = self.session
        try:
            events = self.translator.receive(message, session.next_audio_position())
        except h.ProviderError as e:
            self.protocol_error = str(e)
            self._end(Reason.error_llm_websocket_corrupt_payload, f"{self.spec.name} sent {e}")
            return
        for event in events:
            kind = type(event)
            if kind is h.Audio:
                self._last_audio = now
                self._deliver(event.data)
            elif kind is h.Interrupted:
                self._interrupted(now)
            elif kind is h.Transcript:
                self.translator.said(event)
                self._transcribe(event)
            elif kind is h.Formats:
                self._reformat(event)
            elif kind is h.ToolCall:
                self._tool(event)
            elif kind is h.ToolCancelled:
                for call_id in event.call_ids:
                    if task := self._tools.pop(call_id, None):
                        task.cancel()
                        self._event("tool_call_cancelled", tool_call_id=call_id)
            elif kind is h.Reply:
                _send(ws, event.message)
            elif kind is h.Ready:
                self._became_ready(now)
            elif kind is h.GoAway:
                self._event("provider_go_away", seconds=event.seconds)
                self._spawn(self._switch(now + max(0.0, event.seconds - GO_AWAY_MARGIN_S)))
            elif kind is h.Problem:
                self._event("provider_error", error=event.text)
                log.warning("call %s: %s", self.record.call_id, event.text, extra={"call_id": self.record.call_id})
                if event.fatal:
                    reason = Reason.max_duration_reached if event.cap else Reason.error_llm_websocket_runtime
                    self._end(reason, event.text)
                    return

    def _transcribe(self, said: h.Transcript) -> None:
        transcript = self.transcript
        if said.corrects is not None:  # (what the agent is recorded as having said, cut to what was heard)
            for utterance in reversed(transcript):
                if utterance["role"] == "agent" and utterance["content"] == said.corrects:
                    utterance["content"] = said.text
                    break
            else:
                transcript.append({"role": said.role, "content": said.text})
        else:
            transcript.append({"role": said.role, "content": said.text})
        self._deliver(orjson.dumps({"event_type": "update", "transcript": transcript}).decode())

    def _reformat(self, formats: h.Formats) -> None:
        """The provider's formats, known only now (an ElevenLabs agent's settings): the call's
        conversion follows, before any audio flows (it is held until the session is ready)."""
        self.session.reformat(formats.taken, formats.said)
        self._event("provider_formats", taken=f"{formats.taken.encoding}/{formats.taken.sample_rate}", said=f"{formats.said.encoding}/{formats.said.sample_rate}")

    def _interrupted(self, now: float) -> None:
        session = self.session
        heard = session.heard_ms(now)
        for message in self.translator.interrupt(heard):
            _send(self.ws, message)
            self._event("provider_truncate", heard_ms=round(heard), **_truncated(message))
        if session.next_audio_position() > heard + 1:  # something is queued the caller has not heard
            self._deliver("clear")

    def _caller_spoke(self, now: float) -> None:
        """The bridge's own voice activity heard the caller start: what was not heard yet of the
        agent's audio is dropped (the provider, done generating it, will not say so)."""
        session = self.session
        if session.ending is None and session.next_audio_position() > session.heard_ms(now) + 1:
            self._event("barge_in", heard_ms=round(session.heard_ms(now)))
            self._deliver("clear")

    def _became_ready(self, now: float) -> None:
        self._ready = True
        if self._lost_at is not None:
            self._event("provider_reconnected", attempt=self.reconnects, gap_ms=round((now - self._lost_at) * 1000))
            self._lost_at = None
        held, self._held, self._held_bytes, self._held_since = self._held, deque(), 0, None
        if held:
            self.ws.send_many([_frame(self.ws, m) for m in held])

    def _pong(self, latency: float) -> None:
        self.latency = latency
        if self._pong_wanted:
            self._pong_wanted = False
            self._deliver("pong")

    def _deliver(self, message) -> None:
        if self._on_message is not None:
            self._on_message(message)
        else:
            self._early.append(message)

    def _hold(self, message: str | bytes) -> None:
        """Keep a message for the provider until its connection is ready (at most HOLD_S of it)."""
        now = self.loop.time()
        if self._held_since is None:
            self._held_since = now
        self._held.append(message)
        self._held_bytes += len(message)
        while self._held and now - self._held_since > HOLD_S:  # (the oldest goes: what it says is stale)
            self._held_bytes -= len(self._held.popleft())
            self._held_since = now - HOLD_S

    # --- tools ------------------------------------------------------------------------------

    def tell_model(self, text: str) -> None:
        """Something the model must know now (a voicemail's beep), in words, as a user turn."""
        for message in self.translator.caller_text(text):
            if self._ready and self.ws is not None:
                _send(self.ws, message)
            else:
                self._hold(message)

    def _tool(self, call: h.ToolCall) -> None:
        self._event("tool_call", tool_call_id=call.call_id, name=call.name, arguments=orjson.dumps(call.arguments).decode())
        task = self.loop.create_task(self._answer_tool(call))
        self._tools[call.call_id] = task

    async def _answer_tool(self, call: h.ToolCall) -> None:
        started = self.loop.time()
        agent = self.calls.agent(self.record)
        try:
            if self.control is not None and agent is not None and call.name in agent.call_tools:  # a built-in tool: the call itself
                result = await self.control.handle({**call.arguments, "action": call.name}, source="tool")
                output = orjson.dumps(result).decode()
            else:
                output = await self.calls.call_tool(self.record, call.call_id, call.name, call.arguments)
            self._event(
                "tool_result", tool_call_id=call.call_id, name=call.name, ms=round((self.loop.time() - started) * 1000),
                content=output[:MAX_LOGGED_OUTPUT],
            )  # fmt: skip
        except ToolFailed as e:
            output = orjson.dumps({"error": str(e)}).decode()
            self._event("tool_failed", tool_call_id=call.call_id, name=call.name, error=str(e))
            log.warning("call %s: tool %s failed: %s", self.record.call_id, call.name, e, extra={"call_id": self.record.call_id})
        finally:
            self._tools.pop(call.call_id, None)
        for message in self.translator.tool_output(call, output):
            if self._ready and not self._closing:
                _send(self.ws, message)
            else:
                self._hold(message)

    # --- connections that end -------------------------------------------------------------------

    def _provider_closed(self, ws: connection.WsConnection) -> None:
        if ws is not self.ws or self._closing or self.session.ending is not None:
            if ws is self.ws and not self._closing:
                self._notify_close()
            return
        self.close_code, self.close_reason = ws.close_code, ws.close_reason
        if ws.protocol_error or ws.overflowed:
            self.protocol_error, self.overflowed = ws.protocol_error, ws.overflowed
            self._notify_close()
            return
        self._ready = False  # (what the caller says is held until a new connection is ready)
        self._event("provider_closed", code=ws.close_code, reason=ws.close_reason or None)
        how = f"{ws.close_code} {ws.close_reason}".rstrip() if ws.close_code is not None else "the connection was lost"
        if not self.spec.reconnects:
            self._end(Reason.error_llm_websocket_lost_connection, f"{self.spec.name} ended the conversation ({how}); it cannot be resumed")
            return
        if ws.close_code in FINAL_CLOSE_CODES:
            self._end(Reason.error_llm_websocket_runtime, f"{self.spec.name} closed the session: {ws.close_code} {ws.close_reason}".rstrip())
            return
        self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        if self._reconnecting:
            return
        self._reconnecting, self._ready = True, False
        self._lost_at = self.loop.time()
        last = f"closed with {self.close_code}" if self.close_code is not None else "the connection was lost"
        try:
            for attempt in range(1, MAX_RECONNECTS + 1):
                if attempt > 1:
                    await asyncio.sleep(RECONNECT_PAUSE_S)
                if self._closing or self.session.ending is not None:
                    return
                self.reconnects += 1
                try:
                    ws = await self._connect()
                except (OSError, TimeoutError, connection.HandshakeError, ValueError, ProviderUnreachable) as e:
                    last = f"{type(e).__name__}: {e}"
                    self._event("provider_reconnect_failed", attempt=attempt, error=last)
                    continue
                self._attach(ws)
                for message in self.translator.resume():
                    _send(ws, message)
                if await self._until_ready(ws):
                    return
                last = "its set-up was not accepted in time"
            self._end(
                Reason.error_llm_websocket_lost_connection,
                f"{self.spec.name}'s session was lost ({last}) and {MAX_RECONNECTS} reconnections failed",
            )  # fmt: skip
        finally:
            self._reconnecting = False

    async def _until_ready(self, ws: connection.WsConnection) -> bool:
        deadline = self.loop.time() + READY_TIMEOUT_S
        while not (self._ready and self.ws is ws):
            if ws.closed or ws.close_code is not None or self.loop.time() > deadline or self._closing:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _switch(self, deadline: float) -> None:
        """Move the call to a new connection (the provider ends this one by ``deadline``): at the
        next pause in the conversation, with the session resumed there."""
        if self._switching or self._reconnecting:
            return
        self._switching = True
        try:
            while self.loop.time() < deadline and (self.loop.time() - self._last_audio < IDLE_S or self._tools):
                await asyncio.sleep(0.05)
            if self._closing or self.session.ending is not None:
                return
            old, started = self.ws, self.loop.time()
            self._ready = False  # (the caller's audio is held from now on, and sent to the new one)
            try:
                ws = await self._connect()
            except (OSError, TimeoutError, connection.HandshakeError, ValueError, ProviderUnreachable) as e:
                self._event("provider_switch_failed", error=f"{type(e).__name__}: {e}")
                if self.ws is old and not old.closed:
                    self._became_ready(self.loop.time())  # (stay on the old one; its end reconnects)
                return
            self._attach(ws)
            for message in self.translator.resume():
                _send(ws, message)
            if await self._until_ready(ws):
                self._event("provider_switched", gap_ms=round((self.loop.time() - started) * 1000))
            if old is not None:
                await old.close(NORMAL, "moved to a new connection")
        finally:
            self._switching = False

    def _end(self, reason: Reason, detail: str) -> None:
        """The call cannot go on with this provider: it ends, saying why."""
        self.session.end(reason, detail)
        if self.ws is not None:
            self._spawn(self.ws.close(NORMAL, "the call ends"))
        self._notify_close()

    def _notify_close(self) -> None:
        self.closed = True
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def _spawn(self, coroutine) -> None:
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _event(self, kind: str, **details) -> None:
        observer = self.session.observer
        if observer is not None:
            observer.event(self.loop.time(), kind, provider=self.spec.protocol, **details)


def _frame(ws: connection.WsConnection, message: h.Message) -> bytes:
    return ws.frame_binary(message) if type(message) is bytes else ws.frame_text(message)


def _send(ws: connection.WsConnection, message: h.Message) -> None:
    ws.send_many([_frame(ws, message)])


def _truncated(message: str) -> dict:
    try:
        event = orjson.loads(message)
        return {"item_id": event.get("item_id"), "audio_end_ms": event.get("audio_end_ms")}
    except orjson.JSONDecodeError:
        return {}
