"""Call webhooks to a receiver that verifies signatures with the retell-sdk's own verify."""

import asyncio
import json
import time

import pytest

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from retell.lib.webhook_auth import verify

from bridge.server import BackgroundServer
from bridge.settings import AgentConfig
from bridge.store.outbox import sign

from .conftest import API_KEY, refusing_port, until


class Receiver:
    """Records every delivery; fails the first ``fail_first`` of them with 500."""

    def __init__(self, fail_first: int = 0):
        self.events: list[dict] = []
        self.attempts: list[tuple[str, float]] = []  # (event id, monotonic time), failures too
        self.failures_left = fail_first
        self.bad_signatures = 0
        self.app = FastAPI()
        self.app.post("/hook")(self.hook)
        self.app.post("/analyze")(self.analyze)

    async def hook(self, request: Request):
        body = (await request.body()).decode()
        if not verify(body, API_KEY, request.headers.get("x-retell-signature", "")):
            self.bad_signatures += 1
            return JSONResponse({}, status_code=401)
        self.attempts.append((request.headers["x-bridge-event-id"], time.monotonic()))
        if self.failures_left:
            self.failures_left -= 1
            return JSONResponse({}, status_code=500)
        self.events.append({**json.loads(body), "_id": request.headers["x-bridge-event-id"]})
        return {"ok": True}

    async def analyze(self, request: Request):
        body = json.loads(await request.body())
        return {"call_summary": f"{body['call']['call_id']} talked", "user_sentiment": "Positive"}

    def kinds(self, call_id: str) -> list[str]:
        return [e["event"] for e in self.events if e["call"]["call_id"] == call_id]


FAST = dict(webhook_retry_base_s=0.05, webhook_poll_s=0.05)


async def all_delivered(bridge_or_store, call_id: str, jobs: int) -> bool:
    """The call's ``jobs`` outbox jobs are all delivered: nothing more can come."""
    store = getattr(bridge_or_store, "store", bridge_or_store)
    found = await store.jobs(call_id)
    return len(found) == jobs and all(j["delivered_at"] is not None for j in found)


def test_signatures_are_what_retell_sdk_verifies():
    body = '{"event":"call_ended","call":{"call_id":"x"}}'
    assert verify(body, "key", sign(body, "key"))
    assert not verify(body, "other-key", sign(body, "key"))
    assert not verify(body + " ", "key", sign(body, "key"))
    assert not verify(body, "key", sign(body, "key", timestamp_ms=1))  # more than 5 minutes old


async def test_a_call_sends_started_ended_and_analyzed_once_each(start_bridge):
    receiver = Receiver()
    async with BackgroundServer(receiver.app) as server:
        bridge = await start_bridge(webhook_url=f"{server.base_url}/hook", analysis_url=f"{server.base_url}/analyze", **FAST)
        result = await bridge.call()
        await until(lambda: all_delivered(bridge, result.call_id, 4))  # the analysis job too
    assert receiver.kinds(result.call_id) == ["call_started", "call_ended", "call_analyzed"]
    assert receiver.bad_signatures == 0
    started, ended, analyzed = receiver.events
    assert started["call"]["call_status"] == "ongoing" and started["call"]["end_timestamp"] is None
    assert ended["call"]["call_status"] == "ended" and ended["call"]["disconnection_reason"] == "user_hangup"
    assert analyzed["call"]["call_analysis"] == {"call_summary": f"{result.call_id} talked", "user_sentiment": "Positive"}
    record = await bridge.store.get(result.call_id)
    assert record.call_analysis["user_sentiment"] == "Positive"


async def test_failed_deliveries_are_retried_with_backoff(start_bridge):
    base = 0.4
    receiver = Receiver(fail_first=2)
    async with BackgroundServer(receiver.app) as server:
        bridge = await start_bridge(webhook_url=f"{server.base_url}/hook", webhook_poll_s=0.05, webhook_retry_base_s=base)
        result = await bridge.call()
        await until(lambda: receiver.kinds(result.call_id) == ["call_started", "call_ended"])
    jobs = await bridge.store.jobs(result.call_id)
    assert [j["delivered_at"] is not None for j in jobs] == [True, True]
    assert sum(j["attempts"] for j in jobs) == 2  # the two failures, recorded
    # call_started failed twice (the receiver fails the first two deliveries it sees), then
    # got through: the retries waited base, then 2 x base (exponential), never less
    started_id = next(e["_id"] for e in receiver.events if e["event"] == "call_started")
    times = [t for event_id, t in receiver.attempts if event_id == started_id]
    assert len(times) == 3
    first_wait, second_wait = times[1] - times[0], times[2] - times[1]
    assert base <= first_wait and 2 * base <= second_wait, (first_wait, second_wait)  # (a loaded machine adds, never takes)


async def test_an_unreachable_receiver_is_given_up_after_the_last_attempt(start_bridge):
    with refusing_port() as port:  # bound, never listening: every connection is refused
        bridge = await start_bridge(webhook_url=f"http://127.0.0.1:{port}/hook", webhook_max_attempts=3, **FAST)
        result = await bridge.call()

        async def settled():
            jobs = await bridge.store.jobs(result.call_id)
            return len(jobs) == 2 and all(j["next_attempt_at"] is None for j in jobs)

        async with asyncio.timeout(10):
            while not await settled():
                await asyncio.sleep(0.05)
        for job in await bridge.store.jobs(result.call_id):
            assert job["attempts"] == 3 and job["delivered_at"] is None and "ConnectError" in job["last_error"]


async def test_an_agent_can_have_its_own_webhook(start_bridge):
    main, special = Receiver(), Receiver()
    async with BackgroundServer(main.app) as a, BackgroundServer(special.app) as b:
        agents = {
            "echo": AgentConfig(agent_id="echo", default=True),
            "vip": AgentConfig(agent_id="vip", webhook_url=f"{b.base_url}/hook"),
        }
        bridge = await start_bridge(agents=agents, webhook_url=f"{a.base_url}/hook", **FAST)
        plain, vip = await bridge.call(agent_id="echo"), await bridge.call(agent_id="vip")
        await until(lambda: len(main.events) == 2 and len(special.events) == 2)
    assert {e["call"]["call_id"] for e in main.events} == {plain.call_id}
    assert {e["call"]["call_id"] for e in special.events} == {vip.call_id}


async def test_undelivered_events_survive_a_restart(start_bridge, tmp_path):
    data_dir = tmp_path / "shared"
    patient = dict(FAST, webhook_max_attempts=10)
    with refusing_port() as port:  # the receiver is down the whole time of the first bridge
        url = f"http://127.0.0.1:{port}/hook"
        first = await start_bridge(webhook_url=url, data_dir=data_dir, **patient)
        result = await first.call()
        await first.server.stop()
    receiver = Receiver()
    async with BackgroundServer(receiver.app, port=port):
        second = await start_bridge(webhook_url=url, data_dir=data_dir, **patient)  # same database
        await until(lambda: all_delivered(second, result.call_id, 2))
    assert receiver.kinds(result.call_id) == ["call_started", "call_ended"]  # once each


def test_the_body_is_what_a_javascript_receiver_re_serialises():
    from bridge.store.outbox import body_text

    payload = {"event": "call_ended", "call": {"transcript": "Agent: ¿qué tal? 你好", "e2e_latency": {"p50": 120.0, "p90": 812.4}}}
    text = body_text(payload)
    assert text == '{"event":"call_ended","call":{"transcript":"Agent: ¿qué tal? 你好","e2e_latency":{"p50":120,"p90":812.4}}}'
    assert verify(text, "key", sign(text, "key"))


async def test_a_slow_receiver_does_not_hold_up_the_others(start_bridge):
    """The slow receiver holds its requests until the quick receiver has everything: delivery
    one job at a time would wait for it (60 s timeout) and never get there."""
    slow_seen, fast, release = [], Receiver(), asyncio.Event()
    slow = FastAPI()

    @slow.post("/hook")
    async def crawl():
        slow_seen.append(1)
        await release.wait()
        return {}

    async with BackgroundServer(slow) as s, BackgroundServer(fast.app) as f:
        agents = {
            "echo": AgentConfig(agent_id="echo", default=True, webhook_url=f"{s.base_url}/hook"),
            "quick": AgentConfig(agent_id="quick", webhook_url=f"{f.base_url}/hook"),
        }
        bridge = await start_bridge(agents=agents, webhook_timeout_s=60, **FAST)
        await bridge.call(agent_id="echo")
        await until(lambda: slow_seen)  # its call_started is in flight, unanswered (its call_ended waits behind it)
        quick = await bridge.call(agent_id="quick")
        await until(lambda: fast.kinds(quick.call_id) == ["call_started", "call_ended"], timeout=20)
        assert slow_seen == [1]
        release.set()
        await until(lambda: all_delivered(bridge, quick.call_id, 2))


def _dispatcher(store, tmp_path, http, **settings):
    from bridge.settings import load_settings
    from bridge.store import WebhookDispatcher

    return WebhookDispatcher(store, load_settings(data_dir=tmp_path, api_keys=API_KEY, **settings), http)


async def test_a_cancelled_dispatcher_stops_wherever_its_database_call_is(database_url, tmp_path):
    """Cancelled at every moment of its first claim (SQLite and a real PostgreSQL): it stops
    each time. (A cancellation that lands while SQLAlchemy's asyncpg dialect opens a transaction
    comes out as an AttributeError; a loop that took it for an outage would run on.)"""
    import httpx

    from bridge.store import SqlCallStore

    store = await SqlCallStore.open(database_url, "instance-a", tmp_path)
    store.time_statements(lambda kind, seconds: None)  # as the bridge runs it (its metrics)
    try:
        async with httpx.AsyncClient() as http:
            dispatcher = _dispatcher(store, tmp_path, http, webhook_poll_s=60)
            loop = asyncio.get_running_loop()
            for i in range(300):
                task = asyncio.create_task(dispatcher.run())
                started = loop.time()
                while loop.time() - started < i * 0.00002:  # 0 to 6 ms into its claim, in steps
                    await asyncio.sleep(0)
                task.cancel()
                done, _ = await asyncio.wait([task], timeout=2)
                assert task in done and task.cancelled(), f"still running after a cancel {i * 0.02:.2f} ms in"
    finally:
        await store.close()


async def test_stopping_lets_the_attempts_under_way_finish_and_be_recorded(database_url, tmp_path):
    """A replica stops claiming, and waits for the deliveries under way before it stops
    heartbeating: another replica would otherwise take their jobs over and send them again."""
    import httpx

    from bridge.store import SqlCallStore

    from .test_store import record

    holding, release = [], asyncio.Event()
    receiver = FastAPI()

    @receiver.post("/hook")
    async def hook(request: Request):
        holding.append(request.headers["x-bridge-event-id"])
        await release.wait()
        return {}

    store = await SqlCallStore.open(database_url, "instance-a", tmp_path)
    try:
        async with BackgroundServer(receiver) as server, httpx.AsyncClient() as http:
            dispatcher = _dispatcher(store, tmp_path, http, webhook_poll_s=0.05)
            await store.create(record("c1"))
            await store.enqueue(await store.get("c1"), [("call_started", f"{server.base_url}/hook")])
            dispatching = asyncio.create_task(dispatcher.run())
            await until(lambda: holding)  # the attempt is under way
            stopping = asyncio.create_task(dispatcher.stop(dispatching, timeout_s=10))
            await asyncio.sleep(0.3)
            assert not stopping.done()  # it waits for the attempt
            release.set()
            assert await stopping == 0 and dispatching.cancelled()
            [job] = await store.jobs("c1")
            assert job["delivered_at"] is not None and job["leased_by"] is None  # recorded before stop returned

            # an attempt that does not finish in time is cut off, and counted: its lease stays,
            # so another replica sends it when the lease ends
            release.clear()
            await store.enqueue(await store.get("c1"), [("call_ended", f"{server.base_url}/hook")])
            dispatching = asyncio.create_task(dispatcher.run())
            await until(lambda: len(holding) == 2)
            assert await dispatcher.stop(dispatching, timeout_s=0.2) == 1
            release.set()
            [_, job] = await store.jobs("c1")
            assert job["delivered_at"] is None and job["leased_by"] == "instance-a"
    finally:
        await store.close()


class Scripted:
    """A receiver that answers every delivery with ``answer`` (a status code, or "timeout": it
    answers only after the bridge has given up waiting), counting attempts per event."""

    def __init__(self, answer):
        self.answer = answer
        self.attempts: dict[str, int] = {}
        self.app = FastAPI()
        self.app.post("/hook")(self.hook)

    async def hook(self, request: Request):
        body = json.loads(await request.body())
        self.attempts[body["event"]] = self.attempts.get(body["event"], 0) + 1
        if self.answer == "timeout":
            await asyncio.sleep(2)
            return {"ok": True}
        return JSONResponse({}, status_code=self.answer)


@pytest.mark.parametrize("answer", [400, 401, 404, 410, 422, 301, 500, 502, 503, "timeout"])
async def test_every_answer_but_a_2xx_is_retried_until_the_last_attempt(start_bridge, answer):
    """The retry rule (docs/calls.md, as Retell's): a delivery is done only on a 2xx; a 4xx, a
    3xx, a 5xx, a timeout or a refused connection is tried again, with backoff, until
    webhook_max_attempts, then given up with the last answer recorded."""
    receiver = Scripted(answer)
    async with BackgroundServer(receiver.app) as server:
        bridge = await start_bridge(webhook_url=f"{server.base_url}/hook", webhook_max_attempts=3, webhook_timeout_s=0.3, **FAST)
        result = await bridge.call()

        async def settled():
            jobs = await bridge.store.jobs(result.call_id)
            return jobs if len(jobs) == 2 and all(j["next_attempt_at"] is None for j in jobs) else None

        jobs = await until(settled, timeout=20)
    assert receiver.attempts == {"call_started": 3, "call_ended": 3}
    for job in jobs:
        assert job["attempts"] == 3 and job["delivered_at"] is None
        assert ("Timeout" in job["last_error"]) if answer == "timeout" else (f"answered {answer}" in job["last_error"]), job["last_error"]


@pytest.mark.parametrize("answer", [200, 201, 202, 204])
async def test_a_2xx_is_delivered_at_the_first_attempt(start_bridge, answer):
    receiver = Scripted(answer)
    async with BackgroundServer(receiver.app) as server:
        bridge = await start_bridge(webhook_url=f"{server.base_url}/hook", **FAST)
        result = await bridge.call()
        await until(lambda: all_delivered(bridge, result.call_id, 2), timeout=10)
    assert receiver.attempts == {"call_started": 1, "call_ended": 1}
