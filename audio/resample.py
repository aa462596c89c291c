"""Streaming sample-rate conversion of s16le mono PCM.

``Resampler(in_rate, out_rate).process(chunk)`` returns, for every chunk of any length, all the
output samples whose inputs have arrived: after ``n`` input samples exactly ``ceil(n * out/in)``
output samples have been returned, so output is steady (never more than one sample early or late
against the ideal share) and delayed only by the filter's linear-phase group delay
(``delay_ms``, ~1.66 ms for pairs with 8 kHz). The output is identical, to rounding, whatever the
chunking: every output sample is the same dot product over the same inputs.
"""

from __future__ import annotations

import math
from numbers import Integral

import numpy as np

from .filters import FEW_PERIODS, MAX_RATE, MIN_RATE, _windows, plan, prototype

try:  # the clip ufunc itself: np.clip adds ~2 us of Python dispatch per call
    from numpy._core.umath import clip as _clip
except ImportError:  # pragma: no cover - numpy layout changed
    _clip = np.clip

_INT16_MIN = np.array(-32768, np.float32)
_INT16_MAX = np.array(32767, np.float32)
_EMPTY = np.zeros(0, np.float32)


def check_rate(name: str, rate: object) -> int:
    """Validate a sample rate: an integer in [MIN_RATE, MAX_RATE]."""
    if isinstance(rate, bool) or not isinstance(rate, Integral):
        raise ValueError(f"{name} must be an integer number of Hz, got {rate!r}")
    rate = int(rate)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"{name} must be between {MIN_RATE} and {MAX_RATE} Hz, got {rate}")
    return rate


def check_pcm(data: object) -> memoryview:
    """Validate a non-empty s16le chunk; returns a byte view of it."""
    try:
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"audio must be bytes-like, got {type(data).__name__}") from None
    if not view.nbytes:
        raise ValueError("empty audio chunk")
    if view.nbytes % 2:
        raise ValueError(f"s16le audio needs an even number of bytes, got {view.nbytes}")
    return view


def to_int16_bytes(y: np.ndarray) -> bytes:
    """Round and saturate float samples to s16le bytes (``y`` is overwritten)."""
    np.rint(y, out=y)
    _clip(y, _INT16_MIN, _INT16_MAX, y)
    return y.astype("<i2").tobytes()


#: Per-stream buffer kept between chunks, in float32 samples (12 KiB). Chunks that do not fit
#: are processed in a temporary buffer, so state stays bounded whatever the chunk size.
STATE_SAMPLES = 3072


class Resampler:
    """Stateful polyphase windowed-sinc resampler for one stream (s16le mono)."""

    # _buf[:_held] holds the inputs still needed; _buf[0] is input number _origin counted from
    # the start of the current period (M inputs -> L outputs), and _row is the next output's
    # number within that period.
    __slots__ = ("in_rate", "out_rate", "_plan", "_buf", "_held", "_origin", "_row", "_delay_virtual", "_fed", "_view")

    def __init__(self, in_rate: int, out_rate: int):
        self.in_rate = check_rate("in_rate", in_rate)
        self.out_rate = check_rate("out_rate", out_rate)
        self._buf = _EMPTY
        self._held = 0
        self._origin = 0
        self._row = 0
        self._fed = False
        self._view = None  # the steady state's window view of _buf
        if self.in_rate == self.out_rate:
            self._plan = None
            self._delay_virtual = 0.0
            return
        p = self._plan = plan(self.in_rate, self.out_rate)
        self._delay_virtual = prototype(self.in_rate, self.out_rate).group_delay
        width = getattr(p, "width", p.history + p.step)
        self._buf = np.zeros(min(STATE_SAMPLES, p.history + width + self.in_rate // 50), np.float32)
        self.reset()

    @property
    def passthrough(self) -> bool:
        return self._plan is None

    @property
    def delay_ms(self) -> float:
        """Algorithmic delay: output lags input by this much (constant, linear phase)."""
        if self._plan is None:
            return 0.0
        return 1000.0 * self._delay_virtual / (self._plan.up * self.in_rate)

    @property
    def state_bytes(self) -> int:
        """Bytes of per-stream state (the filter tables are shared and not counted)."""
        return self._buf.nbytes

    def reset(self) -> None:
        """Forget all history (e.g. on barge-in): the next chunk starts from silence."""
        if self._plan is not None:
            self._held = self._plan.history
            self._buf[: self._held] = 0.0
            self._origin = -self._held
        self._row = 0
        self._fed = False  # no input since the last reset: flush has nothing to return

    def process(self, pcm: bytes) -> bytes:
        """Resample one chunk; returns every output sample that is now due."""
        if type(pcm) is not bytes or not pcm or len(pcm) & 1:
            pcm = check_pcm(pcm)
        p = self._plan
        if p is None:
            return bytes(pcm)
        n = len(pcm) >> 1
        # The streaming steady state (a 20 ms frame is whole periods for the usual rates): the
        # same products as _advance, without its bookkeeping for partial periods.
        if p.kind == "period" and not self._row and n % p.step == 0:
            h = p.history
            total = h + n
            buf = self._buf
            if self._held == h and total <= len(buf):
                buf[h:total] = np.frombuffer(pcm, dtype="<i2")
                count = n // p.step
                if count > FEW_PERIODS:  # one matrix product over a cached window view
                    windows = self._view
                    if windows is None or windows.shape[0] != count or windows.base is not buf:
                        windows = self._view = _windows(buf, count, p.width, p.step)
                    y = np.dot(windows, p.matrix_t)
                else:
                    y = p._periods(buf, count)
                buf[:h] = buf[n:total]
                self._fed = True
                return to_int16_bytes(y)
        return to_int16_bytes(self._advance(np.frombuffer(pcm, dtype="<i2")))

    def flush(self) -> bytes:
        """End of stream: return the delayed tail (the last ``delay_ms`` of audio) and reset.
        Returns nothing if nothing was fed since the last reset or flush."""
        if self._plan is None or not self._fed:
            self.reset()
            return b""
        p = self._plan
        pending = self._origin + self._held  # inputs since the current period start
        due = -(-pending * p.up // p.down)
        last = math.ceil((pending * p.up + self._delay_virtual) / p.down)
        zeros = np.zeros(math.ceil(self._delay_virtual / p.up) + 1, np.float32)
        y = self._advance(zeros).reshape(-1)[: last - due]
        self.reset()
        return to_int16_bytes(y) if len(y) else b""

    def _advance(self, x: np.ndarray) -> np.ndarray:
        p = self._plan
        held = self._held
        total = held + len(x)
        end = -(-(self._origin + total) * p.up // p.down)  # outputs due in the current period
        need = total
        if p.kind == "period" and end % p.rows:
            # a partial period reads (zero-weighted) samples that have not arrived yet
            need = max(total, ((end - 1) // p.rows) * p.step + p.width)
        buf = self._buf
        if need > len(buf):
            buf = np.empty(need, np.float32)
            buf[:held] = self._buf[:held]
            if need <= STATE_SAMPLES:
                self._buf = buf
        buf[held:total] = x
        if need > total:
            buf[total:need] = 0.0
        self._fed = True
        first = self._row
        if end <= first:
            y, start = _EMPTY, 0
        else:
            y = p.run(buf, first, end, self._origin)
            done = end // p.rows
            self._row = end - done * p.rows
            if p.kind == "period":  # whole periods retire; the origin stays at -history
                start = done * p.step
            else:  # keep exactly the window of the next output
                oldest = (end * p.down) // p.up - p.taps + 1
                start = oldest - self._origin
                self._origin = oldest - done * p.step
        self._held = total - start
        self._buf[: self._held] = buf[start:total]
        return y
