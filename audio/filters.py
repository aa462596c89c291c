"""Anti-alias / anti-image filter design and the polyphase tables the resampler runs on.

Resampling ``in_rate -> out_rate`` is modelled as: zero-stuff by ``L``, low-pass at the virtual
rate ``F = L * in_rate``, keep every ``M``-th sample (``L/M = out_rate/in_rate`` in lowest terms).
The low-pass is a Kaiser-windowed sinc whose transition band is centred on the Nyquist frequency
of the lower rate ``f_lo``: flat to ``0.425 * f_lo`` (3.4 kHz when one side is 8 kHz), at least
``ATTENUATION_DB`` down from ``0.575 * f_lo`` (4.6 kHz). Images and aliases therefore land only in
the 3.4-4.6 kHz transition band, never in the telephone band, and the filter is short enough that
its linear-phase delay is ~1.66 ms for any pair involving 8 kHz (less for higher pairs).

Designs depend only on the rate pair, are computed once (``functools.lru_cache``) and shared
read-only by every stream; a stream only keeps its own input history.

Two table layouts, chosen by size:

``PeriodPlan`` -- one period of the rate pair (``M`` inputs -> ``L`` outputs) is a fixed linear map
``y = A @ window`` with ``A`` of shape ``(L, W)``. Consecutive periods' windows are a strided view
of the input buffer (no copy), so a chunk costs one BLAS product. Used when ``A`` is small (every
pair among the common telephony/audio rates with 8 kHz, 16 kHz, 24 kHz, 48 kHz ...).

``PhasePlan`` -- for pairs whose period is long (e.g. 8001 -> 47999 Hz) the period matrix would be
huge, so each output gathers its own window and coefficient phase (``L`` rows of ``T`` taps).
Slower per sample, but any integer rate pair works with bounded memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

MIN_RATE = 8000
MAX_RATE = 48000

#: Stop-band attenuation the filters are designed for (targets are -60 dB; 5 dB of margin).
ATTENUATION_DB = 65.0
#: Pass-band edge and stop-band edge as fractions of the lower of the two rates.
PASS_EDGE = 0.425
STOP_EDGE = 0.575

#: Largest period matrix (entries) before falling back to per-phase tables: 1 MiB of float32.
PERIOD_MATRIX_LIMIT = 1 << 18
#: Ratios with ``L * M`` up to this get super-periods of ``SUPER_PERIOD`` reduced periods; the
#: block divides the sample count of 10 and 20 ms at every common rate, so streaming in such
#: chunks never has partial periods. Both values were picked by bench/resampler_kernels.py.
SMALL_RATIO = 48
SUPER_PERIOD = 8
#: Up to this many whole periods per chunk are computed one matrix-vector product each.
FEW_PERIODS = 4


@dataclass(frozen=True)
class Prototype:
    """The low-pass prototype at the virtual rate ``L * in_rate``."""

    up: int  # L
    down: int  # M
    taps: np.ndarray  # float64, length N, DC gain L (compensates zero-stuffing)

    @property
    def group_delay(self) -> float:
        """Delay in samples of the virtual rate (linear phase: (N - 1) / 2)."""
        return (len(self.taps) - 1) / 2


def reduced_ratio(in_rate: int, out_rate: int) -> tuple[int, int]:
    g = math.gcd(in_rate, out_rate)
    return out_rate // g, in_rate // g


def kaiser_length_and_beta(attenuation_db: float, transition: float) -> tuple[int, float]:
    """Kaiser's formulas: taps for a transition width given as a fraction of the sample rate."""
    beta = 0.1102 * (attenuation_db - 8.7)
    n = math.ceil((attenuation_db - 7.95) / (2.285 * 2 * math.pi * transition)) + 1
    return n, beta


@lru_cache(maxsize=16)
def prototype(in_rate: int, out_rate: int, attenuation_db: float = ATTENUATION_DB) -> Prototype:
    up, down = reduced_ratio(in_rate, out_rate)
    virtual_rate = up * in_rate
    low = min(in_rate, out_rate)
    cutoff = (PASS_EDGE + STOP_EDGE) / 2 * low / virtual_rate  # cycles per virtual sample
    transition = (STOP_EDGE - PASS_EDGE) * low / virtual_rate
    n, beta = kaiser_length_and_beta(attenuation_db, transition)
    centre = (n - 1) / 2
    t = np.arange(n, dtype=np.float64) - centre
    taps = 2 * cutoff * np.sinc(2 * cutoff * t) * np.kaiser(n, beta)
    taps *= up / taps.sum()
    taps.setflags(write=False)
    return Prototype(up, down, taps)


class PeriodPlan:
    """Period-matrix layout. A period here is ``block`` periods of the reduced ratio
    (``rows = L*block`` outputs from ``step = M*block`` inputs): grouping small periods makes the
    overlapping windows that BLAS has to copy nearly disjoint (the copy of a 48 kHz -> 8 kHz
    window matrix shrinks ~20x). ``run`` works on a float32 buffer whose index 0 is input
    ``-history`` relative to the start of the period of the next output."""

    kind = "period"

    def __init__(self, proto: Prototype, block: int = 1):
        L, M, h = proto.up, proto.down, proto.taps
        n = len(h)
        self.up, self.down = L, M
        self.rows, self.step = L * block, M * block
        self.history = (n - 1) // L  # inputs before a period start that its outputs may use
        self.width = self.history + ((self.rows - 1) * M) // L + 1
        self.matrix = _coefficients(h, L, M, self.rows, self.history, self.width)
        self.matrix.setflags(write=False)
        self.matrix_t = self.matrix.T  # (a view, made once: it is used for every frame)

    @property
    def nbytes(self) -> int:
        return self.matrix.nbytes

    def run(self, buf: np.ndarray, first: int, end: int, origin: int) -> np.ndarray:
        """Outputs ``first .. end-1`` counted from the current period start (``origin`` is
        always ``-history`` here: whole periods are retired at once). Returns float32 samples
        in output order, 1-D or a C-ordered (periods, rows) array."""
        R, S, W = self.rows, self.step, self.width
        if not first and not end % R:  # whole periods only: the streaming steady state
            return self._periods(buf, end // R)
        if end <= R:  # inside the current period
            return np.dot(self.matrix[first:end], buf[:W])
        pieces = []
        period = 0
        if first:  # finish the period the previous chunk started
            pieces.append(np.dot(self.matrix[first:], buf[:W]))
            period = 1
        full = end // R - period
        if full > 0:
            pieces.append(self._periods(buf[period * S :], full).reshape(-1))
        tail = end % R
        if tail:
            start = (end // R) * S
            pieces.append(np.dot(self.matrix[:tail], buf[start : start + W]))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _periods(self, buf: np.ndarray, count: int) -> np.ndarray:
        if count > FEW_PERIODS:  # one matrix product
            return np.dot(_windows(buf, count, self.width, self.step), self.matrix_t)
        # few long periods (8k<->44.1k: two per 20 ms): one matrix-vector product per period is
        # ~1.5x faster than a matrix product with only 1-4 rows
        out = np.empty((count, self.rows), np.float32)
        W, S = self.width, self.step
        for p in range(count):
            np.dot(self.matrix, buf[p * S : p * S + W], out=out[p])
        return out


def _coefficients(h: np.ndarray, L: int, M: int, rows: int, history: int, width: int) -> np.ndarray:
    """float32 ``(rows, width)`` matrix ``[r, c] = h[r*M - (c - history)*L]``: row ``r`` of a
    period applied to the inputs from ``history`` before the period start (zero outside ``h``)."""
    r = np.arange(rows)[:, None]
    idx = r * M - (np.arange(width)[None, :] - history) * L
    valid = (idx >= 0) & (idx < len(h))
    return np.where(valid, h[np.clip(idx, 0, len(h) - 1)], 0.0).astype(np.float32)


def _windows(buf: np.ndarray, rows: int, width: int, step: int) -> np.ndarray:
    """Read-only view of ``rows`` overlapping windows ``buf[i*step : i*step + width]``."""
    s = buf.strides[0]
    return np.ndarray((rows, width), buf.dtype, buf, 0, (step * s, s))


class PhasePlan:
    """Per-phase layout: output ``k`` uses inputs ``j-T+1 .. j`` (``j = floor(k*M/L)``) and
    coefficient phase ``k*M - j*L``; windows are gathered rows of a strided view."""

    kind = "phase"

    def __init__(self, proto: Prototype):
        L, M, h = proto.up, proto.down, proto.taps
        n = len(h)
        self.up, self.down = L, M
        self.rows, self.step = L, M
        self.history = (n - 1) // L
        self.taps = -(-n // L)  # T = ceil(N / L)
        padded = np.zeros(L * self.taps)
        padded[:n] = h
        # phases[phi, i] = h[phi + i*L]; stored reversed so a forward window row matches.
        self.phases = np.ascontiguousarray(padded.reshape(self.taps, L).T[:, ::-1], dtype=np.float32)
        self.phases.setflags(write=False)

    @property
    def nbytes(self) -> int:
        return self.phases.nbytes

    def run(self, buf: np.ndarray, first: int, end: int, origin: int) -> np.ndarray:
        """Outputs ``first .. end-1`` of the current period; ``buf[0]`` is input ``origin``."""
        L, M, T = self.up, self.down, self.taps
        k = np.arange(first, end, dtype=np.int64)
        last = (k * M) // L
        phase = k * M - last * L
        window = _windows(buf, len(buf) - T + 1, T, 1)[last - T + 1 - origin]
        return np.einsum("ij,ij->i", window, self.phases[phase])


@lru_cache(maxsize=32)
def plan(in_rate: int, out_rate: int) -> PeriodPlan | PhasePlan:
    """The shared, read-only table set for one rate pair."""
    proto = prototype(in_rate, out_rate)
    L, M = proto.up, proto.down
    width = (len(proto.taps) - 1) // L + ((L - 1) * M) // L + 1
    if L * width > PERIOD_MATRIX_LIMIT:
        return PhasePlan(proto)
    if L * M <= SMALL_RATIO:  # e.g. 8k<->48k, 16k<->24k: group short periods
        return PeriodPlan(proto, block=SUPER_PERIOD)
    return PeriodPlan(proto)
