"""The SQL schema, the engine, and migrations (Alembic, run at start-up).

One schema for SQLite (the embedded default, WAL mode) and PostgreSQL (asyncpg). A call is a row
with the columns the API filters and sorts on, plus the whole record as JSON; ``version`` makes
every change a compare-and-set, so concurrent writers (tasks, or replicas sharing one
PostgreSQL) never lose an update."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import JSON, BigInteger, Column, Engine, Index, Integer, MetaData, String, Table, create_engine, event, text
from sqlalchemy import exc
from sqlalchemy.pool import SingletonThreadPool
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..models import MAX_PARTY_CHARS
from ..settings import Settings

metadata = MetaData()

calls = Table(
    "calls",
    metadata,
    Column("call_id", String(64), primary_key=True),
    Column("agent_id", String(128), nullable=False),
    Column("call_type", String(16), nullable=False),
    Column("call_status", String(16), nullable=False),
    Column("direction", String(16)),
    Column("from_number", String(MAX_PARTY_CHARS)),  # E.164, a SIP URI, a client: identity
    Column("to_number", String(MAX_PARTY_CHARS)),
    Column("registered_at", BigInteger, nullable=False),
    Column("start_timestamp", BigInteger),
    Column("end_timestamp", BigInteger),
    Column("sort_key", BigInteger, nullable=False),  # start_timestamp, else registered_at
    Column("instance_id", String(128), nullable=False),
    Column("twilio_call_sid", String(64)),
    Column("version", Integer, nullable=False),
    Column("record", JSON, nullable=False),
)
Index("ix_calls_sort", calls.c.sort_key, calls.c.call_id)
Index("ix_calls_status_instance", calls.c.call_status, calls.c.instance_id)
Index("ix_calls_twilio_sid", calls.c.twilio_call_sid)
Index("ix_calls_end", calls.c.end_timestamp)

instances = Table(
    "instances",
    metadata,
    Column("instance_id", String(128), primary_key=True),
    Column("started_at", BigInteger, nullable=False),
    Column("heartbeat_at", BigInteger, nullable=False),
    Column("claim", String(32)),  # the process holding this id (None: released)
    Column("fingerprint", String(32)),  # of the secrets every replica must share (``secrets_fingerprint``)
    Column("address", String(256)),  # how the other replicas reach this one (``Settings.replica_url``)
)

#: The next free slot of a shared rate (the account's dial rate), in microseconds of the
#: database's clock: one row per rate, every replica takes its slots from it
dial_slots = Table(
    "dial_slots",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("next_slot_us", BigInteger, nullable=False),
)

outbox = Table(
    "webhook_outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("call_id", String(64), nullable=False),
    Column("event", String(32), nullable=False),  # call_started | call_ended | call_analyzed | analyze
    Column("url", String(2048), nullable=False),
    Column("payload", JSON),  # the call as it was when the event happened
    Column("created_at", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", BigInteger),  # NULL once delivered or given up
    Column("leased_by", String(128)),  # the instance delivering it right now
    Column("delivered_at", BigInteger),
    Column("last_error", String(500)),
)
Index("ix_outbox_due", outbox.c.next_attempt_at)
Index("ix_outbox_call", outbox.c.call_id, outbox.c.id)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def database_url(url: str | None, data_dir: Path) -> str:
    """The async SQLAlchemy URL: sqlite+aiosqlite for SQLite, postgresql+asyncpg for PostgreSQL."""
    if not url:
        return f"sqlite+aiosqlite:///{data_dir / 'bridge.db'}"
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    return url


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


#: PostgreSQL connections one bridge process keeps open, unless told (``BRIDGE_DATABASE_POOL_SIZE``)
DEFAULT_POOL_SIZE: int = Settings.model_fields["database_pool_size"].default
#: How long a statement waits for a pooled connection when all are busy before the store is
#: taken as unavailable (``STORE_UNAVAILABLE``: a 503, or the fallback for a caller)
POOL_TIMEOUT_S = 30.0


def make_engine(url: str, pool_size: int = DEFAULT_POOL_SIZE) -> AsyncEngine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    # a database that does not answer costs a request seconds, not asyncpg's default minute.
    # No overflow: a connection opened for a burst and closed after it cost the server a new
    # backend each time (a fork, authentication, asyncpg's type introspection, every statement
    # prepared again), which was half of PostgreSQL's CPU in a burst of 200 set-ups and doubled
    # their p99; a request that finds every connection busy waits for one instead
    engine = create_async_engine(
        url, pool_size=pool_size, max_overflow=0, pool_timeout=POOL_TIMEOUT_S, pool_use_lifo=True,
        connect_args={"timeout": 5, "command_timeout": 30},
    )  # fmt: skip
    _ping_idle_connections(engine)
    return engine


#: a pooled connection unused for longer is pinged before it is used (see ``_ping_idle_connections``)
PING_AFTER_IDLE_S = 1.0


def _ping_idle_connections(engine: AsyncEngine) -> None:
    """SQLAlchemy's ``pool_pre_ping``, for connections that sat idle: a database restarted or
    a connection cut while idle is found before a request uses it (the pool is invalidated and
    reconnects), but a connection in steady use (a burst of calls, every statement of a call's
    set-up) is not pinged each time: that ping was a round trip per statement, two thirds of
    the CPU a statement costs on asyncpg. A connection cut while in use fails its statement as
    before (``STORE_UNAVAILABLE``), and the pool is invalidated then."""
    pool_events = engine.sync_engine

    @event.listens_for(pool_events, "checkin")
    def _idle_since(_dbapi_connection, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(pool_events, "checkout")
    def _ping_if_idle(dbapi_connection, record, _proxy) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return  # (a new connection, or one in use a moment ago)
        try:
            ok = engine.dialect.do_ping(dbapi_connection)
        except Exception:  # noqa: BLE001 (any failure: a new connection is taken)
            ok = False
        if not ok:
            raise exc.InvalidatePoolError("an idle pooled connection did not answer a ping")


def make_sync_engine(engine: AsyncEngine) -> Engine | None:
    """For a SQLite file: a synchronous engine on the same file (the standard library's
    ``sqlite3``), for one thread of the process to run whole transactions on (see
    ``SqlCallStore``). None for PostgreSQL or an in-memory database."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    sync = create_engine(
        engine.url.set(drivername="sqlite"), poolclass=SingletonThreadPool,
        connect_args={"timeout": 30, "check_same_thread": False},
    )  # fmt: skip
    event.listen(sync, "connect", _sqlite_pragmas)
    return sync


def _upgrade(sync_connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = sync_connection
    command.upgrade(config, "head")


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the latest version, one process at a time: an advisory lock on
    PostgreSQL, a lock file next to the database on SQLite."""
    if engine.dialect.name == "postgresql":
        async with engine.begin() as conn:
            await conn.execute(text("SELECT pg_advisory_xact_lock(48151623)"))
            await conn.run_sync(_upgrade)
        return
    database = engine.url.database
    lock_path = Path(database + ".migrate.lock") if database and database != ":memory:" else None
    with open(lock_path, "w") if lock_path else contextlib.nullcontext() as lock:
        if lock is not None:
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade)
