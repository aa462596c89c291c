"""What Twilio does after a call's stream follows from how the call ended: the bridge's TwiML
is ``<Connect action>``, and its answer is a hang-up for a normal ending, the drain message
after the drain's deadline, the fallback message only after a failure. So a normal ending
hangs up even when Twilio's REST API cannot be reached (a dev machine, an outage, a wrong
account SID), and every REST request that fails is on the call's public log."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys

import httpx
import pytest

from bridge.calls.service import DRAIN_DETAIL
from bridge.models import DisconnectionReason as Reason
from bridge.settings import AgentConfig

from .conftest import AUTH_TOKEN, api_client, caller_audio, free_port, hung_up_cleanly, until, wait_for_end
from .test_webhook import PARAMS, post

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing answers there


async def test_a_clean_ending_hangs_up_though_twilio_rest_is_unreachable(start_bridge):
    bridge = await start_bridge(twilio_api_base_url=UNREACHABLE)
    result = await bridge.call(dtmf=((600, "#"),))  # the echo agent hangs up on #
    assert hung_up_cleanly(result), result.summary()
    assert result.record["disconnection_reason"] == "agent_hangup" and result.record["call_status"] == "ended"
    assert result.action_requests == 1


async def test_stop_call_hangs_up_though_twilio_rest_is_unreachable(start_bridge):
    bridge = await start_bridge(twilio_api_base_url=UNREACHABLE)
    call = asyncio.create_task(bridge.call(speed=1.0, tail_ms=20000))
    (live,) = await until(lambda: _ongoing(bridge))
    async with api_client(bridge.base_url) as http:
        assert (await http.post(f"/v2/stop-call/{live.call_id}")).status_code == 204
    result = await call
    assert hung_up_cleanly(result), result.summary()


async def _ongoing(bridge):
    return (await bridge.store.list(statuses=["ongoing"]))[0]


@pytest.mark.parametrize(
    "agent_path,expected",
    [("/close1011", "fallback"), ("/garbage", "fallback"), ("/hangup", "hangup")],
)
async def test_what_twilio_does_after_the_stream_follows_the_ending(start_bridge, bad_agent, agent_path, expected):
    agents = {"a": AgentConfig(agent_id="a", url=f"{bad_agent}{agent_path}/{{call_id}}", default=True)}
    bridge = await start_bridge(agents=agents, twilio_api_base_url=UNREACHABLE)
    result = await bridge.call()
    if expected == "hangup":
        assert hung_up_cleanly(result), result.summary()
    else:
        assert result.after == [f"Say: {bridge.settings.fallback_message}", "Hangup"], result.summary()


async def stream_ended(bridge, call_id: str) -> list[str]:
    """Twilio's <Connect action> request for the call, signed: the verbs of the answer."""
    from bridge.dev.simulator import parse_twiml

    r = await post(bridge.base_url, f"/twilio/stream-ended/{call_id}", params={**PARAMS, "CallStatus": "in-progress"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml"), r.text
    return [f"{verb}: {text}".rstrip(": ") for verb, text in parse_twiml(r.text)[2]]


async def test_the_stream_ended_callback_answers_each_kind_of_ending(start_bridge):
    bridge = await start_bridge(twilio_request_timeout_s=1.5)
    fallback = [f"Say: {bridge.settings.fallback_message}", "Hangup"]
    async with api_client(bridge.base_url) as http:
        made = [(await http.post("/v2/register-phone-call", json={"agent_id": "echo"})).json()["call_id"] for _ in range(5)]
    registered, normal, failed, drained, live = made
    assert await stream_ended(bridge, registered) == fallback  # its stream never started the call
    assert await stream_ended(bridge, "no-such-call") == fallback
    assert await stream_ended(bridge, "bad%00id") == fallback
    for call_id, reason, detail in (
        (normal, Reason.inactivity, "the caller was silent for 10.0 s"),
        (failed, Reason.error_llm_websocket_runtime, "agent closed with 1011"),
        (drained, Reason.max_duration_reached, f"{DRAIN_DETAIL} (5 s)"),
    ):
        await bridge.store.start(call_id)
        await bridge.store.finish(call_id, reason, error_detail=detail)
    assert await stream_ended(bridge, normal) == ["Hangup"]
    assert await stream_ended(bridge, failed) == fallback
    assert await stream_ended(bridge, drained) == [f"Say: {bridge.settings.drain_message}", "Hangup"]
    # an ongoing call whose relay says nothing (its replica died with it): the fallback, in time
    await bridge.store.start(live)
    started = asyncio.get_running_loop().time()
    assert await stream_ended(bridge, live) == fallback
    assert asyncio.get_running_loop().time() - started < bridge.settings.twilio_request_timeout_s + 1
    # a relay's word comes before its record: answered from it at once
    bridge.calls.ending(live, Reason.agent_hangup, "agent closed the socket (1000)")
    assert await stream_ended(bridge, live) == ["Hangup"]


async def test_the_stream_ended_callback_needs_twilio_s_signature(start_bridge):
    bridge = await start_bridge()
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{bridge.base_url}/twilio/stream-ended/x", data=PARAMS)
    assert r.status_code == 403


async def test_a_failed_rest_hang_up_is_on_the_public_log_and_logged(start_bridge, caplog):
    """A call of the user's own TwiML (no <Connect action>: the seeds' audio websocket) is hung
    up through REST; when that fails the call's public log and the log say why."""
    from bridge.dev.simulator import simulate_call
    from bridge.server import BackgroundServer

    from .conftest import API_KEY
    from .test_audio_websocket import users_webhook

    bridge = await start_bridge(twilio_api_base_url=UNREACHABLE)
    caplog.set_level(logging.WARNING)
    async with BackgroundServer(users_webhook(bridge, "v1")) as webhook:
        result = await simulate_call(
            bridge.base_url, AUTH_TOKEN, caller_audio(), api_key=API_KEY, voice_url=f"{webhook.base_url}/voice", speed=8.0,
            tail_ms=1500, dtmf=((600, "#"),),
        )  # fmt: skip
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "agent_hangup"
    assert "Twilio hang-up of" in caplog.text and "failed" in caplog.text
    async with api_client(bridge.base_url) as http:
        log = [json.loads(line) for line in (await http.get(record.public_log_url)).text.splitlines()]
    (failed,) = [e for e in log if e["event"] == "twilio_rest_failed"]
    assert failed["action"] == "hang_up" and "Connect" in failed["reason"], failed


async def test_a_failed_rest_hang_up_outside_a_relay_is_noted(start_bridge):
    """stop-call on a call only registered hangs it up through REST: a failure is noted."""
    bridge = await start_bridge(twilio_api_base_url=UNREACHABLE)
    r = await post(bridge.base_url)
    call_id = r.text.split('name="call_id" value="')[1].split('"')[0]
    async with api_client(bridge.base_url) as http:
        assert (await http.post(f"/v2/stop-call/{call_id}")).status_code == 204
    record = await wait_for_end(bridge, call_id)
    assert [n for n in record.notes if n.startswith("Twilio REST hang-up failed: ")], record.notes


async def test_serve_and_simulate_behave_like_a_real_call(tmp_path):
    """The README's way to try without a phone, as written: `bridge serve` on the embedded
    defaults (dev secrets, Twilio's REST API out of reach) and `bridge simulate`; the echo agent
    hangs up on # and the caller hears no failure message."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "bridge", "serve", "--port", str(port)], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:

        async def serving() -> bool:
            try:
                async with httpx.AsyncClient() as http:
                    return (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
            except httpx.HTTPError:
                return False

        await until(serving, timeout=30)
        ran = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "bridge", "simulate", "--url", f"http://127.0.0.1:{port}", "--speed", "4", "--dtmf", "1500:#"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert ran.returncode == 0, ran.stderr
    decoder, text = json.JSONDecoder(), ran.stdout.strip()
    record, end = decoder.raw_decode(text)
    summary = json.loads(text[end:])
    assert record["disconnection_reason"] == "agent_hangup" and record["call_status"] == "ended"
    assert summary["after"] == ["Hangup"] and summary["fallback"] == [], summary
