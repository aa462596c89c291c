"""``ControlChannel``: live-call commands between replicas, through the database they share.

A command (stop-call today) is sent to every replica with PostgreSQL's ``NOTIFY``; the replica
relaying the call acts on it, the others ignore it. Each replica listens on one dedicated
connection (asyncpg, outside SQLAlchemy's pool, which would recycle it); when that connection is
lost it is made again within a second, and a command sent meanwhile is lost, so senders check
the call's record and repeat (``CallService.stop``). On SQLite (one process) a command goes
straight to this process's own handler.

Measured on loopback (``tests/bridge/test_many_replicas.py``): a stop-call sent to one replica
ends a call relayed by another in tens of milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

CHANNEL = "bridge_control"
RECONNECT_S = 1.0
PING_S = 5.0  # a listening connection that does not answer this often is made again

NOTIFY = text("SELECT pg_notify(:channel, :payload)")

Command = dict[str, Any]


class ControlChannel:
    def __init__(self, engine: AsyncEngine, on_command: Callable[[Command], None]):
        self.engine = engine
        self.on_command = on_command
        self.shared = engine.dialect.name == "postgresql"
        #: the listening connection is up (a command sent now reaches this replica)
        self.listening = asyncio.Event()

    async def send(self, command: Command) -> None:
        """Send ``command`` (JSON, under 8000 bytes) to every replica, this one included."""
        if not self.shared:
            self._deliver(command)
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
