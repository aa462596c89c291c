"""FileWriter: recording and log files are opened and written on one thread, in order per file,
and a file that cannot be opened or written costs only that file."""

from __future__ import annotations

import asyncio
import logging

from audio import StereoWavWriter, read_wav
from bridge.media.file_writer import FileWriter


def test_writes_seeks_and_flushes_land_in_order(tmp_path):
    writer = FileWriter()
    direct, queued = tmp_path / "direct.bin", tmp_path / "queued.bin"
    with open(direct, "xb") as f:
        ops = [("write", b"hello world"), ("seek", 6), ("write", b"there"), ("seek", 0, 2), ("write", b"!"), ("flush",)]
        background = writer.open(queued)
        for op, *args in ops:
            getattr(f, op)(*args)
            getattr(background, op)(*args)
    background.close()
    assert background.closed
    writer.barrier().result(5)
    assert queued.read_bytes() == direct.read_bytes() == b"hello there!"
    writer.stop()


def test_a_wav_written_through_it_equals_one_written_directly(tmp_path):
    writer = FileWriter()
    pcm = bytes(range(256)) * 40
    for name, opener in (("direct.wav", open), ("queued.wav", writer.open)):
        wav = StereoWavWriter(tmp_path / name, 8000, sync_ms=20, opener=opener)
        for i in range(10):
            wav.write(i % 2, pcm)
        wav.close()
    writer.barrier().result(5)
    assert (tmp_path / "queued.wav").read_bytes() == (tmp_path / "direct.wav").read_bytes()
    frames, rate, channels = read_wav(tmp_path / "queued.wav")
    assert (rate, channels, len(frames)) == (8000, 2, 2 * 5 * len(pcm))  # 5 writes a channel, 4 bytes a stereo frame
    writer.stop()


async def test_a_failing_write_is_logged_and_other_files_go_on(tmp_path, caplog):
    writer = FileWriter()
    broken, fine = writer.open(tmp_path / "a.bin"), writer.open(tmp_path / "b.bin")
    broken.close()
    broken._writer.submit(broken._do, "write", b"too late")  # a write to a closed file: ValueError
    fine.write(b"still written")
    fine.close()
    with caplog.at_level(logging.ERROR):
        await asyncio.wrap_future(writer.barrier())
    assert (tmp_path / "b.bin").read_bytes() == b"still written"
    assert any("recording write failed" in r.message for r in caplog.records)
    writer.stop()


def test_a_barrier_before_any_write_is_done_at_once():
    assert FileWriter().barrier().done()


def test_small_writes_are_handed_over_together_and_none_is_lost(tmp_path):
    """Frames of 20 ms are gathered into one hand-over to the thread; a seek, a flush or the
    close hands over what waits first, so the file is the same as one written directly."""
    writer = FileWriter()
    background = writer.open(tmp_path / "queued.bin")
    handed = []
    submit = writer.submit
    writer.submit = lambda fn, *args: (handed.append(args[0] if fn.__name__ == "_do" else fn.__name__), submit(fn, *args))
    frames = [bytes([i]) * 640 for i in range(40)]  # 20 ms of 8 kHz stereo each
    for frame in frames[:30]:
        background.write(frame)
    background.seek(0, 2)
    for frame in frames[30:]:
        background.write(frame)
    background.close()
    writer.barrier().result(5)
    assert (tmp_path / "queued.bin").read_bytes() == b"".join(frames)
    assert handed.count("write") <= 4, handed  # (not one per frame)
    assert handed[-1] == "close"
    writer.stop()


def test_writes_reach_the_file_without_waking_the_thread_for_each(tmp_path):
    """A write only queues (waking the thread per write cost the loop a futex call and the
    interpreter's lock); the thread still finds it within its wake interval, with no barrier."""
    import time

    writer = FileWriter()
    background = writer.open(tmp_path / "queued.bin")
    background.write(b"x" * background.BUFFER_BYTES)
    background.flush()
    assert not writer._wake.is_set()
    deadline = time.monotonic() + 5
    path = tmp_path / "queued.bin"
    while (not path.exists() or path.stat().st_size < background.BUFFER_BYTES) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (tmp_path / "queued.bin").stat().st_size == background.BUFFER_BYTES
    writer.stop()
    assert writer._thread is None


async def test_a_file_that_cannot_be_opened_says_why_and_its_writes_are_dropped(tmp_path, caplog):
    """(opened on the writer thread: the loop never waits on open or mkdir; the error is known
    after a barrier, and the call's record then says the file is unavailable)"""
    writer = FileWriter()
    (tmp_path / "taken").write_bytes(b"a file where a folder should be")
    broken = writer.open(tmp_path / "taken" / "call.wav")
    nested = writer.open(tmp_path / "new" / "folder" / "call.wav", gather=0)
    assert broken.error is None  # (not tried yet, or tried: either way the caller did not wait)
    for f in (broken, nested):
        f.write(b"RIFF")
        f.flush()
        f.close()
    with caplog.at_level(logging.ERROR):
        await asyncio.wrap_future(writer.barrier())
    assert isinstance(broken.error, OSError) and nested.error is None
    assert (tmp_path / "new" / "folder" / "call.wav").read_bytes() == b"RIFF"  # (its folder made)
    log = writer.open(tmp_path / "call.jsonl", "ab", gather=0)
    log.write(b'{"event":"stream_start"}\n')  # a log's line is in the file once the writer ran, no flush, no close
    await asyncio.wrap_future(writer.barrier())
    assert (tmp_path / "call.jsonl").read_bytes() == b'{"event":"stream_start"}\n'
    log.close()
    assert any("cannot open" in r.message for r in caplog.records)
    assert not any("recording write failed" in r.message for r in caplog.records)  # (dropped, not failed again)
    writer.stop()
