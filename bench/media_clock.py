"""The caller's audio on Twilio's clock, before and after: a 2 s network stall mid-call, and 100
calls started at once.

    python -m bench.media_clock [--before PATH] [--calls 100]

A ``bridge serve`` process (embedded echo agent, SQLite) takes simulated Twilio calls saying the
first sentence of the fixture (0.5-3.675 s) in real time. ``--before PATH`` runs the bridge from
another checkout (a ``git worktree`` of an earlier commit) beside this one, so both are
measured in one run with the same simulator. Printed per bridge and scenario:

- the caller channel's offset against the timestamps: where 400 ms pieces of what the caller
  said are found in the recording, against where they were said (ms; worst over pieces and
  calls), and the recording's length against the call's;
- turn latency: recorded (the record's ``e2e_latency``) against what the simulated caller
  lived (in real time: from when it said the end of its speech to when the agent's first audio
  after that reached it), worst difference, and the turns recorded per call (one is right).

The callers run in processes of their own, 25 calls each (a caller that shares its loop with
99 others hears late, and would blame the bridge for it).

The stall holds every frame from 3.0 s to 5.0 s of the call (across the end of speech) and
delivers them at once, as Twilio does after a stall.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

from audio import read_wav
from bridge.dev.simulator import Network, simulate_call

from .load import free_port

TOKEN, KEY = "bench-auth-token", "bench-key"
SAMPLES = Path(__file__).resolve().parents[1] / "audio" / "samples"
SPEECH_END_MS = json.loads((SAMPLES / "caller_8k.json").read_text())["speech_ms"][0][1]
PIECES_MS = (600, 1500, 2500, 3200)


class Bridge:
    def __init__(self, data_dir: str, tree: Path | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ, "BRIDGE_DATA_DIR": data_dir, "BRIDGE_TWILIO_AUTH_TOKEN": TOKEN, "BRIDGE_API_KEYS": KEY,
            "BRIDGE_PUBLIC_URL": self.url,
        }  # fmt: skip
        if tree is not None:
            env["PYTHONPATH"] = str(tree)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve", "--port", str(self.port)], env=env, cwd=tree or None,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def ready(self) -> None:
        async with httpx.AsyncClient() as http:
            for _ in range(400):
                try:
                    if (await http.get(f"{self.url}/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("the bridge did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _correlate(left: np.ndarray, piece: np.ndarray) -> int:
    n = 1 << int(np.ceil(np.log2(len(left) + len(piece))))
    corr = np.fft.irfft(np.fft.rfft(left, n) * np.conj(np.fft.rfft(piece, n)), n)[: len(left) - len(piece) + 1]
    return int(np.argmax(corr))


async def measure(bridge: Bridge, said: bytes, result: dict, tmp: Path) -> dict:
    async with httpx.AsyncClient(base_url=bridge.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
        for _ in range(100):
            record = (await http.get(f"/v2/get-call/{result['call_id']}")).json()
            if record.get("call_status") in ("ended", "error"):
                break
            await asyncio.sleep(0.1)
        if not record.get("recording_url"):  # (a call that never ran: counted, not measured)
            return {"failed": f"{record.get('call_status')} {record.get('disconnection_reason')} {record.get('detail') or ''}"}
        for _ in range(50):
            answer = await http.get(record["recording_url"])
            if answer.status_code != 429:  # (the API's rate limit: wait for it)
                break
            await asyncio.sleep(float(answer.headers.get("retry-after", 1)))
        if answer.status_code != 200:
            return {"failed": f"recording: {answer.status_code} {answer.text[:80]}"}
        wav = answer.content
    path = tmp / f"{result['call_id']}.wav"
    path.write_bytes(wav)
    pcm, _, _ = read_wav(path)
    left = np.frombuffer(pcm, "<i2").reshape(-1, 2)[:, 0].astype(float)
    speech = np.frombuffer(said, "<i2").astype(float)
    offsets = [_correlate(left, speech[ms * 8 : (ms + 400) * 8]) / 8 - ms for ms in PIECES_MS]
    latency = record.get("e2e_latency") or {}
    return {
        "offset_ms": max(offsets, key=abs),
        "length_ms": len(left) / 8 - result['sent_ms'],
        "recorded_ms": latency.get("max"),
        "lived_ms": result["lived_ms"],
        "turns": latency.get("num", 0),
        "network": record.get("caller_network"),
    }


async def _calls_in_processes(url: str, calls: int, stall: bool) -> list[dict]:
    """The simulated callers in processes of their own, 25 calls each."""
    procs = []
    for start in range(0, calls, 25):
        n = min(25, calls - start)
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.media_clock", "--callers", str(n), "--url", url, *(["--stall"] if stall else []),
            stdout=subprocess.PIPE,
        ))  # fmt: skip
    rows = []
    for proc in procs:
        out, _ = await proc.communicate()
        rows += json.loads(out)
    return rows


async def callers(url: str, n: int, stall: bool) -> None:
    """A child: ``n`` calls at once; prints what each caller lived (JSON)."""
    pcm, _, _ = read_wav(SAMPLES / "caller_8k.wav")
    said = pcm[: int(SPEECH_END_MS * 16) + 1600]
    network = Network(stalls=((3000, 2000),)) if stall else None
    results = await asyncio.gather(*[
        simulate_call(url, TOKEN, said, speed=1.0, tail_ms=5000, network=network) for _ in range(n)
    ])  # fmt: skip
    print(json.dumps([{"call_id": r.call_id, "sent_ms": r.sent_ms, "lived_ms": _lived_ms(r)} for r in results]))


def _lived_ms(result) -> float | None:
    """The turn as the simulated caller lived it, in real time (its own loop may lag when it
    carries many calls, so not on its frame clock): from when it said the end of its speech to
    when the agent's first audio after that reached it."""
    end = int(SPEECH_END_MS // 20)
    if end >= len(result.said_at):
        return None
    said = result.said_at[end] + (SPEECH_END_MS % 20) / 1000
    heard = [t for t in result.media_at if t >= said]
    return (heard[0] - said) * 1000 if heard else None


async def scenario(bridge: Bridge, said: bytes, calls: int, stall: bool, tmp: Path) -> dict:
    lived = await _calls_in_processes(bridge.url, calls, stall)
    rows = [await measure(bridge, said, r, tmp) for r in lived]
    failed = [r["failed"] for r in rows if "failed" in r]
    rows = [r for r in rows if "failed" not in r]
    diffs = [r["recorded_ms"] - r["lived_ms"] for r in rows if r["recorded_ms"] is not None and r["lived_ms"] is not None]
    return {
        "offset_ms": max((r["offset_ms"] for r in rows), key=abs),
        "length_ms": max((r["length_ms"] for r in rows), key=abs),
        "recorded_ms": [r["recorded_ms"] for r in rows][:3],
        "lived_ms": [r["lived_ms"] for r in rows][:3],
        "worst_diff_ms": max(diffs, key=abs) if diffs else None,
        "turns": sorted({r["turns"] for r in rows}),
        "unmeasured": sum(r["recorded_ms"] is None for r in rows),
        "failed": failed,
        "network": rows[0]["network"],
    }


async def main_async(args) -> None:
    pcm, _, _ = read_wav(SAMPLES / "caller_8k.wav")
    said = pcm[: int(SPEECH_END_MS * 16) + 1600]
    trees = [("after (this tree)", None)] + ([("before (" + str(args.before) + ")", Path(args.before))] if args.before else [])
    for name, tree in trees:
        with tempfile.TemporaryDirectory() as data:
            bridge = Bridge(data, tree)
            try:
                await bridge.ready()
                tmp = Path(data)
                stall = await scenario(bridge, said, 1, True, tmp)
                burst = await scenario(bridge, said, args.calls, False, tmp)
            finally:
                bridge.stop()
        print(f"\n{name}")
        for label, row in (("2 s stall", stall), (f"{args.calls} calls at once", burst)):
            print(
                f"  {label:<18} caller offset {row['offset_ms']:+8.1f} ms   recording - call {row['length_ms']:+8.1f} ms   "
                f"turn recorded {row['recorded_ms']} lived {row['lived_ms']} (worst diff {row['worst_diff_ms']}) ms   "
                f"turns/call {row['turns']}   unmeasured {row['unmeasured']}   failed {len(row['failed'])} {row['failed'][:2]}"
            )
        if stall["network"]:
            print(f"  stall's caller_network: {stall['network']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="a checkout of an earlier commit, run beside this one")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--callers", type=int, help=argparse.SUPPRESS)  # (a child: this many callers)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--stall", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.callers:
        asyncio.run(callers(args.url, args.callers, args.stall))
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
