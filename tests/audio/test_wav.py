import subprocess
import sys
import textwrap
import wave

import numpy as np
import pytest

from audio import LEFT, RIGHT, StereoWavWriter, read_wav, repair_wav, write_wav

from .signals import to_pcm, tone


def channels(path):
    pcm, rate, nch = read_wav(path)
    assert nch == 2
    frames = np.frombuffer(pcm, "<i2").reshape(-1, 2)
    return frames[:, 0], frames[:, 1], rate


def test_two_speakers_stay_aligned_on_the_shared_clock(tmp_path):
    path = tmp_path / "call.wav"
    caller = to_pcm(tone(500, 8000, 0.5))  # 4000 samples
    agent = to_pcm(tone(1200, 8000, 0.25))  # 2000 samples
    with StereoWavWriter(path, 8000) as w:
        for i in range(0, len(caller), 320):  # the caller talks from 0 to 0.5 s in 20 ms frames
            w.write(LEFT, caller[i : i + 320], at=i // 2)
        w.write(RIGHT, agent, at=6000)  # the agent answers at 0.75 s, in one go
        w.advance(10000)  # the call goes on, silent, until 1.25 s
    left, right, rate = channels(path)
    assert rate == 8000 and len(left) == 10000
    assert np.array_equal(left[:4000], np.frombuffer(caller, "<i2")) and not left[4000:].any()
    assert not right[:6000].any() and not right[8000:].any()
    assert np.array_equal(right[6000:8000], np.frombuffer(agent, "<i2"))


def test_default_position_is_right_after_the_channel_s_previous_audio(tmp_path):
    path = tmp_path / "call.wav"
    with StereoWavWriter(path, 16000) as w:
        assert w.write(RIGHT, b"\x01\x00" * 100) == 0
        assert w.write(RIGHT, b"\x02\x00" * 100) == 100
        assert w.write(LEFT, b"\x03\x00" * 50, at=20) == 20
    left, right, rate = channels(path)
    assert rate == 16000 and len(right) == 200
    assert right.tolist() == [1] * 100 + [2] * 100
    assert left.tolist() == [0] * 20 + [3] * 50 + [0] * 130


def test_overlapping_audio_is_placed_after_never_dropped(tmp_path):
    path = tmp_path / "call.wav"
    with StereoWavWriter(path) as w:
        w.write(RIGHT, b"\x01\x00" * 100, at=0)
        assert w.write(RIGHT, b"\x02\x00" * 10, at=50) == 100  # overlaps: goes after
    _, right, _ = channels(path)
    assert right.tolist() == [1] * 100 + [2] * 10


def test_silent_call_is_silence_of_the_right_length(tmp_path):
    path = tmp_path / "call.wav"
    with StereoWavWriter(path) as w:
        for t in range(0, 8000, 160):
            w.advance(t + 160)
    left, right, _ = channels(path)
    assert len(left) == 8000 and not left.any() and not right.any()


def test_header_is_valid_during_and_after_writing(tmp_path):
    path = tmp_path / "call.wav"
    w = StereoWavWriter(path, 8000, sync_ms=100)
    w.write(LEFT, bytes(2 * 4000))
    w.advance(4000)
    # while still open, the header already counts what was synced (readers can play it)
    with wave.open(str(path)) as r:
        assert r.getnchannels() == 2 and r.getframerate() == 8000 and r.getnframes() == 4000
    w.close()
    w.close()  # idempotent
    with wave.open(str(path)) as r:
        assert r.getnframes() == 4000
    with pytest.raises(ValueError, match="closed"):
        w.write(LEFT, b"\x00\x00")


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda w: w.write(2, b"\x00\x00"), "channel"),
        (lambda w: w.write(LEFT, b"\x00"), "even number"),
        (lambda w: w.write(LEFT, b"\x00\x00", at=-1), "non-negative"),
    ],
)
def test_bad_writes_are_clear_errors_and_change_nothing(tmp_path, call, match):
    with StereoWavWriter(tmp_path / "call.wav") as w:
        w.write(LEFT, b"\x05\x00" * 10)
        with pytest.raises(ValueError, match=match):
            call(w)
        assert w.channel_end(LEFT) == 10 and w.channel_end(RIGHT) == 0


CRASHING_WRITER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from audio import LEFT, RIGHT, StereoWavWriter
    w = StereoWavWriter(sys.argv[1], 8000, sync_ms=1000)
    ramp = np.arange(20000, dtype="<i2")
    for i in range(0, len(ramp), 160):   # 2.5 s: left a ramp, right its negative
        w.write(LEFT, ramp[i:i + 160].tobytes(), at=i)
        w.write(RIGHT, (-ramp[i:i + 160]).tobytes(), at=i)
    w._file.flush()             # what the OS got before the crash...
    w._file.write(b"\\x01\\x02\\x03")  # ...ending in a torn frame
    w._file.flush()
    os._exit(9)                 # killed: no close(), no final header
    """
)


def test_a_recording_cut_off_by_a_crash_is_repaired(tmp_path):
    path = tmp_path / "crashed.wav"
    done = subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(path)], cwd=tmp_path.parent)
    assert done.returncode == 9
    with wave.open(str(path)) as r:  # the header only knows the last sync (2 s)
        assert r.getnframes() == 16000
    assert repair_wav(path) == 20000
    left, right, _ = channels(path)
    assert len(left) == 20000
    assert np.array_equal(left, np.arange(20000, dtype="<i2"))
    assert np.array_equal(right, -left)


def test_repair_of_a_complete_file_changes_nothing(tmp_path):
    path = tmp_path / "ok.wav"
    write_wav(path, to_pcm(tone(440, 8000, 0.1)), 8000)
    before = path.read_bytes()
    assert repair_wav(path) == 800
    assert path.read_bytes() == before


def test_repair_refuses_what_is_not_a_pcm_wav(tmp_path):
    path = tmp_path / "junk.wav"
    path.write_bytes(b"not a wav file at all")
    with pytest.raises(ValueError, match="RIFF"):
        repair_wav(path)
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVE")
    with pytest.raises(ValueError, match="no data chunk"):
        repair_wav(path)


def test_mono_helpers_round_trip(tmp_path):
    pcm = to_pcm(tone(300, 24000, 0.05))
    write_wav(tmp_path / "m.wav", pcm, 24000)
    assert read_wav(tmp_path / "m.wav") == (pcm, 24000, 1)


def test_long_gaps_cost_no_memory(tmp_path):
    import tracemalloc

    path = tmp_path / "gap.wav"
    tracemalloc.start()
    with StereoWavWriter(path, 8000) as w:
        w.write(LEFT, b"\x01\x00" * 10, at=8000 * 600)  # ten minutes in
        w.advance(8000 * 1200)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20  # 1 MiB, for a 38 MB file
    with wave.open(str(path)) as r:
        assert r.getnframes() == 8000 * 1200
        r.setpos(8000 * 600)
        assert np.frombuffer(r.readframes(10), "<i2").reshape(-1, 2)[:, 0].tolist() == [1] * 10


def test_the_writer_never_overwrites_a_file(tmp_path):
    path = tmp_path / "exists.wav"
    path.write_bytes(b"a crashed recording waiting for repair")
    with pytest.raises(FileExistsError):
        StereoWavWriter(path)
    assert path.read_bytes() == b"a crashed recording waiting for repair"


def test_repair_leaves_a_complete_file_with_a_trailing_chunk_alone(tmp_path):
    import struct

    path = tmp_path / "list.wav"
    write_wav(path, bytes(2000), 8000)
    info = b"INFOISFT" + struct.pack("<I", 5) + b"test\x00\x00"
    with open(path, "r+b") as f:
        f.seek(0, 2)
        f.write(b"LIST" + struct.pack("<I", len(info)) + info)
        size = f.tell()
        f.seek(4)
        f.write(struct.pack("<I", size - 8))
    before = path.read_bytes()
    assert repair_wav(path) == 1000
    assert path.read_bytes() == before


def test_truncate_drops_queued_audio_but_never_what_is_written(tmp_path):
    path = tmp_path / "clear.wav"
    with StereoWavWriter(path, 8000) as w:
        w.write(RIGHT, b"\x07\x00" * 1000, at=0)  # agent: 1000 samples queued ahead of the caller
        w.write(LEFT, b"\x01\x00" * 300, at=0)  # the caller reached 300: 300 frames are written
        assert w.truncate(RIGHT, 200) == 700  # a clear at 200: only unwritten audio goes (300..1000)
        assert w.channel_end(RIGHT) == 300
        w.write(RIGHT, b"\x09\x00" * 100)  # new agent audio follows at once
        w.advance(500)
    _, right, _ = channels(path)
    assert right.tolist() == [7] * 300 + [9] * 100 + [0] * 100
