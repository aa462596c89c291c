"""Shared fixtures: database URLs for the store tests (SQLite always; PostgreSQL when reachable).

PostgreSQL runs on 127.0.0.1:5432 (trust auth) on the development machines and in CI. On a
machine without it those tests skip with the reason; with BRIDGE_REQUIRE_SERVICES=1 (set by
.ci/run) they fail instead, so CI cannot silently skip them."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

PG_ADMIN = os.environ.get("BRIDGE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN, timeout=3)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _postgres_available() -> str | None:
    try:
        asyncio.run(_pg_admin("SELECT 1"))
        return None
    except Exception as e:  # noqa: BLE001 - any failure means: not available here
        return f"PostgreSQL not reachable at {PG_ADMIN}: {type(e).__name__}: {e}"


_PG_PROBLEM = _postgres_available()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request, tmp_path):
    """A fresh, empty database: a SQLite file, or a new PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'calls.db'}"
        return
    if _PG_PROBLEM:
        if os.environ.get("BRIDGE_REQUIRE_SERVICES") == "1":
            pytest.fail(_PG_PROBLEM)
        pytest.skip(_PG_PROBLEM)
    name = "bridge_test_" + uuid.uuid4().hex[:12]
    await _pg_admin(f"CREATE DATABASE {name}")
    base = PG_ADMIN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    await _pg_admin(f"DROP DATABASE {name} WITH (FORCE)")
