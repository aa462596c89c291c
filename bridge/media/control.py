"""The agent controls its call: transfers (cold and warm), keys pressed towards the callee, a
hang-up after its last words, and a voicemail's message (docs/protocol.md, "Controlling the
call"). One ``CallControl`` per relayed call; requests come from the agent's ``web`` events,
from the API (any replica: ``CallService.control_call``) and from a hosted model's built-in
tools; each is answered with a ``call_control_result``.

- **Cold transfer.** The agent hears no more of the caller, the audio it sent before the
  request plays to the end (its mark echoed), then the stream ends with what Twilio does
  next: ``<Dial>`` the target (``sendDigits`` for an extension, the caller id asked, the
  agent's ring timeout). The call ends as ``call_transfer`` with ``transfer_destination``.
- **Warm transfer.** The same, then the caller hears hold music (from the bridge, on the same
  stream) while a second leg (``calls.create``, with answering-machine detection) rings the
  target. A human hears the ``message`` (``<Say>``) and is joined with the caller in a
  conference: the caller's stream ends into it, the bridge leaves. No answer, busy, a refusal
  or a voicemail on the target: the hold music stops, the agent hears the caller again and is
  told why (``ok: false``). One transfer at a time; the agent hears nothing meanwhile.
- **Keys.** Standard DTMF tone pairs (``audio.dtmf``), after the agent's audio already sent,
  recorded on the agent's channel; on the transcript as a tool invocation.
- **End.** As the agent closing its socket with 1000: its last words are heard, then the
  call ends as ``agent_hangup``.
- **Voicemail** (answering-machine detection on an outbound call, ``machine_end_*``):
  ``hangup`` ends the call; ``static`` ends the stream into ``<Say>`` the agent's
  ``voicemail_message``; ``message`` tells the agent (``{"event_type": "voicemail"}``, or the
  model in words) to leave its own, then ends as ``voicemail_reached`` once it hangs up (or
  after ``voicemail_max_s``). The record's ``voicemail`` says what was left.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from twilio.twiml.voice_response import VoiceResponse

from audio.dtmf import tones

from ..calls import CallService
from ..models import CallRecord, CallType, Direction
from ..models import DisconnectionReason as Reason
from ..protocol import control as c
from ..protocol import web as wf
from ..protocol.session import TO_AGENT, CallSession

log = logging.getLogger(__name__)

HEARD_SLACK_S = 3.0  # beyond the audio still queued, the wait for a mark echo before acting anyway
HOLD_CHUNK_S = 2.0  # hold music goes out this far ahead of playback
#: a warm transfer waits this long past the target's ring timeout for it to be joined
WARM_GRACE_S = 20.0
VOICEMAIL_TOLD = "[The call reached a voicemail; the beep has sounded. Leave your message now, then end the call.]"


def hold_music(seconds: float, rate: int = 8000) -> bytes:
    """Soft hold music: a slow C-major arpeggio of sine tones (s16le)."""
    notes = (261.63, 329.63, 392.0, 523.25)
    note_s = 0.5
    t = np.arange(int(rate * note_s)) / rate
    envelope = np.sin(np.pi * t / note_s) ** 2
    one = np.concatenate([np.sin(2 * np.pi * f * t) * envelope * 0.12 for f in notes])
    repeats = math.ceil(seconds / (note_s * len(notes)))
    return (np.tile(one, repeats)[: int(rate * seconds)] * 32767).astype("<i2").tobytes()


def dial_twiml(t: c.TransferCall, caller_id: str | None, timeout_s: float) -> str:
    response = VoiceResponse()
    dial = response.dial(caller_id=caller_id, timeout=int(timeout_s), answer_on_bridge=True)
    if t.sip:
        dial.sip(t.to)
    else:
        dial.number(t.to, send_digits=t.extension)
    return str(response)


def conference_twiml(room: str) -> str:
    response = VoiceResponse()
    dial = response.dial()
    dial.conference(room, start_conference_on_enter=True, end_conference_on_exit=True, beep=False)
    return str(response)


class CallControl:
    """The control of one relayed call. ``send(actions)`` writes a session's actions on the
    relay's sockets; ``tell_agent(result)`` gives an answer to the agent (None: the request came
    from elsewhere); ``finish()`` ends the relay."""

    def __init__(
        self, session: CallSession, calls: CallService, record: CallRecord, agent_config, public_base: str, asks_after_stream: bool,
        send: Callable[[list], None], finish: Callable[[], None], loop,
    ):  # fmt: skip
        self.session, self.calls, self.record, self.agent = session, calls, record, agent_config
        self.public_base, self.asks_after_stream = public_base.rstrip("/"), asks_after_stream
        self.send, self.finish, self.loop = send, finish, loop
        self.tell_agent: Callable[[dict], None] | None = None
        self.tell_model: Callable[[str], None] | None = None  # a hosted model, in words
        self.measured: dict[str, Any] = {}  # what the record keeps of the control (transfer_destination, voicemail)
        self.running = False  # the relay runs (the agent connected): set by it
        self._count = 0  # requests so far (their ids on the public log)
        self._transferring = False
        self._transfer_events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._leg: str | None = None
        self._hold: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.voicemail: dict[str, Any] | None = None
        self._voicemail_timer: asyncio.TimerHandle | None = None

    # --- requests -------------------------------------------------------------------------

    def from_agent(self, request) -> None:
        """A ``web``-protocol agent's request (parsed): done in the background, answered to it."""
        task = self.loop.create_task(self._answer_agent(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_agent(self, request) -> None:
        result = await self.do(request, source="agent")
        if self.tell_agent is not None:
            self.tell_agent(result)

    async def handle(self, body: dict[str, Any], source: str = "api") -> dict[str, Any]:
        """A request as the API (``source`` "api") or a hosted model's tool ("tool") gives it
        (``{"action"|"event_type": ..., ...}``)."""
        if (body.get("action") or body.get("event_type")) == "voicemail":
            return await self.voicemail_reached(str(body.get("answered_by", "")))
        try:
            request = c.parse(body)
        except c.ControlError as e:
            return c.result(str(body.get("action") or body.get("event_type")), False, str(e))
        return await self.do(request, source)

    async def do(self, request, source: str) -> dict[str, Any]:
        """One request, answered; the public log has it (``call_control``, with an id its
        ``call_control_result`` repeats) and so the record's ``transcript_with_tool_calls``."""
        if type(request) is c.BadControl:
            return c.result(request.action, False, request.reason)
        self._count += 1
        request_id = f"control_{self._count}"
        self._event("call_control", id=request_id, action=request.action, source=source, **_fields(request))
        result = await self._do(request)
        self._event("call_control_result", id=request_id, action=request.action, ok=result["ok"], reason=result["reason"])
        return result

    async def _do(self, request) -> dict[str, Any]:
        if self.session.ending is not None:
            return c.result(request.action, False, "the call is ending")
        if not self.running:
            return c.result(request.action, False, "the call is still being set up (its agent is not connected yet)")
        try:
            if type(request) is c.EndCall:
                return await self._end_call()
            if type(request) is c.PressDigit:
                return self._press(request)
            return await self._transfer(request)
        except Exception as e:  # a bug answers the agent, never ends the call silently
            log.exception("call %s: %s failed", self.record.call_id, request.action)
            return c.result(request.action, False, f"{type(e).__name__}: {e}")

    async def _end_call(self) -> dict[str, Any]:
        await self._heard_up_to(self.session.next_audio_position())
        reason = Reason.voicemail_reached if self.voicemail is not None else Reason.agent_hangup
        self.session.end(reason, "the agent ended the call" + (" after its voicemail message" if self.voicemail else ""))
        self.finish()
        return c.result("end_call", True)

    def _press(self, request: c.PressDigit) -> dict[str, Any]:
        now = self.loop.time()
        self.send(self.session.play_tones(tones(request.digits), now))
        self._event("press_digit", digits=request.digits)
        return c.result("press_digit", True)

    # --- transfers ------------------------------------------------------------------------

    def _refusal(self, t: c.TransferCall) -> str | None:
        if self._transferring:
            return "a transfer is already under way"
        if self.record.call_type is CallType.web_call or not self.record.twilio_call_sid:
            return "only a phone call can be transferred"
        if self.agent is None or not self.agent.may_transfer_to(t.to):
            return f"{t.to} is not among this agent's transfer_destinations"
        return None

    def _caller_id(self, t: c.TransferCall) -> str | None:
        record = self.record
        ours = record.to_number if record.direction is not Direction.outbound else record.from_number
        theirs = record.from_number if record.direction is not Direction.outbound else record.to_number
        return theirs if t.caller_id == "caller" else ours

    async def _transfer(self, t: c.TransferCall) -> dict[str, Any]:
        if refusal := self._refusal(t):
            self._event("transfer_refused", to=t.to, reason=refusal)
            log.warning("call %s: transfer to %s refused: %s", self.record.call_id, t.to, refusal, extra={"call_id": self.record.call_id})
            return c.result("transfer_call", False, refusal)
        self._transferring = True
        self.session.agent_muted = True
        try:
            await self._heard_up_to(self.session.next_audio_position())
            if self.session.ending is not None:
                return c.result("transfer_call", False, "the call ended before the transfer")
            if t.mode == "cold":
                return self._hand_over(t, dial_twiml(t, self._caller_id(t), self.agent.transfer_timeout_s), "cold")
            return await self._warm(t)
        finally:
            if self.session.ending is None:
                self._transferring = False
                self.session.agent_muted = False

    def _hand_over(self, t: c.TransferCall, twiml: str, mode: str) -> dict[str, Any]:
        """The caller goes on to ``twiml`` (a <Dial>, a conference): the call ends here."""
        self.measured["transfer_destination"] = t.to
        self._event("transfer", to=t.to, mode=mode)
        result = c.result("transfer_call", True)
        if self.tell_agent is not None:  # (said before the agent's socket closes)
            self.tell_agent(result)
            self.tell_agent = None
        self.session.end(Reason.call_transfer, f"transferred ({mode}) to {t.to}", now=True, next_twiml=twiml)
        self.finish()
        return result

    async def _warm(self, t: c.TransferCall) -> dict[str, Any]:
        calls, record = self.calls, self.record
        room = f"transfer-{record.call_id}"
        while not self._transfer_events.empty():  # (nothing an earlier transfer left)
            self._transfer_events.get_nowait()
        self._hold = self.loop.create_task(self._play_hold())
        await calls.store.update(record.call_id, transfer={"to": t.to, "message": t.message, "room": room})
        base = f"{self.public_base}/twilio/transfer/{record.call_id}"
        params: dict[str, Any] = dict(
            to=t.to, from_=self._caller_id(t), url=f"{base}/answered", method="POST", timeout=int(self.agent.transfer_timeout_s),
            machine_detection="Enable", status_callback=f"{base}/status", status_callback_method="POST",
            status_callback_event=["completed"],
        )  # fmt: skip
        if t.extension:
            params["send_digits"] = t.extension
        self._leg, problem = await calls.twilio_rest.create_call(**params)
        if problem:
            return self._back(t, f"the target could not be called: {problem}")
        self._event("transfer_dialing", to=t.to, leg=self._leg)
        deadline = self.loop.time() + self.agent.transfer_timeout_s + WARM_GRACE_S
        while True:
            try:
                event, detail = await asyncio.wait_for(self._transfer_events.get(), max(0.0, deadline - self.loop.time()))
            except TimeoutError:
                await calls.hang_up_leg(self._leg)
                return self._back(t, f"the target was not joined within {self.agent.transfer_timeout_s + WARM_GRACE_S:g} s")
            if self.session.ending is not None:
                return c.result("transfer_call", False, "the call ended during the transfer")
            if event == "answered":
                self._event("transfer_answered", to=t.to)
            elif event == "joined":
                self._stop_hold()
                self._leg = None  # (theirs now: the conference)
                return self._hand_over(t, conference_twiml(room), "warm")
            elif event in ("failed", "voicemail"):
                why = "the target's voicemail answered" if event == "voicemail" else f"the target did not answer ({detail})"
                return self._back(t, why)

    def _back(self, t: c.TransferCall, reason: str) -> dict[str, Any]:
        """A warm transfer that did not happen: the caller is back with the agent."""
        self._stop_hold()
        self._event("transfer_failed", to=t.to, reason=reason)
        task = self.loop.create_task(self.calls.store.update(self.record.call_id, transfer=None))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return c.result("transfer_call", False, reason)

    async def _play_hold(self) -> None:
        music = hold_music(HOLD_CHUNK_S)
        while self.session.ending is None:
            now = self.loop.time()
            if self.session.unplayed_s(now) * 1000 < HOLD_CHUNK_S * 500:
                self.send(self.session.play_tones(music, now))
            await asyncio.sleep(0.2)

    def _stop_hold(self) -> None:
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None
            self.send(self.session.drop_agent_audio(self.loop.time()))

    def transfer_event(self, event: str, detail: str, leg: str = "") -> None:
        """From the target leg's callbacks (``bridge.api.control``), on any replica. One from
        another leg (an earlier transfer's, late) or when no transfer runs is not this one's."""
        if not self._transferring or (leg and self._leg and leg != self._leg):
            return
        self._transfer_events.put_nowait((event, detail))

    # --- voicemail ------------------------------------------------------------------------

    async def voicemail_reached(self, answered_by: str) -> dict[str, Any]:
        """Answering-machine detection: a voicemail answered and its beep has sounded."""
        agent, session = self.agent, self.session
        options = self.record.voicemail_options or {}
        action = options.get("voicemail_action") or (agent.voicemail_action if agent else "hangup")
        message = options.get("voicemail_message", agent.voicemail_message if agent else "")
        audio_url = options.get("voicemail_audio_url", agent.voicemail_audio_url if agent else "")
        self._event("voicemail", answered_by=answered_by, action=action)
        self.voicemail = {"answered_by": answered_by, "action": action, "message": None}
        self.measured["voicemail"] = self.voicemail
        if action == "static" and (message or audio_url):
            response = VoiceResponse()
            if audio_url:
                response.play(audio_url)
                self.voicemail["audio_url"] = audio_url
            if message:
                response.say(message)
                self.voicemail["message"] = message
            response.hangup()
            session.end(Reason.voicemail_reached, f"AnsweredBy {answered_by}: the voicemail message was left", now=True, next_twiml=str(response))
            self.finish()
        elif action == "message":
            self.voicemail["message_from_transcript"] = len(session.transcript)
            if self.tell_model is not None:
                self.tell_model(VOICEMAIL_TOLD + (f" {message}" if message else ""))
            else:
                self.send([(TO_AGENT, wf.voicemail_event(answered_by))])
            self._voicemail_timer = self.loop.call_later(agent.voicemail_max_s if agent else 60.0, self._voicemail_over)
        else:  # hangup, or static with nothing to leave ("" says: hang up)
            session.end(Reason.voicemail_reached, f"AnsweredBy {answered_by}" + (": no voicemail_message, hung up" if action == "static" else ""), now=True)
            self.finish()
        return {"event_type": "call_control_result", "action": "voicemail", "ok": True, "reason": None}

    def _voicemail_over(self) -> None:
        if self.session.ending is None:
            self.session.end(Reason.voicemail_reached, f"the voicemail message took over {self.agent.voicemail_max_s:g} s")
            self.finish()

    def ended(self) -> dict[str, Any]:
        """What the record keeps, once the call ended: ``transfer_destination``, ``voicemail``
        (with what the agent said after the beep)."""
        if self.voicemail is not None and "message_from_transcript" in self.voicemail:
            said = self.session.transcript[self.voicemail.pop("message_from_transcript") :]
            self.voicemail["message"] = " ".join(u["content"] for u in said if u.get("role") == "agent") or None
        return self.measured

    async def close(self) -> None:
        """The call ended: a warm transfer's leg still ringing is hung up; nothing is left running."""
        if self._voicemail_timer is not None:
            self._voicemail_timer.cancel()
        self._transfer_events.put_nowait(("ended", ""))  # (a warm transfer waiting wakes: the call is over)
        if self._hold is not None:
            self._hold.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._leg is not None:
            await self.calls.hang_up_leg(self._leg)
            self._leg = None

    # --- helpers --------------------------------------------------------------------------

    async def _heard_up_to(self, position_ms: float) -> None:
        """Until the caller has heard the agent's audio up to ``position_ms`` (Twilio's mark
        echo), the call ends, or that audio's time is up (plus HEARD_SLACK_S)."""
        session = self.session
        self.send(session.flush_agent_audio(self.loop.time()))
        deadline = self.loop.time() + session.unplayed_s(self.loop.time()) + HEARD_SLACK_S
        while session.ending is None and self.loop.time() < deadline:
            if session.heard_ms(self.loop.time()) >= position_ms - 1:
                return
            await asyncio.sleep(0.02)

    def _event(self, kind: str, **details) -> None:
        if self.session.observer is not None:
            self.session.observer.event(self.loop.time(), kind, **details)


def _fields(request) -> dict[str, Any]:
    if type(request) is c.TransferCall:
        return {"to": request.to, "mode": request.mode}
    if type(request) is c.PressDigit:
        return {"digits": request.digits}
    return {}
