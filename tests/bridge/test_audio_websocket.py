"""The seeds' own flow: a call registered through the API connects on
``/audio-websocket/{call_id}``, from Twilio (protocol ``twilio``, the user's own webhook answers
the TwiML) or from a web client (protocol ``web``), and is relayed like any call."""

import asyncio
import json
import wave

import httpx
import pytest
import websockets
from fastapi import FastAPI, Request
from fastapi.responses import Response
from twilio.request_validator import RequestValidator
from websockets.exceptions import ConnectionClosed, InvalidStatus

from audio import Resampler, pcm_to_ulaw
from bridge.dev.simulator import simulate_call
from bridge.server import BackgroundServer
from bridge.settings import AgentConfig

from .conftest import (
    API_KEY, AUTH_TOKEN, TRUTH, api_client, best_correlation, caller_audio, call_status, until, wait_for_end,
)  # fmt: skip
from .test_web_call import talk


def audio_websocket(bridge, call_id: str, query: str = "") -> str:
    return f"{bridge.base_url.replace('http', 'ws')}/audio-websocket/{call_id}{query}"


async def register(bridge, **body) -> dict:
    body = {"agent_id": "echo", "audio_websocket_protocol": "web", "audio_encoding": "s16le", "sample_rate": 24000, **body}
    async with api_client(bridge.base_url) as http:
        r = await http.post("/register-call", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def first_phrase(pcm: bytes, rate: int) -> bytes:
    """The first phrase of the caller sample, in s16le at ``rate``."""
    start, end = (int(ms * rate / 1000) * 2 for ms in TRUTH[0])
    return pcm[start:end]


async def closed_by_bridge(url: str, **connect) -> tuple[int | None, str]:
    """Open ``url``; the bridge accepts and closes it at once: (close code, reason)."""
    async with websockets.connect(url, **connect) as ws:
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
    return ws.close_code, ws.close_reason


@pytest.mark.parametrize("updates", [True, False], ids=["enable_update", "no updates"])
async def test_a_web_client_talks_to_the_agent_on_the_audio_websocket(bridge, updates):
    call = await register(bridge, metadata={"page": "pricing"})
    assert call["call_type"] == "web_call" and call["call_status"] == "registered"
    said = Resampler(8000, 24000).process(caller_audio())
    heard, texts = await talk(audio_websocket(bridge, call["call_id"], "?enable_update=true" if updates else ""), said, 24000)
    corr, _ = best_correlation(heard, first_phrase(said, 24000))
    assert corr >= 0.9, corr
    events = [json.loads(t) for t in texts if t.startswith("{")]
    if updates:  # the echo agent's transcript, as the seeds' update event
        assert events and all(e["event_type"] == "update" for e in events)
        assert events[-1]["transcript"][0]["role"] == "user"
    else:
        assert events == []
    record = await wait_for_end(bridge, call["call_id"])
    assert record.disconnection_reason.value == "user_hangup", record.error_detail
    assert (record.audio_websocket_protocol.value, record.audio_encoding.value, record.sample_rate) == ("web", "s16le", 24000)
    assert record.transcript.startswith("User: (")
    # recorded like a phone call, at the web client's rate: caller left, agent right
    with wave.open(str(bridge.calls.recording_path(call["call_id"]))) as w:
        assert (w.getframerate(), w.getnchannels()) == (24000, 2) and w.getnframes() > 24000
    async with api_client(bridge.base_url) as http:
        log = (await http.get(record.public_log_url)).text
    assert '"event":"web_client_start"' in log and '"event":"end"' in log


async def test_a_mulaw_web_client_is_converted_both_ways(bridge):
    """A web client in mu-law at 8 kHz; the echo agent speaks s16le at 24 kHz."""
    call = await register(bridge, audio_encoding="mulaw", sample_rate=8000)
    pcm = caller_audio()
    async with websockets.connect(audio_websocket(bridge, call["call_id"])) as ws:
        heard = bytearray()

        async def receive():
            async for message in ws:
                if isinstance(message, bytes):
                    heard.extend(message)

        receiver = asyncio.create_task(receive())
        ulaw = pcm_to_ulaw(pcm) + bytes([0xFF]) * 8000 * 4  # then 4 s of mu-law silence
        for i in range(0, len(ulaw), 160):
            await ws.send(ulaw[i : i + 160])
            await asyncio.sleep(0.02 / 8)
        await ws.close()
        await asyncio.gather(receiver, return_exceptions=True)
    from audio import ulaw_to_pcm

    corr, _ = best_correlation(ulaw_to_pcm(bytes(heard)), first_phrase(pcm, 8000))
    assert corr >= 0.9, corr


def users_webhook(bridge, register_with: str) -> FastAPI:
    """A seeds-era user's own Twilio voice webhook: registers the call with the bridge's API,
    then answers TwiML that connects Twilio to the seeds' audio websocket."""
    app = FastAPI()

    @app.post("/voice")
    async def voice(request: Request) -> Response:
        form = await request.form()
        if register_with == "v1":
            async with httpx.AsyncClient(base_url=bridge.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
                r = await http.post("/register-call", json={
                    "agent_id": "echo", "audio_websocket_protocol": "twilio", "audio_encoding": "mulaw", "sample_rate": 8000,
                    "from_number": form["From"], "to_number": form["To"], "metadata": {"call_sid": form["CallSid"]},
                })  # fmt: skip
                call_id = r.json()["call_id"]
        else:  # the official retell-sdk, v2, with only the agent (numbers are optional in the seed)
            from retell import AsyncRetell

            async with AsyncRetell(api_key=API_KEY, base_url=bridge.base_url, max_retries=0) as sdk:
                call_id = (await sdk.call.register_phone_call(agent_id="echo")).call_id
        stream = f"{bridge.base_url.replace('http', 'ws')}/audio-websocket/{call_id}"
        twiml = f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="{stream}"/></Connect></Response>'
        return Response(twiml, media_type="text/xml")

    return app


@pytest.mark.parametrize("register_with", ["v1", "v2"])
async def test_twilio_connects_a_call_the_users_own_webhook_registered(bridge, register_with):
    async with BackgroundServer(users_webhook(bridge, register_with)) as webhook:
        result = await simulate_call(
            bridge.base_url, AUTH_TOKEN, caller_audio(), api_key=API_KEY, voice_url=f"{webhook.base_url}/voice", speed=8.0,
            tail_ms=1500, fake_api=bridge.fake,
        )  # fmt: skip
    assert result.protocol_errors == [] and result.call_id, (result.protocol_errors, result.twiml)
    corr, _ = best_correlation(result.heard, first_phrase(caller_audio(), 8000))
    assert corr >= 0.9, corr  # the caller heard the echo
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "user_hangup", record.error_detail
    assert record.twilio_call_sid == result.call_sid and record.call_type.value == "phone_call"
    assert (record.audio_websocket_protocol.value, record.audio_encoding.value, record.sample_rate) == ("twilio", "mulaw", 8000)
    if register_with == "v2":
        assert record.from_number is None and record.to_number is None  # nothing was said of them
    else:
        assert record.from_number == "+15550199999" and record.metadata == {"call_sid": result.call_sid}


async def test_register_phone_call_needs_only_the_agent(bridge):
    """The README's SDK example (retell-sdk defaults: no strict validation): numbers unknown are
    null; the call is a Twilio leg waiting for its stream."""
    from retell import AsyncRetell

    async with AsyncRetell(api_key=API_KEY, base_url=bridge.base_url, max_retries=0) as sdk:
        call = await sdk.call.register_phone_call(agent_id="echo")
        again = await sdk.call.retrieve(call.call_id)
    assert call.call_status == "registered" and call.from_number is None and call.to_number is None
    assert again.call_id == call.call_id and again.direction == "inbound"


def signed_headers(url: str) -> dict:
    return {"X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(url, {})}


async def test_the_call_id_opens_one_socket_only(bridge):
    call = await register(bridge)
    url = audio_websocket(bridge, call["call_id"])
    async with websockets.connect(url) as first:
        await first.send(bytes(960))
        await until(lambda: call_status(bridge, call["call_id"], "ongoing"))
        code, reason = await closed_by_bridge(url)
        assert code == 1008 and "already connected" in reason
        await first.send(bytes(960))  # the first socket's call goes on
        assert (await bridge.store.get(call["call_id"])).call_status.value == "ongoing"
    record = await wait_for_end(bridge, call["call_id"])
    assert record.disconnection_reason.value == "user_hangup"
    assert any("audio websocket refused: the call is already connected" in note for note in record.notes), record.notes
    async with api_client(bridge.base_url) as http:  # the refusal is in the call's public log too
        log = [json.loads(line) for line in (await http.get(record.public_log_url)).text.splitlines()]
    assert any(e["event"] == "note" and "already connected" in e["text"] for e in log), log


async def test_an_unknown_call_id_is_refused(bridge):
    code, reason = await closed_by_bridge(audio_websocket(bridge, "no-such-call"))
    assert code == 1008 and reason == "unknown call"


async def test_an_expired_registration_is_refused_with_how_it_ended(start_bridge):
    bridge = await start_bridge(registered_call_timeout_s=0.3)
    for protocol, ended in (("web", "error_user_not_joined"), ("twilio", "registered_call_timeout")):
        fmt = {"audio_encoding": "mulaw", "sample_rate": 8000} if protocol == "twilio" else {}
        call = await register(bridge, audio_websocket_protocol=protocol, **fmt)
        record = await wait_for_end(bridge, call["call_id"])
        assert record.disconnection_reason.value == ended
        url = audio_websocket(bridge, call["call_id"])
        code, reason = await closed_by_bridge(url, additional_headers=signed_headers(url) if protocol == "twilio" else {})
        assert code == 1008 and f"the call has ended ({ended})" in reason
        record = await bridge.store.get(call["call_id"])
        assert record.disconnection_reason.value == ended  # the refusal changes nothing
        assert any(f"has ended ({ended})" in note for note in record.notes), record.notes


async def test_a_create_web_call_call_opens_only_with_its_access_token(bridge):
    """Its call id alone (in the browser's URL, in list-calls) must not open it."""
    async with api_client(bridge.base_url) as http:
        call = (await http.post("/v2/create-web-call", json={"agent_id": "echo"})).json()
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(audio_websocket(bridge, call["call_id"]))
    assert refused.value.response.status_code == 403
    record = await bridge.store.get(call["call_id"])
    assert record.call_status.value == "registered"
    assert any("opens at /web-call/ with its access token" in note for note in record.notes), record.notes


async def test_refusals_noted_on_a_call_are_bounded(bridge):
    call = await register(bridge, audio_websocket_protocol="twilio", audio_encoding="mulaw", sample_rate=8000)
    for _ in range(30):
        with pytest.raises(InvalidStatus):
            await websockets.connect(audio_websocket(bridge, call["call_id"]))
    assert len((await bridge.store.get(call["call_id"])).notes) == 20


@pytest.mark.parametrize("who", ["web client on twilio", "Twilio on web", "forged signature"])
async def test_the_wrong_kind_of_client_is_refused_and_the_call_waits(bridge, who):
    protocol = "web" if who == "Twilio on web" else "twilio"
    fmt = {"audio_encoding": "mulaw", "sample_rate": 8000} if protocol == "twilio" else {}
    call = await register(bridge, audio_websocket_protocol=protocol, **fmt)
    url = audio_websocket(bridge, call["call_id"])
    headers = {"web client on twilio": {}, "Twilio on web": signed_headers(url),
               "forged signature": signed_headers(url + "x")}[who]  # fmt: skip
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(url, additional_headers=headers)
    assert refused.value.response.status_code == 403
    record = await bridge.store.get(call["call_id"])
    assert record.call_status.value == "registered"  # the right client may still come
    why = {"web client on twilio": "not Twilio's media stream (no X-Twilio-Signature) on a call registered with protocol twilio",
           "Twilio on web": "Twilio's media stream on a call registered with protocol web",
           "forged signature": "bad X-Twilio-Signature"}[who]  # fmt: skip
    assert any(why in note for note in record.notes), record.notes


async def test_a_twilio_protocol_agent_serves_a_web_client(start_bridge):
    """The agent speaks Twilio's protocol (mu-law 8 kHz); the browser s16le at 16 kHz: the
    bridge plays Twilio for the agent (start, media, marks back once played, stop)."""
    agents = {"t": AgentConfig(agent_id="t", protocol="twilio", encoding="mulaw", sample_rate=8000, default=True)}
    bridge = await start_bridge(agents=agents)
    async with api_client(bridge.base_url) as http:
        call = (await http.post("/register-call", json={
            "agent_id": "t", "audio_websocket_protocol": "web", "audio_encoding": "s16le", "sample_rate": 16000,
        })).json()  # fmt: skip
    said = Resampler(8000, 16000).process(caller_audio())
    heard, _ = await talk(audio_websocket(bridge, call["call_id"]), said, 16000)
    corr, _ = best_correlation(heard, first_phrase(said, 16000))
    assert corr >= 0.9, corr
    record = await wait_for_end(bridge, call["call_id"])
    assert record.disconnection_reason.value == "user_hangup", record.error_detail
    async with api_client(bridge.base_url) as http:
        log = [json.loads(line) for line in (await http.get(record.public_log_url)).text.splitlines()]
    end = next(e for e in log if e["event"] == "end")
    # heard, by the clock (the client hung up, at 8x real time, before the echo had all played)
    assert end["agent_audio_ms"] > 1000 and 0 < end["heard_ms"] < end["agent_audio_ms"], end


async def test_a_web_client_on_a_bridge_shutting_down_is_told_so(start_bridge):
    bridge = await start_bridge()
    call = await register(bridge)
    async with websockets.connect(audio_websocket(bridge, call["call_id"])) as ws:
        await ws.send(bytes(960))
        await until(lambda: call_status(bridge, call["call_id"], "ongoing"))
        stopping = asyncio.create_task(bridge.server.stop())
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    await ws.recv()
        await stopping
    assert ws.close_code == 1001
    from bridge.store import SqlCallStore

    store = await SqlCallStore.open(bridge.settings.database_url, "reader", bridge.settings.data_dir)
    try:
        record = await store.get(call["call_id"])
    finally:
        await store.close()
    assert record.disconnection_reason.value == "error_unknown" and "shut down" in record.error_detail


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
async def test_web_clients_at_any_rate_hear_the_agent_and_are_recorded_at_theirs(bridge, rate):
    call = await register(bridge, sample_rate=rate)
    said = Resampler(8000, rate).process(caller_audio()) if rate != 8000 else caller_audio()
    heard, _ = await talk(audio_websocket(bridge, call["call_id"]), said, rate)
    corr, _ = best_correlation(heard, first_phrase(said, rate))
    assert corr >= 0.9, corr
    record = await wait_for_end(bridge, call["call_id"])
    assert record.disconnection_reason.value == "user_hangup" and record.e2e_latency is not None
    with wave.open(str(bridge.calls.recording_path(call["call_id"]))) as w:
        assert w.getframerate() == rate
