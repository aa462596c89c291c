"""WAV files: a streaming two-channel call recorder, crash repair, and small mono helpers.

``StereoWavWriter`` records a call as 16-bit PCM stereo, caller on the left and agent on the right,
on one shared clock counted in samples. Each side writes its audio at the clock position where it
happened (or right after its previous audio); ``advance(position)`` says the clock has reached a
point, and every channel that has nothing up to there gets silence. So a side that says nothing is
recorded as silence and the two channels never drift apart.

The file is valid while it is written: the header's sizes are refreshed every ``sync_ms`` of
audio (the data is flushed to the OS at the same time), and ``close()`` writes the final sizes.
A file cut off by a crash between two syncs is made whole again by ``repair_wav``. Audio written
on one channel waits in memory until the other channel or the clock (``advance``) reaches it,
so a live recorder calls ``advance`` as time passes (the bridge does, every frame).
"""

from __future__ import annotations

import os
import struct
import wave
from collections import deque
from numbers import Integral
from pathlib import Path

import numpy as np

from .resample import check_pcm, check_rate

LEFT = 0  # caller
RIGHT = 1  # agent

_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")
HEADER_BYTES = _HEADER.size  # 44
MAX_WAV_BYTES = 0xFFFFFFFF  # RIFF sizes are 32-bit
PCM, EXTENSIBLE = 1, 0xFFFE


def wav_header(sample_rate: int, channels: int, data_bytes: int) -> bytes:
    block = channels * 2
    return _HEADER.pack(
        b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, channels, sample_rate,
        sample_rate * block, block, 16, b"data", data_bytes,
    )  # fmt: skip


class StereoWavWriter:
    """Streaming stereo recorder: channel ``LEFT`` (caller) and ``RIGHT`` (agent).

    Pending audio is kept per channel as positioned segments, so a gap costs no memory: silence
    is generated in bounded blocks only as frames are written out."""

    BLOCK_FRAMES = 8192

    def __init__(self, path: str | os.PathLike, sample_rate: int = 8000, *, sync_ms: int = 250, opener=open):
        """``opener(path, mode)`` opens the file: ``open``, or one whose writes happen
        elsewhere (it needs ``write``, ``seek``, ``flush``, ``close`` and ``closed``)."""
        self.path = Path(path)
        self.sample_rate = check_rate("sample_rate", sample_rate)
        self._sync_frames = max(1, self.sample_rate * sync_ms // 1000)
        self._file = opener(self.path, "xb")  # never overwrite (e.g. a crashed recording to repair)
        self._file.write(wav_header(self.sample_rate, 2, 0))
        self._file.flush()
        self.frames_written = 0  # stereo frames in the file
        self._synced = 0
        self._clock = 0  # highest position passed to advance(): both channels are known up to it
        self._segments: tuple[deque, deque] = (deque(), deque())  # (start, bytes) not yet written
        self._ends = [0, 0]  # per channel: position just after its last audio

    @property
    def closed(self) -> bool:
        return self._file.closed

    def channel_end(self, channel: int) -> int:
        """Clock position just after the last audio (or silence) this channel holds."""
        return max(self._ends[channel], self._clock)

    def write(self, channel: int, pcm: bytes, at: int | None = None) -> int:
        """Place s16le ``pcm`` on ``channel`` at clock position ``at`` (samples; default: right
        after the channel's previous audio). A gap before ``at`` becomes silence. Audio that would
        overlap what the channel already holds is placed after it instead: nothing is dropped or
        overwritten. Returns the position where the audio landed."""
        if channel not in (LEFT, RIGHT):
            raise ValueError(f"channel must be LEFT (0) or RIGHT (1), got {channel!r}")
        data = bytes(check_pcm(pcm))
        if at is not None and (isinstance(at, bool) or not isinstance(at, Integral) or at < 0):
            raise ValueError(f"at must be a non-negative sample position, got {at!r}")
        self._check_open()
        start = self.channel_end(channel) if at is None else max(int(at), self.channel_end(channel))
        self._segments[channel].append((start, data))
        self._ends[channel] = start + len(data) // 2
        self._commit(min(self.channel_end(LEFT), self.channel_end(RIGHT)))
        return start

    def truncate(self, channel: int, position: int) -> int:
        """Drop what ``channel`` holds after clock ``position`` that is not written yet (agent
        audio queued ahead of time that a barge-in ``clear`` threw away). Returns the samples
        dropped; audio already in the file is never touched."""
        if channel not in (LEFT, RIGHT):
            raise ValueError(f"channel must be LEFT (0) or RIGHT (1), got {channel!r}")
        cut = max(int(position), self.frames_written)
        segments = self._segments[channel]
        kept, dropped = [], 0
        for start, data in segments:
            end = start + len(data) // 2
            if end <= cut:
                kept.append((start, data))
            else:
                if start < cut:
                    kept.append((start, data[: 2 * (cut - start)]))
                dropped += end - max(start, cut)
        segments.clear()
        segments.extend(kept)
        if dropped:
            self._ends[channel] = cut
        return dropped

    def advance(self, position: int) -> None:
        """The shared clock reached ``position``: channels silent up to there get silence."""
        if isinstance(position, bool) or not isinstance(position, Integral):
            raise ValueError(f"position must be a sample position, got {position!r}")
        self._check_open()
        self._clock = max(self._clock, int(position))
        self._commit(min(self.channel_end(LEFT), self.channel_end(RIGHT)))

    def close(self) -> None:
        """Pad the shorter channel with silence, write everything and the final header."""
        if self._file.closed:
            return
        try:
            self._commit(max(self.channel_end(LEFT), self.channel_end(RIGHT)))
            self._write_sizes()
        finally:
            self._file.close()

    def __enter__(self) -> StereoWavWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._file.closed:
            raise ValueError(f"recording {self.path} is closed")

    def _commit(self, until: int) -> None:
        """Write frames up to clock position ``until``, in blocks of at most BLOCK_FRAMES."""
        while self.frames_written < until:
            start = self.frames_written
            count = min(until - start, self.BLOCK_FRAMES)
            if (start + count) * 4 + HEADER_BYTES > MAX_WAV_BYTES:
                raise ValueError(f"recording {self.path} reached the 4 GiB limit of the WAV format")
            block = np.zeros((count, 2), "<i2")
            for channel in (LEFT, RIGHT):
                segments = self._segments[channel]
                while segments:
                    seg_start, data = segments[0]
                    seg_end = seg_start + len(data) // 2
                    if seg_start >= start + count:
                        break
                    lo, hi = max(seg_start, start), min(seg_end, start + count)
                    block[lo - start : hi - start, channel] = np.frombuffer(data, "<i2", hi - lo, 2 * (lo - seg_start))
                    if seg_end > start + count:
                        break
                    segments.popleft()
            self._file.write(block.tobytes())
            self.frames_written += count
            if self.frames_written - self._synced >= self._sync_frames:
                self._write_sizes()

    def _write_sizes(self) -> None:
        data_bytes = self.frames_written * 4
        f = self._file
        f.seek(4)
        f.write(struct.pack("<I", 36 + data_bytes))
        f.seek(40)
        f.write(struct.pack("<I", data_bytes))
        f.seek(0, os.SEEK_END)
        f.flush()
        self._synced = self.frames_written


def repair_wav(path: str | os.PathLike) -> int:
    """Make a PCM WAV cut off mid-write playable: the RIFF and data sizes are set from what the
    file really holds (a trailing partial frame is cut). Returns the number of frames.
    Raises ValueError if the file is not a PCM WAV or lost its header."""
    path = Path(path)
    with open(path, "r+b") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise ValueError(f"{path} is not a RIFF/WAVE file")
        size = os.fstat(f.fileno()).st_size
        block = None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                raise ValueError(f"{path} has no data chunk")
            cid, clen = struct.unpack("<4sI", chunk)
            if cid == b"fmt ":
                fmt = f.read(clen)
                if len(fmt) < 16:
                    raise ValueError(f"{path} has a truncated fmt chunk")
                tag, channels, _rate, _bps, block, bits = struct.unpack("<HHIIHH", fmt[:16])
                if tag not in (PCM, EXTENSIBLE) or bits != 16 or not block:
                    raise ValueError(f"{path} is not 16-bit PCM")
                if clen % 2:
                    f.read(1)
            elif cid == b"data":
                if block is None:
                    raise ValueError(f"{path} has data before its fmt chunk")
                start = f.tell()
                if _chunk_follows(f, start + clen + (clen % 2), size):
                    return clen // block  # complete: a well-formed chunk follows the data
                data_bytes = (size - start) // block * block
                f.truncate(start + data_bytes)
                f.seek(start - 4)
                f.write(struct.pack("<I", data_bytes))
                f.seek(4)
                f.write(struct.pack("<I", start - 8 + data_bytes))
                return data_bytes // block
            else:
                f.seek(clen + (clen % 2), os.SEEK_CUR)


def _chunk_follows(f, position: int, size: int) -> bool:
    """Whether a plausible RIFF chunk header (ASCII id, size within the file) is at ``position``."""
    if position + 8 > size:
        return False
    f.seek(position)
    cid, clen = struct.unpack("<4sI", f.read(8))
    return all(32 <= c < 127 for c in cid) and position + 8 + clen <= size


def read_wav(path: str | os.PathLike) -> tuple[bytes, int, int]:
    """Read a 16-bit PCM WAV: (s16le frames, sample rate, channels)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path} is not 16-bit PCM")
        return w.readframes(w.getnframes()), w.getframerate(), w.getnchannels()


def write_wav(path: str | os.PathLike, pcm: bytes, sample_rate: int, channels: int = 1) -> None:
    """Write s16le frames as a 16-bit PCM WAV."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
