"""Shared fixtures: database URLs for the store tests (SQLite always; PostgreSQL when reachable).

PostgreSQL runs on 127.0.0.1:5432 (trust auth) on the development machines and in CI. On a
machine without it those tests skip with the reason; with BRIDGE_REQUIRE_SERVICES=1 (set by
.ci/run) they fail instead, so CI cannot silently skip them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

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


class OwnPostgres:
    """A PostgreSQL server of the test's own (initdb, pg_ctl, another port), to stop and start
    mid-call: the machine's own server is never touched."""

    def __init__(self, root: Path, port: int, bin_dir: Path):
        self.root, self.port, self.bin = root, port, bin_dir
        self.data = root / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(a) for a in args]
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        self._run(self.bin / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(self.bin / "pg_ctl", "-D", self.data, "-o", options, "-l", self.root / "log", "-w", "start")

    def stop(self) -> None:
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")


def _postgres_bin() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


@pytest.fixture
def own_postgres():
    """``OwnPostgres``, started; stopped and removed afterwards."""
    bin_dir = _postgres_bin()
    if bin_dir is None or (os.geteuid() == 0 and shutil.which("runuser") is None):
        problem = "PostgreSQL's initdb/pg_ctl (and runuser, as root) are needed to run a server of the test's own"
        if os.environ.get("BRIDGE_REQUIRE_SERVICES") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    root = Path(tempfile.mkdtemp(prefix="bridge-pg-"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = OwnPostgres(root, port, bin_dir)
    server.init()
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
