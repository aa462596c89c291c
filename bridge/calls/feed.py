"""The call-events feed behind the dashboard's live view (``GET /v2/call-events``): every call
that is created, changes status or ends, on whichever replica, read from the database the
replicas share.

One poller per process, running only while someone subscribes: every ``feed_interval_s`` it
reads the live calls (registered or ongoing) and the calls that ended since its last read, and
hands each subscriber the calls that changed. A subscriber is a bounded queue: one that does not
keep up (a stalled browser) is dropped, never waited for, and reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..models import CallRecord, now_ms

log = logging.getLogger(__name__)

#: Events a subscriber may have waiting; more, and it is dropped (it reconnects with a snapshot)
MAX_PENDING = 1000
#: The "ended since" window reaches this far back before the last read: a call that ended on
#: another replica's clock a little behind ours is not missed (seen twice is harmless)
CLOCK_SLACK_MS = 5000
DROPPED = object()  # what a dropped subscriber reads last


def _state(record: CallRecord) -> tuple:
    """What makes a call's row in the dashboard change."""
    return (record.call_status, record.start_timestamp, record.end_timestamp, record.disconnection_reason)


class Subscription:
    """One subscriber: ``snapshot`` (the live calls when it subscribed), then ``next()``."""

    def __init__(self, snapshot: list[dict[str, Any]]):
        self.snapshot = snapshot
        self.queue: asyncio.Queue = asyncio.Queue(MAX_PENDING + 1)
        self.dropped = False

    def put(self, event: dict[str, Any]) -> None:
        if self.dropped:
            return
        if self.queue.qsize() >= MAX_PENDING:
            self.dropped = True
            self.queue.put_nowait(DROPPED)
            return
        self.queue.put_nowait(event)

    async def next(self, timeout_s: float) -> dict[str, Any] | None:
        """The next changed call (its public object), or None after ``timeout_s`` with none.
        Raises ``OverflowError`` once the subscriber was dropped for falling behind."""
        try:
            event = await asyncio.wait_for(self.queue.get(), timeout_s)
        except TimeoutError:
            return None
        if event is DROPPED:
            raise OverflowError(f"over {MAX_PENDING} call events unread")
        return event


class CallFeed:
    """``read(since_ms)`` gives the live calls and those ended since (``SqlCallStore.
    live_and_ended_since``), ``get(call_id)`` one call."""

    def __init__(
        self, read: Callable[[int], Awaitable[tuple[list[CallRecord], list[CallRecord]]]],
        get: Callable[[str], Awaitable[CallRecord | None]], interval_s: float,
    ):  # fmt: skip
        self._read_calls, self._get, self.interval_s = read, get, interval_s
        self._subscribers: set[Subscription] = set()
        self._task: asyncio.Task | None = None
        self._known: dict[str, tuple] = {}  # live calls at the last read: call id -> _state
        self._ended_seen: set[str] = set()  # calls the last read saw ended
        self._snapshot: dict[str, dict[str, Any]] = {}  # the live calls' public objects
        self._since_ms = 0
        self._ready: asyncio.Event | None = None
        self.failing: str | None = None  # the last read's error, while reads fail

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def subscribe(self) -> Subscription:
        """A new subscriber, with the live calls as of the latest read."""
        if self._task is None or self._task.done():
            self._ready = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="call-feed")
        await self._ready.wait()
        if self.failing:
            raise ConnectionError(self.failing)
        subscription = Subscription(list(self._snapshot.values()))
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        self._known, self._snapshot, self._ended_seen = {}, {}, set()
        self._since_ms = now_ms() - CLOCK_SLACK_MS
        interval = self.interval_s
        first = True
        idle_since: float | None = None
        while True:
            started = time.monotonic()
            try:
                await self._read(first)
                self.failing = None
            except Exception as e:  # the database is away: subscribers wait, the feed goes on
                if self.failing is None:
                    log.warning("call-events feed: cannot read the calls: %s", e)
                self.failing = f"the call store does not answer: {type(e).__name__}"
            if first:
                first = False
                self._ready.set()
            if self._subscribers:
                idle_since = None
            elif idle_since is None:
                idle_since = started
            elif started - idle_since > 10 * interval:  # nobody listens: stop reading
                self._task = None
                return
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _read(self, first: bool) -> None:
        read_at = now_ms()
        live, ended = await self._read_calls(self._since_ms)
        self._since_ms = read_at - CLOCK_SLACK_MS
        changed: list[CallRecord] = []
        now_live: dict[str, tuple] = {}
        for record in live:
            state = now_live[record.call_id] = _state(record)
            if self._known.get(record.call_id) != state:
                changed.append(record)
        for record in ended:  # ended since the last read (or just before: seen again, unchanged)
            if record.call_id in self._known or record.call_id not in self._ended_seen:
                changed.append(record)
        gone = set(self._known) - set(now_live) - {r.call_id for r in ended}
        self._known = now_live
        self._ended_seen = {r.call_id for r in ended}
        self._snapshot = {r.call_id: r.public() for r in live}
        for call_id in gone:  # left the live set without an ending in the window: deleted, or ended long ago
            record = await self._get(call_id)
            if record is not None:
                changed.append(record)
        if first:
            return
        for record in changed:
            event = record.public()
            for subscription in list(self._subscribers):
                subscription.put(event)
