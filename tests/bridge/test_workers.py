"""``bridge serve --workers N`` (``bridge.workers``): N bridge processes on one port, each a
replica of its own, on SQLite as on PostgreSQL.

End to end, with real ``bridge serve --workers 2`` processes and real signals: calls spread over
both workers; a stop-call and a listener sent to the worker that does not relay the call reach
the one that does; ``/metrics`` on the public port covers both; a worker killed with -9 is
started again (a new instance id) while the other serves, and its live call is reaped with a
reason; SIGTERM drains every worker (a live call runs to its end) and the supervisor exits 0.
And piece by piece: the merged metrics, the UDP control channel between workers (a forged
datagram is dropped), the dial rate shared on SQLite, the core count under a CPU quota."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from bridge.dev.simulator import simulate_call
from bridge.metrics import merge_expositions
from bridge.settings import cpu_count
from bridge.store import ControlChannel, SqlCallStore
from bridge.store.control import WorkerGroup
from bridge.store.schema import calls, instances

from .replicas import read_record
from .conftest import AUTH_TOKEN, api_client, best_correlation, caller_audio, until
from .test_drain import Replica, fake_twilio  # noqa: F401 - the fixture
from .test_listen import _channel, _listen

HEARTBEAT_S = 0.5  # the lease is three heartbeats: 1.5 s


def test_merged_metrics_are_one_bridge_s():
    one = """# HELP bridge_calls_ended_total Calls ended
# TYPE bridge_calls_ended_total counter
bridge_calls_ended_total{reason="user_hangup"} 3.0
bridge_calls_ended_created{reason="user_hangup"} 200.0
# HELP bridge_live_calls Calls relayed now
# TYPE bridge_live_calls gauge
bridge_live_calls{agent="echo",call_type="phone_call",direction="inbound"} 2.0
# HELP bridge_draining 1 while draining
# TYPE bridge_draining gauge
bridge_draining 0.0
# HELP bridge_webhook_outbox_depth Jobs
# TYPE bridge_webhook_outbox_depth gauge
bridge_webhook_outbox_depth 7.0
# HELP bridge_call_setup_seconds Set-up
# TYPE bridge_call_setup_seconds histogram
bridge_call_setup_seconds_bucket{le="0.1"} 1.0
bridge_call_setup_seconds_bucket{le="+Inf"} 2.0
bridge_call_setup_seconds_count 2.0
bridge_call_setup_seconds_sum 0.5
"""
    two = one.replace("} 3.0", "} 4.0").replace("} 200.0", "} 100.0").replace("bridge_draining 0.0", "bridge_draining 1.0")
    merged = merge_expositions([one, two]).decode()
    lines = set(merged.splitlines())
    assert 'bridge_calls_ended_total{reason="user_hangup"} 7.0' in lines
    assert 'bridge_calls_ended_created{reason="user_hangup"} 100.0' in lines  # the earliest, not a sum of times
    assert 'bridge_live_calls{agent="echo",call_type="phone_call",direction="inbound"} 4.0' in lines
    assert "bridge_draining 1.0" in lines and "bridge_webhook_outbox_depth 7.0" in lines  # the whole bridge's: highest
    assert 'bridge_call_setup_seconds_bucket{le="+Inf"} 4.0' in lines and "bridge_call_setup_seconds_sum 1.0" in lines
    assert "bridge_workers 2.0" in lines


def test_auto_is_the_cores_this_process_may_use(tmp_path):
    quota = tmp_path / "cpu.max"
    cores = len(os.sched_getaffinity(0))
    quota.write_text("max 100000\n")
    assert cpu_count(quota) == cores
    quota.write_text("150000 100000\n")  # a limit of 1.5 cores: 2 workers (rounded up)
    assert cpu_count(quota) == min(cores, 2)
    assert cpu_count(tmp_path / "absent") == cores


async def test_workers_send_each_other_signed_commands_over_loopback(tmp_path):
    ports = []
    for _ in range(2):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    addresses = tuple(f"http://127.0.0.1:{p}" for p in ports)
    store = await SqlCallStore.open(f"sqlite:///{tmp_path / 'calls.db'}", "a", tmp_path, workers=2)
    got = {a: [] for a in addresses}
    channels = [ControlChannel(store.engine, got[a].append, WorkerGroup(a, addresses, b"k" * 32)) for a in addresses]
    listeners = [asyncio.create_task(c.run()) for c in channels]
    try:
        assert store.shared and all(c.shared for c in channels)
        await asyncio.wait_for(asyncio.gather(*(c.listening.wait() for c in channels)), 10)
        await channels[0].send({"op": "stop", "call_id": "one"})
        assert got[addresses[0]] == [{"op": "stop", "call_id": "one"}]  # to itself at once
        await until(lambda: got[addresses[1]] == [{"op": "stop", "call_id": "one"}], timeout=5)
        # another local process that does not hold the workers' key cannot stop a call
        forged = WorkerGroup(addresses[0], addresses, b"x" * 32).sign(b'{"op":"stop","call_id":"two"}')
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            attacker.sendto(forged, ("127.0.0.1", ports[1]))
            attacker.sendto(b"short", ("127.0.0.1", ports[1]))
        await channels[0].send({"op": "stop", "call_id": "three"})
        await until(lambda: len(got[addresses[1]]) == 2, timeout=5)
        assert [c["call_id"] for c in got[addresses[1]]] == ["one", "three"]
    finally:
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        await store.close()


async def test_the_dial_rate_is_one_schedule_for_the_workers_on_sqlite(tmp_path, monkeypatch):
    import bridge.store.call_store as call_store

    url = f"sqlite:///{tmp_path / 'calls.db'}"
    stores = [await SqlCallStore.open(url, name, tmp_path, workers=2) for name in ("w1", "w2")]
    monkeypatch.setattr(call_store.time, "time_ns", lambda: 1_800_000_000 * 10**9)  # (the machine's clock, stopped)
    try:
        waits = await asyncio.gather(*(stores[i % 2].take_slot("twilio", 0.1, 5.0) for i in range(10)))
        assert sorted(waits) == pytest.approx([0.1 * i for i in range(10)]), waits  # one slot each, 100 ms apart, both processes
        assert await stores[0].take_slot("twilio", 0.1, 0.5) is None  # more than 0.5 s away: refused, nothing taken
        assert await stores[1].take_slot("twilio", 0.1, 5.0) == pytest.approx(1.0)
    finally:
        monkeypatch.undo()
        for store in stores:
            await store.close()


# --- end to end ------------------------------------------------------------------------------


async def _instances(database_url: str, tmp_path) -> dict[str, str]:
    """instance id -> address, of the instances that hold their claim."""
    store = await SqlCallStore.open(database_url, "reader", tmp_path)
    try:
        async with store.engine.connect() as conn:
            rows = await conn.execute(select(instances.c.instance_id, instances.c.address).where(instances.c.claim.is_not(None)))
            return {row.instance_id: row.address for row in rows}
    finally:
        await store.close()


async def _owners(database_url: str, tmp_path) -> dict[str, tuple[str, str]]:
    """call id -> (status, instance id)."""
    store = await SqlCallStore.open(database_url, "reader", tmp_path)
    try:
        async with store.engine.connect() as conn:
            return {r.call_id: (r.call_status, r.instance_id) for r in await conn.execute(select(calls.c.call_id, calls.c.call_status, calls.c.instance_id))}
    finally:
        await store.close()


def _worker_pid(supervisor: int, instance_id: str) -> int:
    for child in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"BRIDGE_INSTANCE_ID={instance_id}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker holds {instance_id}")


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_two_workers_on_one_port_are_one_bridge(tmp_path, fake_twilio, database_url):  # noqa: F811
    fake, fake_url = fake_twilio
    if database_url.startswith("sqlite"):
        database_url = f"sqlite:///{tmp_path / 'data-bridge' / 'bridge.db'}"
    bridge = Replica(tmp_path, fake_url, workers=2, instance_id="box", heartbeat_interval_s=HEARTBEAT_S, database_url=database_url)
    try:
        await bridge.start()
        await until(lambda: _count_instances(database_url, tmp_path, 2), timeout=20, interval=0.2)
        workers = await _instances(database_url, tmp_path)
        assert set(workers) == {"box-1", "box-2"} and all(a.startswith("http://127.0.0.1:") for a in workers.values()), workers
        said = caller_audio()

        def place(pcm: bytes, **options):
            return asyncio.create_task(simulate_call(bridge.base_url, AUTH_TOKEN, pcm, speed=1.0, fake_api=fake, max_call_s=40, **options))

        # calls spread over both workers (the kernel hashes each connection to one)
        placed = []
        while True:
            placed += [place(said * 4) for _ in range(4)]
            await until(lambda n=len(placed): _live(database_url, tmp_path, n), timeout=20, interval=0.1)
            held = {owner for status, owner in (await _owners(database_url, tmp_path)).values() if status == "ongoing"}
            if held == {"box-1", "box-2"} or len(placed) >= 16:
                break
        assert held == {"box-1", "box-2"}, held
        live = {c: owner for c, (status, owner) in (await _owners(database_url, tmp_path)).items() if status == "ongoing"}

        # a listener and a stop-call sent to the worker that does not relay the call
        target = next(iter(live))
        other = workers["box-2" if live[target] == "box-1" else "box-1"]
        async with api_client(other) as http:
            grant = (await http.post(f"/v2/listen-live-call/{target}")).json()
        listener = asyncio.create_task(_listen(f"{other.replace('http', 'ws')}/listen-live/{target}", grant["access_token"]))
        await asyncio.sleep(4.5)  # (the caller's first sentence and its echo)
        async with api_client(other) as http:
            stopped_at = time.monotonic()
            assert (await http.post(f"/v2/stop-call/{target}")).status_code == 204
            stop_s = time.monotonic() - stopped_at
            record = (await http.get(f"/v2/get-call/{target}")).json()
        assert record["call_status"] == "ended" and record["disconnection_reason"] == "agent_hangup", record
        heard = await asyncio.wait_for(listener, 10)
        assert heard["start"]["call_id"] == target and heard["texts"][-1] == {"event": "end", "reason": "agent_hangup"}, heard["texts"]
        peak, _ = best_correlation(_channel(heard["frames"], 0), said)
        assert peak > 0.9, peak

        # /metrics on the public port is the whole bridge's, whichever worker answers
        async with api_client(bridge.base_url) as http:
            text = (await http.get("/metrics")).text
        assert "bridge_workers 2.0" in text, text[-2000:]
        live_gauge = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("bridge_live_calls{"))
        assert live_gauge == len(live) - 1, text

        # kill -9 a worker: started again under a new id; its live calls are reaped by the other
        victim = live[next(c for c in live if c != target)]
        doomed = [c for c, owner in live.items() if owner == victim and c != target]
        os.kill(_worker_pid(bridge.process.pid, victim), signal.SIGKILL)
        await until(lambda: _count_instances(database_url, tmp_path, 3), timeout=20, interval=0.2)  # box-K.1 too
        assert f"{victim}.1" in await _instances(database_url, tmp_path)

        async def reaped() -> bool:
            owners = await _owners(database_url, tmp_path)
            return all(owners[c][0] != "ongoing" for c in doomed)

        await until(reaped, timeout=20, interval=0.2)
        for call_id in doomed:
            record = await read_record(database_url, tmp_path, call_id)
            assert record.disconnection_reason.value == "error_unknown" and "lease expired" in record.error_detail, record.error_detail
        assert (await httpx.AsyncClient().get(f"{bridge.base_url}/livez")).status_code == 200

        # SIGTERM drains both: a call placed now runs to its end, then the supervisor exits 0
        await asyncio.gather(*placed, return_exceptions=True)
        last = place(said, tail_ms=1500)
        await until(lambda: _live(database_url, tmp_path, 1), timeout=20, interval=0.1)
        bridge.signal(signal.SIGTERM)
        result = await asyncio.wait_for(last, 30)
        log = bridge.log_path.read_text()
        assert result.ended_by == "caller" and result.protocol_errors == [], (result.summary(), [l for l in log.splitlines() if result.call_id in l or "WARNING" in l or "ERROR" in l])
        assert await bridge.exit_code(timeout=30) == 0
        print(f"\n2 workers: stop-call through the other worker answered in {stop_s * 1000:.0f} ms")
    finally:
        _stop(bridge)


def _stop(bridge: Replica) -> None:
    """Kill the supervisor and its workers (a worker left alone would drain for its calls)."""
    if bridge.process is not None and bridge.process.poll() is None:
        for child in Path(f"/proc/{bridge.process.pid}/task/{bridge.process.pid}/children").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child), signal.SIGKILL)
    bridge.stop()


async def _count_instances(database_url, tmp_path, n: int) -> bool:
    try:
        return len(await _instances(database_url, tmp_path)) >= n
    except Exception:  # (the schema is being made)
        return False


async def _live(database_url, tmp_path, n: int) -> bool:
    return sum(1 for status, _ in (await _owners(database_url, tmp_path)).values() if status == "ongoing") >= n
