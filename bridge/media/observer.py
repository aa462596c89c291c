"""What the bridge sees of a call, measured on the wire: turns and their latency, silence, the
agent link's round trip, a log of events, and the stereo recording.

``CallObserver`` is fed by ``CallSession`` with the caller's leg as it crosses the bridge: every
audio payload from the caller and every agent payload sent to the caller, in the caller leg's
format (``caller_format``: mu-law 8 kHz from Twilio, the web client's own format), with the
bridge's clock (seconds):

- the caller's audio goes where Twilio's own clock puts it (``MediaClock``: each frame's
  ``timestamp``), not where it arrived: a network stall's burst lands where it was said, lost
  frames are silence in their place; a web caller (no timestamps) is placed by arrival;
- turn latency (``e2e_latency``): voice activity on the caller's audio finds where each turn ends
  (the end of the last voiced frame, on Twilio's clock); the latency is the time from there to
  when the caller heard the agent's first audio after it, so a stall or a set-up backlog counts
  in full; the agent's own part (``agent_latency``) runs from when the bridge had that end of
  speech to the agent's first audio;
- silence: when the caller last spoke and when the agent's last audio finished playing, for the
  ``end_call_after_silence_ms`` limit (``inactivity``);
- the recording: caller left as received, agent right as sent, both placed on one clock (see
  ``Recording``); a clear cuts the agent audio Twilio threw away;
- events for the public log (JSON lines), with times in ms since the stream started.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audio import (
    LEFT, RIGHT, SPEECH_END, SPEECH_START, TWILIO_FORMAT, AudioFormat, StereoWavWriter, VoiceActivityDetector, ulaw_to_pcm,
)  # fmt: skip

from ..models import Latency
from ..protocol.media_clock import MediaClock

#: Caller audio that arrives later than its place on the clock by more than this is a real gap
#: (a dropout), recorded as silence; less is jitter, and the audio stays contiguous.
JITTER_S = 0.1
#: Caller audio is analysed (VAD) and recorded, and agent audio recorded, in batches of this
#: many milliseconds: per 20 ms frame it costs a tenth, and event times stay exact (they are
#: stream times).
BATCH_MS = 200
#: On Twilio's clock, the last this many ms of caller audio wait before they are analysed and
#: recorded: a frame that comes back this late, out of order, still goes in its place.
HOLD_MS = 60
#: Caller audio placed this far behind the arrival clock gives up waiting for what is missing
#: before it (silence is written there; a frame that comes later still is counted, not placed),
#: so a caller leg that stalls does not hold the agent's side of the recording in memory.
MAX_LATE_S = 10.0
MULAW_SILENCE = 0xFF
#: agent bursts kept waiting for a caller turn to answer (the newest)
MAX_BURSTS = 64


def percentiles(samples: list[float]) -> Latency | None:
    """The seeds' latency object (ms), or None when there is nothing to report."""
    if not samples:
        return None
    a = np.asarray(samples, dtype=float)
    p = np.percentile(a, [50, 90, 95, 99])
    return Latency(
        p50=round(float(p[0]), 1), p90=round(float(p[1]), 1), p95=round(float(p[2]), 1), p99=round(float(p[3]), 1),
        max=round(float(a.max()), 1), min=round(float(a.min()), 1), num=len(a),
    )  # fmt: skip


class Recording:
    """The call's stereo WAV, written while the call runs. Positions are samples since the
    stream started on the bridge's clock; each side stays contiguous unless it fell behind the
    clock by more than JITTER_S (then the gap is silence)."""

    def __init__(self, path: Path, opener=None, rate: int = 8000):
        """``opener(path, mode)``: the writer thread's (``FileWriter.open``, which makes the
        folder), or by default a plain file opened here."""
        if opener is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            opener = open
        self.path = path
        self.rate = rate
        self.writer = StereoWavWriter(path, rate, sync_ms=1000, opener=opener)

    @property
    def file(self):
        """What the opener gave (a ``BackgroundFile``: its ``error`` says whether it opened)."""
        return self.writer._file

    def put(self, channel: int, pcm: bytes, clock_pos: int) -> None:
        """At exactly ``clock_pos`` (the caller's audio, on Twilio's clock)."""
        self.writer.write(channel, pcm, at=clock_pos)

    def place(self, channel: int, pcm: bytes, clock_pos: int) -> None:
        end = self.writer.channel_end(channel)
        self.writer.write(channel, pcm, at=clock_pos if clock_pos - end > JITTER_S * self.rate else None)

    def advance(self, clock_pos: int) -> None:
        # what the caller side has not sent by now (minus jitter) is a gap
        self.writer.advance(max(0, clock_pos - int(JITTER_S * self.rate)))

    def cut_agent(self, clock_pos: int) -> None:
        self.writer.truncate(RIGHT, clock_pos)

    def close(self) -> None:
        self.writer.close()


@dataclass
class CallObserver:
    started: float  # bridge clock when the stream started (s)
    recording: Recording | None = None
    log_path: Path | None = None
    #: how the log is opened: ``FileWriter.open`` (its writes then run on the writer thread, one
    #: hand-over a line); None: a plain file opened here
    log_opener: Any = None
    private: bool = False  # opt_out_sensitive_data_storage: nothing about the content is kept
    vad_end_silence_ms: int = 600
    caller_format: AudioFormat = TWILIO_FORMAT  # the caller leg's (recording, VAD)
    turn_latencies_ms: list[float] = field(default_factory=list)
    agent_latencies_ms: list[float] = field(default_factory=list)
    #: the caller leg's media clock (Twilio's timestamps); None: placed by arrival (a web caller)
    clock: MediaClock | None = None
    events: list[dict] = field(default_factory=list)
    #: the call's live listeners (``listen.ListenTap``), handed the audio as it crosses
    tap: Any = None
    #: told when the caller starts speaking (the relay clock): a hosted model's own barge-in
    on_caller_speech: Any = None

    def __post_init__(self) -> None:
        self.rate = rate = self.caller_format.sample_rate
        self.width = self.caller_format.bytes_per_sample  # bytes a sample
        self._pcm = ulaw_to_pcm if self.caller_format.encoding == "mulaw" else bytes
        self._batch_bytes = rate * BATCH_MS // 1000 * self.width
        self.vad = VoiceActivityDetector(rate, end_silence_ms=self.vad_end_silence_ms)
        self.caller_speaking = False
        self.caller_last_voice = self.started  # clock time the caller last spoke (or the start)
        self.agent_audio_until = self.started  # clock time the agent's queued audio ends playing
        self._turn_end: float | None = None  # a caller turn that ended, waiting for the agent (clock s)
        self._turn_had_at: float | None = None  # when the bridge had that end of speech (clock s)
        #: agent bursts not yet matched to a turn: (when the caller heard it start, when it was sent)
        self._agent_bursts: list[tuple[float, float]] = []
        self._agent_last_sent = -1.0
        # The first batch is of random length, so that calls started together (or all calls of
        # a load test) do not all analyse their audio in the same 20 ms every 200 ms.
        self._caller_batch_bytes = random.randint(rate // 50, self._batch_bytes // self.width) * self.width
        self._caller_ulaw = bytearray()  # caller audio not yet analysed and recorded
        self._caller_at = 0  # clock position (samples) of its first byte
        self._hold_bytes = rate * HOLD_MS // 1000 * self.width
        self._agent_ulaw = bytearray()  # agent audio not yet recorded (contiguous)
        self._agent_at = 0
        self._log = None
        if self.log_path is not None and self.log_opener is not None:
            self._log = self.log_opener(self.log_path, "ab", gather=0)
        elif self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 - open for the call's life
        self._log_file = self._log  # (kept after close: unwritten() asks it)

    # --- what happened ---------------------------------------------------------------------

    def event(self, now: float, kind: str, **details) -> None:
        entry = {"t_ms": round((now - self.started) * 1000, 1), "event": kind, **details}
        self.events.append(entry)
        if self._log is not None:
            self._log.write(json.dumps(entry, separators=(",", ":")).encode() + b"\n")

    def caller_audio(self, payload: bytes, now: float, timestamp_ms: int | None = None, chunk: int | None = None) -> None:
        if not payload:
            return
        if self.clock is not None:
            self._caller_timed(payload, now, timestamp_ms, chunk)
            return
        tap = self.tap
        if tap is not None and tap.listeners:
            tap.audio(0, self._pcm(payload), max(0, int((now - self.started) * self.rate) - len(payload) // self.width))
        pending = self._caller_ulaw
        if not pending:
            self._caller_at = max(0, int((now - self.started) * self.rate) - len(payload) // self.width)
        pending += payload
        if len(pending) >= self._caller_batch_bytes:
            self._caller_batch_bytes = self._batch_bytes
            self._caller_batch(now)

    def reading(self, backlog: bool) -> None:
        """The relay hands over the caller's frames that queued during set-up (``True``), then
        is caught up (``False``): what was said meanwhile waited for the set-up."""
        if self.clock is not None:
            self.clock.reading(backlog)

    def _caller_timed(self, payload: bytes, now: float, timestamp_ms: int | None, chunk: int | None) -> None:
        """A Twilio frame, at its place on Twilio's clock. ``_caller_ulaw`` holds the audio from
        ``_caller_at`` on, holes (frames not come yet) filled with silence."""
        clock = self.clock
        samples = len(payload) // self.width
        position = clock.place(samples, timestamp_ms, chunk, now - self.started)
        if clock.stall_ended is not None:
            gap, at = clock.stall_ended
            clock.stall_ended = None
            self.event(now, "caller_stall", ms=round(gap * 1000, 1), at_ms=round(at * 1000 / self.rate, 1))
        if position is None:  # a duplicate
            return
        pending, width = self._caller_ulaw, self.width
        floor = int((now - self.started - MAX_LATE_S) * self.rate)
        if floor > self._caller_at + len(pending) // width:  # (waited long enough for what is missing)
            self._caller_flush(now, len(pending))
            self._caller_silence(now, floor - self._caller_at)
        if position < self._caller_at:  # its place is written already
            clock.too_late += 1
            return
        tap = self.tap
        if tap is not None and tap.listeners:
            tap.audio(0, self._pcm(payload), position)
        if (position - self._caller_at) * width - len(pending) > self._batch_bytes:  # a long gap: silence, batch by batch
            self._caller_flush(now, len(pending))
            self._caller_silence(now, position - self._caller_at)
        offset = (position - self._caller_at) * width
        if offset > len(pending):
            pending.extend(bytes([MULAW_SILENCE]) * (offset - len(pending)))
        pending[offset : offset + len(payload)] = payload
        if len(pending) >= self._caller_batch_bytes + self._hold_bytes:
            self._caller_batch_bytes = self._batch_bytes
            self._caller_flush(now, len(pending) - self._hold_bytes)

    def _caller_silence(self, now: float, samples: int) -> None:
        while samples > 0:
            n = min(samples, self._batch_bytes // self.width)
            self._caller_ulaw.extend(bytes([MULAW_SILENCE]) * (n * self.width))
            self._caller_flush(now, len(self._caller_ulaw))
            samples -= n

    def _caller_flush(self, now: float, size: int) -> None:
        """Analyse and record the first ``size`` bytes of the timed caller audio."""
        if size <= 0:
            return
        pending = self._caller_ulaw
        pcm = self._pcm(bytes(pending[:size]))
        del pending[:size]
        if self.recording is not None:
            self.recording.put(LEFT, pcm, self._caller_at)
            if self._agent_ulaw:
                self._agent_batch()
        self._caller_at += size // self.width
        self._analyse(pcm, now)

    def _caller_batch(self, now: float) -> None:
        pcm = self._pcm(self._caller_ulaw)
        self._caller_ulaw.clear()
        if self.recording is not None:
            self.recording.place(LEFT, pcm, self._caller_at)
            if self._agent_ulaw:  # the clock must not pass agent audio still held in a batch
                self._agent_batch()
            self.recording.advance(int((now - self.started) * self.rate))
        self._analyse(pcm, now)

    def _analyse(self, pcm: bytes, now: float) -> None:
        clock = self.clock
        for e in self.vad.process(pcm):
            if clock is not None and clock.trusted:  # (the VAD has seen the audio from position 0, holes as silence)
                at = self.started + clock.to_bridge(e.at_ms)
                had = clock.arrived(e.at_ms)
                had = at if had is None else self.started + had
            else:
                # on the clock, the event happened as much audio ago as the VAD has seen since it
                # (a web client streams in real time; this also holds for a simulator running faster)
                at = had = now - (self.vad.time_ms - e.at_ms) / 1000
            if e.kind == SPEECH_START:
                if self._turn_end is not None:
                    self._match_turn(now, before=at)  # (answered before the caller spoke again, or not at all)
                self._turn_end = None
                self._agent_bursts = [b for b in self._agent_bursts if b[0] >= at]
                self.caller_speaking = True
                self.event(now, "caller_speech_start", at_ms=round(e.at_ms, 1))
                if self.on_caller_speech is not None:
                    self.on_caller_speech(now)
            elif e.kind == SPEECH_END:
                self.caller_speaking = False
                self.caller_last_voice = at
                self._turn_end, self._turn_had_at = at, had
                self.event(now, "caller_speech_end", at_ms=round(e.at_ms, 1))
                self._match_turn(now)
        if self.caller_speaking:
            self.caller_last_voice = now

    def agent_audio(self, payload: bytes, now: float) -> None:
        duration = len(payload) / self.width / self.rate
        start = max(now, self.agent_audio_until)
        self.agent_audio_until = start + duration
        if now - self._agent_last_sent > 0.1:  # a new burst of agent audio
            bursts = self._agent_bursts
            bursts.append((start, now))
            if len(bursts) > MAX_BURSTS:  # (an agent talking on while the caller never speaks)
                del bursts[0]
            self._match_turn(now)
        self._agent_last_sent = now
        tap = self.tap
        if tap is not None and tap.listeners:
            tap.audio(1, self._pcm(payload), int((start - self.started) * self.rate))
        if self.recording is not None:
            # contiguous audio is batched; a jump past the jitter allowance starts a new batch
            # (the recording then has a gap), exactly as placing each frame would
            pending = self._agent_ulaw
            at = int((start - self.started) * self.rate)
            if pending and at - (self._agent_at + len(pending) // self.width) > JITTER_S * self.rate:
                self._agent_batch()
            if not pending:
                self._agent_at = at
            pending += payload
            if len(pending) >= self._batch_bytes:
                self._agent_batch()

    def _agent_batch(self) -> None:
        self.recording.place(RIGHT, self._pcm(self._agent_ulaw), self._agent_at)
        self._agent_ulaw.clear()

    def agent_cleared(self, now: float) -> None:
        self.agent_audio_until = now
        if self.tap is not None and self.tap.listeners:
            self.tap.clear(int((now - self.started) * self.rate))
        if self.recording is not None:
            if self._agent_ulaw:
                self._agent_batch()
            self.recording.cut_agent(int((now - self.started) * self.rate))
        self.event(now, "clear")

    def _match_turn(self, now: float, before: float | None = None) -> None:
        """A turn's latency: its end to when the caller heard the first agent burst after it
        (if that came ``before`` the caller spoke again); the agent's own, from when the bridge
        had the end of speech to that burst's first audio. Its event is logged ``now`` (the log
        is in time order) with ``sent_ms``, when that audio was sent (often earlier: an agent
        that answers before the end of speech is certain)."""
        end = self._turn_end
        if end is None:
            return
        for heard, sent in self._agent_bursts:
            if heard >= end:
                if before is not None and heard >= before:
                    return
                latency = (heard - end) * 1000
                agent = max(0.0, (sent - (self._turn_had_at or end)) * 1000)
                self.turn_latencies_ms.append(latency)
                self.agent_latencies_ms.append(agent)
                self.event(
                    now, "turn", latency_ms=round(latency, 1), agent_latency_ms=round(agent, 1),
                    sent_ms=round((sent - self.started) * 1000, 1),
                )  # fmt: skip
                self._turn_end = None
                self._agent_bursts = [b for b in self._agent_bursts if b[0] > heard]
                return

    # --- limits ----------------------------------------------------------------------------

    def silent_for(self, now: float) -> float:
        """Seconds the caller has been silent since the agent's audio finished (0 while either
        one is talking)."""
        if self.caller_speaking or now < self.agent_audio_until:
            return 0.0
        return now - max(self.caller_last_voice, self.agent_audio_until)

    def woven_transcript(self, transcript: list[dict]) -> list[dict]:
        """``transcript_with_tool_calls``: the utterances with the caller's keypad presses and a
        hosted model's function calls and their results where they happened (as the agent's
        updates arrived), in the shapes of retell-sdk's ``transcript_with_tool_calls``."""
        woven, used, controls = [], 0, set()
        for e in self.events:
            kind = e["event"]
            if kind == "transcript":
                upto = min(e["utterances"], len(transcript))
                woven += [{**u, "words": u.get("words", [])} for u in transcript[used:upto]]
                used = max(used, upto)
            elif kind == "dtmf":
                woven.append({"role": "dtmf", "digit": e["digit"]})
            elif kind == "tool_call":
                woven.append({"role": "tool_call_invocation", "tool_call_id": e["tool_call_id"], "name": e["name"], "arguments": e.get("arguments", "{}")})
            elif kind in ("tool_result", "tool_failed"):
                woven.append({"role": "tool_call_result", "tool_call_id": e["tool_call_id"], "content": e.get("content") or e.get("error", "")})
            elif kind == "call_control" and e.get("source") != "tool":  # (a model's tool call is woven as such)
                arguments = {k: v for k, v in e.items() if k not in ("t_ms", "event", "id", "action", "source")}
                woven.append({"role": "tool_call_invocation", "tool_call_id": e["id"], "name": e["action"], "arguments": json.dumps(arguments)})
                controls.add(e["id"])
            elif kind == "call_control_result" and e["id"] in controls:
                content = "ok" if e["ok"] else f"refused: {e['reason']}"
                woven.append({"role": "tool_call_result", "tool_call_id": e["id"], "content": content})
        woven += [{**u, "words": u.get("words", [])} for u in transcript[used:]]
        return woven

    def unwritten(self) -> dict[str, str]:
        """{record field: why} for a recording or log the writer thread could not open (known
        once the writer has tried: after a ``FileWriter.barrier``)."""
        problems = {}
        files = (("recording_url", "no recording", self.recording and self.recording.file), ("public_log_url", "no public log", self._log_file))
        for name, what, file in files:
            error = getattr(file, "error", None)
            if error is not None:
                problems[name] = f"{what}: {error}"
        return problems

    def close(self) -> None:
        if self._caller_ulaw:
            if self.clock is not None:
                self._caller_flush(self.started + self._caller_at / self.rate, len(self._caller_ulaw))
            else:
                self._caller_batch(self.started + len(self._caller_ulaw) / self.width / self.rate)
        if self.recording is not None:
            if self._agent_ulaw:
                self._agent_batch()
            self.recording.close()
        if self._log is not None:
            self._log.close()
            self._log = None  # (an event after the end, e.g. a control request's result: kept in memory only)


def transcript_fields(transcript: list[dict]) -> dict:
    """The record's ``transcript_object`` and ``transcript`` (word timings only if the agent
    sent them: the web protocol's update carries none)."""
    if not transcript:
        return {}
    return {
        "transcript_object": [{**u, "words": u.get("words", [])} for u in transcript],
        "transcript": "".join(f"{u['role'].capitalize()}: {u['content']}\n" for u in transcript),
    }


def measured_fields(observer: CallObserver, session) -> dict:
    """What a phone call's record keeps of what its relay measured: turn latency, the agent
    link's round trip, and (unless the call is private) the transcript with keypad presses."""
    fields = {
        "e2e_latency": percentiles(observer.turn_latencies_ms),
        "agent_latency": percentiles(observer.agent_latencies_ms),
        "llm_websocket_network_rtt_latency": percentiles(session.stats.rtt_ms),
        "caller_network": observer.clock.summary() if observer.clock is not None else None,
    }
    if not observer.private:
        fields.update(transcript_fields(session.transcript))
        if session.transcript or session.stats.dtmf or any(e["event"] in ("tool_call", "call_control") for e in observer.events):
            fields["transcript_with_tool_calls"] = observer.woven_transcript(session.transcript)
    return fields
