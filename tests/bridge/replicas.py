"""Real parts for the many-replica tests: HAProxy as the load balancer (Debian's package), an
S3-compatible server process (moto's standalone server, over HTTP), a webhook receiver, and
``bridge serve`` replicas sharing one PostgreSQL database."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import httpx
import pytest
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge.models import now_ms
from bridge.server import BackgroundServer
from bridge.store import SqlCallStore
from bridge.store.schema import calls

from .conftest import free_port, until
from .test_drain import Replica, live

BUCKET = "bridge-calls"
S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def require(problem: str) -> None:
    if os.environ.get("BRIDGE_REQUIRE_SERVICES") == "1":
        pytest.fail(problem)
    pytest.skip(problem)


class Balancer:
    """HAProxy in front of the replicas' ports: round robin, no stickiness, health checks on
    ``/readyz`` every 200 ms (a draining replica is out within one check; a busy one has a second to
    answer, as a loaded test machine is slow, not down), websockets tunnelled.
    Each answer names the replica that served it (``X-Served-By``)."""

    def __init__(self, tmp_path, ports: list[int]):
        if shutil.which("haproxy") is None:
            require("HAProxy is needed as the load balancer (apt-get install haproxy)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp_path / "haproxy.cfg"
        servers = "\n".join(f"    server r{i} 127.0.0.1:{port} check" for i, port in enumerate(ports))
        self.config.write_text(f"""
global
    maxconn 4096
    log stdout format raw local0

defaults
    mode http
    log global
    option httplog
    option redispatch
    retries 3
    retry-on conn-failure empty-response
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    timeout http-request 10s

frontend public
    bind 127.0.0.1:{self.port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 200ms fall 1 rise 1
    timeout check 1s
    http-response set-header X-Served-By %[srv_name]
{servers}
""")
        self.log_path = tmp_path / "haproxy.log"
        self.process: subprocess.Popen | None = None

    async def start(self) -> None:
        check = subprocess.run(["haproxy", "-c", "-f", str(self.config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.process = subprocess.Popen(["haproxy", "-db", "-f", str(self.config)], stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        await until(lambda: live(self.url), timeout=15)
        await asyncio.sleep(0.5)  # the first health checks mark the ports nobody listens on down

    def is_down(self, server: str) -> bool:
        """Whether HAProxy's health checks have most lately marked ``server`` (r0, r1...) down."""
        changes = [line for line in self.log_path.read_text().splitlines() if f"Server replicas/{server} is " in line]
        return bool(changes) and " is DOWN" in changes[-1]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class ObjectStore:
    """moto's S3 server in its own process (``moto_server``), reached over HTTP like any store."""

    def __init__(self, tmp_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "s3.log"
        self.process: subprocess.Popen | None = None

    async def start(self) -> None:
        server = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
        if not os.path.exists(server):
            require("moto's S3 server is needed (pip install 'moto[server]', in the test extra)")
        self.process = subprocess.Popen(
            [server, "-H", "127.0.0.1", "-p", str(self.port)], stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT
        )

        async def up() -> bool:
            try:
                async with httpx.AsyncClient() as http:
                    await http.get(self.url)
                return True
            except httpx.HTTPError:
                return False

        await until(up, timeout=30)
        async with self.client() as s3:
            await s3.create_bucket(Bucket=BUCKET)

    def client(self):
        from aiobotocore.session import get_session

        return get_session().create_client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class Webhooks:
    """Receives the replicas' call webhooks: ``events`` is [(event, call_id)] in arrival order."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []
        self.server: BackgroundServer | None = None

    async def _hook(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.events.append((body["event"], body["call"]["call_id"]))
        return Response(status_code=204)

    async def start(self) -> str:
        self.server = BackgroundServer(Starlette(routes=[Route("/hook", self._hook, methods=["POST"])]), lifespan="off")
        return f"{await self.server.start()}/hook"

    def counts(self) -> Counter:
        return Counter(self.events)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()


def make_replica(tmp_path, fake_url: str, name: str, **settings) -> Replica:
    replica = Replica(tmp_path, fake_url, name=name, instance_id=f"replica-{name}", **settings)
    replica.env.update(S3_ENV)
    return replica


async def owners(database_url: str, tmp_path) -> dict[str, str]:
    """call id -> the replica (instance id) that holds it, read from the shared database."""
    store = await SqlCallStore.open(database_url, "reader", tmp_path)
    try:
        async with store.engine.connect() as conn:
            return {row.call_id: row.instance_id for row in await conn.execute(select(calls.c.call_id, calls.c.instance_id))}
    finally:
        await store.close()


async def webhooks_pending(database_url: str, tmp_path) -> int:
    """Webhook jobs in the shared outbox not yet delivered (nor given up)."""
    store = await SqlCallStore.open(database_url, "reader", tmp_path)
    try:
        return sum(1 for job in await store.jobs() if job["next_attempt_at"] is not None)
    finally:
        await store.close()


async def webhook_report(database_url: str, tmp_path, call_ids, replicas=()) -> str:
    """Why these calls' webhooks have not come (for a failing test): each call's record status
    and owner, its outbox jobs, and what the replicas logged about it."""
    held_by = await owners(database_url, tmp_path)
    store = await SqlCallStore.open(database_url, "reader", tmp_path)
    lines = []
    try:
        for call_id in call_ids:
            record = await store.get(call_id)
            lines.append(f"{call_id}: {record.call_status.value if record else 'no record'} held by {held_by.get(call_id, '-')}")
            for job in await store.jobs(call_id):
                due = job["next_attempt_at"]
                lines.append(
                    f"  job {job['id']} {job['event']}: attempts {job['attempts']}, "
                    f"{'delivered' if job['delivered_at'] else f'due in {(due - now_ms()) / 1000:.1f} s' if due else 'given up'}, "
                    f"leased by {job['leased_by']}, last error {job['last_error']}"
                )
    finally:
        await store.close()
    for replica in replicas:
        log = replica.log_path.read_text() if replica.log_path.exists() else ""
        lines += [f"  [{replica.log_path.stem}] {line}" for line in log.splitlines() if any(c and c in line for c in call_ids) or "webhook" in line]
    return "\n".join(lines)


async def read_record(database_url: str, tmp_path, call_id: str):
    store = await SqlCallStore.open(database_url, "reader", tmp_path)
    try:
        return await store.get(call_id)
    finally:
        await store.close()
