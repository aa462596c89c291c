"""The call store on SQLite and on a real PostgreSQL: same tests, same code."""

import asyncio

import pytest
from sqlalchemy.exc import IntegrityError

from bridge.models import CallRecord, CallStatus, DisconnectionReason
from bridge.store import SqlCallStore


def record(call_id: str, **fields) -> CallRecord:
    base = dict(agent_id="a1", audio_websocket_protocol="web", audio_encoding="s16le", sample_rate=24000)
    return CallRecord(call_id=call_id, **{**base, **fields})


@pytest.fixture
async def store(database_url):
    s = await SqlCallStore.open(database_url, "instance-a")
    yield s
    await s.close()


async def test_records_round_trip_with_every_field(store):
    r = record("c1", from_number="+14155550100", to_number="+14155550111", direction="inbound",
               metadata={"customer": 42, "tags": ["vip"]}, retell_llm_dynamic_variables={"name": "Ada"},
               twilio_call_sid="CA1", notes=["n"])  # fmt: skip
    await store.create(r)
    assert await store.get("c1") == r
    assert await store.get("nope") is None
    with pytest.raises(IntegrityError):
        await store.create(r)  # the call id is unique


async def test_a_call_starts_once_and_ends_once(store):
    await store.create(record("c1"))
    started = await asyncio.gather(*(store.start("c1", twilio_call_sid=f"CA{i}") for i in range(8)))
    assert sum(r is not None for r in started) == 1
    winner = next(r for r in started if r is not None)
    assert (await store.get("c1")).twilio_call_sid == winner.twilio_call_sid
    ended = await asyncio.gather(*(store.finish("c1", reason) for reason in (DisconnectionReason.user_hangup, DisconnectionReason.agent_hangup) * 4))
    assert sum(r is not None for r in ended) == 1
    final = await store.get("c1")
    assert final.call_status is CallStatus.ended and final.end_timestamp >= final.start_timestamp
    assert await store.start("c1") is None  # ended calls never restart


async def test_concurrent_updates_are_never_lost(store):
    await store.create(record("c1", notes=[]))

    async def add(i):
        for _ in range(50):
            if await store._change("c1", lambda r, i=i: r.model_copy(update={"notes": [*r.notes, str(i)]})):
                return
            await asyncio.sleep(0)

    await asyncio.gather(*(add(i) for i in range(10)))
    assert sorted((await store.get("c1")).notes, key=int) == [str(i) for i in range(10)]


async def test_errors_end_with_status_error(store):
    await store.create(record("c1"))
    r = await store.finish("c1", DisconnectionReason.error_llm_websocket_open, error_detail="refused")
    assert r.call_status is CallStatus.error and r.error_detail == "refused"
    assert (await store.get("c1")).disconnection_reason is DisconnectionReason.error_llm_websocket_open


async def test_restart_recovers_only_this_instance_s_live_calls(database_url):
    a = await SqlCallStore.open(database_url, "instance-a")
    b = await SqlCallStore.open(database_url, "instance-b")
    for store, prefix in ((a, "a"), (b, "b")):
        await store.create(record(f"{prefix}-registered"))
        await store.create(record(f"{prefix}-ongoing"))
        await store.start(f"{prefix}-ongoing")
        await store.create(record(f"{prefix}-ended"))
        await store.finish(f"{prefix}-ended", DisconnectionReason.user_hangup)
    await a.close()
    # instance a comes back (same id) and ends the calls it was relaying; a call only registered
    # may still connect, and b's calls are not its to end
    a2 = await SqlCallStore.open(database_url, "instance-a")
    ended = await a2.recover(DisconnectionReason.error_unknown, "restarted")
    assert [r.call_id for r in ended] == ["a-ongoing"]
    r = await a2.get("a-ongoing")
    assert r.call_status is CallStatus.error and r.error_detail == "restarted"
    assert (await a2.get("a-registered")).call_status is CallStatus.registered
    assert (await a2.get("a-ended")).disconnection_reason is DisconnectionReason.user_hangup
    assert (await a2.get("b-ongoing")).call_status is CallStatus.ongoing
    assert (await a2.get("b-registered")).call_status is CallStatus.registered
    await a2.close()
    await b.close()


async def test_the_instance_relaying_a_call_owns_it(database_url):
    a = await SqlCallStore.open(database_url, "instance-a")
    b = await SqlCallStore.open(database_url, "instance-b")
    await a.create(record("c1"))  # webhook answered by a
    await b.start("c1")  # the stream landed on b
    assert await a.recover(DisconnectionReason.error_unknown, "x") == []
    assert [r.call_id for r in await b.recover(DisconnectionReason.error_unknown, "x")] == ["c1"]
    await a.close()
    await b.close()


async def test_listing_filters_sorts_and_pages(store):
    for i in range(25):
        r = record(f"c{i:02d}", agent_id="a1" if i % 2 else "a2", direction="inbound" if i % 3 else "outbound",
                   registered_at=1_000_000 + i)  # fmt: skip
        await store.create(r)
        if i % 5 == 0:
            await store.update(f"c{i:02d}", start_timestamp=2_000_000 + i, call_status=CallStatus.ongoing)
    seen, cursor = [], None
    while True:
        page, cursor = await store.list(limit=7, cursor=cursor)
        seen += [r.call_id for r in page]
        if cursor is None:
            break
    assert len(seen) == 25 == len(set(seen))
    assert seen[:5] == ["c20", "c15", "c10", "c05", "c00"]  # started calls sort by start time, newest first
    ascending, _ = await store.list(descending=False, limit=100)
    assert [r.call_id for r in ascending] == list(reversed(seen))
    a1, _ = await store.list(agent_ids=["a1"], limit=100)
    assert {r.agent_id for r in a1} == {"a1"} and len(a1) == 12
    out, _ = await store.list(directions=["outbound"], statuses=["registered"], limit=100)
    assert sorted(r.call_id for r in out) == ["c03", "c06", "c09", "c12", "c18", "c21", "c24"]
    window, _ = await store.list(start_after=2_000_005, start_before=2_000_015, limit=100)
    assert [r.call_id for r in window] == ["c15", "c10", "c05"]
    with pytest.raises(ValueError, match="pagination_key"):
        await store.list(cursor="!!not-a-cursor!!")


async def test_delete(store):
    await store.create(record("c1"))
    assert await store.delete("c1") is True
    assert await store.get("c1") is None and await store.delete("c1") is False


async def test_registered_before_sees_every_instance_s_registrations(database_url):
    a = await SqlCallStore.open(database_url, "instance-a")
    b = await SqlCallStore.open(database_url, "instance-b")
    await a.create(record("old", registered_at=1000))
    await b.create(record("other", registered_at=900))
    await a.create(record("new", registered_at=10**13))
    assert [r.call_id for r in await a.registered_before(5000)] == ["other", "old"]  # oldest first
    assert [r.call_id for r in await a.registered_before(5000, limit=1)] == ["other"]
    await a.close()
    await b.close()


async def test_migrations_are_idempotent(database_url):
    first = await SqlCallStore.open(database_url, "x")
    await first.create(record("kept"))
    await first.close()
    second = await SqlCallStore.open(database_url, "x")
    assert (await second.get("kept")).call_id == "kept"
    await second.close()


async def test_outbox_jobs_are_leased_ordered_per_call_and_released_after_a_restart(database_url):
    store = await SqlCallStore.open(database_url, "instance-a")
    store.webhook_targets = lambda event, r: [(event, "http://hooks.example/h")]
    await store.create(record("c1"))
    await store.start("c1")
    await store.finish("c1", DisconnectionReason.user_hangup)
    jobs = await store.jobs("c1")
    assert [j["event"] for j in jobs] == ["call_started", "call_ended"]
    assert jobs[0]["payload"]["call"]["call_status"] == "ongoing"  # the call as it was then
    first = await store.claim_due(lease_ms=60_000)
    assert [j["event"] for j in first] == ["call_started"]  # call_ended waits its turn
    assert await store.claim_due(lease_ms=60_000) == []  # leased
    other = await SqlCallStore.open(database_url, "instance-b")
    assert await other.claim_due(lease_ms=60_000) == []  # not another instance's to take
    await store.release_leases()  # this instance restarted
    again = await store.claim_due(lease_ms=60_000)
    assert [j["event"] for j in again] == ["call_started"]
    await store.job_done(again[0]["id"])
    assert [j["event"] for j in await other.claim_due(lease_ms=60_000)] == ["call_ended"]
    await store.close()
    await other.close()


async def test_a_late_answer_never_overwrites_a_job_another_instance_took_over(database_url):
    a = await SqlCallStore.open(database_url, "instance-a")
    b = await SqlCallStore.open(database_url, "instance-b")
    a.webhook_targets = lambda event, r: [(event, "http://hooks.example/h")]
    await a.create(record("c1"))
    await a.start("c1")
    (job,) = await a.claim_due(lease_ms=1)  # a's lease runs out at once...
    await asyncio.sleep(0.01)
    (again,) = await b.claim_due(lease_ms=60_000)  # ...and b takes the job over
    await b.job_done(again["id"])
    await a.job_failed(job["id"], 1, retry_at=0, error="late")  # a's late answer: ignored
    (settled,) = await a.jobs("c1")
    assert settled["delivered_at"] is not None and settled["next_attempt_at"] is None
    assert await a.claim_due(lease_ms=60_000) == []
    await a.close()
    await b.close()


async def test_notes_are_never_lost(store):
    await store.create(record("c1"))
    added = await asyncio.gather(*(store.add_note("c1", f"n{i}", cap=8) for i in range(10)))
    assert sum(r is not None for r in added) == 8  # the cap, checked in the same write
    notes = (await store.get("c1")).notes
    assert len(notes) == 8 and set(notes) <= {f"n{i}" for i in range(10)}


async def test_recovery_leaves_a_call_another_instance_took_over(database_url):
    a = await SqlCallStore.open(database_url, "instance-a")
    b = await SqlCallStore.open(database_url, "instance-b")
    await a.create(record("c1"))
    assert await a.finish("c1", DisconnectionReason.error_unknown, owner="instance-b") is None
    await b.start("c1")  # b owns it now
    assert await a.recover(DisconnectionReason.error_unknown, "x") == []
    assert (await b.get("c1")).call_status is CallStatus.ongoing
    await a.close()
    await b.close()


async def test_a_row_this_process_wrote_last_is_never_trusted_over_the_database(database_url):
    """A store skips the read before changing a call it wrote last; another process's change in
    between must win: no refusal on the stale row (owner, status), no update lost."""
    a = await SqlCallStore.open(database_url, "instance-a")
    b = await SqlCallStore.open(database_url, "instance-b")
    await a.create(record("c1", notes=[]))  # a wrote it last: registered, owned by a
    await b.start("c1")  # b took it over (ongoing, b's)
    # a reaps b's call: its own memory says "registered, a's", the database says "ongoing, b's"
    ended = await a.finish("c1", DisconnectionReason.error_unknown, owner="instance-b", error_detail="reaped")
    assert ended is not None and ended.call_status is CallStatus.error
    await a.create(record("c2", notes=[]))
    await b.add_note("c2", "from b", cap=10)
    await a.add_note("c2", "from a", cap=10)  # a's remembered row is one version old
    assert sorted((await b.get("c2")).notes) == ["from a", "from b"]
    await a.create(record("c3"))
    await b.finish("c3", DisconnectionReason.user_hangup)
    assert await a.start("c3") is None  # ended elsewhere: never started from a's memory
    assert (await a.get("c3")).call_status is CallStatus.ended
    await a.close()
    await b.close()


async def test_replicas_starting_together_migrate_one_at_a_time(database_url):
    stores = await asyncio.gather(*(SqlCallStore.open(database_url, f"instance-{i}") for i in range(6)))
    await stores[0].create(record("c1"))
    assert (await stores[5].get("c1")).call_id == "c1"
    for s in stores:
        await s.close()


async def test_a_page_of_large_records_stops_at_its_byte_budget_and_pages_on(store):
    """30 calls with 40 kB of metadata each, listed with a 200 kB budget: pages of at most 5
    calls (and never an empty one, even when one record alone is over the budget), whose
    cursors still walk every call once, in order."""
    blob = {"notes": "x" * 40_000}
    for i in range(30):
        await store.create(record(f"c{i:02}", registered_at=1000 + i, metadata=blob))
    seen, cursor, sizes = [], None, []
    while True:
        page, cursor = await store.list(limit=1000, cursor=cursor, max_bytes=200_000)
        sizes.append(len(page))
        seen += [r.call_id for r in page]
        if cursor is None:
            break
    assert seen == [f"c{i:02}" for i in reversed(range(30))]
    assert max(sizes) <= 5 and min(sizes) >= 1
    (one,), cursor = await store.list(limit=1000, max_bytes=10)
    assert one.call_id == "c29" and cursor is not None


async def test_an_instance_id_is_held_by_one_process_at_a_time(database_url):
    a = await SqlCallStore.open(database_url, "instance-a")
    b = await SqlCallStore.open(database_url, "instance-a")  # another process, same id
    assert await a.claim(lease_ms=60_000) is None
    held = await b.claim(lease_ms=60_000)
    assert held is not None and 0 <= held < 5  # a's heartbeat, seconds old
    assert await a.heartbeat()
    await a.release()  # a graceful stop: b may take it at once
    assert await b.claim(lease_ms=60_000) is None
    assert not await a.heartbeat()  # a knows it no longer holds the id
    await a.close()
    await b.close()


async def test_a_crashed_holder_s_lease_runs_out(database_url):
    a = await SqlCallStore.open(database_url, "instance-a")
    assert await a.claim(lease_ms=200) is None
    await a.close()  # killed: no release
    b = await SqlCallStore.open(database_url, "instance-a")
    assert await b.claim(lease_ms=60_000) is not None  # a's heartbeat is younger than a minute: not yet
    await asyncio.sleep(0.3)  # a lease of 200 ms runs out (the lease is the claimer's, on each call)
    assert await b.claim(lease_ms=200) is None
    await b.close()


async def test_timed_statements_raise_their_own_errors(database_url, tmp_path):
    """With the statement timer on (as the bridge runs), a failing statement raises its own
    error and a cancelled one ``CancelledError``: a ``handle_error`` listener that raised
    would replace both (SQLAlchemy 2.1 leaves ``ExceptionContext.cursor`` unset)."""
    store = await SqlCallStore.open(database_url, "instance-a", tmp_path)
    seen = []
    store.time_statements(lambda kind, seconds: seen.append(kind))
    try:
        await store.create(record("c1"))
        with pytest.raises(IntegrityError):
            await store.create(record("c1"))
        assert "insert" in seen and "select" not in seen
        cancelled = 0
        for i in range(200):  # cancelled at every moment of a read
            task = asyncio.create_task(store.get("c1"))
            for _ in range(i % 20):
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                cancelled += 1
        assert cancelled > 0  # (the others had finished: no other error came out)
    finally:
        await store.close()


async def test_a_pooled_connection_dropped_while_idle_is_replaced_before_it_is_used(database_url, monkeypatch):
    """Pooled PostgreSQL connections are pinged only after sitting idle (not before every
    statement): one the server dropped meanwhile (a restart, an idle timeout, a proxy) is
    replaced, and the store's caller never sees it."""
    if not database_url.startswith("postgres"):
        pytest.skip("a PostgreSQL connection pool (SQLite opens a file)")
    import asyncpg

    from bridge.store import schema

    monkeypatch.setattr(schema, "PING_AFTER_IDLE_S", 0.2)
    store = await SqlCallStore.open(database_url, "instance-a")
    try:
        await asyncio.gather(*(store.create(record(f"c{i}")) for i in range(5)))  # a few pooled connections
        admin = await asyncpg.connect(database_url)
        try:
            dropped = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        assert dropped >= 1
        await asyncio.sleep(0.4)
        assert [r.call_id for r in await asyncio.gather(*(store.get(f"c{i}") for i in range(5)))] == [f"c{i}" for i in range(5)]
        assert await store.start("c0") is not None
    finally:
        await store.close()


async def test_the_rows_a_store_remembers_are_bounded_in_number_and_size(store, monkeypatch):
    from bridge.store import call_store

    monkeypatch.setattr(call_store, "REMEMBERED_ROWS", 3)
    for i in range(5):
        await store.create(record(f"c{i}"))
    assert list(store._rows) == ["c2", "c3", "c4"]  # the newest only
    await store.create(record("big", metadata={"blob": "x" * (call_store.REMEMBERED_ROW_BYTES + 1)}))
    assert "big" not in store._rows  # read again when it changes, never held
    assert (await store.start("big")).call_status is CallStatus.ongoing
    await store.finish("c4", DisconnectionReason.user_hangup)
    assert "c4" not in store._rows  # an ended call is forgotten


async def test_a_burst_keeps_the_pools_connections_open_and_waits_for_them(database_url):
    """PostgreSQL: a burst larger than the pool waits for its connections instead of opening
    more and closing them after (each one a new server backend: most of the server's CPU in a
    burst of set-ups); every call of the burst is registered and started."""
    if not database_url.startswith("postgres"):
        pytest.skip("a PostgreSQL connection pool (SQLite opens a file)")
    from sqlalchemy import event

    store = await SqlCallStore.open(database_url, "instance-a", pool_size=3)
    opened, closed = [], []
    event.listen(store.engine.sync_engine, "connect", lambda *a: opened.append(1))
    event.listen(store.engine.sync_engine, "close", lambda *a: closed.append(1))
    try:
        await asyncio.gather(*(store.create(record(f"c{i}")) for i in range(40)))
        started = await asyncio.gather(*(store.start(f"c{i}") for i in range(40)))
        assert all(r is not None and r.call_status is CallStatus.ongoing for r in started)
        assert len(opened) <= 3 and not closed
        assert store.engine.pool.checkedin() == 3  # all kept, idle, for the next burst
    finally:
        await store.close()


async def test_a_statement_run_on_its_own_leaves_the_connection_transactional(database_url):
    """PostgreSQL runs one-statement writes and reads in autocommit (one round trip each); the
    same pooled connection then still runs a multi-statement change as one transaction: a
    failure in it undoes all of it."""
    if not database_url.startswith("postgres"):
        pytest.skip("autocommit is PostgreSQL's (SQLite writes on its own thread)")
    from bridge.store import call_store

    store = await SqlCallStore.open(database_url, "instance-a", pool_size=1)  # (one connection for all)
    try:
        await store.create(record("c1"))  # autocommit
        assert await store.get("c1") is not None  # autocommit

        def two_inserts_then_fail(conn):
            for call_id in ("c2", "c3"):
                values = {"call_id": call_id, "instance_id": "instance-a", "version": 1, **call_store._columns(record(call_id))}
                conn.execute(call_store.INSERT_CALL, values)
            raise RuntimeError("the second half of a change failed")

        with pytest.raises(RuntimeError):
            await store._write(two_inserts_then_fail)
        assert await store.get("c2") is None and await store.get("c3") is None  # all undone
        assert (await store.start("c1")).call_status is CallStatus.ongoing  # autocommit again
        with pytest.raises(IntegrityError):
            await store.create(record("c1"))  # a failed statement on its own changes nothing
        assert (await store.get("c1")).call_status is CallStatus.ongoing
    finally:
        await store.close()


async def test_a_pool_with_every_connection_busy_too_long_is_the_database_unavailable(database_url, monkeypatch):
    """A statement that waits for a pooled connection longer than the pool's timeout fails as
    the database being unavailable (the API's 503, a caller's fallback), not as a bug."""
    if not database_url.startswith("postgres"):
        pytest.skip("a PostgreSQL connection pool (SQLite opens a file)")
    from bridge.store import STORE_UNAVAILABLE, schema

    monkeypatch.setattr(schema, "POOL_TIMEOUT_S", 0.2)
    store = await SqlCallStore.open(database_url, "instance-a", pool_size=1)
    try:
        async with store.engine.connect():  # the only connection, held
            with pytest.raises(STORE_UNAVAILABLE):
                await store.get("c1")
        assert await store.get("c1") is None  # handed back: the store works again
    finally:
        await store.close()
