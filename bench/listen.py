"""What live listeners cost a call, and whether a stalled one touches it.

    python -m bench.listen [--calls 20] [--seconds 12]

A ``bridge serve`` process (embedded echo agent, SQLite) takes ``--calls`` simulated Twilio calls
at once, all saying the same audio in real time, in four rounds: no listener; one listener per
call reading everything; four per call; one per call that stops reading at once (a raw socket
with a 4 KB receive buffer). Printed per round:

- the bridge's CPU per call (user + system seconds of its process over the round);
- the mean added delay per relayed frame (the bridge's own ``bridge_added_delay_seconds``);
- the shift: how far each call's frames reached the caller from where the no-listener round's
  first call got them, on each call's own clock (ms; worst over the round's calls);
- for stalled listeners: how many were dropped, and how long after they stopped reading;
- for reading listeners (in a process of their own; one per call parses the frames, the others
  read raw bytes, so the clients' own work stays small on a 2-core machine): the caller audio
  each parsing listener received, and how late its frames came against the call's clock
  (relative to the first frame).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import websockets

from audio import read_wav
from bridge.dev.simulator import simulate_call
from bridge.protocol.websocket import ClientHandshake

from .load import cpu_seconds, free_port

TOKEN, KEY = "bench-auth-token", "bench-key"
SAMPLE = Path(__file__).resolve().parents[1] / "audio" / "samples" / "caller_8k.wav"


class Bridge:
    def __init__(self, data_dir: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ, "BRIDGE_DATA_DIR": data_dir, "BRIDGE_TWILIO_AUTH_TOKEN": TOKEN, "BRIDGE_API_KEYS": KEY,
            "BRIDGE_PUBLIC_URL": self.url
        }  # fmt: skip
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve", "--port", str(self.port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    async def ready(self) -> None:
        async with httpx.AsyncClient() as http:
            for _ in range(200):
                try:
                    if (await http.get(f"{self.url}/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("the bridge did not start")

    async def delay(self) -> tuple[float, float]:
        """(sum, count) of the bridge's added-delay histogram."""
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as http:
            text = (await http.get(f"{self.url}/metrics")).text
        total = sum(float(v) for v in re.findall(r"^bridge_added_delay_seconds_sum\S* (\S+)$", text, re.M))
        count = sum(float(v) for v in re.findall(r"^bridge_added_delay_seconds_count\S* (\S+)$", text, re.M))
        return total, count

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


async def reading_listener(url: str, token: str, got: dict) -> None:
    """Reads everything; notes each caller frame's arrival against the call's clock."""
    async with websockets.connect(f"{url}?access_token={token}", max_size=None) as ws:
        started = None
        async for message in ws:
            if isinstance(message, bytes) and message[0] == 0:
                position = int.from_bytes(message[1:5], "little")
                now = time.monotonic()
                if started is None:
                    started = now - position / 8000
                got["lags"].append(now - (started + position / 8000))
                got["bytes"] += len(message) - 5


async def draining_listener(url: str, token: str, got: dict) -> None:
    """Reads everything as raw bytes, unparsed (a cheap client: the call's other listeners)."""
    loop = asyncio.get_running_loop()
    s = await stalled_listener(url, token, receive_buffer=None)
    try:
        while data := await loop.sock_recv(s, 65536):
            got["raw_bytes"] = got.get("raw_bytes", 0) + len(data)
    finally:
        s.close()


async def stalled_listener(url: str, token: str, receive_buffer: int | None = 4096) -> socket.socket:
    """A listener's socket, opened (the bridge's own client handshake), that the caller then
    reads raw or never again: with ``receive_buffer`` set, a listener that stops reading."""
    loop = asyncio.get_running_loop()
    host, rest = url.removeprefix("ws://").split("/", 1)
    s = socket.socket()
    s.setblocking(False)
    if receive_buffer:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    await loop.sock_connect(s, (host.rsplit(":", 1)[0], int(host.rsplit(":", 1)[1])))
    handshake = ClientHandshake(host, f"/{rest}?access_token={token}")
    await loop.sock_sendall(s, handshake.request)
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = await loop.sock_recv(s, 1024)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        answer += chunk
    handshake.check(answer.split(b"\r\n\r\n", 1)[0])  # (raises if the upgrade was refused)
    return s


async def listener_process() -> None:
    """``--listeners``: reads (url, token) lines from stdin and listens to each until its call
    ends; then prints what they got as JSON. A process of its own, so that the listeners'
    work does not slow the simulated callers that measure the call's timing."""
    loop = asyncio.get_running_loop()
    got = {"lags": [], "bytes": 0}
    readers = []
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        url, token, parse = json.loads(line)
        readers.append(asyncio.create_task(reading_listener(url, token, got) if parse else draining_listener(url, token, got)))
    await asyncio.gather(*readers, return_exceptions=True)
    print(json.dumps(got))


async def one_round(bridge: Bridge, pcm: bytes, calls: int, listeners: int, stalled: bool) -> dict:
    cpu0, (sum0, count0) = cpu_seconds(bridge.process.pid), await bridge.delay()
    tasks = [asyncio.create_task(simulate_call(bridge.url, TOKEN, pcm, api_key=KEY, speed=1.0, tail_ms=1000)) for _ in range(calls)]
    got = {"lags": [], "bytes": 0}
    held: list[socket.socket] = []
    child = None
    if listeners and not stalled:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.listen", "--listeners", stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )  # fmt: skip
    if listeners:
        async with httpx.AsyncClient(base_url=bridge.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
            ongoing: list[str] = []
            while len(ongoing) < calls:
                r = await http.get("/v2/list-calls", params={"call_status": "ongoing", "limit": 1000})
                ongoing = [c["call_id"] for c in r.json()]
                await asyncio.sleep(0.05)
            for call_id in ongoing:
                for i in range(listeners):
                    grant = (await http.post(f"/v2/listen-live-call/{call_id}")).json()
                    if stalled:
                        held.append(await stalled_listener(grant["url"], grant["access_token"]))
                    else:
                        child.stdin.write((json.dumps([grant["url"], grant["access_token"], i == 0]) + "\n").encode())
                        await child.stdin.drain()
    if child is not None:
        child.stdin.close()
    results = await asyncio.gather(*tasks)
    if child is not None:
        got = json.loads((await child.communicate())[0])
    for s in held:
        s.close()
    cpu1, (sum1, count1) = cpu_seconds(bridge.process.pid), await bridge.delay()
    row = {
        "results": results,
        "cpu_ms_per_call": (cpu1 - cpu0) * 1000 / calls,
        "added_delay_us": (sum1 - sum0) / max(1.0, count1 - count0) * 1e6,
    }
    if got["lags"]:
        lags = np.asarray(got["lags"]) * 1000
        row["listener_lag_ms"] = (float(np.percentile(lags, 50)), float(np.percentile(lags, 99)))
        row["listener_audio_s"] = got["bytes"] / 2 / 8000 / calls  # (one parsing listener per call)
    if stalled:
        dropped_after = []
        async with httpx.AsyncClient(base_url=bridge.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
            for result in results:
                log = (await http.get(f"/v2/public-logs/{result.call_id}.jsonl")).text.splitlines()
                events = [json.loads(line) for line in log]
                joined = {e["participant"]: e["t_ms"] for e in events if e["event"] == "listener_joined"}
                dropped_after += [e["t_ms"] - joined[e["participant"]] for e in events if e["event"] == "listener_dropped"]
        row["dropped"] = (len(dropped_after), calls * listeners)
        row["dropped_after_s"] = float(np.median(dropped_after)) / 1000 if dropped_after else None
    return row


def shifts_ms(reference, result) -> np.ndarray:
    a, b = np.asarray(reference.media_at), np.asarray(result.media_at)
    n = min(len(a), len(b))
    return np.abs((a[:n] - a[0]) - (b[:n] - b[0])) * 1000


async def main_async(args) -> None:
    sample, _, _ = read_wav(SAMPLE)
    pcm = (sample * (int(args.seconds * 16000) // len(sample) + 1))[: int(args.seconds * 16000)]
    with tempfile.TemporaryDirectory() as data_dir:
        bridge = Bridge(data_dir)
        try:
            await bridge.ready()
            await one_round(bridge, pcm[: 8000 * 2 * 2], 2, 0, False)  # warm-up
            rounds = {}
            for name, listeners, stalled in (("no listener", 0, False), ("1 reading listener per call", 1, False),
                                             ("4 reading listeners per call", 4, False), ("1 stalled listener per call", 1, True)):  # fmt: skip
                rounds[name] = await one_round(bridge, pcm, args.calls, listeners, stalled)
        finally:
            bridge.stop()
    reference = rounds["no listener"]["results"][0]
    print(f"{args.calls} simultaneous calls of {args.seconds:g} s to the echo agent, per round; one bridge process")
    print(f"{'round':32} {'CPU ms/call':>12} {'added delay':>12} {'shift p50/p99/max':>20}  listeners")
    for name, row in rounds.items():
        shifts = np.concatenate([shifts_ms(reference, r) for r in row["results"]])
        shift = "/".join(f"{v:.1f}" for v in (*np.percentile(shifts, [50, 99]), shifts.max())) + " ms"
        frames = {r.media_received for r in row["results"]}
        extra = ""
        if "listener_lag_ms" in row:
            extra = f"lag p50 {row['listener_lag_ms'][0]:.1f} ms p99 {row['listener_lag_ms'][1]:.1f} ms, {row['listener_audio_s']:.1f} s of caller audio each"
        if "dropped" in row:
            extra = f"{row['dropped'][0]}/{row['dropped'][1]} dropped, {row['dropped_after_s']:.1f} s after they stopped reading"
        print(f"{name:32} {row['cpu_ms_per_call']:>12.1f} {row['added_delay_us']:>10.1f}us {shift:>20}  {extra} (frames/call {sorted(frames)})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--listeners", action="store_true", help=argparse.SUPPRESS)  # (the listeners' own process)
    args = parser.parse_args(argv)
    asyncio.run(listener_process() if args.listeners else main_async(args))


if __name__ == "__main__":
    main()
