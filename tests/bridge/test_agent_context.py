"""What the agent learns about the bridge and the call: its own headers on the upgrade (so it
can tell the bridge from anyone), the call id, and the call's context (``customParameters`` on
the twilio protocol; a first ``call_details`` message on the web protocol when asked for)."""

import contextlib
import json

import websockets

from bridge.settings import AgentConfig

from .conftest import api_client, retell_client, wait_for_end
from .test_web_call import talk, ws_url


@contextlib.asynccontextmanager
async def recording_agent():
    """An agent that records each upgrade's headers and the first text message, then reads on."""
    seen: list[dict] = []

    async def handler(ws):
        entry = {"headers": ws.request.headers, "path": ws.request.path, "first_text": None}
        seen.append(entry)
        async for message in ws:
            if isinstance(message, str) and entry["first_text"] is None:
                entry["first_text"] = message

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen


async def test_a_web_agent_gets_its_headers_and_the_call_details(start_bridge):
    async with recording_agent() as (url, seen):
        agent = AgentConfig(
            agent_id="a", url=f"{url}/{{call_id}}", default=True, send_call_details=True, sample_rate=16000,
            headers={"Authorization": "Bearer agent-secret", "X-Tenant": "acme"},
        )  # fmt: skip
        bridge = await start_bridge(agents={"a": agent})
        result = await bridge.call()
    (entry,) = seen
    assert entry["headers"]["Authorization"] == "Bearer agent-secret" and entry["headers"]["X-Tenant"] == "acme"
    assert entry["headers"]["X-Bridge-Call-Id"] == result.call_id
    details = json.loads(entry["first_text"])
    assert details["event_type"] == "call_details"
    assert details["call"]["call_id"] == result.call_id and details["call"]["to_number"] == "+15550100000"
    # the call object's format is the caller's leg (as in the seeds): both legs are said apart
    assert (details["call"]["audio_encoding"], details["call"]["sample_rate"]) == ("mulaw", 8000)
    assert details["caller_audio"] == {"protocol": "twilio", "encoding": "mulaw", "sample_rate": 8000}
    assert details["agent_audio"] == {"protocol": "web", "encoding": "s16le", "sample_rate": 16000}


async def test_a_call_shorter_than_the_keepalive_interval_has_the_agent_link_s_round_trip(start_bridge):
    """The first ping goes a second after the agent's socket opens, not after the 5 s interval."""
    bridge = await start_bridge()
    result = await bridge.call(speed=2.0, tail_ms=500)
    async with api_client(bridge.base_url) as http:
        record = (await http.get(f"/v2/get-call/{result.call_id}")).json()
    assert record["end_timestamp"] - record["start_timestamp"] < 5000, record
    assert record["llm_websocket_network_rtt_latency"]["num"] >= 1, record


async def test_a_web_call_s_agent_gets_the_call_details_without_the_access_token(start_bridge):
    async with recording_agent() as (url, seen):
        agent = AgentConfig(agent_id="a", url=f"{url}/{{call_id}}", default=True, send_call_details=True)
        bridge = await start_bridge(agents={"a": agent})
        async with retell_client(bridge) as sdk:
            call = await sdk.call.create_web_call(agent_id="a", metadata={"page": "pricing"})
        await talk(ws_url(bridge, call.call_id, call.access_token), bytes(9600), 24000, tail_s=0.2)
        await wait_for_end(bridge, call.call_id)
    details = json.loads(seen[0]["first_text"])["call"]
    assert details["call_id"] == call.call_id and details["metadata"] == {"page": "pricing"}
    assert "access_token" not in details and seen[0]["headers"]["X-Bridge-Call-Id"] == call.call_id


async def test_a_twilio_protocol_agent_gets_its_headers_and_the_context_in_custom_parameters(start_bridge):
    frames: list[dict] = []
    headers = []

    async def handler(ws):
        headers.append(ws.request.headers)
        async for message in ws:
            if isinstance(message, str):
                frames.append(json.loads(message))

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        agent = AgentConfig(
            agent_id="t", url=f"{url}/{{call_id}}", protocol="twilio", encoding="mulaw", sample_rate=8000, default=True,
            headers={"Authorization": "Bearer agent-secret"},
        )  # fmt: skip
        bridge = await start_bridge(agents={"t": agent})
        result = await bridge.call(speed=4.0, tail_ms=200)
    assert headers[0]["Authorization"] == "Bearer agent-secret" and headers[0]["X-Bridge-Call-Id"] == result.call_id
    (start,) = [f for f in frames if f["event"] == "start"]
    params = start["start"]["customParameters"]
    assert params["call_id"] == result.call_id and params["agent_id"] == "t"
    assert params["to_number"] == "+15550100000" and params["direction"] == "inbound"
    assert "token" not in params
