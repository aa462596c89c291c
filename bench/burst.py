"""Set-up under a burst: 10, 50 and 200 calls arriving at once, and one call at a time.

    python -m bench.burst                                   # bridge on SQLite, on PostgreSQL, the sample relay
    python -m bench.burst --targets bridge-sqlite --bursts 10 50 200 --rounds 3
    python -m bench.burst --targets sample bridge-postgresql-other bridge-postgresql --other ../before

A call's set-up is what its caller waits through before the agent exists: from the voice
webhook's POST to the agent's websocket upgrade (signed webhook, TwiML, the media stream's
upgrade, ``connected`` and ``start``, the bridge dialling the agent). Each burst sends every
call's webhook at the same instant, on its own connection, as Twilio does when a campaign or a
busy hour rings many numbers at once; each call is hung up before the next burst.

The system under test runs pinned to core 0; this process (Twilio and the null agent, on bare
asyncio protocols with a hand-rolled HTTP/1.1 POST, so the driver adds as little as it can)
on core 1. Peers, in the same run:

- ``bridge-sqlite``: ``bridge serve`` on the embedded defaults, every feature on;
- ``bridge-postgresql``: the same on a fresh PostgreSQL database (``--postgres``, default the
  development machines' ``postgresql://postgres@127.0.0.1:5432/test``'s server);
- ``sample``: a relay written the way Twilio's sample is (``bench/naive_relay.py``: a FastAPI
  ``/incoming-call`` answering ``<Connect><Stream>`` TwiML, no signature, no record).

Printed per target and burst: set-up p50 / p99 / max in ms over ``--rounds`` rounds, calls
that never reached the agent, and the ratio of the bridge's p99 to the sample's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from twilio.request_validator import RequestValidator

from .load import AUTH_TOKEN, Bridge, Call, Naive, NullAgent, stats

GIVE_UP_S = 15.0  # (Twilio's own webhook timeout)


async def post_form(port: int, path: str, params: dict, headers: dict) -> str:
    """One HTTP/1.1 POST of a form on its own connection (as Twilio sends each webhook): the
    response's body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = urlencode(params).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        )
        writer.write(head.encode() + body)
        response = await reader.read()
    finally:
        writer.close()
    status = response.split(b" ", 2)[1]
    if status != b"200":
        raise RuntimeError(f"{path} answered {status.decode()}: {response[-200:]!r}")
    return response.split(b"\r\n\r\n", 1)[1].decode()


def twilio_form() -> dict:
    return {"CallSid": "CA" + secrets.token_hex(16), "AccountSid": "AC" + "0" * 32, "From": "+15550100000",
            "To": "+15550199999", "Direction": "inbound", "CallStatus": "ringing"}  # fmt: skip


class BridgeTarget(Bridge):
    def __init__(self, agent_port, workdir, database_url: str | None = None, name: str = "bridge sqlite", source=None):
        super().__init__(agent_port, workdir, "s16le", 24000, source=source)
        self.name, self.database_url = name, database_url

    def command(self):
        cmd, env = super().command()
        if self.database_url:
            env["BRIDGE_DATABASE_URL"] = self.database_url
        return cmd, env

    async def open(self, call: Call, validator: RequestValidator, known) -> None:
        params = twilio_form()
        url = f"http://127.0.0.1:{self.port}/twilio/voice"
        twiml = await post_form(self.port, "/twilio/voice", params, {"X-Twilio-Signature": validator.compute_signature(url, params)})
        stream_url = re.search(r'<Stream url="([^"]+)"', twiml).group(1)
        custom = dict(re.findall(r'<Parameter name="([^"]+)" value="([^"]+)"', twiml))
        call.call_id = custom["call_id"]
        known(call)
        await self._connect(call, stream_url, custom, [("X-Twilio-Signature", validator.compute_signature(stream_url, {}))])


class SampleTarget(Naive):
    def __init__(self, agent_port, workdir):
        super().__init__(agent_port, workdir)
        self.name = "sample relay"

    async def open(self, call: Call, validator, known) -> None:
        params = twilio_form()
        twiml = await post_form(self.port, "/incoming-call", params, {})
        stream_url = re.search(r'<Stream url="([^"]+)"', twiml).group(1)
        custom = dict(re.findall(r'<Parameter name="([^"]+)" value="([^"]+)"', twiml))
        call.call_id = custom["call_id"]
        known(call)
        await self._connect(call, stream_url, custom, [])


async def fresh_database(server: str) -> str:
    """A new, empty database on the PostgreSQL server of ``server``: its URL."""
    import asyncpg

    name = "bench_burst_" + secrets.token_hex(4)
    admin = await asyncpg.connect(server.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    parts = urlsplit(server)
    return parts._replace(path=f"/{name}").geturl()


async def drop_database(server: str, url: str) -> None:
    import asyncpg

    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path[1:]}" WITH (FORCE)')
    finally:
        await admin.close()


async def burst(target, agent: NullAgent, n: int) -> tuple[list[float], int]:
    """``n`` calls at once: each one's set-up in seconds, and how many never reached the agent."""
    validator = RequestValidator(AUTH_TOKEN)
    calls = [Call(i) for i in range(n)]

    async def one(call: Call) -> None:
        call.setup_started = time.perf_counter()
        try:
            await target.open(call, validator, lambda c: agent.calls.__setitem__(c.call_id, c))
        except (OSError, RuntimeError, AttributeError) as e:  # (counted as never set up)
            print(f"  {target.name}: a call failed: {type(e).__name__}: {e}", flush=True)
            return
        deadline = call.setup_started + GIVE_UP_S
        while not call.agent_opened and time.perf_counter() < deadline:
            await asyncio.sleep(0.001)

    await asyncio.wait_for(asyncio.gather(*(one(c) for c in calls)), GIVE_UP_S + 5)
    times = [c.agent_opened - c.setup_started for c in calls if c.agent_opened]
    for call in calls:
        if call.caller is not None:
            call.caller.close()
        agent.calls.pop(call.call_id, None)
    await asyncio.sleep(0.5 + n / 100)  # the endings written before the next burst
    return times, n - len(times)


async def one_at_a_time(target, agent: NullAgent, count: int) -> list[float]:
    times: list[float] = []
    for _ in range(count):
        t, _lost = await burst(target, agent, 1)
        times += t
    return times


def line(name: str, what: str, times: list[float], lost: int, ref: tuple | None = None) -> str:
    p50, p99, mx = stats(times)
    text = f"{name:<20}{what:>12}{len(times):>7}{lost:>6}{p50:>9.1f}{p99:>9.1f}{mx:>9.1f}"
    if ref is not None:
        text += f"{p50 / ref[0]:>9.2f}x{p99 / ref[1]:>8.2f}x"
    return text


async def main_async(args) -> int:
    os.sched_setaffinity(0, {1})
    agent = NullAgent()
    await agent.start()
    workdir = Path(tempfile.mkdtemp(prefix="bridge-burst-"))
    results: dict[str, dict[str, tuple]] = {}
    print(f"{'target':<20}{'calls':>12}{'set up':>7}{'lost':>6}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'p50/peer':>10}{'p99/peer':>9}", flush=True)
    order = sorted(args.targets, key=lambda t: t != "sample")  # the peer first: the others' ratios are to it
    for name in order:
        database = None
        if name == "sample":
            target = SampleTarget(agent.port, workdir)
        elif name in ("bridge-postgresql", "bridge-postgresql-other"):
            database = await fresh_database(args.postgres)
            other = name.endswith("-other")
            target = BridgeTarget(
                agent.port, workdir, database, "bridge pg (other)" if other else "bridge postgresql", args.other if other else None
            )
        elif name == "bridge-sqlite-other":
            target = BridgeTarget(agent.port, workdir, name="bridge sqlite (other)", source=args.other)
        else:
            target = BridgeTarget(agent.port, workdir)
        await target.start()
        mine = results[target.name] = {}
        peer = results.get("sample relay", {})
        try:
            times = await one_at_a_time(target, agent, args.single)
            mine["1 at a time"] = stats(times)
            print(line(target.name, "1 at a time", times, 0, peer.get("1 at a time")), flush=True)
            for n in args.bursts:
                times, lost = [], 0
                for _ in range(args.rounds):
                    t, missing = await burst(target, agent, n)
                    times += t
                    lost += missing
                mine[f"{n} at once"] = stats(times)
                print(line(target.name, f"{n} at once", times, lost, peer.get(f"{n} at once")), flush=True)
        finally:
            target.stop()
            if database:
                await drop_database(args.postgres, database)
    return 0


def main(argv=None) -> int:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["sample", "bridge-sqlite", "bridge-postgresql"], choices=["sample", "bridge-sqlite", "bridge-postgresql", "bridge-sqlite-other", "bridge-postgresql-other"])
    parser.add_argument("--other", type=Path, help="the -other targets run the bridge from this checkout (e.g. a git worktree of an older commit)")
    parser.add_argument("--bursts", nargs="+", type=int, default=[10, 50, 200])
    parser.add_argument("--rounds", type=int, default=3, help="bursts of each size (their set-ups pooled)")
    parser.add_argument("--single", type=int, default=50, help="calls set up one at a time")
    parser.add_argument("--postgres", default=os.environ.get("BRIDGE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"))
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
