"""What one loopback TCP send costs on this machine, with nothing else around it: the kernel's
share of the floor under any relay that sends one websocket message per 20 ms frame.

    python -m bench.send_cost

The sender (core 0) writes 300- and 1000-byte messages (a Twilio media frame, a 24 kHz agent
frame) round-robin over 100 connections, paced; a reader process on core 1 drains them.
Prints the sender's user and system CPU per send."""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import selectors
import socket
import time


def _reader(port: int, ready) -> None:
    os.sched_setaffinity(0, {1})
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(512)
    server.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    ready.set()
    while True:
        for key, _ in selector.select():
            if key.fileobj is server:
                conn, _ = server.accept()
                conn.setblocking(False)
                selector.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = key.fileobj.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                selector.unregister(key.fileobj)
                key.fileobj.close()


def main() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ready = mp.Event()
    reader = mp.Process(target=_reader, args=(port, ready), daemon=True)
    reader.start()
    ready.wait()
    os.sched_setaffinity(0, {0})
    for size in (300, 1000):
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
        message, count = b"x" * size, 20000
        before = resource.getrusage(resource.RUSAGE_SELF)
        for i in range(count):
            conns[i % 100].send(message)
            if i % 100 == 99:
                time.sleep(0.0005)  # paced, like frames
        after = resource.getrusage(resource.RUSAGE_SELF)
        user = (after.ru_utime - before.ru_utime) / count * 1e6
        system = (after.ru_stime - before.ru_stime) / count * 1e6
        print(f"{size:>5} B loopback TCP send: {user:.1f} us user + {system:.1f} us system")
        for conn in conns:
            conn.close()
    reader.terminate()


if __name__ == "__main__":
    main()
