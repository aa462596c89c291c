"""The call API against the official retell-sdk client (strict response validation: the SDK's
own models must parse every answer), and bad bodies over plain HTTP."""

import asyncio
import json
from unittest.mock import ANY

import httpx
import pytest
from retell import APIStatusError

from bridge.models import DisconnectionReason

from .conftest import hung_up_cleanly, API_KEY, api_client, ongoing_calls, until


async def count(bridge) -> int:
    return len((await bridge.store.list(limit=1000))[0])


async def test_register_get_update_stop_delete_with_the_sdk(bridge, sdk):
    call = await sdk.call.register_phone_call(
        agent_id="echo", from_number="+14155550100", to_number="+14155550111", direction="inbound",
        metadata={"crm_id": 7}, retell_llm_dynamic_variables={"name": "Ada"},
    )  # fmt: skip
    assert call.call_type == "phone_call" and call.call_status == "registered" and call.agent_id == "echo"
    assert call.metadata == {"crm_id": 7} and call.retell_llm_dynamic_variables == {"name": "Ada"}
    fetched = await sdk.call.retrieve(call.call_id)
    assert fetched.call_id == call.call_id and fetched.from_number == "+14155550100"
    assert fetched.end_timestamp is None and fetched.disconnection_reason is None  # null, never made up
    updated = await sdk.call.update(call.call_id, metadata={"crm_id": 8})
    assert updated.metadata == {"crm_id": 8}
    assert (await bridge.store.get(call.call_id)).metadata == {"crm_id": 8}
    with pytest.raises(APIStatusError) as live:
        await sdk.call.delete(call.call_id)  # a live call must be stopped first
    assert live.value.status_code == 422
    await sdk.call.stop(call.call_id)
    stopped = await sdk.call.retrieve(call.call_id)
    assert stopped.call_status == "ended" and stopped.disconnection_reason == "agent_hangup"
    await sdk.call.delete(call.call_id)
    with pytest.raises(APIStatusError) as gone:
        await sdk.call.retrieve(call.call_id)
    assert gone.value.status_code == 404 and gone.value.body == {"status": "error", "message": f"call {call.call_id} not found"}


async def test_list_with_filters_and_pagination_with_the_sdk(bridge, sdk):
    ids = []
    for i in range(7):
        c = await sdk.call.register_phone_call(
            agent_id="echo", from_number="+14155550100", to_number=f"+1415555012{i}",
            direction="outbound" if i % 2 else "inbound",
        )  # fmt: skip
        ids.append(c.call_id)
    seen, key = [], None
    while True:
        page = await sdk.call.list(limit=3, pagination_key=key) if key else await sdk.call.list(limit=3)
        seen += [item.call_id for item in page.items]
        if not page.has_more:
            break
        key = page.pagination_key
    assert sorted(seen) == sorted(ids) and len(seen) == 7
    assert seen == list(reversed(ids))  # newest first
    ascending = await sdk.call.list(sort_order="ascending", limit=100)
    assert [i.call_id for i in ascending.items] == ids
    outbound = await sdk.call.list(filter_criteria={"direction": {"op": "in", "type": "enum", "value": ["outbound"]}})
    assert sorted(i.call_id for i in outbound.items) == sorted(ids[1::2])
    by_agent = await sdk.call.list(filter_criteria={"agent": [{"agent_id": "nobody"}]})
    assert by_agent.items == [] and by_agent.has_more is False
    registered = await sdk.call.list(filter_criteria={"call_status": {"op": "in", "type": "enum", "value": ["registered"]}})
    assert len(registered.items) == 7
    # the call id and the numbers, with retell-sdk's string filters (the dashboard's search)
    def found(**criteria):
        return sdk.call.list(filter_criteria={name: {"type": "string", "op": op, "value": v} for name, (op, v) in criteria.items()})

    assert [i.call_id for i in (await found(call_id=("eq", ids[3]))).items] == [ids[3]]
    assert [i.call_id for i in (await found(call_id=("sw", ids[3][:8]))).items] == [ids[3]]
    assert [i.call_id for i in (await found(to_number=("ew", "0123"))).items] == [ids[3]]
    assert len((await found(to_number=("co", "55501"))).items) == 7 and (await found(to_number=("co", "5%"))).items == []  # (no wildcard)
    assert len((await found(from_number=("sw", "+1415"), to_number=("ne", "+14155550120"))).items) == 6
    either = await sdk.call.list(filter_criteria={"call_id": {"op": "in", "type": "enum", "value": ids[:2]}})
    assert sorted(i.call_id for i in either.items) == sorted(ids[:2])


async def test_a_call_placed_through_twilio_is_seen_by_the_sdk(bridge, sdk):
    result = await bridge.call()
    call = await sdk.call.retrieve(result.call_id)
    assert call.call_status == "ended" and call.disconnection_reason == "user_hangup"
    assert call.transcript.startswith("User: (") and call.transcript_object[0].role == "user"
    assert call.start_timestamp <= call.end_timestamp


async def test_v1_register_call_and_v2_list(bridge):
    async with api_client(bridge.base_url) as http:
        body = {"agent_id": "echo", "audio_websocket_protocol": "twilio", "audio_encoding": "mulaw", "sample_rate": 8000,
                "end_call_after_silence_ms": 600000, "from_number": "+12137771234", "to_number": "+12137771235",
                "direction": "inbound", "metadata": {}, "retell_llm_dynamic_variables": {"customer_name": "John Doe"},
                "drop_call_if_machine_detected": True, "opt_out_sensitive_data_storage": True}  # fmt: skip
        r = await http.post("/register-call", json=body)
        assert r.status_code == 201
        call = r.json()
        for key, value in body.items():
            assert call[key] == value
        assert call["call_status"] == "registered" and call["recording_url"] is None
        assert (await http.get(f"/get-call/{call['call_id']}")).json() == call
        listed = await http.get("/v2/list-calls", params={"agent_id": "echo", "limit": 10})
        assert [c["call_id"] for c in listed.json()] == [call["call_id"]]


def nested(levels: int) -> dict:
    """``levels`` objects, one inside the other (``nested(1) == {"a": 1}``)."""
    value: object = 1
    for _ in range(levels):
        value = {"a": value}
    return value


GOOD_V1 = {"agent_id": "echo", "audio_websocket_protocol": "web", "audio_encoding": "s16le", "sample_rate": 24000}


@pytest.mark.parametrize(
    "path,body,status,message",
    [
        ("/register-call", {k: v for k, v in GOOD_V1.items() if k != "agent_id"}, 422, "agent_id: Field required"),
        ("/register-call", {**GOOD_V1, "sample_rate": "fast"}, 422, "sample_rate"),
        ("/register-call", {**GOOD_V1, "sample_rate": 7999}, 422, "sample_rate: Input should be greater than or equal to 8000"),
        ("/register-call", {**GOOD_V1, "sample_rate": 48001}, 422, "sample_rate"),
        ("/register-call", {**GOOD_V1, "audio_encoding": "opus"}, 422, "audio_encoding"),
        ("/register-call", {**GOOD_V1, "audio_websocket_protocol": "twilio", "audio_encoding": "mulaw", "sample_rate": 16000}, 422, "sample_rate 8000"),
        ("/register-call", {**GOOD_V1, "end_call_after_silence_ms": 9999}, 422, "end_call_after_silence_ms"),
        ("/register-call", {**GOOD_V1, "from_number": "555-1234"}, 422, "E.164"),
        ("/register-call", {**GOOD_V1, "agent_id": "nobody"}, 404, "agent nobody not found"),
        ("/register-call", {**GOOD_V1, "metadata": {"blob": "x" * 60000}}, 422, "is larger than 50 kB"),
        ("/register-call", {**GOOD_V1, "metadata": nested(33)}, 422, "metadata: Value error, nests objects or arrays deeper than 32"),
        ("/register-call", {**GOOD_V1, "metadata": nested(300)}, 422, "deeper than 32 levels"),  # was a 500
        ("/register-call", {**GOOD_V1, "metadata": {"list": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}, 422, "deeper"),
        ("/register-call", {**GOOD_V1, "retell_llm_dynamic_variables": {"n": 5}}, 422, "retell_llm_dynamic_variables.n"),
        ("/register-call", {**GOOD_V1, "from_number": "+14155550100\n"}, 422, "E.164"),
        ("/v2/register-phone-call", {"agent_id": "echo", "from_number": "not a number"}, 422, "from_number"),
        ("/v3/list-calls", {"filter_criteria": {"start_timestamp": {"op": "bt", "value": ["x", 1]}}}, 422, "start_timestamp"),
        ("/v3/list-calls", {"filter_criteria": {"start_timestamp": {"op": "ge", "value": 10**30}}}, 422, "start_timestamp"),
        ("/v3/list-calls", {"filter_criteria": {"call_status": {"op": "in", "value": [{}]}}}, 422, "call_status"),
        ("/v3/list-calls", {"filter_criteria": {"agent": [{"agent_id": 5}]}}, 422, "agent"),
        ("/v3/list-calls", {"filter_criteria": {"call_id": {"op": "in", "type": "enum", "value": ["a"] * 20000}}}, 422, "call_id"),
        ("/v3/list-calls", {"filter_criteria": {"to_number": {"op": "like", "type": "string", "value": "1"}}}, 422, "to_number"),
        ("/v3/list-calls", {"filter_criteria": {"agent": [{"agent_id": "a\u0000b"}]}}, 422, "agent"),
        ("/v3/list-calls", {"pagination_key": "OTk5OTk5OTk5OTk5OTk5OTk5OTk5OjE"}, 422, "pagination_key"),
        ("/register-call", {**GOOD_V1, "metadata": "not an object"}, 422, "metadata"),
        ("/v2/register-phone-call", {}, 422, "agent_id"),
        ("/v2/register-phone-call", {"agent_id": "echo", "direction": "sideways"}, 422, "direction"),
        ("/v3/list-calls", {"limit": 0}, 422, "limit"),
        ("/v3/list-calls", {"filter_criteria": {"call_status": {"op": "in", "value": ["lost"]}}}, 422, "call_status"),
        ("/v3/list-calls", {"filter_criteria": {"user_sentiment": {}}}, 422, "user_sentiment"),
        ("/v3/list-calls", {"pagination_key": "bogus!"}, 422, "pagination_key"),
    ],
)  # fmt: skip
async def test_bad_bodies_answer_the_documented_error_and_store_nothing(bridge, path, body, status, message):
    async with api_client(bridge.base_url) as http:
        r = await http.post(path, json=body)
    assert r.status_code == status
    assert r.json()["status"] == "error" and message in r.json()["message"]
    assert await count(bridge) == 0


async def test_odd_call_ids_are_404_and_skip_pages(bridge, sdk):
    async with api_client(bridge.base_url) as http:
        for path in ("/v2/get-call/%00", "/v2/get-call/a%20b", "/get-call/" + "x" * 65):
            assert (await http.get(path)).status_code == 404
        r = await http.get("/v2/list-calls", params={"start_after": 2**64})
        assert r.status_code == 422
    ids = [(await sdk.call.register_phone_call(agent_id="echo", from_number="+14155550100", to_number="+14155550111")).call_id
           for _ in range(3)]  # fmt: skip
    page = await sdk.call.list(skip=1, limit=10)
    assert [c.call_id for c in page.items] == list(reversed(ids))[1:]
    nothing = await sdk.call.list(filter_criteria={"call_status": {"op": "in", "type": "enum", "value": ["not_connected"]}})
    assert nothing.items == []
    call = await sdk.call.register_phone_call(agent_id="echo", from_number="+14155550100", to_number="+14155550111")
    assert call.direction == "inbound"  # the SDK needs a direction: inbound unless said


async def test_not_json_is_400_and_unknown_calls_are_404(bridge):
    async with api_client(bridge.base_url) as http:
        r = await http.post("/register-call", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json() == {"status": "error", "message": "the body is not valid JSON"}
        for method, path in (("GET", "/v2/get-call/nope"), ("GET", "/get-call/nope"), ("PATCH", "/v2/update-call/nope"),
                             ("DELETE", "/v2/delete-call/nope"), ("POST", "/v2/stop-call/nope")):  # fmt: skip
            r = await http.request(method, path, json={})
            assert r.status_code == 404 and r.json() == {"status": "error", "message": "call nope not found"}
        r = await http.post(f"/v2/listen-live-call/{'x' * 5000}")  # not a call id: not echoed whole
        assert r.status_code == 404 and r.json()["message"] == f"call {'x' * 64!r}... not found: not a call id"


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic " + API_KEY, "Bearer"])
async def test_every_endpoint_needs_the_api_key(bridge, header):
    headers = {"Authorization": header} if header else {}
    async with httpx.AsyncClient(base_url=bridge.base_url, headers=headers) as http:
        for method, path in (("POST", "/register-call"), ("POST", "/v2/register-phone-call"), ("GET", "/v2/get-call/x"),
                             ("POST", "/v3/list-calls"), ("GET", "/v2/list-calls"), ("PATCH", "/v2/update-call/x"),
                             ("DELETE", "/v2/delete-call/x"), ("POST", "/v2/stop-call/x")):  # fmt: skip
            r = await http.request(method, path, json=GOOD_V1)
            assert r.status_code == 401, path
            assert r.json()["status"] == "error" and "API key" in r.json()["message"]
    assert await count(bridge) == 0


async def test_stop_call_ends_a_live_call_on_both_legs(bridge, sdk):
    call_task = asyncio.create_task(bridge.call(speed=1.0, tail_ms=20000))
    live = await until(lambda: ongoing_calls(bridge))
    await sdk.call.stop(live[0].call_id)
    result = await call_task
    assert hung_up_cleanly(result), result.summary()  # no fallback
    assert bridge.fake.requests == []  # (the stream's end hangs up: no REST request)
    record = await bridge.store.get(live[0].call_id)
    assert record.disconnection_reason is DisconnectionReason.agent_hangup


async def test_openapi_documents_every_endpoint(bridge):
    async with httpx.AsyncClient(base_url=bridge.base_url) as http:
        spec = (await http.get("/openapi.json")).json()
        assert (await http.get("/docs")).status_code == 200
    for path in ("/register-call", "/v2/register-phone-call", "/v2/create-phone-call", "/v2/create-web-call",
                 "/v3/create-web-call", "/v2/get-call/{call_id}", "/get-call/{call_id}", "/v3/list-calls",
                 "/v2/list-calls", "/v2/update-call/{call_id}", "/v2/delete-call/{call_id}", "/v2/stop-call/{call_id}",
                 "/twilio/voice"):  # fmt: skip
        assert path in spec["paths"], path
        for method, operation in spec["paths"][path].items():
            if path != "/twilio/voice":
                ok = next(code for code in operation["responses"] if code.startswith("2"))
                assert ok == "204" or "content" in operation["responses"][ok], (path, method)
                assert "401" in operation["responses"], (path, method)
    assert spec["components"]["securitySchemes"]["apiKey"] == {"type": "http", "scheme": "bearer", "description": ANY}
    for path, operations in spec["paths"].items():  # every route the key guards says so (Authorize in /docs)
        for method, operation in operations.items():
            guarded = not path.startswith("/twilio/") and path not in ("/healthz", "/livez", "/readyz")
            assert (operation.get("security") == [{"apiKey": []}]) == guarded, (method, path)
    callbacks = [(path, ops["post"]) for path, ops in spec["paths"].items() if path.startswith("/twilio/")]
    assert {"/twilio/voice", "/twilio/voice/{agent_id}", "/twilio/stream-ended/{call_id}", "/twilio/status/{call_id}", "/twilio/amd/{call_id}"} <= {
        path for path, _ in callbacks
    }
    for path, operation in callbacks:  # a signed form in, TwiML (or nothing) out
        form = operation["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]
        assert {"CallSid", "AccountSid", "From", "To", "CallStatus"} <= set(form["properties"]), path
        assert any(p["name"] == "X-Twilio-Signature" and p["in"] == "header" for p in operation["parameters"]), path
        answers = operation["responses"]
        assert "403" in answers and ("204" in answers or set(answers["200"]["content"]) == {"application/xml"}), (path, answers)
    voice = spec["paths"]["/twilio/voice"]["post"]
    assert [p["name"] for p in voice["parameters"]] == ["X-Twilio-Signature"]  # (no agent_id: that is /twilio/voice/{agent_id})
    assert "<Connect" in voice["responses"]["200"]["content"]["application/xml"]["example"]
    assert not any(path in spec["paths"] for path in ("/create-agent", "/rerun-call-analysis/{call_id}"))  # (the 501s: not documented as served)
    schemas = spec["components"]["schemas"]
    assert {"RegisterCallV1", "CallObject", "CallList", "ErrorBody", "CreatePhoneCall", "WebCallV3"} <= set(schemas)
    assert "disconnection_reason" in schemas["CallObject"]["properties"]


async def test_metadata_nested_32_levels_deep_is_kept(bridge, sdk):
    call = await sdk.call.update(
        (await sdk.call.register_phone_call(agent_id="echo", from_number="+14155550100", to_number="+14155550111")).call_id,
        metadata=nested(32),
    )
    assert call.metadata == nested(32)
    async with api_client(bridge.base_url) as http:
        r = await http.patch(f"/v2/update-call/{call.call_id}", json={"metadata": nested(300)})
    assert r.status_code == 422 and "deeper than 32 levels" in r.json()["message"]


async def raw_request(bridge, head: str, body_chunks=()) -> tuple[int, dict]:
    """Send a request head (and maybe chunks of a body) on a bare socket; the status and JSON
    body of the answer. Nothing waits for a body the head promised but never sent."""
    reader, writer = await asyncio.open_connection(bridge.server.host, bridge.server.port)
    writer.write(head.replace("\n", "\r\n").encode() + b"\r\n")
    for chunk in body_chunks:
        writer.write(chunk)
        await writer.drain()
    async with asyncio.timeout(10):
        head_in = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
        length = int(head_in.split("content-length:", 1)[1].split("\r\n", 1)[0])
        answer = await reader.readexactly(length)
    writer.close()
    return int(head_in.split()[1]), json.loads(answer)


@pytest.mark.parametrize(
    "head,status,message",
    [
        ("POST /v2/register-phone-call HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Length: 200000000\n",
         401, "missing API key"),
        ("POST /v2/register-phone-call HTTP/1.1\nHost: x\nAuthorization: Bearer wrong\nContent-Length: 200000000\n",
         401, "invalid API key"),
        (f"POST /v2/register-phone-call HTTP/1.1\nHost: x\nAuthorization: Bearer {API_KEY}\nContent-Type: application/json\n"
         "Content-Length: 200000000\n", 413, "the body is over 1048576 bytes"),
        ("POST /twilio/voice HTTP/1.1\nHost: x\nX-Twilio-Signature: x\nContent-Type: application/x-www-form-urlencoded\n"
         "Content-Length: 1000000\n", 413, "the body is over 65536 bytes"),
    ],
)  # fmt: skip
async def test_a_huge_body_is_refused_from_its_head_before_a_byte_of_it_is_read(bridge, head, status, message):
    """The API key and the declared size are checked before any body is read: the answer comes
    though the 200 MB never do."""
    got, body = await raw_request(bridge, head)
    assert got == status and message in body["message"]
    assert await count(bridge) == 0


async def test_a_body_sent_in_chunks_is_cut_off_at_the_cap(bridge):
    head = (
        f"POST /v2/register-phone-call HTTP/1.1\nHost: x\nAuthorization: Bearer {API_KEY}\n"
        "Content-Type: application/json\nTransfer-Encoding: chunked\n"
    )
    chunk = b"100000\r\n" + b" " * 0x100000 + b"\r\n"  # 1 MiB of JSON whitespace a chunk
    got, body = await raw_request(bridge, head, [chunk] * 3)
    assert got == 413 and body["status"] == "error"
    assert await count(bridge) == 0


async def test_a_page_of_large_calls_is_bounded_and_pages_on_with_the_sdk(bridge, sdk):
    """limit=1000 over calls with 45 kB of metadata each: the answer stops at about 2 MB with
    has_more and a pagination key, and the SDK's paging still reaches every call once."""
    blob = {"notes": "x" * 45_000}
    for _ in range(60):
        await sdk.call.register_phone_call(agent_id="echo", from_number="+14155550100", to_number="+14155550111", metadata=blob)
    first = await sdk.call.list(limit=1000)
    assert 1 <= len(first.items) < 60 and first.has_more and first.pagination_key
    seen, key = [i.call_id for i in first.items], first.pagination_key
    while key:
        page = await sdk.call.list(limit=1000, pagination_key=key)
        seen += [i.call_id for i in page.items]
        key = page.pagination_key if page.has_more else None
    assert len(seen) == len(set(seen)) == 60
