"""What the dashboard's call-events feed costs, whatever the calls carry.

    python -m bench.feed [--calls 1000] [--readers 10]

A ``bridge serve`` process (SQLite) with ``--calls`` calls registered through the API, each
carrying the API's own limits (50 kB of metadata and 50 kB of dynamic variables: ~100 kB a
record). Then ``--readers`` subscribers that never read (raw sockets with a 4 KB receive
buffer) open ``/v2/call-events``, while ``/healthz`` is timed, and as many calls again are
registered (an event each, which they never read). Printed: the bridge's resident memory
before and after, the snapshot's size, ``/healthz``'s worst answer time while they subscribe,
and how many readers the bridge had dropped 12 s later (it drops one whose buffers stay full
for 10 s).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import time

import httpx

from .listen import KEY, Bridge


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def main(calls: int, readers: int) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        bridge = Bridge(data_dir)
        await bridge.ready()
        headers = {"Authorization": f"Bearer {KEY}"}
        body = {"agent_id": "echo", "metadata": {"notes": "m" * 50_000}, "retell_llm_dynamic_variables": {"v": "d" * 50_000}}
        async with httpx.AsyncClient(base_url=bridge.url, headers=headers, timeout=30) as http:
            for _ in range(calls):
                assert (await http.post("/v2/register-phone-call", json=body)).status_code == 201
            before = rss_mib(bridge.process.pid)
            sockets, worst = [], 0.0
            for _ in range(readers):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", bridge.port))
                sock.sendall(f"GET /v2/call-events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode())
                sockets.append(sock)
                started = time.monotonic()
                await http.get("/healthz")
                worst = max(worst, time.monotonic() - started)
            for _ in range(calls):  # calls keep coming: an event each, which nobody reads
                await http.post("/v2/register-phone-call", json={"agent_id": "echo"})
            await asyncio.sleep(2)
            after = rss_mib(bridge.process.pid)
            snapshot = b""
            async with http.stream("GET", "/v2/call-events") as stream:
                async for chunk in stream.aiter_bytes():
                    snapshot += chunk
                    if b"\n\n" in snapshot:
                        break
            await asyncio.sleep(12)  # past the bound for a reader that takes no write (10 s)
            dropped = 0
            for sock in sockets:
                sock.setblocking(False)
                try:
                    while sock.recv(65536):
                        pass
                except BlockingIOError:
                    continue  # still open
                except OSError:
                    pass
                dropped += 1
        print(f"calls registered: {calls} of ~100 kB each; readers that never read: {readers}")
        print(f"snapshot event: {len(snapshot) / 1024:.1f} KiB ({len(snapshot) / max(1, snapshot.count(b'call_id')):.0f} bytes a call)")
        print(f"bridge RSS: {before:.0f} MiB before the readers, {after:.0f} MiB with them (+{after - before:.1f} MiB)")
        print(f"/healthz while they subscribed: worst {worst * 1000:.1f} ms")
        print(f"readers whose connection the bridge had closed 12 s later: {dropped} of {readers}")
        bridge.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--readers", type=int, default=10)
    options = parser.parse_args()
    asyncio.run(main(options.calls, options.readers))
