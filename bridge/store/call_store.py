"""``SqlCallStore``: where call records live, in SQLite or PostgreSQL (see ``schema.py``), the same
code for both. Status changes are compare-and-set, so a stream token can start a call only once
and a call ends only once, whichever task or replica gets there first.

Every change is read-modify-write guarded by the row's ``version``: if another task or replica
changed the call in between, the write does not happen and the change is retried on the fresh
row (or refused, for status changes whose precondition no longer holds)."""

from __future__ import annotations

import asyncio
import base64
import functools
import random
import secrets
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

import orjson
from sqlalchemy import and_, bindparam, delete, func, insert, or_, select, text, update
from sqlalchemy import event as sql_event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from ..models import CallRecord, CallStatus, DisconnectionReason, now_ms
from .schema import DEFAULT_POOL_SIZE, calls, database_url, instances, make_engine, make_sync_engine, migrate, outbox

RETRIES = 20
STREAM_ROWS = 50  # rows fetched at a time when a page is streamed from the database
REMEMBERED_ROWS = 1024  # live calls whose last written row this process keeps (``_rows``)
REMEMBERED_ROW_BYTES = 16 * 1024  # ... if its record is no larger (memory stays under 16 MiB)


def _columns(record: CallRecord) -> dict[str, Any]:
    return {
        "agent_id": record.agent_id,
        "call_type": record.call_type.value,
        "call_status": record.call_status.value,
        "direction": record.direction.value if record.direction else None,
        "from_number": record.from_number,
        "to_number": record.to_number,
        "registered_at": record.registered_at,
        "start_timestamp": record.start_timestamp,
        "end_timestamp": record.end_timestamp,
        "sort_key": record.start_timestamp or record.registered_at,
        "twilio_call_sid": record.twilio_call_sid,
        "record": record.model_dump(mode="json"),
    }


#: A call in the dashboard's live view (``summaries``): a small, bounded part of the call object
_SUMMARY = (
    calls.c.call_id, calls.c.agent_id, calls.c.call_type, calls.c.call_status, calls.c.direction, calls.c.from_number,
    calls.c.to_number, calls.c.start_timestamp, calls.c.end_timestamp,
    calls.c.record["disconnection_reason"].as_string().label("disconnection_reason"),
    calls.c.record["opt_out_sensitive_data_storage"].as_boolean().label("opt_out_sensitive_data_storage"),
    calls.c.record["e2e_latency"].label("e2e_latency"),
    calls.c.record["transfer_destination"].as_string().label("transfer_destination"),
)  # fmt: skip
SUMMARY_FIELDS = tuple(str(column.key) for column in _SUMMARY)  # (plain str: SQLAlchemy's names are a subclass)


#: The statements of a call's set-up, built once (SQLAlchemy then only binds their parameters)
INSERT_CALL = insert(calls)
SELECT_ROW = select(calls.c.record, calls.c.version, calls.c.instance_id).where(calls.c.call_id == bindparam("key_call_id"))
SELECT_BY_TWILIO_SID = select(calls.c.record).where(calls.c.twilio_call_sid == bindparam("key_sid")).limit(1)
#: compare-and-set on the row's version; the columns set are the parameters' other keys
UPDATE_CALL = update(calls).where(calls.c.call_id == bindparam("key_call_id"), calls.c.version == bindparam("key_version"))
UPDATE_CALL_OF_OWNER = UPDATE_CALL.where(calls.c.instance_id == bindparam("key_instance_id"))


def encode_cursor(sort_key: int, call_id: str) -> str:
    return base64.urlsafe_b64encode(f"{sort_key}:{call_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        key, call_id = raw.split(":", 1)
        if not 0 <= int(key) < 2**63 or "\x00" in call_id:
            raise ValueError
        return int(key), call_id
    except (ValueError, UnicodeDecodeError):
        raise ValueError("pagination_key is not one this API gave out") from None


#: the text columns list() filters on, and its operators (retell-sdk's string filter)
TEXT_COLUMNS = ("call_id", "from_number", "to_number")
TEXT_OPS = {
    "eq": lambda column, value: column == value,
    "ne": lambda column, value: or_(column != value, column.is_(None)),
    "sw": lambda column, value: column.startswith(value, autoescape=True),
    "ew": lambda column, value: column.endswith(value, autoescape=True),
    "co": lambda column, value: column.contains(value, autoescape=True),
    "in": lambda column, values: column.in_(values),
}


class SqlCallStore:
    def __init__(self, engine: AsyncEngine, instance_id: str, workers: int = 1):
        self.engine = engine
        self.instance_id = instance_id
        #: other processes share this database: replicas on PostgreSQL, or the workers of one
        #: ``bridge serve --workers N`` on SQLite
        self.shared = engine.dialect.name == "postgresql" or workers > 1
        self.claim_token = secrets.token_hex(16)  # this process, as the holder of instance_id
        #: changes of one call in this process go one at a time (compare-and-set then only
        #: retries for other processes' changes): call id -> (lock, changes holding or awaiting it)
        self._changing: dict[str, list] = {}
        #: SQLite: every write, and the reads a call's set-up waits on, run as one function each
        #: on one thread of this process, with SQLAlchemy's synchronous engine (one hand-over
        #: per transaction instead of aiosqlite's three or four per statement; this process's
        #: writers never meet on SQLite's lock, whose busy handler sleeps 1-100 ms at a time;
        #: other processes, the workers, still meet there). PostgreSQL: the same functions, on
        #: the asyncio engine (``run_sync``)
        self._sync_engine = make_sync_engine(engine)
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite") if self._sync_engine is not None else None
        #: PostgreSQL: the same pool, its connections in autocommit while they run one statement
        #: (``_write(single=True)`` and ``_read``): each then costs one round trip, not three
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT") if engine.dialect.name == "postgresql" else None
        #: the rows this process wrote last, of live calls: ``call_id -> (version, instance_id,
        #: record as JSON)``, so a change of a call this process registered or changed needs no
        #: read first (the compare-and-set on the version still decides: a row another process
        #: changed meanwhile is read again). Bounded; a call leaves it when it ends
        self._rows: OrderedDict[str, tuple[int, str, dict]] = OrderedDict()

    @classmethod
    async def open(
        cls, url: str | None, instance_id: str, data_dir=None, workers: int = 1, pool_size: int = DEFAULT_POOL_SIZE
    ) -> SqlCallStore:
        from pathlib import Path

        engine = make_engine(database_url(url, Path(data_dir or "var")), pool_size)
        await migrate(engine)
        return cls(engine, instance_id, workers)

    async def close(self) -> None:
        if self._db_thread is not None:
            await asyncio.get_running_loop().run_in_executor(self._db_thread, self._sync_engine.dispose)
            self._db_thread.shutdown(wait=False)
        await self.engine.dispose()

    async def _write(self, transaction, single: bool = False):
        """``transaction(connection)`` (synchronous SQLAlchemy) in one database transaction,
        committed if it returns, rolled back if it raises: its result. ``single``: it runs one
        statement, which on PostgreSQL then runs on its own (autocommit: one round trip, where
        BEGIN, the statement and COMMIT were three; a statement is atomic on its own)."""
        if self._db_thread is None:
            if single and self._autocommit is not None:
                async with self._autocommit.connect() as conn:
                    return await conn.run_sync(transaction)
            async with self.engine.begin() as conn:
                return await conn.run_sync(transaction)
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, self._sync_write, transaction)

    def _sync_write(self, transaction):
        with self._sync_engine.begin() as conn:
            return transaction(conn)

    async def _read(self, query):
        """``query(connection)`` (synchronous SQLAlchemy), reading with one statement: its
        result (on PostgreSQL in autocommit, so two statements would not share a snapshot)."""
        if self._db_thread is None:
            async with (self._autocommit or self.engine).connect() as conn:  # (one statement: no BEGIN)
                return await conn.run_sync(query)
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, self._sync_read, query)

    def _sync_read(self, query):
        with self._sync_engine.connect() as conn:
            return query(conn)

    def _remember(self, call_id: str, version: int, instance_id: str, record: dict, status: str) -> None:
        rows = self._rows
        if status in (CallStatus.ended.value, CallStatus.error.value) or len(orjson.dumps(record)) > REMEMBERED_ROW_BYTES:
            rows.pop(call_id, None)  # (an ended call changes rarely; a large record is read again)
            return
        rows[call_id] = (version, instance_id, record)
        rows.move_to_end(call_id)
        if len(rows) > REMEMBERED_ROWS:
            rows.popitem(last=False)

    # --- instances ---------------------------------------------------------------------------

    async def claim(self, lease_ms: int, fingerprint: str | None = None, address: str | None = None) -> float | None:
        """Take this instance id for this process (``self.claim_token``), unless another process
        holds it: its heartbeat is younger than ``lease_ms``. Returns None when taken, else the
        holder's heartbeat age in seconds. Released (``release``) or expired claims are taken
        over, compare-and-set, so two processes starting together cannot both win. The
        ``fingerprint`` of this process's shared secrets and its ``address`` (how the other
        replicas reach it) are kept with the claim."""
        now = now_ms()
        fields = dict(started_at=now, heartbeat_at=now, claim=self.claim_token, fingerprint=fingerprint, address=address)

        def take_over(conn) -> float | None | bool:
            row = conn.execute(select(instances).where(instances.c.instance_id == self.instance_id)).first()
            if row is None:
                return False
            if row.claim not in (None, self.claim_token) and now - row.heartbeat_at < lease_ms:
                return (now - row.heartbeat_at) / 1000
            done = conn.execute(
                update(instances)
                .where(instances.c.instance_id == self.instance_id, instances.c.heartbeat_at == row.heartbeat_at)
                .values(**fields)
            )
            return None if done.rowcount == 1 else 0.0

        taken = await self._write(take_over)
        if taken is not False:
            return taken
        try:
            await self._write(lambda conn: conn.execute(insert(instances).values(instance_id=self.instance_id, **fields)))
        except IntegrityError:  # another process inserted it first
            return 0.0
        return None

    async def live_fingerprints(self, lease_ms: int) -> dict[str, str | None]:
        """The other live instances (heartbeat younger than ``lease_ms``, claim held) and the
        fingerprints of their shared secrets."""
        query = select(instances.c.instance_id, instances.c.fingerprint).where(
            instances.c.instance_id != self.instance_id,
            instances.c.claim.is_not(None),
            instances.c.heartbeat_at >= now_ms() - lease_ms,
        )
        async with self.engine.connect() as conn:
            return {row.instance_id: row.fingerprint for row in await conn.execute(query)}

    async def relay_address(self, call_id: str, lease_ms: int) -> tuple[str, str | None] | None:
        """The replica relaying an ongoing call, and its address (None for one that registered
        none): ``(instance_id, address)``, or None when the call is not ongoing or its replica's
        lease has lapsed."""
        query = (
            select(instances.c.instance_id, instances.c.address)
            .select_from(calls.join(instances, calls.c.instance_id == instances.c.instance_id))
            .where(
                calls.c.call_id == call_id,
                calls.c.call_status == CallStatus.ongoing.value,
                instances.c.claim.is_not(None),
                instances.c.heartbeat_at >= now_ms() - lease_ms,
            )
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else (row.instance_id, row.address)

    async def live_and_ended_since(
        self, since_ms: int, max_ongoing: int = 10_000, max_registered: int = 200, max_ended: int = 2000
    ) -> tuple[dict[str, int], dict[str, int]]:
        """For the call-events feed, without reading records: the live calls (every ongoing
        call, newest first, up to ``max_ongoing``; then the newest ``max_registered`` calls only
        registered, which never crowd an ongoing one out) and the calls that ended at or after
        ``since_ms`` (oldest ending first, up to ``max_ended``), each ``{call_id: version}``
        (the version changes with every change of the record)."""
        newest = (calls.c.sort_key.desc(), calls.c.call_id.desc())
        ongoing = select(calls.c.call_id, calls.c.version).where(calls.c.call_status == CallStatus.ongoing.value)
        registered = select(calls.c.call_id, calls.c.version).where(calls.c.call_status == CallStatus.registered.value)
        ended = (
            select(calls.c.call_id, calls.c.version)
            .where(calls.c.end_timestamp >= since_ms, calls.c.call_status.in_((CallStatus.ended.value, CallStatus.error.value)))
            .order_by(calls.c.end_timestamp, calls.c.call_id)
            .limit(max_ended)
        )
        async with self.engine.connect() as conn:
            live = (await conn.execute(ongoing.order_by(*newest).limit(max_ongoing))).all()
            live += (await conn.execute(registered.order_by(*newest).limit(max_registered))).all()
            ended_rows = (await conn.execute(ended)).all()
        return {r.call_id: r.version for r in live}, {r.call_id: r.version for r in ended_rows}

    async def summaries(self, call_ids: Iterable[str]) -> list[dict[str, Any]]:
        """What the live view shows of these calls (those that exist), in no particular order:
        ``SUMMARY_FIELDS`` of each, read from the columns and a few paths into the record (never
        the record whole: its metadata, transcript... may be a hundred kilobytes a call)."""
        call_ids = list(call_ids)
        found = []
        for i in range(0, len(call_ids), 500):
            async with self.engine.connect() as conn:
                rows = await conn.execute(select(*_SUMMARY).where(calls.c.call_id.in_(call_ids[i : i + 500])))
                found += [dict(zip(SUMMARY_FIELDS, row)) for row in rows]
        return found

    async def heartbeat(self) -> bool:
        """Renew this process's claim; False if another process has taken the id over."""
        statement = (
            update(instances)
            .where(instances.c.instance_id == self.instance_id, instances.c.claim == self.claim_token)
            .values(heartbeat_at=now_ms())
        )
        return await self._write(lambda conn: conn.execute(statement).rowcount == 1)

    async def release(self) -> None:
        """Give the id up (a graceful stop): the next process may claim it at once."""
        statement = (
            update(instances)
            .where(instances.c.instance_id == self.instance_id, instances.c.claim == self.claim_token)
            .values(claim=None)
        )
        await self._write(lambda conn: conn.execute(statement))

    async def recover(self, reason: DisconnectionReason, detail: str) -> list[CallRecord]:
        """End the calls this instance was relaying when it stopped (it died with them). Calls
        only registered are left alone: their stream may still come (to any instance), and if it
        never does they end by their own ``registered_call_timeout``."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(calls.c.call_id).where(
                    calls.c.instance_id == self.instance_id, calls.c.call_status == CallStatus.ongoing.value
                )
            )
            call_ids = [row.call_id for row in rows]
        ended = []
        for call_id in call_ids:
            record = await self.finish(call_id, reason, error_detail=detail, owner=self.instance_id)
            if record is not None:
                ended.append(record)
        return ended

    async def orphans(self, lease_ms: int) -> list[tuple[str, str]]:
        """Live calls of other instances that are gone: their heartbeat is older than ``lease_ms``
        (a crash, a lost machine) or they released their id (stopped) with calls still live.
        ``[(call_id, owner)]``."""
        stale = now_ms() - lease_ms
        query = (
            select(calls.c.call_id, calls.c.instance_id)
            .join(instances, instances.c.instance_id == calls.c.instance_id)
            .where(
                calls.c.call_status == CallStatus.ongoing.value,
                calls.c.instance_id != self.instance_id,
                or_(instances.c.heartbeat_at < stale, instances.c.claim.is_(None)),
            )
        )
        async with self.engine.connect() as conn:
            return [(row.call_id, row.instance_id) for row in await conn.execute(query)]

    async def not_mine(self, call_ids: list[str]) -> list[str]:
        """Which of these calls (relayed here) are no longer this instance's live calls: ended
        elsewhere (reaped while this instance's lease had expired), or gone."""
        if not call_ids:
            return []
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(calls.c.call_id).where(
                    calls.c.call_id.in_(call_ids), calls.c.call_status == CallStatus.ongoing.value,
                    calls.c.instance_id == self.instance_id,
                )
            )  # fmt: skip
            mine = {row.call_id for row in rows}
        return [call_id for call_id in call_ids if call_id not in mine]

    async def states(self, call_ids: list[str]) -> dict[str, tuple[CallStatus, str]]:
        """``{call_id: (status, owning instance)}`` of the calls that exist."""
        if not call_ids:
            return {}
        query = select(calls.c.call_id, calls.c.call_status, calls.c.instance_id).where(calls.c.call_id.in_(call_ids))
        async with self.engine.connect() as conn:
            return {row.call_id: (CallStatus(row.call_status), row.instance_id) for row in await conn.execute(query)}

    # --- coordination between replicas (PostgreSQL) ---------------------------------------

    async def take_slot(self, name: str, interval_s: float, max_wait_s: float) -> float | None:
        """A shared rate (``name``: one slot every ``interval_s`` across every process): take the
        next free slot and return how long to wait for it, or None if it is more than
        ``max_wait_s`` away (nothing taken). Slots are kept on the database's clock, so the
        replicas' own clocks do not matter; the row lock queues concurrent takers in order."""
        interval_us, max_wait_us = int(interval_s * 1e6), int(max_wait_s * 1e6)
        if self.engine.dialect.name == "sqlite":  # (the workers of one machine: one clock)
            return await self._take_local_slot(name, interval_us, max_wait_us)
        statement = text(
            "WITH now AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS us) "
            "UPDATE dial_slots SET next_slot_us = GREATEST(dial_slots.next_slot_us, now.us) + :interval "
            "FROM now WHERE dial_slots.name = :name AND GREATEST(dial_slots.next_slot_us, now.us) - now.us <= :max_wait "
            "RETURNING dial_slots.next_slot_us - :interval - (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS wait_us"
        )
        row = await self._write(lambda conn: self._slot(conn, name, statement, interval=interval_us, max_wait=max_wait_us))
        return None if row is None else max(0, row.wait_us) / 1e6

    @staticmethod
    def _slot(conn, name: str, statement, **parameters):
        conn.execute(text("INSERT INTO dial_slots (name, next_slot_us) VALUES (:name, 0) ON CONFLICT DO NOTHING"), {"name": name})
        return conn.execute(statement, {"name": name, **parameters}).first()

    async def _take_local_slot(self, name: str, interval_us: int, max_wait_us: int) -> float | None:
        """``take_slot`` on SQLite: one UPDATE (SQLite runs it under the database's write lock,
        so workers queue on it), on this machine's clock, which every worker shares."""
        now_us = time.time_ns() // 1000
        statement = text(
            "UPDATE dial_slots SET next_slot_us = MAX(next_slot_us, :now) + :interval "
            "WHERE name = :name AND MAX(next_slot_us, :now) - :now <= :max_wait "
            "RETURNING next_slot_us - :interval - :now AS wait_us"
        )
        row = await self._write(lambda conn: self._slot(conn, name, statement, interval=interval_us, max_wait=max_wait_us, now=now_us))
        return None if row is None else max(0, row.wait_us) / 1e6

    # --- calls -------------------------------------------------------------------------------

    async def create(self, record: CallRecord) -> None:
        columns = _columns(record)
        values = {"call_id": record.call_id, "instance_id": self.instance_id, "version": 1, **columns}
        await self._write(lambda conn: conn.execute(INSERT_CALL, values), single=True)
        self._remember(record.call_id, 1, self.instance_id, columns["record"], columns["call_status"])

    def time_statements(self, observe) -> None:
        """Call ``observe(kind, seconds)`` for every statement the database runs (``kind``:
        select, insert, update, delete...): the store's latency, for metrics."""
        timings = {}

        def before(conn, cursor, statement, parameters, context, executemany):
            timings[id(cursor)] = time.perf_counter()

        def after(conn, cursor, statement, parameters, context, executemany):
            started = timings.pop(id(cursor), None)
            if started is not None:
                observe(statement.lstrip().split(" ", 1)[0].lower()[:16], time.perf_counter() - started)

        def failed(error_context):  # (must never raise: what it raises replaces the error)
            execution = error_context.execution_context  # (its ``cursor`` is unset in SQLAlchemy 2.1)
            cursor = getattr(execution, "cursor", None) if execution is not None else None
            if cursor is not None:
                timings.pop(id(cursor), None)

        for engine in filter(None, (self.engine.sync_engine, self._sync_engine)):
            sql_event.listen(engine, "before_cursor_execute", before)
            sql_event.listen(engine, "after_cursor_execute", after)
            sql_event.listen(engine, "handle_error", failed)

    async def ping(self) -> None:
        """One round trip to the database (readiness): raises if it does not answer."""
        async with self.engine.connect() as conn:
            await conn.execute(select(1))

    async def outbox_backlog(self) -> tuple[int, int | None]:
        """Webhook jobs not yet delivered nor given up: (how many, age of the oldest in ms)."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(func.count(), func.min(outbox.c.created_at)).where(outbox.c.next_attempt_at.is_not(None)))
            ).first()
        count, oldest = row if row else (0, None)
        return int(count or 0), (now_ms() - int(oldest)) if oldest is not None else None

    async def outbox_due(self) -> int:
        """Webhook jobs due now (not leased to anyone)."""
        async with self.engine.connect() as conn:
            return int((await conn.execute(select(func.count()).where(outbox.c.next_attempt_at <= now_ms()))).scalar() or 0)

    async def get(self, call_id: str) -> CallRecord | None:
        row = await self._row(call_id)
        return CallRecord.model_validate(row.record) if row else None

    async def _row(self, call_id: str):
        return await self._read(lambda conn: conn.execute(SELECT_ROW, {"key_call_id": call_id}).first())

    async def _change(self, call_id: str, make, take_ownership: bool = False, events=(), owner: str | None = None) -> CallRecord | None:
        """Apply ``make(record) -> new record | None`` as a compare-and-set on the row version.
        ``events(new record) -> [(event, url)]`` go into the webhook outbox in the same
        transaction: the change and its webhooks are stored together or not at all. Changes of
        one call made in this process wait for each other (hundreds at once never exhaust the
        retries, which are left for other replicas' changes)."""
        entry = self._changing.setdefault(call_id, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                return await self._change_now(call_id, make, take_ownership, events, owner)
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._changing[call_id]

    async def _change_now(self, call_id: str, make, take_ownership: bool, events, owner: str | None) -> CallRecord | None:
        remembered = self._rows.get(call_id)
        for attempt in range(RETRIES):
            if attempt > 1 or (attempt and remembered is None):  # another process changed it in
                # between: back off a random while, so two processes changing one call at a
                # steady rate do not keep colliding (not after a remembered row was stale)
                await asyncio.sleep(random.uniform(0, 0.001 * 2 ** min(attempt, 7)))
            if attempt == 0 and remembered is not None:
                version, instance_id, record = remembered
            else:
                row = await self._row(call_id)
                if row is None:
                    self._rows.pop(call_id, None)
                    return None
                version, instance_id, record = row.version, row.instance_id, row.record
            new = None if owner is not None and instance_id != owner else make(CallRecord.model_validate(record))
            if new is None:
                if attempt == 0 and remembered is not None:  # (a refusal is only ever the database's)
                    self._rows.pop(call_id, None)
                    continue
                return None
            values = {**_columns(new), "version": version + 1, "key_call_id": call_id, "key_version": version}
            if take_ownership:
                values["instance_id"] = instance_id = self.instance_id
            jobs = events(new) if events else ()
            if owner is not None:  # e.g. recovery: only while the call is still this instance's
                values["key_instance_id"] = owner
            statement = UPDATE_CALL_OF_OWNER if owner is not None else UPDATE_CALL
            update = functools.partial(self._update, statement=statement, values=values, record=new, jobs=jobs)
            if await self._write(update, single=not jobs):
                self._remember(call_id, version + 1, instance_id, values["record"], values["call_status"])
                return new
            self._rows.pop(call_id, None)
        raise RuntimeError(f"call {call_id} kept changing under {RETRIES} attempts to update it")

    def _update(self, conn, *, statement, values: dict, record: CallRecord, jobs) -> bool:
        """The compare-and-set of ``_change_now`` and its webhook jobs, in one transaction."""
        if conn.execute(statement, values).rowcount != 1:
            return False
        self._enqueue(conn, record, jobs)
        return True

    async def update(self, call_id: str, **fields: Any) -> CallRecord | None:
        return await self._change(call_id, lambda r: r.model_copy(update=fields))

    async def start(self, call_id: str, fields_for=None, **fields: Any) -> CallRecord | None:
        """registered -> ongoing (with ``start_timestamp``); None if the call is not registered.
        ``fields_for(record) -> dict``: more fields, chosen from the record being started."""

        def make(r: CallRecord) -> CallRecord | None:
            if r.call_status is not CallStatus.registered:
                return None
            more = fields_for(r) if fields_for is not None else {}
            return r.model_copy(update={"call_status": CallStatus.ongoing, "start_timestamp": now_ms(), **fields, **more})

        # the instance relaying the call owns it from now on (the webhook may have run elsewhere)
        return await self._change(call_id, make, take_ownership=True, events=self._hooks("call_started"))

    async def finish(
        self, call_id: str, reason: DisconnectionReason, *, only_if: CallStatus | None = None, owner: str | None = None,
        **fields: Any,
    ) -> CallRecord | None:
        """-> ended / error with ``end_timestamp`` and the reason; None if it already ended (or,
        with ``only_if``, if its status is not that one any more; with ``owner``, if another
        instance owns it now)."""

        def make(r: CallRecord) -> CallRecord | None:
            if r.call_status in (CallStatus.ended, CallStatus.error):
                return None
            if only_if is not None and r.call_status is not only_if:
                return None
            status = CallStatus.error if reason.is_error else CallStatus.ended
            changes = {"call_status": status, "disconnection_reason": reason, "end_timestamp": now_ms(), **fields}
            return r.model_copy(update=changes)

        return await self._change(call_id, make, events=self._hooks("call_ended"), owner=owner)

    # --- webhook outbox ----------------------------------------------------------------------

    #: ``(event, record) -> [(event, url)]``: which webhooks a status change queues (set by the app)
    webhook_targets = None

    def _hooks(self, event: str):
        targets = self.webhook_targets
        return (lambda record: targets(event, record)) if targets else ()

    @staticmethod
    def _enqueue(conn, record: CallRecord, jobs) -> None:
        now = now_ms()
        for event, url in jobs:
            payload = {"event": event, "call": record.public()} if event.startswith("call_") else None
            conn.execute(
                insert(outbox).values(
                    call_id=record.call_id, event=event, url=url, payload=payload, created_at=now,
                    attempts=0, next_attempt_at=now,
                )
            )  # fmt: skip

    async def enqueue(self, record: CallRecord, jobs) -> None:
        jobs = list(jobs)
        await self._write(lambda conn: self._enqueue(conn, record, jobs))

    async def claim_due(self, lease_ms: int, limit: int = 20) -> list[dict]:
        """Due outbox jobs, each leased to this caller for ``lease_ms`` (another instance or task
        sees it again only if this one dies before finishing it). A call's jobs go in order: one
        waits while an earlier job of the same call is pending (a given-up job no longer blocks)."""
        now = now_ms()
        earlier = outbox.alias("earlier")
        blocked = (
            select(earlier.c.id)
            .where(earlier.c.call_id == outbox.c.call_id, earlier.c.id < outbox.c.id, earlier.c.next_attempt_at.is_not(None))
            .exists()
        )
        async with self.engine.connect() as conn:
            rows = list(
                await conn.execute(
                    # a call's events go out in order: none while an earlier one is still pending
                    select(outbox).where(outbox.c.next_attempt_at <= now, ~blocked).order_by(outbox.c.id).limit(limit)
                )
            )
        claimed = []
        for row in rows:
            statement = (
                update(outbox)
                .where(outbox.c.id == row.id, outbox.c.next_attempt_at == row.next_attempt_at)
                .values(next_attempt_at=now + lease_ms, leased_by=self.instance_id)
            )
            if await self._write(lambda conn, statement=statement: conn.execute(statement).rowcount == 1):
                claimed.append(dict(row._mapping))
        return claimed

    def _mine(self, job_id: int):
        # only while this instance still holds the lease: a late answer never overwrites a job
        # that another replica took over (or already delivered)
        return and_(outbox.c.id == job_id, outbox.c.leased_by == self.instance_id, outbox.c.delivered_at.is_(None))

    async def job_done(self, job_id: int) -> None:
        statement = update(outbox).where(self._mine(job_id)).values(delivered_at=now_ms(), next_attempt_at=None, leased_by=None)
        await self._write(lambda conn: conn.execute(statement))

    async def job_failed(self, job_id: int, attempts: int, retry_at: int | None, error: str) -> None:
        statement = (
            update(outbox)
            .where(self._mine(job_id))
            .values(attempts=attempts, next_attempt_at=retry_at, last_error=error[:500], leased_by=None)
        )
        await self._write(lambda conn: conn.execute(statement))

    async def purge_outbox(self, older_than_ms: int) -> int:
        """Delete delivered or abandoned webhook jobs older than the given time."""
        statement = delete(outbox).where(outbox.c.next_attempt_at.is_(None), outbox.c.created_at < older_than_ms)
        return await self._write(lambda conn: conn.execute(statement).rowcount)

    async def add_note(self, call_id: str, text: str, cap: int) -> CallRecord | None:
        """Add ``text`` to the call's notes unless it has ``cap`` already (checked in the same
        compare-and-set as the write: concurrent notes never pass the cap). Returns the record,
        or None if the call is unknown or full."""

        def make(r: CallRecord) -> CallRecord | None:
            return r.model_copy(update={"notes": [*r.notes, text]}) if len(r.notes) < cap else None

        return await self._change(call_id, make)

    async def release_stale_leases(self, lease_ms: int) -> int:
        """The webhook jobs that gone instances (lease expired, or released) were delivering
        are due again now, not when their job lease runs out: returns how many."""
        stale = now_ms() - lease_ms
        gone = select(instances.c.instance_id).where(
            instances.c.instance_id != self.instance_id, or_(instances.c.heartbeat_at < stale, instances.c.claim.is_(None))
        )
        statement = (
            update(outbox)
            .where(outbox.c.leased_by.in_(gone), outbox.c.next_attempt_at.is_not(None))
            .values(next_attempt_at=now_ms(), leased_by=None)
        )
        return await self._write(lambda conn: conn.execute(statement).rowcount or 0)

    async def release_leases(self) -> None:
        """After a restart: the jobs this instance was delivering when it died are due again."""
        statement = update(outbox).where(outbox.c.leased_by == self.instance_id).values(next_attempt_at=now_ms(), leased_by=None)
        await self._write(lambda conn: conn.execute(statement))

    async def jobs(self, call_id: str | None = None) -> list[dict]:
        query = select(outbox).order_by(outbox.c.id)
        if call_id:
            query = query.where(outbox.c.call_id == call_id)
        async with self.engine.connect() as conn:
            return [dict(r._mapping) for r in await conn.execute(query)]

    async def by_twilio_sid(self, call_sid: str) -> CallRecord | None:
        """The call registered for a Twilio CallSid, if any."""
        row = await self._read(lambda conn: conn.execute(SELECT_BY_TWILIO_SID, {"key_sid": call_sid}).first())
        return CallRecord.model_validate(row.record) if row else None

    async def registered_before(self, timestamp_ms: int, limit: int = 500) -> list[CallRecord]:
        """Calls still registered that were registered before the time, oldest first (at most
        ``limit``), whichever instance registered them: one that is gone (a pod replaced under
        a new name) leaves its registrations to the others."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(calls.c.record)
                .where(calls.c.call_status == CallStatus.registered.value, calls.c.registered_at < timestamp_ms)
                .order_by(calls.c.registered_at)
                .limit(limit)
            )
            return [CallRecord.model_validate(row.record) for row in rows]

    async def delete(self, call_id: str) -> bool:
        self._rows.pop(call_id, None)
        statement = delete(calls).where(calls.c.call_id == call_id)
        return await self._write(lambda conn: conn.execute(statement).rowcount == 1)

    async def list(
        self,
        *,
        agent_ids: Iterable[str] = (),
        statuses: Iterable[str] = (),
        directions: Iterable[str] = (),
        call_types: Iterable[str] = (),
        text: Iterable[tuple[str, str, str | list[str]]] = (),
        start_after: int | None = None,
        start_before: int | None = None,
        descending: bool = True,
        limit: int = 50,
        cursor: str | None = None,
        skip: int = 0,
        max_bytes: int | None = None,
    ) -> tuple[list[CallRecord], str | None]:
        """One page of calls, newest first by default (by start time, else registration time);
        returns the page and the cursor of the next page (None at the end). With ``max_bytes``
        the page stops early (with a cursor) once its records' JSON would pass that size: rows
        are streamed from the database, so a page of large records is never held whole.
        ``text``: (column, op, value) filters on ``call_id``, ``from_number`` or ``to_number``, op
        one of ``TEXT_OPS`` (eq, ne, sw: starts with, ew: ends with, co: contains, in: one of a
        list; LIKE's wildcards in the value are matched as themselves)."""
        query = select(calls.c.record, calls.c.sort_key, calls.c.call_id)
        for name, op, value in text:
            if name not in TEXT_COLUMNS or op not in TEXT_OPS:
                raise ValueError(f"cannot filter {name!r} with {op!r}")
            query = query.where(TEXT_OPS[op](calls.c[name], value))
        for column, values in (
            (calls.c.agent_id, agent_ids), (calls.c.call_status, statuses),
            (calls.c.direction, directions), (calls.c.call_type, call_types),
        ):  # fmt: skip
            values = list(values)
            if values:
                query = query.where(column.in_(values))
        if start_after is not None:
            query = query.where(calls.c.start_timestamp >= start_after)
        if start_before is not None:
            query = query.where(calls.c.start_timestamp <= start_before)
        if cursor:
            key, call_id = decode_cursor(cursor)
            if descending:
                query = query.where(or_(calls.c.sort_key < key, and_(calls.c.sort_key == key, calls.c.call_id < call_id)))
            else:
                query = query.where(or_(calls.c.sort_key > key, and_(calls.c.sort_key == key, calls.c.call_id > call_id)))
        order = (calls.c.sort_key.desc(), calls.c.call_id.desc()) if descending else (calls.c.sort_key, calls.c.call_id)
        query = query.order_by(*order).offset(skip).limit(limit + 1)
        page, more, size = [], False, 0
        async with self.engine.connect() as conn:
            result = await conn.stream(query.execution_options(yield_per=STREAM_ROWS))
            async for row in result:
                if max_bytes is not None:
                    size += len(orjson.dumps(row.record))
                if len(page) == limit or (page and max_bytes is not None and size > max_bytes):
                    more = True
                    break
                page.append(row)
            await result.close()
        next_cursor = encode_cursor(page[-1].sort_key, page[-1].call_id) if more else None
        return [CallRecord.model_validate(r.record) for r in page], next_cursor
