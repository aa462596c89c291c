"""POST /twilio/voice with signatures made by the twilio package's RequestValidator."""

import asyncio
import xml.etree.ElementTree as ET

import httpx
import pytest
from twilio.request_validator import RequestValidator

from bridge.settings import AgentConfig, ExternalRegistrar
from bridge.dev.simulator import connect_action, parse_twiml

from .conftest import AUTH_TOKEN

PARAMS = {
    "CallSid": "CA" + "1" * 32, "AccountSid": "AC" + "2" * 32, "From": "+15005550006", "To": "+14155550100",
    "Direction": "inbound", "CallStatus": "ringing", "ApiVersion": "2010-04-01",
}  # fmt: skip


def signed(url: str, params: dict, token: str = AUTH_TOKEN) -> dict:
    return {"X-Twilio-Signature": RequestValidator(token).compute_signature(url, params)}


async def post(base: str, path: str = "/twilio/voice", params=PARAMS, headers=None, signed_url=None):
    url = base + path
    headers = signed(signed_url or url, params) if headers is None else headers
    async with httpx.AsyncClient() as http:
        return await http.post(url, data=params, headers=headers)


async def registered(bridge) -> list:
    return (await bridge.store.list(limit=1000))[0]


async def test_a_signed_call_gets_connect_stream_twiml(start_bridge):
    bridge = await start_bridge()
    r = await post(bridge.base_url)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    url, params, after = parse_twiml(r.text)
    assert url == bridge.base_url.replace("http", "ws") + "/twilio/media"  # no query string
    assert set(params) == {"call_id", "token", "bridge_action"} and params["bridge_action"] == "1"
    # what Twilio does after the stream is the bridge's answer to the <Connect action>
    assert after == [] and connect_action(r.text) == (f"{bridge.base_url}/twilio/stream-ended/{params['call_id']}", "POST")
    record = await bridge.store.get(params["call_id"])
    assert record.call_status.value == "registered" and record.twilio_call_sid == PARAMS["CallSid"]
    assert (record.from_number, record.to_number, record.direction.value) == ("+15005550006", "+14155550100", "inbound")
    # the twilio package builds the same document shape
    root = ET.fromstring(r.text)
    assert [child.tag for child in root] == ["Connect"]


@pytest.mark.parametrize(
    "headers",
    [
        {},  # missing
        {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"},  # forged
        "wrong-token",
        "wrong-url",
    ],
)
async def test_bad_signatures_are_refused_and_register_nothing(start_bridge, headers):
    bridge = await start_bridge()
    if headers == "wrong-token":
        headers = signed(bridge.base_url + "/twilio/voice", PARAMS, token="not-the-token")
    elif headers == "wrong-url":
        headers = signed("https://elsewhere.example.com/twilio/voice", PARAMS)
    r = await post(bridge.base_url, headers=headers)
    assert r.status_code == 403
    assert await registered(bridge) == []


async def test_a_tampered_parameter_breaks_the_signature(start_bridge):
    bridge = await start_bridge()
    url = bridge.base_url + "/twilio/voice"
    headers = signed(url, PARAMS)
    r = await post(bridge.base_url, params={**PARAMS, "To": "+19005550199"}, headers=headers)
    assert r.status_code == 403


async def test_behind_ngrok_the_public_url_is_what_is_signed(start_bridge):
    bridge = await start_bridge(public_url="https://abc123.ngrok.app")
    r = await post(bridge.base_url, signed_url="https://abc123.ngrok.app/twilio/voice")
    assert r.status_code == 200
    assert parse_twiml(r.text)[0] == "wss://abc123.ngrok.app/twilio/media"
    # the local URL is not what Twilio signed, so it no longer passes
    assert (await post(bridge.base_url)).status_code == 403


async def test_trusted_forwarded_headers_give_the_public_url(start_bridge):
    bridge = await start_bridge(trust_forwarded_headers=True)
    public = "https://bridge.example.com/twilio/voice"
    headers = {**signed(public, PARAMS), "X-Forwarded-Proto": "https", "X-Forwarded-Host": "bridge.example.com"}
    r = await post(bridge.base_url, headers=headers)
    assert r.status_code == 200 and parse_twiml(r.text)[0] == "wss://bridge.example.com/twilio/media"
    # without trust the same headers change nothing
    other = await start_bridge()
    assert (await post(other.base_url, headers=headers)).status_code == 403


async def test_an_amd_callback_never_registers_a_second_call(start_bridge):
    bridge = await start_bridge()
    assert (await post(bridge.base_url)).status_code == 200
    amd = {**PARAMS, "AnsweredBy": "machine_start"}
    r = await post(bridge.base_url, params=amd)
    assert r.status_code == 200 and parse_twiml(r.text) == (None, {}, [])
    assert len(await registered(bridge)) == 1


AGENTS = {
    "sales": AgentConfig(agent_id="sales", numbers=["+14155550100"]),
    "support": AgentConfig(agent_id="support", numbers=["+14155550111"], default=True, sample_rate=16000),
    "lab": AgentConfig(agent_id="lab", sample_rate=8000),
}


@pytest.mark.parametrize(
    "to,path,agent",
    [
        ("+14155550100", "/twilio/voice", "sales"),
        ("+14155550111", "/twilio/voice", "support"),
        ("+13125550123", "/twilio/voice", "support"),  # unknown number: the default agent
        ("+14155550100", "/twilio/voice/lab", "lab"),  # the path names the agent
    ],
)
async def test_calls_are_routed_by_number_or_path(start_bridge, to, path, agent):
    bridge = await start_bridge(agents=AGENTS)
    r = await post(bridge.base_url, path, params={**PARAMS, "To": to})
    call_id = parse_twiml(r.text)[1]["call_id"]
    record = await bridge.store.get(call_id)
    assert record.agent_id == agent
    # the record's format is the caller's leg (Twilio's stream); the agent's is its own
    assert (record.audio_websocket_protocol.value, record.audio_encoding.value, record.sample_rate) == ("twilio", "mulaw", 8000)


async def test_no_agent_for_a_number_plays_the_fallback(start_bridge):
    agents = {"sales": AgentConfig(agent_id="sales", numbers=["+14155550100"]), "x": AgentConfig(agent_id="x")}
    bridge = await start_bridge(agents=agents)
    r = await post(bridge.base_url, params={**PARAMS, "To": "+13125550123"})
    assert r.status_code == 200 and parse_twiml(r.text)[0] is None
    assert parse_twiml(r.text)[2][0][0] == "Say"
    r = await post(bridge.base_url, "/twilio/voice/nobody")
    assert parse_twiml(r.text)[0] is None
    assert await registered(bridge) == []


async def test_an_external_registrar_gives_the_call_id(start_bridge):
    from fastapi import FastAPI, Request

    from bridge.server import BackgroundServer

    seen = []
    registrar = FastAPI()

    @registrar.post("/register-call", status_code=201)
    async def register(request: Request):
        seen.append((request.headers.get("authorization"), await request.json()))
        return {"call_id": "ext_call_42", "agent_id": "ext"}

    async with BackgroundServer(registrar) as server:
        agent = AgentConfig(agent_id="ext", registrar=ExternalRegistrar(url=server.base_url, api_key="reg-key"), sample_rate=16000)
        bridge = await start_bridge(agents={"ext": agent})
        r = await post(bridge.base_url)
        assert parse_twiml(r.text)[1]["call_id"] == "ext_call_42"
        auth, body = seen[0]
        assert auth == "Bearer reg-key"
        # the v1 contract's format is the audio websocket's: a phone call's is Twilio's stream
        assert body["agent_id"] == "ext" and body["audio_websocket_protocol"] == "twilio"
        assert body["audio_encoding"] == "mulaw" and body["sample_rate"] == 8000
        assert body["from_number"] == PARAMS["From"] and body["direction"] == "inbound"
        assert (await bridge.store.get("ext_call_42")).call_status.value == "registered"


async def test_an_unreachable_registrar_plays_the_fallback(start_bridge):
    agent = AgentConfig(agent_id="ext", registrar=ExternalRegistrar(url="http://127.0.0.1:9", api_key="k"))
    bridge = await start_bridge(agents={"ext": agent})
    r = await post(bridge.base_url)
    assert r.status_code == 200 and parse_twiml(r.text)[0] is None


async def test_synchronous_amd_registers_the_call_on_its_first_request(start_bridge):
    """With synchronous answering-machine detection Twilio's first (and only) request to the
    voice URL already carries AnsweredBy: it must still get a call and <Connect>."""
    bridge = await start_bridge()
    r = await post(bridge.base_url, params={**PARAMS, "AnsweredBy": "human"})
    url, params, _ = parse_twiml(r.text)
    assert url is not None and (await bridge.store.get(params["call_id"])).twilio_call_sid == PARAMS["CallSid"]


async def test_a_retried_webhook_gets_the_same_call(start_bridge):
    bridge = await start_bridge()
    first = parse_twiml((await post(bridge.base_url)).text)[1]
    again = parse_twiml((await post(bridge.base_url)).text)[1]
    assert first["call_id"] == again["call_id"] and first["token"] != again["token"]
    assert len(await registered(bridge)) == 1


async def test_only_url_encoded_forms_are_read(start_bridge):
    bridge = await start_bridge()
    async with httpx.AsyncClient() as http:
        r = await http.post(bridge.base_url + "/twilio/voice", files={"CallSid": ("x", b"hi")}, headers={"X-Twilio-Signature": "abc"})
        assert r.status_code == 403
        big = {**PARAMS, "Padding": "x" * 70000}
        r = await http.post(bridge.base_url + "/twilio/voice", data=big, headers=signed(bridge.base_url + "/twilio/voice", big))
        assert r.status_code == 413 and "over 65536 bytes" in r.json()["message"]  # signed, but too big to read
    assert await registered(bridge) == []


async def test_agent_ids_that_need_url_encoding_are_signed_as_sent(start_bridge):
    bridge = await start_bridge(agents={"sales team": AgentConfig(agent_id="sales team", default=True)})
    r = await post(bridge.base_url, "/twilio/voice/sales%20team")
    assert r.status_code == 200 and parse_twiml(r.text)[0] is not None


async def test_a_registrar_repeating_a_call_id_gets_the_fallback(start_bridge):
    from fastapi import FastAPI

    from bridge.server import BackgroundServer

    registrar = FastAPI()

    @registrar.post("/register-call", status_code=201)
    async def register():
        return {"call_id": "always-the-same"}

    async with BackgroundServer(registrar) as server:
        agent = AgentConfig(agent_id="ext", registrar=ExternalRegistrar(url=server.base_url, api_key="k"))
        bridge = await start_bridge(agents={"ext": agent})
        assert parse_twiml((await post(bridge.base_url)).text)[1]["call_id"] == "always-the-same"
        second = await post(bridge.base_url, params={**PARAMS, "CallSid": "CA" + "9" * 32})
        assert second.status_code == 200 and parse_twiml(second.text)[0] is None  # fallback, no 500


@pytest.mark.parametrize("call_id", ["../../etc/passwd", "x" * 65, "", 42, "a b"])
async def test_a_registrar_s_call_id_that_is_not_a_call_id_gets_the_fallback(start_bridge, call_id):
    """The call id names the call's files and URLs: a registrar cannot put a path or a
    megabyte there."""
    from fastapi import FastAPI

    from bridge.server import BackgroundServer

    registrar = FastAPI()

    @registrar.post("/register-call", status_code=201)
    async def register():
        return {"call_id": call_id}

    async with BackgroundServer(registrar) as server:
        agent = AgentConfig(agent_id="ext", registrar=ExternalRegistrar(url=server.base_url, api_key="k"))
        bridge = await start_bridge(agents={"ext": agent})
        r = await post(bridge.base_url)
        assert r.status_code == 200 and parse_twiml(r.text)[0] is None  # the fallback
        assert await registered(bridge) == []


async def test_connections_that_never_finish_their_head_are_dropped_and_webhooks_go_on(start_bridge):
    """Bare connects, a partial upgrade and slowloris heads (a byte now and then): each is
    dropped once request_head_timeout_s has passed without a whole head, at most
    max_waiting_connections wait at once, and a signed webhook gets through meanwhile."""
    bridge = await start_bridge(request_head_timeout_s=1.0, max_waiting_connections=20)
    host, port = bridge.server.host, bridge.server.port
    idle = [await asyncio.open_connection(host, port) for _ in range(40)]  # bare connects
    partial = await asyncio.open_connection(host, port)
    partial[1].write(b"GET /twilio/media HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")  # never ends
    slow = await asyncio.open_connection(host, port)

    async def drip():
        for byte in b"POST /twilio/voice HTTP/1.1\r\nHost: x\r\n" * 10:
            slow[1].write(bytes([byte]))
            await asyncio.sleep(0.1)

    dripping = asyncio.create_task(drip())
    r = await post(bridge.base_url)  # a real webhook, with 40+ sockets waiting
    assert r.status_code == 200 and parse_twiml(r.text)[0].endswith("/twilio/media")
    async with asyncio.timeout(10):  # every one of them is dropped: EOF, or a reset
        for reader, _ in [*idle, partial, slow]:
            try:
                assert await reader.read() == b""
            except ConnectionResetError:
                pass
    dripping.cancel()
    for _, writer in [*idle, partial, slow]:
        writer.close()


async def test_the_head_deadline_spares_a_pipelined_request_under_way():
    """A second request pipelined behind the first is dispatched as the first one's answer
    completes: its head has come, so the deadline must not cut it while it runs."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from bridge.server import http_protocol

    async def fast(request):
        return PlainTextResponse("fast")

    async def slow(request):
        await asyncio.sleep(1.5)
        return PlainTextResponse("slow")

    app = Starlette(routes=[Route("/fast", fast), Route("/slow", slow)])
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", http=http_protocol(head_timeout_s=0.5))
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\nGET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(10):
            answers = b""
            while answers.count(b"HTTP/1.1 200") < 2 or not answers.endswith(b"slow"):
                chunk = await reader.read(4096)
                assert chunk, f"closed early: {answers!r}"
                answers += chunk
        writer.close()
    finally:
        server.should_exit = True
        await task
