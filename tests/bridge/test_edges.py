"""What reaches the bridge from outside, the same on SQLite and PostgreSQL: every field Twilio
can send (SIP URIs, ``client:`` identities, NULs, values longer than any column) gives a call,
never the fallback; ids that are no call id are "unknown call" on every path, never a 500;
stored text holds no NUL; per-call caps hold under concurrency."""

from __future__ import annotations

import asyncio

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from bridge.calls.service import MAX_NOTES
from bridge.dev.simulator import parse_twiml
from bridge.models import MAX_PARTY_CHARS

from .conftest import api_client, caller_audio, until, wait_for_end
from .test_webhook import PARAMS, post

SIP_CALLER = "sip:+14155550100@trunk.example.pstn.twilio.com"  # 46 characters


@pytest.mark.parametrize(
    "caller",
    [SIP_CALLER, "client:alice", "sip:" + "x" * 200 + "@pbx.example.com", "Anonymous"],
    ids=["sip-trunk", "client", "long-sip", "anonymous"],
)
async def test_any_caller_twilio_sends_gets_a_call(database_url, start_bridge, caller):
    bridge = await start_bridge(database_url=database_url)
    result = await bridge.call(caller_audio(), from_number=caller, to_number="sip:agent@bridge.example.com")
    assert result.stream_started, result.twiml  # not the fallback: the stream was opened
    record = await wait_for_end(bridge, result.call_id)
    assert record.disconnection_reason.value == "user_hangup", record.error_detail
    assert (record.from_number, record.to_number) == (caller, "sip:agent@bridge.example.com")
    found, _ = await bridge.store.list(limit=10)
    assert [r.from_number for r in found] == [caller]


async def test_a_value_longer_than_its_column_is_kept_cut_with_a_note(database_url, start_bridge):
    bridge = await start_bridge(database_url=database_url)
    caller = "sip:" + "y" * 400 + "@pbx.example.com"
    r = await post(bridge.base_url, params={**PARAMS, "From": caller})
    url, params, _ = parse_twiml(r.text)
    assert url is not None, r.text  # a call, not the fallback
    record = await bridge.store.get(params["call_id"])
    assert record.from_number == caller[:MAX_PARTY_CHARS]
    assert record.notes == [f"Twilio's From was {len(caller)} characters: the first {MAX_PARTY_CHARS} are kept"]


async def test_a_nul_from_twilio_is_not_stored(database_url, start_bridge):
    bridge = await start_bridge(database_url=database_url)
    r = await post(bridge.base_url, params={**PARAMS, "From": "+1415\x005550100", "To": "+14155550100\x00"})
    url, params, _ = parse_twiml(r.text)
    assert url is not None, r.text
    record = await bridge.store.get(params["call_id"])
    assert (record.from_number, record.to_number) == ("+1415\ufffd5550100", "+14155550100\ufffd")
    assert record.notes == ["Twilio's From had control characters: replaced", "Twilio's To had control characters: replaced"]


async def test_a_call_sid_that_is_not_one_is_refused_with_the_reason(database_url, start_bridge, caplog):
    bridge = await start_bridge(database_url=database_url)
    r = await post(bridge.base_url, params={**PARAMS, "CallSid": "CA" + "1" * 100})
    assert r.status_code == 200 and parse_twiml(r.text)[0] is None  # the fallback, said by Twilio
    assert "CallSid" in caplog.text and "is not a Twilio call SID" in caplog.text
    assert (await bridge.store.list())[0] == []


async def closed_with(url: str) -> tuple[int | None, str]:
    async with asyncio.timeout(10):
        async with websockets.connect(url) as ws:
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.recv()
    return ws.close_code, ws.close_reason


@pytest.mark.parametrize(
    "path",
    ["/audio-websocket/%00", "/audio-websocket/a%00b", "/audio-websocket/" + "a" * 65, "/web-call/%00?access_token=x",
     "/web-call/token/%00", "/web-call/" + "b" * 65 + "?access_token=x", "/audio-websocket/%E2%80%AE"],
)  # fmt: skip
async def test_an_id_that_is_no_call_id_is_an_unknown_call_on_every_path(database_url, start_bridge, path, caplog):
    bridge = await start_bridge(database_url=database_url)
    code, reason = await closed_with(bridge.base_url.replace("http", "ws") + path)
    assert (code, reason) in ((1008, "unknown call"), (1008, "unknown web call"))
    assert "Traceback" not in caplog.text and "ERROR" not in caplog.text


@pytest.mark.parametrize("path", ["/twilio/status/%00", "/twilio/amd/%00", "/twilio/stream-ended/%00", "/twilio/voice?call_id=%00"])
async def test_twilio_callbacks_naming_no_call_id_are_answered(database_url, start_bridge, path, caplog):
    bridge = await start_bridge(database_url=database_url)
    r = await post(bridge.base_url, path, params={**PARAMS, "CallStatus": "busy", "AnsweredBy": "human"})
    assert r.status_code in (200, 204), r.text
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize(
    "body",
    [{"metadata": {"a": "b\x00c"}}, {"metadata": {"a\x00": 1}}, {"metadata": {"a": [{"b": "\x00"}]}},
     {"retell_llm_dynamic_variables": {"name": "\x00"}}],
)  # fmt: skip
async def test_text_with_a_nul_is_refused_on_both_databases(database_url, start_bridge, body):
    bridge = await start_bridge(database_url=database_url)
    async with api_client(bridge.base_url) as http:
        r = await http.post("/v2/register-phone-call", json={"agent_id": "echo", **body})
        assert r.status_code == 422 and "NUL" in r.json()["message"], r.text
        made = await http.post("/v2/register-phone-call", json={"agent_id": "echo"})
        r = await http.patch(f"/v2/update-call/{made.json()['call_id']}", json={"metadata": {"x": "\x00"}})
        assert r.status_code == 422 and "NUL" in r.json()["message"], r.text
    assert [call.metadata for call in (await bridge.store.list())[0]] == [None]


async def test_the_note_cap_holds_under_concurrent_refusals(database_url, start_bridge):
    """Hundreds of bad tokens at once, from two replicas: exactly MAX_NOTES notes."""
    bridge = await start_bridge(database_url=database_url)
    async with api_client(bridge.base_url) as http:
        call = (await http.post("/v2/create-web-call", json={"agent_id": "echo"})).json()
    base = bridge.base_url.replace("http", "ws")
    refusals = [closed_with(f"{base}/web-call/{call['call_id']}?access_token=1.2.bad") for _ in range(120)]
    notes = [bridge.calls.note(call["call_id"], f"note {i}") for i in range(120)]
    results = await asyncio.gather(*refusals, *notes, return_exceptions=True)
    assert not [r for r in results if isinstance(r, Exception)], [r for r in results if isinstance(r, Exception)][:3]
    record = await bridge.store.get(call["call_id"])
    assert len(record.notes) == MAX_NOTES, len(record.notes)
    # its public log has the same notes, no more
    log = bridge.calls.log_path(call["call_id"])
    if log.exists():
        assert log.read_text().count('"event":"note"') <= MAX_NOTES


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_second_replica_s_notes_share_the_cap(database_url, start_bridge):
    first = await start_bridge(database_url=database_url, instance_id="one")
    second = await start_bridge(database_url=database_url, instance_id="two")
    async with api_client(first.base_url) as http:
        call = (await http.post("/v2/register-phone-call", json={"agent_id": "echo"})).json()
    await asyncio.gather(*(b.calls.note(call["call_id"], f"{i}") for i in range(60) for b in (first, second)))
    record = await until(lambda: first.store.get(call["call_id"]))
    assert len(record.notes) == MAX_NOTES
