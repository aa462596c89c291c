"""``ControlChannel``: live-call commands between replicas.

A command (stop-call, a control request, how a call ended) is sent to every replica; the
replica relaying the call acts on it, the others ignore it. Two transports:

- PostgreSQL's ``NOTIFY``, for replicas sharing the database: each replica listens on one
  dedicated connection (asyncpg, outside SQLAlchemy's pool, which would recycle it); when that
  connection is lost it is made again within a second;
- UDP datagrams on loopback, for the workers of one ``bridge serve --workers N`` on SQLite
  (``WorkerGroup``): each worker listens on 127.0.0.1 at its private port, each datagram is
  signed (HMAC-SHA256 with a key of the shared secrets: another local process cannot forge a
  stop), and a worker being restarted misses what is sent meanwhile.

Either way a command can be lost (a connection being made again, a worker restarting), so
senders check the call's record and repeat (``CallService.stop``). On SQLite with one process a
command goes straight to this process's own handler.

Measured on loopback (``tests/bridge/test_many_replicas.py``, ``tests/bridge/test_workers.py``): a
stop-call sent to one replica or worker ends a call relayed by another in tens of milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

CHANNEL = "bridge_control"
RECONNECT_S = 1.0
PING_S = 5.0  # a listening connection that does not answer this often is made again

NOTIFY = text("SELECT pg_notify(:channel, :payload)")

Command = dict[str, Any]


#: what a worker's socket may hold unread (commands come in bursts: a drain's endings)
WORKER_RECEIVE_BUFFER = 1 << 20
MAC_BYTES = 32


@dataclass(frozen=True)
class WorkerGroup:
    """The workers of one machine (``bridge serve --workers N``): ``me`` and every worker's
    private address (``http://HOST:PORT``; each listens for commands on UDP 127.0.0.1:PORT),
    and the key that signs their commands."""

    me: str
    addresses: tuple[str, ...]
    key: bytes

    @staticmethod
    def port(address: str) -> int:
        return urlsplit(address).port or 80

    def sign(self, payload: bytes) -> bytes:
        return hmac.new(self.key, payload, hashlib.sha256).digest() + payload

    def verify(self, datagram: bytes) -> bytes | None:
        mac, payload = datagram[:MAC_BYTES], datagram[MAC_BYTES:]
        return payload if hmac.compare_digest(mac, hmac.new(self.key, payload, hashlib.sha256).digest()) else None


class ControlChannel:
    def __init__(self, engine: AsyncEngine, on_command: Callable[[Command], None], workers: WorkerGroup | None = None):
        self.engine = engine
        self.on_command = on_command
        self.workers = workers if engine.dialect.name != "postgresql" else None
        #: commands reach other processes (replicas on PostgreSQL, or this machine's workers)
        self.shared = engine.dialect.name == "postgresql" or self.workers is not None
        #: the listening connection is up (a command sent now reaches this replica)
        self.listening = asyncio.Event()
        self._socket: socket.socket | None = None

    async def send(self, command: Command) -> None:
        """Send ``command`` (JSON, under 8000 bytes) to every replica, this one included."""
        if not self.shared:
            self._deliver(command)
            return
        if self.workers is not None:
            self._send_to_workers(command)
            return
        async with self.engine.begin() as conn:
            await conn.execute(
                NOTIFY, {"channel": CHANNEL, "payload": json.dumps(command, separators=(",", ":"))}
            )

    def _deliver(self, command: Command) -> None:
        try:
            self.on_command(command)
        except Exception:  # a bad command never ends the listener
            log.exception("control command %s failed", command)

    def _send_to_workers(self, command: Command) -> None:
        payload = json.dumps(command, separators=(",", ":")).encode()
        datagram = self.workers.sign(payload)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
            out.setblocking(False)
            for address in self.workers.addresses:
                if address == self.workers.me:
                    continue
                try:
                    out.sendto(datagram, ("127.0.0.1", WorkerGroup.port(address)))
                except OSError as e:  # (a full buffer: the command is lost, as on a reconnect)
                    log.warning("control channel: not sent to worker %s: %s", address, e)
        self._deliver(command)

    def _read_datagrams(self) -> None:
        while True:
            try:
                datagram = self._socket.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("control channel: %s", e)
                return
            payload = self.workers.verify(datagram)
            if payload is None:
                log.error("control channel: a datagram not signed with the workers' key (dropped)")
                continue
            self._received(None, None, None, payload.decode("utf-8", "replace"))

    async def _listen_to_workers(self, stopping: Callable[[], bool]) -> None:
        port = WorkerGroup.port(self.workers.me)
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, WORKER_RECEIVE_BUFFER)
                sock.bind(("127.0.0.1", port))
                break
            except OSError as e:  # (another program holds the port: the other workers cannot reach this one)
                sock.close()
                log.error("control channel: cannot listen on UDP 127.0.0.1:%d: %s (trying again)", port, e)
                if stopping():
                    return
                await asyncio.sleep(RECONNECT_S)
        sock.setblocking(False)
        self._socket = sock
        loop = asyncio.get_running_loop()
        loop.add_reader(sock, self._read_datagrams)
        self.listening.set()
        try:
            while not stopping():
                await asyncio.sleep(PING_S)
        finally:
            loop.remove_reader(sock)
            self.listening.clear()
            sock.close()

    def _received(self, _conn, _pid, _channel, payload: str) -> None:
        try:
            command = json.loads(payload)
        except ValueError:
            log.error("control channel: not JSON: %.200s", payload)
            return
        if isinstance(command, dict):
            self._deliver(command)

    async def run(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """Listen until cancelled (a background job): reconnect whenever the connection is lost."""
        if not self.shared:
            self.listening.set()
            return
        if self.workers is not None:
            await self._listen_to_workers(stopping)
            return
        import asyncpg

        # the engine's own connect arguments (ssl and other asyncpg options in the URL's query)
        _, options = self.engine.dialect.create_connect_args(self.engine.url)
        while not stopping():
            conn = None
            try:
                conn = await asyncpg.connect(**{**options, "timeout": 5})
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._received)
                self.listening.set()
                while not lost.is_set() and not stopping():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), PING_S)
                    if not lost.is_set():
                        await conn.fetchval("SELECT 1", timeout=PING_S)
                log.warning("control channel: the listening connection was lost: listening again")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the database is restarting or unreachable: try again soon
                log.warning("control channel: cannot listen: %s: %s", type(e).__name__, e)
            finally:
                self.listening.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)
            await asyncio.sleep(RECONNECT_S)
