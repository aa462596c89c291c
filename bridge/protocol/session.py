"""The relay logic of one call, sans-I/O: feed it what arrives from the caller's leg and from
the agent, get back what to send where. No sockets, no clock of its own (times are passed in).

Two legs, each speaking one of the two protocols (docs/protocol.md):

- the caller's leg (``caller``): Twilio's media stream (``twilio``, mu-law 8 kHz), or a web
  client (``web``, e.g. the browser's ``retell-client-js-sdk``) in ``caller_format``;
- the agent's leg (``protocol``): ``twilio`` or ``web``, in ``agent_format``.

``from_caller`` (``from_twilio`` for a Twilio caller) / ``from_agent`` / ``agent_idle`` /
``flush_agent_audio`` / ``ping`` return a list of ``(TO_CALLER | TO_AGENT, message)`` to send in
order. When the call must end, ``ending`` is set (first reason wins) and the relay closes the
sockets.

A Twilio caller:

Agent audio on the ``web`` protocol is converted to mu-law 8 kHz and cut into Twilio ``media``
frames of ``frame_ms``. A partial frame waits for more audio while Twilio still has enough queued
(``idle_timeout``), so an agent sending faster than real time gets whole frames. A uniquely
named ``mark`` follows every ``mark_interval_ms`` of audio and the end of every burst (the agent
quiet for ``BURST_GAP_S``), so ``played_ms`` says how much agent audio the caller has really
heard. A ``clear`` from the agent drops what is not yet sent, resets the resampler and makes the
marks still pending "cleared": Twilio echoes them, but they do not count as played, and what the
clear dropped never counts as heard.

A web caller gets the agent's audio converted to its format as soon as it arrives (it plays what
it receives, in order), ``clear`` as the text ``clear``, and the agent's ``update`` (if it asked,
``caller_updates``) and ``metadata`` events; its ``ping`` is answered with ``pong``. It echoes no
marks, so what it has heard is estimated from the clock: audio plays in real time from when it
was sent. A ``twilio``-protocol agent of a web caller gets the caller's audio as Twilio's
``media`` frames (mu-law 8 kHz, 20 ms), and its marks back when the audio before them has played
(at once on its ``clear``), as Twilio would.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from audio import TWILIO_FORMAT, AudioFormat, Converter, agent_to_twilio, pcm_to_ulaw, twilio_to_agent

from . import control
from . import twilio as tf
from . import web as wf
from ..models import DisconnectionReason, Protocol
from .websocket import INVALID_PAYLOAD, POLICY_VIOLATION, UNSUPPORTED_DATA

TO_CALLER = 0
TO_AGENT = 1
TO_BRIDGE = 2  # a call-control request of the agent's (``bridge.protocol.control``), for the relay
TO_TWILIO = TO_CALLER  # the caller's leg, when it is Twilio's media stream
BURST_GAP_S = 0.1  # the agent quiet this long ends a burst (a mark then says when it was heard)

Action = tuple[int, str | bytes]
CONTROLS = (control.TransferCall, control.PressDigit, control.EndCall, control.BadControl)


@dataclass(frozen=True)
class Ending:
    reason: DisconnectionReason
    detail: str = ""
    #: the close code that says what went wrong with the caller's side, if it was its frames
    #: (RFC 6455: 1007 invalid payload, 1003 unsupported data, 1008 policy, 1002 protocol)
    close_code: int | None = None
    #: stopped from outside the call (stop-call, a machine answered, the drain's deadline): the
    #: agent audio the caller has not heard yet is dropped, not played out
    now: bool = False
    #: what Twilio does once the stream ends, when not a plain hang-up (a transfer's <Dial>)
    next_twiml: str | None = None


@dataclass
class SessionStats:
    inbound_frames: int = 0  # audio frames from the caller
    outbound_frames: int = 0  # audio frames sent to the caller
    sent_ms: float = 0.0  # agent audio sent to the caller
    played_ms: float = 0.0  # agent audio the caller heard (Twilio echoed the marks after it;
    # for a web caller, what its clock says has played)
    clears: int = 0
    dropped_frames: int = 0  # agent audio a clear threw away before it was sent (Twilio frames)
    dtmf: list[str] = field(default_factory=list)
    rtt_ms: list[float] = field(default_factory=list)


class CallSession:
    def __init__(
        self,
        protocol: Protocol,
        agent_format: AudioFormat,
        stream_sid: str,
        *,
        frame_ms: int = 20,
        mark_interval_ms: int = 100,
        observer=None,
        caller: Protocol = Protocol.twilio,
        caller_format: AudioFormat = TWILIO_FORMAT,
        caller_updates: bool = False,
        agent_in_format: AudioFormat | None = None,
    ):
        self.protocol = protocol
        self.agent_format = agent_format  # what the agent sends
        self.agent_in_format = agent_in_format or agent_format  # what it takes (a hosted model's may differ)
        self.caller = caller
        self.caller_format = caller_format
        self.web_caller = web_caller = caller is Protocol.web
        self.caller_updates = caller_updates  # a web caller asked for the agent's updates
        self.twilio = tf.FrameBuilder(stream_sid)
        self.frame_ms = frame_ms
        self.frame_bytes = 8 * frame_ms  # mu-law 8 kHz: 8 bytes a millisecond
        self.mark_interval_ms = mark_interval_ms
        # the agent's leg in the format it speaks: Twilio's for a twilio-protocol agent
        self._converters()
        if web_caller:
            self.from_caller = self._from_web_caller
            self.caller_frames = tf.StreamFrames(stream_sid)  # as Twilio sends: for a twilio agent
        else:
            self.from_caller = self.from_twilio
        self._caller_carry = b""  # a lone byte of a split s16le sample from a web caller
        self._caller_ulaw = bytearray()  # a web caller's audio for a twilio agent, not yet framed
        self._agent_marks: deque[tuple[str, float]] = deque()  # a twilio agent's marks, and when
        # the audio before them has played (a web caller echoes none)
        self.stats = SessionStats()
        self.observer = observer  # CallObserver: latency, silence, log, recording
        self.transcript: list[dict[str, str]] = []
        self.ending: Ending | None = None
        self._pending = bytearray()  # converted agent audio not yet framed
        self._carry = b""  # a lone byte of a split s16le sample
        self._marks: deque[tuple[str, float]] = deque()  # (name, heard position at the mark)
        self._cleared: set[str] = set()
        self._mark_seq = 0
        self._last_mark_ms = 0.0
        self._heard_base = 0.0  # heard position and sent_ms at the last clear: audio sent after
        self._sent_base = 0.0  # it is heard after what was heard before it
        self._queue_end = 0.0  # when Twilio's queue of agent audio runs dry (relay clock, s)
        self._ping_sent: float | None = None
        self._echoed_at: float | None = None  # when Twilio last echoed a mark (relay clock)
        #: the agent hears nothing of the caller (a transfer under way); its audio still plays
        self.agent_muted = False

    def _converters(self) -> None:
        twilio_agent = self.protocol is Protocol.twilio
        agent_leg = TWILIO_FORMAT if twilio_agent else self.agent_format
        agent_in_leg = TWILIO_FORMAT if twilio_agent else self.agent_in_format
        if self.web_caller:
            self.inbound = Converter(self.caller_format, agent_in_leg)
            self.outbound = Converter(agent_leg, self.caller_format)
        else:
            self.inbound = twilio_to_agent(agent_in_leg)
            self.outbound = agent_to_twilio(agent_leg)

    def reformat(self, agent_in_format: AudioFormat, agent_format: AudioFormat) -> None:
        """The agent's formats, learned once its session opened (a hosted model whose formats
        are its own settings): the conversion each way follows from now on."""
        self.agent_in_format, self.agent_format = agent_in_format, agent_format
        self._carry = self._caller_carry = b""
        self._converters()

    # --- ending ------------------------------------------------------------------------------

    def end(
        self, reason: DisconnectionReason, detail: str = "", close_code: int | None = None, now: bool = False, next_twiml: str | None = None
    ) -> None:
        if self.ending is None:
            self.ending = Ending(reason, detail, close_code, now, next_twiml)

    # --- Twilio -> agent ---------------------------------------------------------------------

    def from_twilio(self, text: str, now: float = 0.0) -> list[Action]:
        if type(text) is not str:
            self.end(DisconnectionReason.error_frontend_corrupted_payload, "binary frame from Twilio", UNSUPPORTED_DATA)
            return []
        try:
            event = tf.parse(text)
        except tf.FrameError as e:
            self.end(DisconnectionReason.error_frontend_corrupted_payload, f"from Twilio: {e}", INVALID_PAYLOAD)
            return []
        twilio_protocol = self.protocol is Protocol.twilio
        if type(event) is tf.Media:
            self.stats.inbound_frames += 1
            if self.observer is not None:
                self.observer.caller_audio(event.payload, now, event.timestamp_ms, event.chunk)
            if self.agent_muted:  # (a transfer under way: the agent hears nothing more)
                return []
            if twilio_protocol:
                return [(TO_AGENT, text)]
            if not event.payload:
                return []
            audio = self.inbound.process(event.payload)
            return [(TO_AGENT, audio)] if audio else []
        if type(event) is tf.Mark:
            if twilio_protocol:
                return [(TO_AGENT, text)]
            self._mark_echoed(event.name, now)
            return []
        if type(event) is tf.Dtmf:
            self.stats.dtmf.append(event.digit)
            if self.observer is not None:
                self.observer.event(now, "dtmf", digit=event.digit)
            return [(TO_AGENT, text if twilio_protocol else wf.dtmf_event(event.digit))]
        if type(event) is tf.Stop:
            self.end(DisconnectionReason.user_hangup, "Twilio sent stop")
            return [(TO_AGENT, text)] if twilio_protocol else []
        if type(event) is tf.Clear:
            self.end(DisconnectionReason.error_frontend_corrupted_payload, "Twilio sent a clear frame", POLICY_VIOLATION)
        return []  # a repeated connected/start, or an event added after this was written

    def _from_web_caller(self, message: str | bytes, now: float = 0.0) -> list[Action]:
        if type(message) is str:
            text = message.strip()
            if text == "ping":
                return [(TO_CALLER, "pong")]
            if text != "pong":
                self.end(
                    DisconnectionReason.error_frontend_corrupted_payload, f"unexpected text from the web client: {text[:60]!r}",
                    UNSUPPORTED_DATA,
                )  # fmt: skip
            return []
        data = message
        if self.caller_format.encoding == "s16le":
            if self._caller_carry:
                data = self._caller_carry + data
                self._caller_carry = b""
            if len(data) & 1:
                data, self._caller_carry = data[:-1], data[-1:]
        if not data:
            return []
        self.stats.inbound_frames += 1
        if self.observer is not None:
            self.observer.caller_audio(data, now)
        if self.agent_muted:
            return []
        audio = self.inbound.process(data)
        if self.protocol is Protocol.web:
            return [(TO_AGENT, audio)] if audio else []
        pending = self._caller_ulaw  # a twilio agent: Twilio's 20 ms media frames
        pending += audio
        size = self.frame_bytes
        actions: list[Action] = []
        while len(pending) >= size:
            actions.append((TO_AGENT, self.caller_frames.media(bytes(pending[:size]))))
            del pending[:size]
        return actions

    def update_played(self, now: float) -> None:
        """A web caller: the agent audio it has heard by ``now`` (it plays what it gets, in order)."""
        unplayed_ms = max(0.0, self._queue_end - now) * 1000
        self.stats.played_ms = max(self.stats.played_ms, self._heard_base + self.stats.sent_ms - self._sent_base - unplayed_ms)

    def unplayed_s(self, now: float) -> float:
        """How long the agent audio already sent takes to finish playing (a web caller)."""
        return max(0.0, self._queue_end - now)

    def next_audio_position(self) -> float:
        """Where agent audio that arrives now will be heard, on the call's heard timeline (ms):
        after everything sent and waiting to be sent."""
        pending_ms = len(self._pending) / 8 if not self.web_caller else 0.0
        return self._heard_base + self.stats.sent_ms - self._sent_base + pending_ms

    def heard_ms(self, now: float) -> float:
        """How much agent audio the caller has heard by ``now`` (the heard timeline, ms): the
        last mark Twilio echoed, plus what has played since by the clock (Twilio plays in real
        time), never past the next mark not yet echoed nor past what was sent. A web caller's
        by the clock alone."""
        if self.web_caller:
            self.update_played(now)
            return self.stats.played_ms
        heard = self.stats.played_ms
        sent = self._heard_base + self.stats.sent_ms - self._sent_base
        by_clock = sent - max(0.0, self._queue_end - now) * 1000  # (the queue drains from the end back)
        if self._echoed_at is not None:
            by_clock = min(by_clock, heard + (now - self._echoed_at) * 1000)
        if self._marks:
            by_clock = min(by_clock, self._marks[0][1])
        return max(heard, by_clock)

    def _mark_echoed(self, name: str, now: float) -> None:
        if name in self._cleared:  # flushed by a clear: not heard
            self._cleared.discard(name)
            return
        if not any(sent_name == name for sent_name, _ in self._marks):
            return  # (a name not pending, e.g. echoed twice: it must not consume the others)
        while self._marks:
            sent_name, position = self._marks.popleft()
            if sent_name == name:
                self.stats.played_ms = position
                self._echoed_at = now
                return

    # --- agent -> Twilio ---------------------------------------------------------------------

    def from_agent(self, message: str | bytes, now: float = 0.0) -> list[Action]:
        if self.protocol is Protocol.twilio:
            return self._from_twilio_agent(message, now)
        try:
            m = wf.parse(message)
        except tf.FrameError as e:
            self.end(DisconnectionReason.error_llm_websocket_corrupt_payload, f"from agent: {e}")
            return []
        if type(m) is wf.Audio:
            return self._agent_audio(m.data, now)
        if m is wf.CLEAR:
            return self._clear(now)
        if m is wf.PONG:
            if self._ping_sent is not None:
                self.stats.rtt_ms.append((now - self._ping_sent) * 1000)
                self._ping_sent = None
            return []
        if m is wf.PING:
            return [(TO_AGENT, "pong")]
        if type(m) is wf.Update:
            if self.observer is not None and len(m.transcript) != len(self.transcript):
                details: dict = {"utterances": len(m.transcript)}
                # the utterances another now follows are done: the log carries them, so a live
                # call's page shows its transcript (a private call's content is never kept)
                done = m.transcript[max(0, len(self.transcript) - 1) : len(m.transcript) - 1]
                if done and not getattr(self.observer, "private", True):
                    details["settled"] = [{"role": u.get("role"), "content": u.get("content")} for u in done if isinstance(u, dict)]
                self.observer.event(now, "transcript", **details)
            self.transcript = m.transcript
            if self.web_caller and self.caller_updates:
                return [(TO_CALLER, message)]
        elif type(m) is wf.Metadata and self.web_caller:
            return [(TO_CALLER, message)]
        elif type(m) in CONTROLS:
            return [(TO_BRIDGE, m)]
        return []

    def _from_twilio_agent(self, message: str | bytes, now: float) -> list[Action]:
        if not isinstance(message, str):
            self.end(DisconnectionReason.error_llm_websocket_corrupt_payload, "binary frame on the twilio protocol")
            return []
        try:
            event = tf.parse(message)
        except tf.FrameError as e:
            self.end(DisconnectionReason.error_llm_websocket_corrupt_payload, f"from agent: {e}")
            return []
        if self.web_caller:
            return self._from_twilio_agent_to_web(event, now)
        if type(event) is tf.Media:
            self.stats.outbound_frames += 1
            self.stats.sent_ms += len(event.payload) / 8
            if self.observer is not None:
                self.observer.agent_audio(event.payload, now)
        elif type(event) is tf.Clear:
            self.stats.clears += 1
            if self.observer is not None:
                self.observer.agent_cleared(now)
        elif type(event) is not tf.Mark:
            name = event.event if type(event) is tf.Unknown else type(event).__name__.lower()
            self.end(DisconnectionReason.error_llm_websocket_corrupt_payload, f"agent sent a '{name}' frame")
            return []
        return [(TO_TWILIO, message)]

    def _from_twilio_agent_to_web(self, event: tf.TwilioEvent, now: float) -> list[Action]:
        actions: list[Action] = []
        if type(event) is tf.Media:
            if event.payload:
                self._send_to_web(actions, self.outbound.process(event.payload), now)
        elif type(event) is tf.Mark:
            if self._queue_end <= now:  # nothing left to play: heard at once
                return [(TO_AGENT, self.caller_frames.mark(event.name))]
            self._agent_marks.append((event.name, self._queue_end))
        elif type(event) is tf.Clear:
            return self._clear(now)
        else:
            name = event.event if type(event) is tf.Unknown else type(event).__name__.lower()
            self.end(DisconnectionReason.error_llm_websocket_corrupt_payload, f"agent sent a '{name}' frame")
        return actions

    def _send_to_web(self, actions: list[Action], audio: bytes, now: float) -> None:
        if not audio:
            return
        actions.append((TO_CALLER, audio))
        duration_ms = self.caller_format.duration_ms(len(audio))
        self.stats.outbound_frames += 1
        self.stats.sent_ms += duration_ms
        self._queue_end = max(self._queue_end, now) + duration_ms / 1000
        if self.observer is not None:
            self.observer.agent_audio(audio, now)

    def _agent_audio(self, data: bytes, now: float) -> list[Action]:
        if self.agent_format.encoding == "s16le":
            if self._carry:
                data = self._carry + data
                self._carry = b""
            if len(data) & 1:
                data, self._carry = data[:-1], data[-1:]
        if not data:
            return []
        actions: list[Action] = []
        if self.web_caller:
            self._send_to_web(actions, self.outbound.process(data), now)
            return actions
        self._pending += self.outbound.process(data)
        size = self.frame_bytes
        while len(self._pending) >= size:
            self._send_media(actions, bytes(self._pending[:size]), now)
            del self._pending[:size]
            if self.stats.sent_ms - self._last_mark_ms >= self.mark_interval_ms:
                self._send_mark(actions)
        return actions

    def idle_timeout(self, now: float) -> float | None:
        """How long the relay may wait for more agent audio before calling ``agent_idle``
        (None: nothing is waiting). A partial frame waits while Twilio has more than a frame
        queued; marked audio waits for nothing."""
        if self.web_caller:  # audio goes out as it comes; a twilio agent's marks wait for play
            return max(0.0, self._agent_marks[0][1] - now) if self._agent_marks else None
        frame_s = self.frame_ms / 1000
        if self._pending:
            return max(frame_s, self._queue_end - now - frame_s)
        if self.stats.sent_ms > self._last_mark_ms:
            return BURST_GAP_S
        return None

    def agent_idle(self, now: float) -> list[Action]:
        """``idle_timeout`` passed with no agent audio: send the partial frame so Twilio's queue
        does not run dry, or, after a whole burst, the mark that tells when it was heard."""
        actions: list[Action] = []
        if self.web_caller:
            marks = self._agent_marks
            while marks and marks[0][1] <= now:
                actions.append((TO_AGENT, self.caller_frames.mark(marks.popleft()[0])))
            return actions
        if self._pending:
            self._send_media(actions, bytes(self._pending), now)
            self._pending.clear()
            if self.stats.sent_ms - self._last_mark_ms >= self.mark_interval_ms:
                self._send_mark(actions)
        elif self.stats.sent_ms > self._last_mark_ms:
            self._send_mark(actions)
        return actions

    def drop_agent_audio(self, now: float) -> list[Action]:
        """The call is stopped: what the caller has not heard of the agent's audio is dropped
        (``clear`` to Twilio or the web client), as a barge-in would."""
        if self.web_caller:
            if self._queue_end <= now:
                return []
        elif not self._pending and self.stats.sent_ms <= self.stats.played_ms:
            return []
        return self._clear(now)

    def play_tones(self, pcm: bytes, now: float) -> list[Action]:
        """Audio of the bridge's own for the caller (s16le 8 kHz: keypad tones, hold music),
        queued after the agent audio already sent, placed, marked and recorded on the agent's
        channel like the agent's own."""
        actions = self.flush_agent_audio(now) if not self.web_caller else []
        ulaw = pcm_to_ulaw(pcm)
        if self.web_caller:
            self._send_to_web(actions, Converter(TWILIO_FORMAT, self.caller_format).process(ulaw), now)
            return actions
        size = self.frame_bytes
        for at in range(0, len(ulaw), size):
            self._send_media(actions, ulaw[at : at + size], now)
            if self.stats.sent_ms - self._last_mark_ms >= self.mark_interval_ms:
                self._send_mark(actions)
        self._send_mark(actions)
        return actions

    def flush_agent_audio(self, now: float = 0.0) -> list[Action]:
        """The agent is gone: send everything left, with a mark after it."""
        actions: list[Action] = []
        if self.web_caller:
            return actions  # (sent as it came)
        if self._pending:
            self._send_media(actions, bytes(self._pending), now)
            self._pending.clear()
        if self.stats.sent_ms > self._last_mark_ms:
            self._send_mark(actions)
        return actions

    def _send_media(self, actions: list[Action], payload: bytes, now: float) -> None:
        actions.append((TO_TWILIO, self.twilio.media(payload)))
        duration_ms = len(payload) / 8
        self.stats.outbound_frames += 1
        self.stats.sent_ms += duration_ms
        self._queue_end = max(self._queue_end, now) + duration_ms / 1000
        if self.observer is not None:
            self.observer.agent_audio(payload, now)

    def _send_mark(self, actions: list[Action]) -> None:
        self._mark_seq += 1
        name = f"m{self._mark_seq}"
        self._marks.append((name, self._heard_base + self.stats.sent_ms - self._sent_base))
        self._last_mark_ms = self.stats.sent_ms
        actions.append((TO_TWILIO, self.twilio.mark(name)))

    def _clear(self, now: float) -> list[Action]:
        self.stats.clears += 1
        if self.observer is not None:
            self.observer.agent_cleared(now)
        if self.web_caller:
            self.update_played(now)  # what played until now was heard; the rest is thrown away
            self._carry = b""
            self.outbound.reset()
            self._heard_base, self._sent_base = self.stats.played_ms, self.stats.sent_ms
            self._queue_end = 0.0
            actions: list[Action] = [(TO_CALLER, "clear")]
            while self._agent_marks:  # Twilio echoes the marks of cleared audio at once
                actions.append((TO_AGENT, self.caller_frames.mark(self._agent_marks.popleft()[0])))
            return actions
        self.stats.dropped_frames += -(-len(self._pending) // self.frame_bytes)
        self._pending.clear()
        self._carry = b""
        self.outbound.reset()
        self._cleared.update(name for name, _ in self._marks)
        self._marks.clear()
        self._last_mark_ms = self.stats.sent_ms
        self._heard_base, self._sent_base = self.stats.played_ms, self.stats.sent_ms
        self._queue_end = 0.0
        return [(TO_TWILIO, self.twilio.clear())]

    # --- keepalive ---------------------------------------------------------------------------

    def ping(self, now: float) -> list[Action]:
        """Web-protocol keepalive; the round trip is measured when the ``pong`` comes back."""
        if self.protocol is not Protocol.web:
            return []
        if self._ping_sent is None:
            self._ping_sent = now
        return [(TO_AGENT, "ping")]

    def agent_stop(self) -> list[Action]:
        """The web caller left: a ``twilio``-protocol agent gets Twilio's ``stop``."""
        if self.web_caller and self.protocol is Protocol.twilio:
            return [(TO_AGENT, self.caller_frames.stop())]
        return []

    @property
    def pending_marks(self) -> int:
        return len(self._marks)
