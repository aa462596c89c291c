"""The ends of a call's life outside its stream: retention of recordings, logs and settled
webhook jobs; the sweep of a dialed call that never connected; Twilio's status and AMD
callbacks (signed with the twilio package's RequestValidator) for calls before and during
their stream."""

import os
import time

import httpx
import pytest
from twilio.request_validator import RequestValidator

from bridge.calls import service
from bridge.models import CallRecord, now_ms
from bridge.settings import AgentConfig
from bridge.store import SqlCallStore

from .conftest import hung_up_cleanly, AUTH_TOKEN, api_client, call_status, caller_audio, until, wait_for_end

OWNED = "+14155550100"
CALLEE = "+14155550199"
AGENTS = {"echo": AgentConfig(agent_id="echo", numbers=[OWNED], default=True)}
DIAL_SETTINGS = dict(agents=AGENTS, twilio_calls_per_second=50)
DAY_S = 86_400
DAY_MS = DAY_S * 1000
HOOK = "http://hooks.example/h"
TALKATIVE = caller_audio() + bytes(16_000 * 16)  # the phrase, then 16 s of silence: ~5 s at speed 4


def never_answered(fake) -> None:
    """Twilio accepts every dial and the callee's phone just rings: no voice request, no stream,
    no status callback."""
    fake.dial_outcome = lambda params: "ringing"


async def dial(bridge, **body) -> CallRecord:
    async with api_client(bridge.base_url) as http:
        r = await http.post("/v2/create-phone-call", json={"from_number": OWNED, "to_number": CALLEE, **body})
    assert r.status_code == 201, r.text
    return await bridge.store.get(r.json()["call_id"])


async def twilio_callback(bridge, path: str, record: CallRecord, **fields) -> int:
    """POST a callback for ``record`` the way Twilio does: form-encoded, X-Twilio-Signature."""
    url = bridge.base_url + path
    form = {
        "CallSid": record.twilio_call_sid, "AccountSid": record.twilio_account_sid, "From": OWNED, "To": CALLEE,
        "Direction": "outbound-api", "ApiVersion": "2010-04-01", **fields,
    }  # fmt: skip
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, form)
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(url, data=form, headers={"X-Twilio-Signature": signature})
    return r.status_code


def web_call(call_id: str) -> CallRecord:
    return CallRecord(call_id=call_id, agent_id="echo", audio_websocket_protocol="web", audio_encoding="s16le", sample_rate=24000)


def hangups(fake) -> list[tuple[str, str | None]]:
    return [(call_sid, form.get("Status")) for call_sid, form in fake.requests]


def aged_files(data_dir, now: float, ages_days: dict[str, float]) -> None:
    for folder, ext in (("recordings", "wav"), ("logs", "jsonl")):
        (data_dir / folder).mkdir(parents=True, exist_ok=True)
        for name, age in ages_days.items():
            path = data_dir / folder / f"{name}.{ext}"
            path.write_bytes(b"kept until it is old")
            os.utime(path, (now - age * DAY_S, now - age * DAY_S))


def kept(data_dir) -> dict[str, list[str]]:
    return {folder: sorted(p.name for p in (data_dir / folder).iterdir()) for folder in ("recordings", "logs")}


# --- retention -------------------------------------------------------------------------------


async def test_retention_deletes_recordings_and_logs_older_than_the_setting_and_keeps_newer_ones(start_bridge):
    bridge = await start_bridge(recording_retention_days=2)
    now = time.time()
    aged_files(bridge.settings.data_dir, now, {"call_old": 2.1, "call_ancient": 400, "call_new": 1.9, "call_today": 0})
    await bridge.calls.retention_pass(now=now)
    assert kept(bridge.settings.data_dir) == {
        "recordings": ["call_new.wav", "call_today.wav"],
        "logs": ["call_new.jsonl", "call_today.jsonl"],
    }


async def test_without_a_retention_setting_every_recording_and_log_is_kept(start_bridge):
    bridge = await start_bridge()
    assert bridge.settings.recording_retention_days is None
    now = time.time()
    aged_files(bridge.settings.data_dir, now, {"call_ancient": 4000, "call_today": 0})
    await bridge.calls.retention_pass(now=now)
    assert kept(bridge.settings.data_dir) == {
        "recordings": ["call_ancient.wav", "call_today.wav"],
        "logs": ["call_ancient.jsonl", "call_today.jsonl"],
    }


async def test_retention_purges_webhook_jobs_settled_over_7_days_ago_and_keeps_pending_ones(start_bridge, database_url):
    earlier = await SqlCallStore.open(database_url, "earlier-instance")  # what another replica left
    for call_id in ("delivered", "given_up", "retrying", "in_flight"):
        await earlier.enqueue(web_call(call_id), [("call_ended", HOOK)])
    jobs = {job["call_id"]: job["id"] for job in await earlier.claim_due(lease_ms=30 * DAY_MS)}
    assert set(jobs) == {"delivered", "given_up", "retrying", "in_flight"}
    await earlier.job_done(jobs["delivered"])
    await earlier.job_failed(jobs["given_up"], 4, None, "RuntimeError: gave up")
    await earlier.job_failed(jobs["retrying"], 1, now_ms() + DAY_MS, "RuntimeError: will retry")
    await earlier.close()

    bridge = await start_bridge(database_url=database_url)
    created = [job["created_at"] for job in await bridge.store.jobs()]
    await bridge.calls.retention_pass(now=(min(created) + 7 * DAY_MS - 60_000) / 1000)
    assert sorted(job["call_id"] for job in await bridge.store.jobs()) == ["delivered", "given_up", "in_flight", "retrying"]
    await bridge.calls.retention_pass(now=(max(created) + 7 * DAY_MS + 60_000) / 1000)
    assert sorted(job["call_id"] for job in await bridge.store.jobs()) == ["in_flight", "retrying"]


# --- the sweep of dialed calls ---------------------------------------------------------------


async def test_a_dialed_call_swept_as_never_connected_is_hung_up_through_twilio(start_bridge, monkeypatch):
    monkeypatch.setattr(service, "OUTBOUND_RING_S", 0)
    bridge = await start_bridge(registered_call_timeout_s=2, **DIAL_SETTINGS)
    never_answered(bridge.fake)
    call = await dial(bridge)
    (call_sid,) = bridge.fake.outbound
    assert call.twilio_call_sid == call_sid
    record = await wait_for_end(bridge, call.call_id, timeout=20)
    assert record.disconnection_reason == "registered_call_timeout" and record.start_timestamp is None
    assert await until(lambda: hangups(bridge.fake), timeout=20) == [(call_sid, "completed")]


# --- Twilio's status callback ------------------------------------------------------------------


async def test_completed_before_any_stream_ends_a_dialed_call_as_user_hangup(start_bridge):
    bridge = await start_bridge(**DIAL_SETTINGS)
    never_answered(bridge.fake)
    call = await dial(bridge)
    assert await twilio_callback(bridge, f"/twilio/status/{call.call_id}", call, CallStatus="completed") == 204
    record = await bridge.store.get(call.call_id)
    assert (record.call_status, record.disconnection_reason) == ("ended", "user_hangup")
    assert record.error_detail == "completed before the stream" and record.start_timestamp is None


async def test_completed_for_a_call_already_streaming_changes_nothing(start_bridge):
    bridge = await start_bridge(callee_pcm=TALKATIVE, **DIAL_SETTINGS)
    call = await dial(bridge)
    before = await until(lambda: call_status(bridge, call.call_id, "ongoing"), timeout=20)
    assert await twilio_callback(bridge, f"/twilio/status/{call.call_id}", call, CallStatus="completed") == 204
    after = await bridge.store.get(call.call_id)
    assert (after.call_status, after.disconnection_reason, after.end_timestamp) == ("ongoing", None, None)
    assert after.error_detail is None and after.start_timestamp == before.start_timestamp
    callee = await bridge.fake.outbound[call.twilio_call_sid]
    assert callee.ended_by == "caller"  # the stream went on until the callee hung up
    record = await wait_for_end(bridge, call.call_id, timeout=20)
    assert record.disconnection_reason == "user_hangup" and record.error_detail == "Twilio sent stop"


async def test_a_canceled_dial_ends_as_dial_failed(start_bridge):
    bridge = await start_bridge(**DIAL_SETTINGS)
    never_answered(bridge.fake)
    call = await dial(bridge)
    assert await twilio_callback(bridge, f"/twilio/status/{call.call_id}", call, CallStatus="canceled") == 204
    record = await bridge.store.get(call.call_id)
    assert record.disconnection_reason == "dial_failed" and record.error_detail == "Twilio CallStatus canceled"


# --- answering-machine detection -------------------------------------------------------------


async def test_amd_human_changes_nothing_and_machine_start_drops_the_live_call_as_machine_detected(start_bridge):
    bridge = await start_bridge(callee_pcm=TALKATIVE, **DIAL_SETTINGS)  # the fake sends no AMD for a human
    call = await dial(bridge, drop_call_if_machine_detected=True)
    await until(lambda: call_status(bridge, call.call_id, "ongoing"), timeout=20)
    amd = f"/twilio/amd/{call.call_id}"
    assert await twilio_callback(bridge, amd, call, AnsweredBy="human", MachineDetectionDuration="1830") == 204
    assert (await bridge.store.get(call.call_id)).call_status == "ongoing"
    assert bridge.fake.requests == []
    machine = await twilio_callback(bridge, amd, call, AnsweredBy="machine_start", MachineDetectionDuration="2210")
    assert machine == 204
    callee = await bridge.fake.outbound[call.twilio_call_sid]
    assert hung_up_cleanly(callee) and bridge.fake.requests == []  # no fallback, no REST request
    record = await wait_for_end(bridge, call.call_id, timeout=20)
    assert (record.call_status, record.disconnection_reason) == ("ended", "machine_detected")
    assert record.error_detail == "AnsweredBy machine_start"


@pytest.mark.parametrize(
    "answered_by,reason",
    [
        ("machine_start", "machine_detected"),
        ("fax", "machine_detected"),
        ("machine_end_beep", "voicemail_reached"),
        ("machine_end_silence", "voicemail_reached"),
        ("machine_end_other", "voicemail_reached"),
    ],
)
async def test_amd_for_a_call_not_relayed_here_hangs_it_up_through_twilio_and_ends_it(
    start_bridge, answered_by, reason
):
    bridge = await start_bridge(**DIAL_SETTINGS)
    never_answered(bridge.fake)
    call = await dial(bridge, drop_call_if_machine_detected=True)
    assert await twilio_callback(bridge, f"/twilio/amd/{call.call_id}", call, AnsweredBy=answered_by) == 204
    assert hangups(bridge.fake) == [(call.twilio_call_sid, "completed")]
    record = await bridge.store.get(call.call_id)
    assert (record.call_status, record.disconnection_reason) == ("ended", reason)
    assert record.error_detail == f"AnsweredBy {answered_by}"


async def test_amd_for_a_call_that_did_not_ask_to_drop_machines_changes_nothing(start_bridge):
    bridge = await start_bridge(**DIAL_SETTINGS)
    never_answered(bridge.fake)
    call = await dial(bridge)
    assert await twilio_callback(bridge, f"/twilio/amd/{call.call_id}", call, AnsweredBy="machine_start") == 204
    assert (await bridge.store.get(call.call_id)).call_status == "registered"
    assert bridge.fake.requests == []


# --- reaping a gone replica's calls ------------------------------------------------------------


async def test_a_gone_replica_s_calls_are_ended_once_and_hung_up_through_twilio_together(start_bridge, monkeypatch):
    """Another process on the same database stopped with 30 phone calls live: this one ends
    each once and tells Twilio to hang them all up, several at a time (their callers hear
    silence until then; was: one after the other, 30 round trips for the last one)."""
    import asyncio

    bridge = await start_bridge()
    gone = await SqlCallStore.open(bridge.settings.database_url, "replica-gone", bridge.settings.data_dir)
    assert await gone.claim(lease_ms=60_000) is None
    sids = [f"CA{i:032d}" for i in range(30)]
    for i, sid in enumerate(sids):
        record = CallRecord(
            call_id=f"orphan{i}", agent_id="echo", audio_websocket_protocol="twilio", audio_encoding="mulaw", sample_rate=8000,
            twilio_call_sid=sid, twilio_account_sid="AC" + "0" * 32,
        )  # fmt: skip
        await gone.create(record)
        assert await gone.start(record.call_id) is not None
    await gone.release()  # stopped with its calls live
    await gone.close()

    in_flight, most = 0, 0
    hang_up = bridge.calls.twilio_rest.hangup

    async def slow_twilio(*args, **kwargs):  # Twilio takes 0.2 s to answer each
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.2)
            return await hang_up(*args, **kwargs)
        finally:
            in_flight -= 1

    monkeypatch.setattr(bridge.calls.twilio_rest, "hangup", slow_twilio)
    bridge.calls._healthy_since = time.monotonic() - 3600  # (this replica's own lease has held: it may reap)
    await bridge.calls.reap_orphans()  # (the background sweep may take some of them meanwhile)
    for i in range(30):
        record = await bridge.store.get(f"orphan{i}")
        assert record.disconnection_reason == "error_unknown" and record.error_detail.endswith(": replica-gone"), record
    await until(lambda: len(hangups(bridge.fake)) >= len(sids), timeout=15)  # (the sweep's share too)
    assert sorted(hangups(bridge.fake)) == [(sid, "completed") for sid in sids]  # each once
    # each ended once, by whichever sweep got there first (only that one hangs up): no later
    # hang-up can come for a call already ended
    assert bridge.calls.metrics.calls_ended.labels("error_unknown")._value.get() == len(sids)
    assert most >= service.REAP_HANG_UPS_AT_ONCE, most
    assert await bridge.calls.reap_orphans() == 0


async def test_a_replica_that_died_without_releasing_its_id_is_reaped_once_its_lease_expires(start_bridge):
    """A crash (kill -9, a lost machine): its claim stays, its heartbeat stops. Once the
    heartbeat is older than the lease (three heartbeats) its live calls are ended here, not
    before."""
    from sqlalchemy import update

    from bridge.store.schema import instances

    bridge = await start_bridge(heartbeat_interval_s=0.5)
    dead = await SqlCallStore.open(bridge.settings.database_url, "replica-dead", bridge.settings.data_dir)
    try:
        assert await dead.claim(lease_ms=1500) is None
        record = CallRecord(
            call_id="cut-off", agent_id="echo", audio_websocket_protocol="twilio", audio_encoding="mulaw", sample_rate=8000,
            twilio_call_sid="CA" + "e" * 32, twilio_account_sid="AC" + "0" * 32,
        )  # fmt: skip
        await dead.create(record)
        assert await dead.start("cut-off") is not None
        bridge.calls._healthy_since = time.monotonic() - 3600  # (this replica's own lease has held)
        assert await bridge.calls.reap_orphans() == 0  # its heartbeat is fresh: alive, not reaped
        async with dead.engine.begin() as conn:  # it died 10 s ago: no heartbeat since
            await conn.execute(update(instances).where(instances.c.instance_id == "replica-dead").values(heartbeat_at=now_ms() - 10_000))
        ended = await until(lambda: call_status(bridge, "cut-off", "error"), timeout=10)  # (the sweep, or this)
        assert ended.disconnection_reason == "error_unknown" and ended.error_detail.endswith(": replica-dead"), ended
        assert await until(lambda: hangups(bridge.fake), timeout=10) == [("CA" + "e" * 32, "completed")]
    finally:
        await dead.close()


async def test_calls_registered_by_a_replica_that_is_gone_end_by_their_timeout(start_bridge, database_url):
    """Three calls registered on a replica that was then replaced under a new instance id (a
    rolling update names pods anew): this replica ends them by registered_call_timeout, each
    once, as it does its own (was: registered for ever, and in the live view)."""
    bridge = await start_bridge(database_url=database_url, registered_call_timeout_s=1.0)
    gone = await SqlCallStore.open(bridge.settings.database_url, "replaced-pod", bridge.settings.data_dir)
    try:
        for i in range(3):
            await gone.create(CallRecord(
                call_id=f"left{i}", agent_id="echo", audio_websocket_protocol="twilio", audio_encoding="mulaw", sample_rate=8000,
            ))  # fmt: skip
    finally:
        await gone.close()
    for i in range(3):
        record = await until(lambda i=i: call_status(bridge, f"left{i}", "error"), timeout=10)
        assert record.disconnection_reason == "registered_call_timeout" and record.error_detail == "no media stream within 1 s"
    assert bridge.calls.metrics.calls_ended.labels("registered_call_timeout")._value.get() == 3


async def test_stop_call_on_a_call_whose_replica_does_not_answer_ends_it_here(start_bridge):
    """The replica relaying a web call holds its lease but does not answer the stop (its
    control channel is cut): after two waits stop-call ends the record here with the API's
    reason (was: 204 while the call stayed ongoing until the lease ran out, or for ever)."""
    bridge = await start_bridge()
    silent = await SqlCallStore.open(bridge.settings.database_url, "replica-silent", bridge.settings.data_dir)
    try:
        assert await silent.claim(lease_ms=60_000) is None  # alive: its lease holds
        await silent.create(web_call("held-elsewhere"))
        assert await silent.start("held-elsewhere") is not None
        async with api_client(bridge.base_url) as http:
            r = await http.post("/v2/stop-call/held-elsewhere")
        assert r.status_code == 204
        record = await bridge.store.get("held-elsewhere")
        assert record.call_status.value == "ended" and record.disconnection_reason == "agent_hangup", record
        assert "the replica relaying it did not end it within 2 s" in record.error_detail, record.error_detail
        assert await silent.not_mine(["held-elsewhere"]) == ["held-elsewhere"]  # its relay lets go at its next sweep
    finally:
        await silent.release()
        await silent.close()
