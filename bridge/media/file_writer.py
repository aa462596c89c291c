"""Recording and public-log writes off the event loop.

A write to a file usually lands in the page cache in microseconds, but now and then the kernel
makes it wait (dirty-page writeback): on the event loop that stalls every call's audio, measured
as tens of ms of added delay under load. ``FileWriter`` runs the writes of every recording on
one thread, in order per file; the loop only queues them. The thread drains the queue every
``WAKE_S`` rather than being woken per write: waking it cost the loop a futex call and then the
interpreter's lock, 700 times a second at 60 calls (8 % of the loop's samples at 24 kHz); a
barrier or a stop wakes it at once."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)


class BackgroundFile:
    """A binary file whose opening and ``write`` / ``seek`` / ``flush`` / ``close`` all run on
    the writer thread, in the order they were called. Opening there too keeps its syscalls (and
    the interpreter's lock taken back after each) off the event loop: they were a sixth of the
    loop's time while a burst of calls set up. A file that cannot be opened (a full disk, a
    read-only volume) says why in ``error`` once the writer has tried (after a ``barrier``);
    what is written to it meanwhile is dropped, the call goes on.

    Consecutive writes are gathered here up to ``gather`` bytes (default ``BUFFER_BYTES``) and
    handed over as one: a recording writes every 20 ms frame, and each hand-over costs the loop
    (this was a tenth of its time at 24 kHz). A log hands each line over (``gather=0``)."""

    #: at most this much of a call's recording waits here (~85 ms of 24 kHz stereo audio)
    BUFFER_BYTES = 8192

    def __init__(self, writer: FileWriter, path, mode: str, gather: int = BUFFER_BYTES):
        self._file = None
        self.error: OSError | None = None
        self._writer = writer
        self._gather = gather
        self._pending = bytearray()
        self.closed = False
        writer.submit(self._open, path, mode)

    def _open(self, path, mode: str) -> None:  # (on the writer thread)
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # (a file handed every write, a log, is unbuffered: each line is in the file once written)
            self._file = open(path, mode, buffering=0 if self._gather == 0 else -1)  # noqa: SIM115 - closed by close()
        except OSError as e:
            self.error = e
            log.error("cannot open %s: %s", path, e)

    def _do(self, name: str, *args) -> None:  # (on the writer thread)
        if self._file is not None:
            getattr(self._file, name)(*args)

    def write(self, data: bytes) -> None:
        self._pending += data
        if len(self._pending) >= self._gather:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._pending:
            self._writer.submit(self._do, "write", bytes(self._pending))
            self._pending.clear()

    def seek(self, offset: int, whence: int = 0) -> None:
        self._hand_over()
        self._writer.submit(self._do, "seek", offset, whence)

    def flush(self) -> None:
        self._hand_over()
        self._writer.submit(self._do, "flush")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._hand_over()
            self._writer.submit(self._do, "close")


class FileWriter:
    """One thread doing the file writes of all calls (started on first use)."""

    #: how often the thread looks for queued writes (a barrier or a stop wakes it at once)
    WAKE_S = 0.05

    def __init__(self) -> None:
        self._jobs: deque = deque()  # (appends and pops are atomic: no lock per write)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def open(self, path, mode: str = "xb", gather: int = BackgroundFile.BUFFER_BYTES) -> BackgroundFile:
        """``path`` opened on the writer thread (its folder made if need be)."""
        return BackgroundFile(self, path, mode, gather)

    def submit(self, fn, *args) -> None:
        if self._thread is None:
            self._start()
        self._jobs.append((fn, args))

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="recording-writer", daemon=True)
                self._thread.start()

    def barrier(self) -> concurrent.futures.Future:
        """Done when everything submitted before it is done."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        if self._thread is None:
            done.set_result(None)
        else:
            self._jobs.append((done.set_result, (None,)))
            self._wake.set()
        return done

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is queued, then end the thread."""
        if self._thread is not None:
            self._jobs.append(None)
            self._wake.set()
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        jobs, wake = self._jobs, self._wake
        while True:
            wake.wait(self.WAKE_S)
            wake.clear()
            while jobs:
                job = jobs.popleft()
                if job is None:
                    return
                fn, args = job
                try:
                    fn(*args)
                except (OSError, ValueError) as e:  # a full disk costs the recording, never the call
                    log.error("recording write failed: %s", e)
