"""Resampler benchmark: ours against audioop.ratecv and soxr.ResampleStream (HQ), one table.

    python -m bench.resampler            # full table (about a minute)
    python -m bench.resampler --quick    # fewer timing repeats

Every engine streams the same signals in 20 ms chunks, bytes in -> bytes out, for 8000 -> R and
R -> 8000. Columns:

  snr1k/snr3k  tone SNR (noise + distortion), least-squares fit of the tone: delay-independent
  snrN         band-limited noise (64 tones, 100-3400 Hz), after aligning the engine's own delay
               (fractional, found by search) and gain
  ripple       max - min gain over 100-3400 Hz, dB
  img/alias    up: energy above 4.6 kHz for tones up to 3.4 kHz (worst), dB re the tone;
               down: what tones between 4.6 kHz and R/2 put into 0-3.4 kHz (worst), dB re input
  delay        alignment delay found for the noise, ms
  latency      worst, over the stream, of how far the output lags the input that has arrived:
               alignment delay plus whatever the engine holds back (bursts), ms
  burst        largest difference between a chunk's output and its exact share, samples
  us/frame     median of 5 runs of the mean time per 20 ms frame, bytes in -> bytes out, one core
  state        memory a live stream holds (C allocator growth over 300 streams, mallinfo2), KiB
  seam         ours only: max |streamed - one-shot| over random chunkings, LSB

Targets (issue 2): SNR >= 60 dB, ripple <= 0.1 dB, images/aliases <= -60 dB, delay <= 2 ms with
steady output, <= 10 us/frame for integer ratios and <= 20 us for the others, state <= 16 KiB,
seam <= 1 LSB.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import timeit
import tracemalloc

import numpy as np

from audio import Resampler
from audio._audioop import audioop

try:
    import soxr
except ImportError:  # pragma: no cover
    soxr = None

RATES = [16000, 22050, 24000, 44100, 48000]
AMPLITUDE = 10000.0


# --- engines: each a factory of a "process(bytes) -> bytes" stream ---------------------------


def ours(a: int, b: int):
    return Resampler(a, b).process


def ratecv(a: int, b: int):
    state = None

    def process(chunk: bytes) -> bytes:
        nonlocal state
        out, state = audioop.ratecv(chunk, 2, 1, a, b, state)
        return out

    return process


def soxr_hq(a: int, b: int):
    stream = soxr.ResampleStream(a, b, 1, dtype="int16", quality="HQ")

    def process(chunk: bytes) -> bytes:
        return stream.resample_chunk(np.frombuffer(chunk, "<i2")).tobytes()

    return process


ENGINES = {"ours": ours, "audioop.ratecv": ratecv}
if soxr is not None:
    ENGINES["soxr HQ"] = soxr_hq


# --- signals and measurements --------------------------------------------------------------


def to_pcm(x: np.ndarray) -> bytes:
    return np.clip(np.rint(x), -32768, 32767).astype("<i2").tobytes()


def run(factory, a: int, b: int, x: np.ndarray) -> tuple[np.ndarray, list[int]]:
    process = factory(a, b)
    pcm = to_pcm(x)
    step = 2 * (a // 50)
    counts, out = [], []
    for i in range(0, len(pcm), step):
        y = process(pcm[i : i + step])
        counts.append(len(y) // 2)
        out.append(y)
    return np.frombuffer(b"".join(out), "<i2").astype(float), counts


def fit_tone(y: np.ndarray, rate: int, freq: float) -> tuple[float, float]:
    """(amplitude, SNR dB) of a tone in y by least squares."""
    t = np.arange(len(y)) / rate
    basis = np.column_stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)])
    coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
    fitted = basis @ coef
    return float(np.hypot(*coef)), 10 * np.log10(np.sum(fitted**2) / max(np.sum((y - fitted) ** 2), 1e-30))


class Multitone:
    """Band-limited noise as a sum of sinusoids: exact at any rate and any fractional delay."""

    def __init__(self, lo=100.0, hi=3400.0, count=64, seed=7):
        rng = np.random.default_rng(seed)
        self.freqs = rng.uniform(lo, hi, count)
        self.phases = rng.uniform(0, 2 * np.pi, count)
        self.amp = AMPLITUDE / np.sqrt(count / 2) / 2

    def at(self, t: np.ndarray) -> np.ndarray:
        return self.amp * np.sin(2 * np.pi * self.freqs[None, :] * t[:, None] + self.phases).sum(axis=1)


def aligned_snr(y: np.ndarray, rate: int, signal: Multitone, skip: int) -> tuple[float, float]:
    """Find the engine's delay d (s) and gain g minimising |y - g*s(t - d)|; returns (snr, d)."""
    seg = y[skip : skip + rate // 2]
    t = (np.arange(len(seg)) + skip) / rate

    def residual(d):
        s = signal.at(t - d)
        g = np.dot(seg, s) / np.dot(s, s)
        return np.sum((seg - g * s) ** 2), g, s

    # coarse: integer lags by cross-correlation, then golden-section on the fraction
    ref = signal.at(t)
    lags = np.arange(0, int(0.25 * rate))
    corr = [np.dot(seg[lag:], ref[: len(ref) - lag]) for lag in lags]
    d0 = lags[int(np.argmax(corr))] / rate
    lo, hi = d0 - 1.0 / rate, d0 + 1.0 / rate
    phi = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        m1, m2 = hi - phi * (hi - lo), lo + phi * (hi - lo)
        if residual(m1)[0] < residual(m2)[0]:
            hi = m2
        else:
            lo = m1
    d = (lo + hi) / 2
    err, g, s = residual(d)
    return 10 * np.log10(np.sum((g * s) ** 2) / max(err, 1e-30)), d


def band_db(y: np.ndarray, rate: int, lo: float, hi: float, reference: float) -> float:
    w = np.blackman(len(y))
    spec = np.abs(np.fft.rfft(y * w)) ** 2
    f = np.fft.rfftfreq(len(y), 1 / rate)
    return 10 * np.log10(max(spec[(f >= lo) & (f <= hi)].sum(), 1e-30) / reference)


def windowed_energy(x: np.ndarray) -> float:
    return float((np.abs(np.fft.rfft(x * np.blackman(len(x)))) ** 2).sum())


def tone(freq: float, rate: int, seconds: float) -> np.ndarray:
    return AMPLITUDE * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def quality(factory, a: int, b: int) -> dict:
    skip = b // 5  # 200 ms: past any start-up
    row = {}
    for freq, key in ((1000, "snr1k"), (3000, "snr3k")):
        y, _ = run(factory, a, b, tone(freq, a, 1.0))
        row[key] = fit_tone(y[skip:], b, freq)[1]
    signal = Multitone()
    y, counts = run(factory, a, b, signal.at(np.arange(a) / a))
    row["snrN"], delay = aligned_snr(y, b, signal, skip)
    row["delay"] = delay * 1000
    # latency: after each chunk, input time arrived minus input time the output has reached
    chunk = a // 50
    arrived = np.arange(1, len(counts) + 1) * chunk / a
    reached = np.cumsum(counts) / b - delay
    steady = slice(5, None)
    row["latency"] = float(np.max(arrived[steady] - reached[steady]) * 1000)
    share = chunk * b / a
    row["burst"] = float(np.max(np.abs(np.array(counts[steady]) - share)))
    gains = []
    for freq in np.linspace(100, 3400, 12):
        y, _ = run(factory, a, b, tone(freq, a, 0.6))
        gains.append(20 * np.log10(fit_tone(y[skip:], b, freq)[0] / AMPLITUDE))
    row["ripple"] = max(gains) - min(gains)
    worst = -300.0
    if b > a:  # images of in-band tones above 4.6 kHz
        for freq in (300, 1000, 2000, 3000, 3400):
            y, _ = run(factory, a, b, tone(freq, a, 1.0))
            y = y[skip:]
            worst = max(worst, band_db(y, b, 4600, b / 2, windowed_energy(y)))
    else:  # what content between 4.6 kHz and R/2 folds into 0-3.4 kHz
        for freq in np.linspace(4600, a / 2 - 100, 8):
            x = tone(freq, a, 1.0)
            y, _ = run(factory, a, b, x)
            y = y[skip:]
            ref = windowed_energy(x[: len(y) * a // b]) * b / a
            worst = max(worst, band_db(y, b, 0, 3400, ref))
    row["img/alias"] = worst
    return row


def cost_us(factory, a: int, b: int, repeats: int) -> float:
    rng = np.random.default_rng(1)
    chunks = [to_pcm(rng.standard_normal(a // 50) * 3000) for _ in range(50)]
    process = factory(a, b)
    for c in chunks:  # warm up
        process(c)
    number = 2000
    runs = []
    for _ in range(repeats):
        it = iter(chunks * (number // 50 + 1))
        runs.append(timeit.timeit(lambda it=it: process(next(it)), number=number) / number * 1e6)
    return statistics.median(runs)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
    )]  # fmt: skip


def malloc_in_use() -> int:
    """Bytes the C allocator has handed out (glibc mallinfo2): counts C libraries' state and
    numpy buffers alike, unlike RSS, which hides reuse of freed pages."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def state_kib(name: str, factory, a: int, b: int) -> float:
    """Memory one stream adds: allocator growth over 300 live streams, plus Python objects."""
    chunk = bytes(2 * (a // 50))
    factory(a, b)(chunk)  # shared set-up (filter tables, imports) before measuring
    gc.collect()
    tracemalloc.start()
    before = malloc_in_use()
    streams = []
    for _ in range(300):
        p = factory(a, b)
        for _ in range(5):
            p(chunk)
        streams.append(p)
    gc.collect()
    c_bytes = malloc_in_use() - before
    py_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return max(c_bytes, py_bytes) / 300 / 1024


def seam_lsb(a: int, b: int) -> int:
    rng = np.random.default_rng(3)
    pcm = to_pcm(rng.standard_normal(a // 2) * 6000)
    whole = Resampler(a, b)
    ref = np.frombuffer(whole.process(pcm) + whole.flush(), "<i2").astype(int)
    worst = 0
    for _ in range(5):
        r = Resampler(a, b)
        out, i = [], 0
        while i < len(pcm):
            n = 2 * int(rng.integers(1, a // 10))
            out.append(r.process(pcm[i : i + n]))
            i += n
        y = np.frombuffer(b"".join(out) + r.flush(), "<i2").astype(int)
        worst = max(worst, int(np.abs(y - ref).max()))
    return worst


COLUMNS = [
    ("snr1k", "{:7.1f}"), ("snr3k", "{:7.1f}"), ("snrN", "{:7.1f}"), ("ripple", "{:8.3f}"),
    ("img/alias", "{:10.1f}"), ("delay", "{:7.2f}"), ("latency", "{:9.2f}"), ("burst", "{:7.0f}"),
    ("us/frame", "{:10.2f}"), ("state", "{:8.1f}"), ("seam", "{:>6}"),
]  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats")
    parser.add_argument("--rates", type=int, nargs="*", default=RATES)
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 7
    if soxr is None:
        print("soxr not installed (pip install '.[bench]'): peer column skipped", file=sys.stderr)
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}" + (f", soxr {soxr.__version__}" if soxr else ""))
    head = f"{'direction':<14}{'engine':<16}" + "".join(f"{name:>{len(fmt.format(0))}}" for name, fmt in COLUMNS)
    print(head)
    print("-" * len(head))
    for rate in args.rates:
        for a, b in ((8000, rate), (rate, 8000)):
            for name, factory in ENGINES.items():
                row = quality(factory, a, b)
                row["us/frame"] = cost_us(factory, a, b, repeats)
                row["state"] = state_kib(name, factory, a, b)
                row["seam"] = seam_lsb(a, b) if name == "ours" else "-"
                cells = "".join(fmt.format(row[key]).rjust(len(fmt.format(0))) for key, fmt in COLUMNS)
                print(f"{f'{a}->{b}':<14}{name:<16}{cells}", flush=True)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
