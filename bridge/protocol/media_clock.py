"""The caller's media clock: where each of Twilio's frames belongs on the call's timeline, read
from the frame itself (``media.timestamp``: ms since the stream began; ``media.chunk``: its
count), not from when it arrived; and what the network did to the frames on the way.

After a network stall Twilio delivers the late frames in a burst; placed by arrival, the caller's
audio would show a gap and then every later word late by the stall, to the end of the call
(pipecat#4561, #2676). Placed at its timestamp, each frame lands where it was said: a frame that
never came (a gap in ``chunk``) is silence in its place, a duplicate is dropped, one that comes
back in the wrong order goes where it belongs.

Sans-I/O: frames' sizes, fields and arrival times (seconds since the stream started, the
bridge's clock) in; sample positions and figures out. ``bridge.media.observer`` places the audio
(recording, voice activity, live listeners) where this says.

The figures (``summary``, the record's ``caller_network``):

- ``inbound_delay_ms``: each frame's arrival against its timestamp, beyond the call's best frame
  (p50, p99, max): 0 on a steady network, the stall's length for the first frame after one;
- ``longest_stall_ms``, ``stalls``: the longest time no frame arrived, and how many such times
  reached ``STALL_NOTE_S`` (each is noted on the public log);
- ``late_bursts``: runs of frames that arrived over ``LATE_S`` later than the best (a stall's
  backlog, delivered at once, is one);
- ``frames``, ``frames_lost`` (chunks that never came), ``frames_duplicated``,
  ``frames_reordered`` (came after a later one, still placed), ``frames_too_late`` (came after
  their place was written: counted, not placed);
- ``setup_backlog_ms``: caller audio that waited for the call's set-up (the agent connecting)
  before the bridge read it: not the network's doing, so not in the delay figures.
"""

from __future__ import annotations

from collections import deque

#: a stall (no caller frame for this long) is noted on the public log
STALL_NOTE_S = 0.5
#: a frame this much later than the call's best frame is late; a run of late frames is a burst
LATE_S = 0.1
#: a timestamp further ahead of the arrival clock than this is not Twilio's clock (placed by
#: arrival instead): nothing arrives before it was said. Twilio's clock may lead the bridge's by
#: as long as the bridge took to take the stream up (its ``start`` read late, under a burst of
#: calls: over a second seen), so the allowance is wide.
FUTURE_S = 5.0
#: chunks remembered to tell a duplicate from a frame that comes back late
CHUNK_MEMORY = 512


def _delay_bin(ms: float) -> int:
    """Delays are counted in 1 ms bins up to 1 s, 10 ms to 10 s, then 100 ms: a call's figures
    cost a bounded dict, whatever its length."""
    a = abs(ms)
    step = 1 if a < 1000 else 10 if a < 10_000 else 100
    return int(round(ms / step)) * step


class MediaClock:
    """One call's caller leg. ``place`` says where a frame goes; ``summary`` what the network did."""

    def __init__(self, rate: int = 8000):
        self.rate = rate
        self.trusted = True  # the frames' timestamps are Twilio's clock (else: by arrival)
        self.frames = 0
        self.lost = 0
        self.duplicated = 0
        self.reordered = 0
        self.too_late = 0
        self.stalls = 0
        self.longest_stall_s = 0.0
        self.late_bursts = 0
        self.backlog_s = 0.0
        self._backlog = False  # the frames handed over now waited for the call's set-up
        self._best: float | None = None  # the smallest arrival - capture seen (s)
        self._worst: float | None = None
        self._delays: dict[int, int] = {}  # arrival - capture (ms bins) -> frames
        self._late = False
        self._last_arrival: float | None = None
        self._max_chunk = 0
        self._missing: set[int] = set()  # chunk numbers skipped over, not yet come
        self._seen: deque[int] = deque()  # recent chunk numbers (with _seen_set)
        self._seen_set: set[int] = set()
        self._next = 0  # the position just after the latest frame placed (samples)
        #: (the position a frame ends at, when it arrived), for the last few seconds: when the
        #: bridge had the audio up to a point (the agent's own latency starts there)
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=500)
        #: a stall over STALL_NOTE_S just ended: (its length s, the frame's position samples),
        #: read (and reset) by the observer for the public log
        self.stall_ended: tuple[float, int] | None = None

    # --- frames -----------------------------------------------------------------------------

    def reading(self, backlog: bool) -> None:
        """The bridge reads the frames that queued while the call was set up (``True``), then
        is caught up (``False``): the former waited for the set-up, not for the network."""
        self._backlog = backlog

    def place(self, samples: int, timestamp_ms: int | None, chunk: int | None, now: float) -> int | None:
        """A frame of ``samples`` samples arrived at ``now``: its position (samples since the
        stream began), or None for a duplicate (not to be placed again)."""
        self.frames += 1
        if chunk is not None and chunk > 0:
            if chunk in self._seen_set:
                self.duplicated += 1
                self.frames -= 1
                return None
            self._remember(chunk)
            if chunk > self._max_chunk:
                if self._max_chunk and chunk > self._max_chunk + 1:
                    gap = chunk - self._max_chunk - 1
                    self.lost += gap
                    if gap <= CHUNK_MEMORY:
                        self._missing.update(range(self._max_chunk + 1, chunk))
                self._max_chunk = chunk
            elif chunk in self._missing:  # it came after all, after a later one
                self._missing.discard(chunk)
                self.lost -= 1
                self.reordered += 1
            else:  # older than we remember: a duplicate we forgot
                self.duplicated += 1
                self.frames -= 1
                return None
        position = self._position(samples, timestamp_ms, now)
        self._network(position, samples, timestamp_ms, now)
        end = position + samples
        if end > self._next:
            self._next = end
        self._arrivals.append((end, now))
        return position

    def _position(self, samples: int, timestamp_ms: int | None, now: float) -> int:
        if timestamp_ms is not None and self.trusted:
            if 0 <= timestamp_ms <= (now + FUTURE_S) * 1000:
                return timestamp_ms * self.rate // 1000
            self.trusted = False  # (from here on, by arrival: one clock per call)
        # no timestamp (a web caller): contiguous, unless it fell behind the arrival clock
        return max(self._next, int(now * self.rate) - samples) if self._next else max(0, int(now * self.rate) - samples)

    def _network(self, position: int, samples: int, timestamp_ms: int | None, now: float) -> None:
        captured_end = (position + samples) / self.rate  # when it was said (its end), on Twilio's clock
        if self._backlog:  # waited for the bridge to read the caller at all (set-up): not the network
            self.backlog_s = max(self.backlog_s, captured_end)
            return
        last, self._last_arrival = self._last_arrival, now
        if last is not None:
            gap = now - last
            if gap > self.longest_stall_s:
                self.longest_stall_s = gap
            if gap >= STALL_NOTE_S:
                self.stalls += 1
                self.stall_ended = (gap, position)
        if timestamp_ms is None or not self.trusted:
            return
        delay = now - captured_end
        key = _delay_bin(delay * 1000)
        self._delays[key] = self._delays.get(key, 0) + 1
        if self._best is None or delay < self._best:
            self._best = delay
        if self._worst is None or delay > self._worst:
            self._worst = delay
        late = delay - self._best > LATE_S
        if late and not self._late:
            self.late_bursts += 1
        self._late = late

    def _remember(self, chunk: int) -> None:
        self._seen.append(chunk)
        self._seen_set.add(chunk)
        if len(self._seen) > CHUNK_MEMORY:
            self._seen_set.discard(self._seen.popleft())
        if len(self._missing) > CHUNK_MEMORY:  # (a huge gap: forget the oldest holes)
            for old in sorted(self._missing)[: len(self._missing) - CHUNK_MEMORY]:
                self._missing.discard(old)

    # --- reading the clock --------------------------------------------------------------------

    def to_bridge(self, position_ms: float) -> float:
        """Twilio's ``position_ms`` on the bridge's clock (s since the stream started). Twilio's
        clock starts with the stream, as the bridge's does at ``start``; only if frames arrive
        earlier than that says (the ``start`` frame itself came late) does the best frame's
        delay move it (a backlog's frames, all late, never do)."""
        if not self.trusted:
            return position_ms / 1000
        return position_ms / 1000 + min(0.0, self._best or 0.0)

    def arrived(self, position_ms: float) -> float | None:
        """When the bridge had the caller's audio up to ``position_ms`` (s since the stream
        started; None if that is older than it remembers)."""
        position = position_ms * self.rate / 1000
        for end, at in self._arrivals:
            if end >= position:
                return at
        return None

    def summary(self) -> dict:
        """The record's ``caller_network`` (ms figures rounded to 0.1 ms)."""
        delays = None
        if self._delays and self._best is not None:
            best = _delay_bin(self._best * 1000)
            ordered = sorted(self._delays.items())
            total = sum(n for _, n in ordered)

            def quantile(q: float) -> float:
                rank, seen = q * (total - 1), 0
                for key, n in ordered:
                    seen += n
                    if seen > rank:
                        return max(0.0, key - best)
                return max(0.0, ordered[-1][0] - best)

            delays = {"p50": round(quantile(0.5), 1), "p99": round(quantile(0.99), 1), "max": round((self._worst - self._best) * 1000, 1)}
        return {
            "clock": "twilio" if self.trusted else "arrival",
            "inbound_delay_ms": delays,
            "longest_stall_ms": round(self.longest_stall_s * 1000, 1),
            "stalls": self.stalls,
            "late_bursts": self.late_bursts,
            "frames": self.frames,
            "frames_lost": self.lost,
            "frames_duplicated": self.duplicated,
            "frames_reordered": self.reordered,
            "frames_too_late": self.too_late,
            "setup_backlog_ms": round(self.backlog_s * 1000, 1),
        }
