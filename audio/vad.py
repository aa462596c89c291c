"""Energy-based voice activity detection with an adaptive noise floor and hysteresis.

Audio (s16le mono, any rate) is cut into frames (20 ms by default). Each frame's level is the
mean power of the pre-emphasised signal (``x[n] - 0.95 x[n-1]``, which removes DC and mains hum
by ~24 dB and keeps the 0.5-3.4 kHz band that carries speech) in dB full scale. A frame whose
energy sits in one sample (a click on the line) counts as unvoiced and leaves the floor alone.

The noise floor follows quiet frames down quickly and rises slowly (``floor_rise_db_per_s``), but
never stays below the quietest frame of the last ``floor_window_ms`` (speech dips within three
seconds; noise does not), so stationary line noise (hiss, hum, a noisy line, a step in its level)
becomes the floor within three seconds and only what stands above it counts. Digital silence
(dropouts) leaves the floor alone, and a line that starts digitally silent is taken as quiet
(-60 dBFS) until it shows otherwise, so speech right after silence is caught at once; the price
is that line noise fading in after digital silence reads as at most one 3 s turn. Speech starts after ``start_ms`` of consecutive frames above ``floor + start_margin_db``
(and above ``min_start_dbfs``, so faint noise on a digitally silent line never triggers); it
continues while frames stay above the lower ``floor + continue_margin_db`` (hysteresis) and ends
after ``end_silence_ms`` below it. Events carry stream times: a start is stamped at the first
frame of the run above the lower threshold that led to it (a soft onset such as "h" counts), an
end at the end of its last voiced frame (what turn-latency measurement needs), even though both
are only known a little later.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from .resample import check_pcm, check_rate

SPEECH_START = "speech_start"
SPEECH_END = "speech_end"

_FULL_SCALE_POWER = 32768.0**2
#: Frames below this are digital silence (mu-law's quietest codes decode to about -72 dBFS):
#: they say nothing about the line's noise, so they leave the floor alone.
DIGITAL_SILENCE_DBFS = -75.0
#: The floor assumed for a line that starts digitally silent.
QUIET_LINE_DBFS = -60.0
#: A frame where one sample holds more than this share of the energy is a click, not speech.
IMPULSE_SHARE = 0.25
_MIN_DB = -100.0


@dataclass(frozen=True, slots=True)
class VadEvent:
    kind: str  # SPEECH_START or SPEECH_END
    at_ms: float  # stream time of the first voiced frame's start, or the last voiced frame's end


class VoiceActivityDetector:
    def __init__(
        self,
        sample_rate: int = 8000,
        *,
        frame_ms: int = 20,
        start_ms: int = 60,
        end_silence_ms: int = 600,
        start_margin_db: float = 9.0,
        continue_margin_db: float = 4.0,
        min_start_dbfs: float = -50.0,
        floor_rise_db_per_s: float = 2.0,
        floor_window_ms: int = 3000,
        pre_emphasis: float = 0.95,
    ):
        self.sample_rate = check_rate("sample_rate", sample_rate)
        for name, value in (("frame_ms", frame_ms), ("start_ms", start_ms), ("end_silence_ms", end_silence_ms)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if continue_margin_db > start_margin_db:
            raise ValueError("continue_margin_db must not exceed start_margin_db (hysteresis)")
        self.frame_ms = frame_ms
        self.frame_samples = self.sample_rate * frame_ms // 1000
        self._frame_duration_ms = self.frame_samples * 1000 / self.sample_rate  # exact, e.g. 19.95 at 11025
        if self.frame_samples < 2:
            raise ValueError(f"frame_ms={frame_ms} is too short at {self.sample_rate} Hz")
        self.start_frames = max(1, math.ceil(start_ms / frame_ms))
        self.end_frames = max(1, math.ceil(end_silence_ms / frame_ms))
        self.start_margin_db = start_margin_db
        self.continue_margin_db = continue_margin_db
        self.min_start_dbfs = min_start_dbfs
        self.floor_rise_db = floor_rise_db_per_s * frame_ms / 1000
        self.floor_window = max(1, floor_window_ms // frame_ms)
        self.pre_emphasis = pre_emphasis
        self.reset()

    def reset(self) -> None:
        self.speaking = False
        self.noise_floor_db: float | None = None
        self.level_db = _MIN_DB
        self._pending = np.zeros(0, np.float32)
        self._previous = 0.0  # last sample of the previous frame (pre-emphasis state)
        self._frames = 0  # frames analysed so far
        self._run = 0  # consecutive frames on the other side of the current state
        self._onset = 0  # first frame of the current run above the lower threshold
        self._last_voiced_end = 0  # frame index just after the last voiced frame
        # sliding minimum over the last floor_window non-silent frames (monotonic deque)
        self._minima: deque[tuple[int, float]] = deque()  # (non-silent frame count, level), increasing
        self._noisy_frames = 0
        self._seen_silence = False  # digital silence before any line noise: a quiet line

    @property
    def time_ms(self) -> float:
        """Stream time analysed so far (whole frames)."""
        return self._frames * self._frame_duration_ms

    def process(self, pcm: bytes) -> list[VadEvent]:
        """Feed s16le audio of any length; returns the events it completes, in order."""
        x = np.frombuffer(check_pcm(pcm), dtype="<i2").astype(np.float32)
        if len(self._pending):
            x = np.concatenate((self._pending, x))
        n = self.frame_samples
        whole = len(x) // n
        self._pending = x[whole * n :].copy()
        events: list[VadEvent] = []
        if not whole:
            return events
        frames = x[: whole * n].reshape(whole, n)
        emphasised = frames.copy()
        emphasised[:, 1:] -= self.pre_emphasis * frames[:, :-1]
        emphasised[1:, 0] -= self.pre_emphasis * frames[:-1, -1]
        emphasised[0, 0] -= self.pre_emphasis * self._previous
        self._previous = float(frames[-1, -1])
        squares = np.square(emphasised, out=emphasised)
        energy = squares.sum(axis=1)
        # a click puts most of a frame's energy in one or two samples; speech and noise spread
        # it (the largest of 160 samples holds ~5%)
        impulsive = squares.max(axis=1) > IMPULSE_SHARE * energy
        levels = 10 * np.log10(np.maximum(energy / (n * _FULL_SCALE_POWER), 10 ** (_MIN_DB / 10)))
        for level, click in zip(levels.tolist(), impulsive.tolist()):
            event = self._frame(None if click else level)
            if event is not None:
                events.append(event)
        return events

    def finish(self) -> list[VadEvent]:
        """End of stream: closes speech still going on (at the end of its last voiced frame)."""
        events = []
        if self.speaking:
            events.append(VadEvent(SPEECH_END, self._last_voiced_end * self._frame_duration_ms))
        self.reset()
        return events

    def _frame(self, level: float | None) -> VadEvent | None:
        """One frame's level in dBFS, or None for a click (unvoiced, and no news about the
        noise floor)."""
        index = self._frames
        self._frames += 1
        if level is not None:
            self.level_db = level
            if level <= DIGITAL_SILENCE_DBFS:
                self._seen_silence = True
            elif self.noise_floor_db is None:
                # a line that was digitally silent is quiet: what comes next is judged against that
                self.noise_floor_db = QUIET_LINE_DBFS if self._seen_silence else level
        floor = self.noise_floor_db if self.noise_floor_db is not None else _MIN_DB
        voiced_low = level is not None and level > self._low_threshold(floor)
        event = None
        if not self.speaking:
            if not voiced_low:
                self._onset = index + 1
            high = max(floor + self.start_margin_db, self.min_start_dbfs)
            self._run = self._run + 1 if level is not None and level > high else 0
            if self._run >= self.start_frames:
                self.speaking = True
                self._run = 0
                self._last_voiced_end = index + 1
                event = VadEvent(SPEECH_START, self._onset * self._frame_duration_ms)
        elif voiced_low:
            self._run = 0
            self._last_voiced_end = index + 1
        else:
            self._run += 1
            if self._run >= self.end_frames:
                self.speaking = False
                self._run = 0
                self._onset = index + 1
                event = VadEvent(SPEECH_END, self._last_voiced_end * self._frame_duration_ms)
        if level is not None and level > DIGITAL_SILENCE_DBFS:
            # the floor follows quiet frames down quickly and rises slowly, but never stays below
            # the quietest frame of the last floor_window: what never dips is noise, not speech
            minima = self._minima
            count = self._noisy_frames = self._noisy_frames + 1
            while minima and minima[-1][1] >= level:
                minima.pop()
            minima.append((count, level))
            if minima[0][0] <= count - self.floor_window:
                minima.popleft()
            if level < floor:
                floor += 0.5 * (level - floor)
            else:
                floor = min(level, floor + self.floor_rise_db)
            if self._noisy_frames >= self.floor_window:
                floor = max(floor, minima[0][1])
            self.noise_floor_db = floor
        return event

    def _low_threshold(self, floor: float) -> float:
        """The continue threshold (hysteresis: below the start threshold by the margins' gap)."""
        hysteresis = self.start_margin_db - self.continue_margin_db
        return max(floor + self.continue_margin_db, self.min_start_dbfs - hysteresis)
