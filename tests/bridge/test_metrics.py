"""``/metrics`` after a known sequence of calls, parsed with prometheus_client's own parser."""

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bridge.settings import AgentConfig

from .conftest import api_client, caller_audio, free_port, until, wait_for_end

# port 9 (discard): privileged, so no server of the run binds it, and nothing listens there
REFUSED_PORT = 9
DEAD = f"ws://127.0.0.1:{REFUSED_PORT}/{{call_id}}"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value}"""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(bridge) -> dict:
    async with api_client(bridge.base_url) as http:
        r = await http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return samples(r.text)


async def test_metrics_count_what_happened(start_bridge):
    agents = {
        "echo": AgentConfig(agent_id="echo", default=True),
        "dead": AgentConfig(agent_id="dead", url=DEAD),
    }
    bridge = await start_bridge(
        agents=agents, registered_call_timeout_s=0.3, webhook_url=f"http://127.0.0.1:{REFUSED_PORT}/hook", webhook_timeout_s=1,
        webhook_retry_base_s=0.1, webhook_max_attempts=2,
    )  # fmt: skip
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{bridge.base_url}/metrics")).status_code == 401  # the API key, on the main port

    # two calls to the echo agent; while the first is live, it shows as live
    first = asyncio.create_task(bridge.call(caller_audio(), speed=2.0))
    await until(lambda: bridge.calls.live_calls == 1)
    live = await scrape(bridge)
    assert live[("bridge_live_calls", (("agent", "echo"), ("call_type", "phone_call"), ("direction", "inbound")))] == 1
    assert live[("bridge_draining", ())] == 0
    results = [await first, await bridge.call(caller_audio(), speed=2.0)]
    # one whose agent cannot be reached, one registered and never connected
    failed = await bridge.call(caller_audio(), agent_id="dead")
    async with api_client(bridge.base_url) as http:
        registered = (await http.post("/v2/register-phone-call", json={"agent_id": "echo"})).json()
    await wait_for_end(bridge, registered["call_id"])
    await wait_for_end(bridge, failed.call_id)
    records = [await wait_for_end(bridge, r.call_id) for r in results]

    async def delivered_or_failed():  # every webhook attempt made (they all fail: nobody listens)
        return all(j["next_attempt_at"] is None for j in await bridge.store.jobs())

    await until(delivered_or_failed, timeout=15)
    m = await scrape(bridge)
    ended = {labels[0][1]: v for (name, labels), v in m.items() if name == "bridge_calls_ended_total"}
    assert ended == {"user_hangup": 2, "error_llm_websocket_open": 1, "registered_call_timeout": 1}, ended
    assert m[("bridge_agent_connect_failures_total", (("agent", "dead"),))] == 1
    assert not any(name == "bridge_live_calls" for name, _ in m)  # nothing live now
    frames_in = m[("bridge_frames_total", (("direction", "in"),))]
    sent = sum(r.sent_ms // 20 for r in results)
    assert sent - 5 <= frames_in <= sent + 5, (frames_in, sent)
    assert m[("bridge_frames_total", (("direction", "out"),))] == sum(r.media_received for r in results)
    turns = sum(r.e2e_latency.num for r in records)
    assert m[("bridge_turn_latency_seconds_count", ())] == turns > 0
    assert m[("bridge_call_setup_seconds_count", ())] == 2  # the calls whose agent answered
    delays = m[("bridge_added_delay_seconds_count", (("direction", "in"),))]
    expected = sum(r.sent_ms // 20 // 50 for r in results)  # one frame in 50 of each call is timed
    assert expected - 2 <= delays <= expected + 2, (delays, expected)
    assert m[("bridge_added_delay_seconds_sum", (("direction", "in"),))] / delays < 0.01  # under 10 ms on average
    jobs = await bridge.store.jobs()
    attempts = sum(j["attempts"] for j in jobs)
    failures = sum(v for (name, _), v in m.items() if name == "bridge_webhook_delivery_failures_total")
    assert failures == attempts > 0
    assert m[("bridge_store_operation_seconds_count", (("operation", "select"),))] > 0
    assert m[("bridge_store_operation_seconds_count", (("operation", "update"),))] > 0


async def test_metrics_on_their_own_port_need_no_key(start_bridge):
    port = free_port()
    await start_bridge(metrics_port=port)
    async with httpx.AsyncClient() as http:
        r = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert r.status_code == 200 and "bridge_draining 0.0" in r.text, r.text[:500]


async def test_the_gauges_and_counters_the_other_test_leaves_alone(start_bridge, bad_agent, monkeypatch):
    """bridge_draining while draining; bridge_frames_dropped_total exactly what the clears threw
    away; bridge_agent_rtt_seconds one sample per ping answered; the webhook outbox's depth and
    oldest age as the store has them."""
    from bridge.api import metrics as metrics_api

    monkeypatch.setattr(metrics_api, "OUTBOX_REFRESH_S", 0.1)
    agents = {
        "echo": AgentConfig(agent_id="echo", default=True),
        "clear": AgentConfig(agent_id="clear", url=f"{bad_agent}/clear/{{call_id}}"),
    }
    bridge = await start_bridge(
        agents=agents, keepalive_interval_s=0.25, webhook_url=f"http://127.0.0.1:{REFUSED_PORT}/hook", webhook_retry_base_s=3600,
        webhook_poll_s=0.05,
    )  # fmt: skip
    echoed = await bridge.call(caller_audio(), speed=2.0)
    # the agent sends 1010 ms at once and takes it back: 50 whole frames went out at once, the
    # last 10 ms (short of a frame) waited for more and was dropped: one frame, per call
    cleared = [await bridge.call(bytes(16000), agent_id="clear") for _ in range(2)]
    assert all(r.clears == 1 for r in cleared)
    record = await wait_for_end(bridge, echoed.call_id)
    for r in cleared:
        await wait_for_end(bridge, r.call_id)
    m = await scrape(bridge)
    assert m[("bridge_frames_dropped_total", ())] == 2
    rtt = record.llm_websocket_network_rtt_latency
    assert rtt is not None and rtt.num >= 2
    pings_answered = m[("bridge_agent_rtt_seconds_count", ())]
    records = [await bridge.store.get(r.call_id) for r in (echoed, *cleared)]
    assert pings_answered == sum(r.llm_websocket_network_rtt_latency.num for r in records if r.llm_websocket_network_rtt_latency)
    assert 0 < m[("bridge_agent_rtt_seconds_sum", ())] / pings_answered < 0.5

    # every webhook failed once and waits an hour: 2 jobs a call pending
    depth, oldest_ms = await bridge.store.outbox_backlog()
    assert depth == 6

    async def gauges():
        m = await scrape(bridge)
        return m if m[("bridge_webhook_outbox_depth", ())] == 6 else None

    m = await until(gauges, timeout=5)
    assert 0 < m[("bridge_webhook_outbox_oldest_age_seconds", ())] <= (oldest_ms / 1000) + 1

    assert m[("bridge_draining", ())] == 0
    bridge.calls.draining = True
    assert (await scrape(bridge))[("bridge_draining", ())] == 1
    bridge.calls.draining = False
