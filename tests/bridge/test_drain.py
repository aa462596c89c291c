"""Graceful drain (docs/operations.md), on a real ``bridge serve`` process and real signals:
SIGTERM during a live call lets it run to its end (the caller hears all of it), the replica is
not ready from the signal on, a voice webhook is handed on (once, never in a loop), and the
process exits 0; a call still live at ``drain_timeout_s`` ends with the documented reason and
the caller hears the drain message; SIGINT stops at once, recording every call's end. Also the
health endpoints, in process."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from twilio.request_validator import RequestValidator

from bridge.dev.simulator import FakeTwilioApi, simulate_call
from bridge.store import SqlCallStore

from .conftest import API_KEY, AUTH_TOKEN, TRUTH, api_client, best_correlation, caller_audio, free_port, until

PARAMS = {"CallSid": "CA" + "d" * 32, "AccountSid": "AC" + "0" * 32, "From": "+15550199999", "To": "+15550100000"}


async def live(base_url: str) -> bool:
    """``/livez`` answers 200 (a process started serving, itself or behind a balancer)."""
    try:
        async with httpx.AsyncClient() as http:
            return (await http.get(f"{base_url}/livez")).status_code == 200
    except httpx.HTTPError:
        return False


class Replica:
    """``bridge serve`` in its own process, with a fake Twilio REST API."""

    def __init__(self, tmp_path, fake_url: str, name: str = "bridge", **env):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.data_dir = tmp_path / f"data-{name}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
            "BRIDGE_PORT": str(self.port), "BRIDGE_DATA_DIR": str(self.data_dir), "BRIDGE_TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "BRIDGE_API_KEYS": API_KEY, "BRIDGE_REQUEST_HOST_SIGNATURES": "1", "BRIDGE_TWILIO_API_BASE_URL": fake_url,
            "BRIDGE_TWILIO_ACCOUNT_SID": "AC" + "0" * 32, **{f"BRIDGE_{k.upper()}": str(v) for k, v in env.items()},
        }  # fmt: skip
        self.process: subprocess.Popen | None = None
        self.log_path = tmp_path / f"{name}.log"

    async def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve"], env=self.env, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT
        )
        await until(lambda: live(self.base_url), timeout=30)

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    async def exit_code(self, timeout: float = 30) -> int:
        return await asyncio.to_thread(self.process.wait, timeout)

    async def record(self, call_id: str):
        store = await SqlCallStore.open(f"sqlite:///{self.data_dir / 'bridge.db'}", "reader", self.data_dir)
        try:
            return await store.get(call_id)
        finally:
            await store.close()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
async def fake_twilio():
    fake = FakeTwilioApi(AUTH_TOKEN)
    url = await fake.start()
    yield fake, url
    await fake.stop()


@pytest.fixture
def replica(tmp_path, fake_twilio):
    made: list[Replica] = []

    def make(**env) -> Replica:
        made.append(Replica(tmp_path, fake_twilio[1], **env))
        return made[-1]

    yield make
    for r in made:
        r.stop()


async def post_voice(url: str) -> httpx.Response:
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, PARAMS)
    async with httpx.AsyncClient() as http:
        return await http.post(url, data=PARAMS, headers={"X-Twilio-Signature": signature})


async def readiness(base_url: str) -> int:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{base_url}/readyz")).status_code


def unready(base_url: str):
    """For ``until``: ``/readyz`` answers 503 (the drain has begun)."""

    async def check() -> bool:
        return await readiness(base_url) == 503

    return check


async def live_call_id(base_url: str) -> str:
    async def ongoing():
        async with api_client(base_url) as http:
            r = await http.post("/v3/list-calls", json={"filter_criteria": {"call_status": {"op": "in", "value": ["ongoing"]}}})
        items = r.json()["items"]
        return items[0]["call_id"] if items else None

    return await until(ongoing, timeout=15)


async def test_sigterm_lets_a_live_call_finish_then_exits_0(replica, fake_twilio):
    fake, _ = fake_twilio
    bridge = replica()
    await bridge.start()
    assert await readiness(bridge.base_url) == 200
    said = caller_audio()
    call = asyncio.create_task(simulate_call(bridge.base_url, AUTH_TOKEN, said, speed=1.0, tail_ms=2500, fake_api=fake))
    call_id = await live_call_id(bridge.base_url)
    t0 = time.monotonic()
    timeline = {}
    bridge.signal(signal.SIGTERM)
    await until(unready(bridge.base_url), timeout=10)
    timeline["not ready"] = time.monotonic() - t0
    assert not call.done()  # unready at once: while the call still goes on
    # a new call's webhook during the drain is handed to a ready replica through the public URL,
    # and, coming back to a draining one on SQLite (one process: no other replica), answered 503
    # (Twilio then uses the number's fallback URL); replicas on PostgreSQL answer it there
    first = await post_voice(f"{bridge.base_url}/twilio/voice")
    assert first.status_code == 200 and "<Redirect" in first.text, first.text
    redirect = first.text.split('method="POST">')[1].split("</Redirect>")[0].replace("&amp;", "&")
    assert redirect == f"{bridge.base_url}/twilio/voice?bridge_handed_over=1"
    second = await post_voice(redirect)
    assert second.status_code == 503
    timeline["webhook handed over"] = time.monotonic() - t0
    result = await call
    timeline["call ended"] = time.monotonic() - t0
    code = await bridge.exit_code()
    timeline["process exited"] = time.monotonic() - t0
    print("\ndrain timeline (s after SIGTERM):", {k: round(v, 2) for k, v in timeline.items()})
    assert code == 0, bridge.log_path.read_text()[-2000:]
    assert result.ended_by == "caller" and result.protocol_errors == []
    corr, _ = best_correlation(result.heard, said[int(TRUTH[0][0] * 16) : int(TRUTH[0][1] * 16)])
    assert corr >= 0.9, corr  # the caller heard all of the echo
    record = await bridge.record(call_id)
    assert record.disconnection_reason.value == "user_hangup", record.error_detail
    assert timeline["call ended"] > 3.0  # the call went on, for seconds


async def test_a_call_live_at_the_drain_deadline_ends_with_a_message(replica, fake_twilio):
    fake, _ = fake_twilio
    bridge = replica(drain_timeout_s=1.0)
    await bridge.start()
    long_call = caller_audio() * 6
    call = asyncio.create_task(simulate_call(bridge.base_url, AUTH_TOKEN, long_call, speed=1.0, fake_api=fake, max_call_s=60))
    call_id = await live_call_id(bridge.base_url)
    bridge.signal(signal.SIGTERM)
    result = await call
    assert await bridge.exit_code() == 0
    # the stream ended, and the replica, still there, told Twilio what to do next: no REST request
    assert result.after == ["Say: Sorry, we have to end this call now. Please call again.", "Hangup"], result.summary()
    assert fake.requests == []
    record = await bridge.record(call_id)
    assert record.disconnection_reason.value == "max_duration_reached"
    assert record.error_detail == "the replica's drain deadline passed (1 s)"


@pytest.mark.parametrize("signals", [["SIGINT"], ["SIGTERM", "SIGTERM"]], ids=["SIGINT", "a second SIGTERM"])
async def test_sigint_or_a_second_sigterm_stops_at_once_and_records_the_call(replica, fake_twilio, signals):
    fake, _ = fake_twilio
    bridge = replica()
    await bridge.start()
    call = asyncio.create_task(simulate_call(bridge.base_url, AUTH_TOKEN, caller_audio() * 6, speed=1.0, fake_api=fake))
    call_id = await live_call_id(bridge.base_url)
    if signals == ["SIGTERM", "SIGTERM"]:  # the first one drains: wait until it has begun
        bridge.signal(signal.SIGTERM)
        await until(unready(bridge.base_url), timeout=10)
    t0 = time.monotonic()
    bridge.signal(getattr(signal, signals[-1]))
    assert await bridge.exit_code() == 0
    assert time.monotonic() - t0 < 10
    await call
    record = await bridge.record(call_id)
    assert record.disconnection_reason.value == "error_unknown" and record.error_detail == "the bridge shut down"


async def test_health(start_bridge):
    bridge = await start_bridge(max_live_calls=1)
    async with httpx.AsyncClient(base_url=bridge.base_url) as http:  # no API key needed
        assert (await http.get("/livez")).json()["status"] == "ok"
        assert (await http.get("/healthz")).status_code == 200
        r = await http.get("/readyz")
        assert r.status_code == 200 and r.json() == {"status": "ready", "live_calls": 0, "problems": []}
        call = asyncio.create_task(bridge.call(caller_audio() * 3, speed=1.0))
        await until(lambda: bridge.calls.live_calls == 1)
        r = await http.get("/readyz")
        assert r.status_code == 503 and r.json()["problems"] == ["1 live calls (max_live_calls 1)"]
        await call
        assert (await http.get("/readyz")).status_code == 200
        bridge.app.state.loop_watch.last_tick -= 10  # as if the loop had been blocked for 10 s
        r = await http.get("/livez")
        assert r.status_code == 503 and r.json()["status"] == "stalled"


async def test_the_drain_waits_for_a_stream_answered_just_before_it(start_bridge):
    """(in process) A voice webhook answered, then SIGTERM's drain, then the stream: the drain
    waits for that stream's call, and ends once it has ended; with none due it ends at once."""
    import uvicorn

    from bridge.dev.simulator import SimulationResult, _stream, parse_twiml
    from bridge.server import DrainingServer

    from .test_webhook import post

    bridge = await start_bridge(drain_timeout_s=60)
    answered = await post(bridge.base_url, params={**PARAMS, "CallSid": "CA" + "9" * 32})
    stream_url, stream_params, _ = parse_twiml(answered.text)
    assert bridge.calls.streams_due() == 1
    server = DrainingServer(uvicorn.Config(bridge.app), bridge.calls)
    drain = asyncio.create_task(server.drain())
    try:
        await asyncio.sleep(1.0)  # a stream is due: the drain goes on waiting for it
        assert not drain.done() and not server.should_exit and bridge.calls.draining
        result = SimulationResult(PARAMS["CallSid"], 200)
        await _stream(
            result, stream_url, stream_params, RequestValidator(AUTH_TOKEN), PARAMS["AccountSid"], caller_audio(), 8.0, (), 500, 30,
            asyncio.Event(),
        )  # fmt: skip
        assert result.ended_by == "caller" and result.sent_ms >= len(caller_audio()) // 16  # the call ran in full
        await asyncio.wait_for(drain, 10)  # and then the drain ended
        assert server.should_exit
        record = await bridge.store.get(stream_params["call_id"])
        assert record.disconnection_reason is not None and record.disconnection_reason.value == "user_hangup", (record.call_status, record.notes, result.summary(), result.protocol_errors)
    finally:
        drain.cancel()
        bridge.calls.draining = False
    idle = DrainingServer(uvicorn.Config(bridge.app), bridge.calls)
    await asyncio.wait_for(idle.drain(), 5)  # nothing live, nothing due: at once
