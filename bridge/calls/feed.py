"""The call-events feed behind the dashboard's live view (``GET /v2/call-events``): every call
that is created, changes status or ends, on whichever replica, read from the database the
replicas share.

One poller per process, running only while someone subscribes: every ``feed_interval_s`` it
reads the versions of the live calls and of the calls that ended since its last read, then the
summaries (``SqlCallStore.summaries``: a few hundred bytes a call, never the record) of those
that changed, and hands each subscriber the calls that changed. What the view holds:

- every ongoing call, newest first, up to MAX_ONGOING: calls only registered never push one out;
- the newest MAX_REGISTERED calls only registered (a campaign registering ahead, clients that
  never connect: the rest are not shown until they start or end);
- each ending once, up to MAX_ENDED a read.

A live call pushed out of the view by a cap comes once more, with ``"in_view": false``.

What a subscriber costs is bounded whatever the calls carry: each event is encoded once and
shared by every subscriber, and so is the snapshot a new one starts with; a subscriber is a
bounded queue, dropped (it reconnects with a snapshot) when MAX_PENDING events wait for it; the
stream that writes it to the network drops a reader that does not take a write within
``SLOW_READER_S`` (``bridge.api.live``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from ..models import now_ms

log = logging.getLogger(__name__)

#: Events a subscriber may have waiting; more, and it is dropped (it reconnects with a snapshot)
MAX_PENDING = 1000
#: The live view's caps (documented in docs/dashboard.md)
MAX_ONGOING = 10_000
MAX_REGISTERED = 200
MAX_ENDED = 2000
#: The "ended since" window reaches this far back before the last read: a call that ended on
#: another replica's clock a little behind ours is not missed (seen twice is harmless)
CLOCK_SLACK_MS = 5000
DROPPED = object()  # what a dropped subscriber reads last
#: A subscriber waits at most this long for the first read (a database that hangs, rather than
#: refusing, answers 503 instead of hanging the request)
FIRST_READ_TIMEOUT_S = 10.0

Versions = tuple[dict[str, int], dict[str, int]]
LIVE_STATUSES = ("registered", "ongoing")


def event_bytes(kind: str, data: Any) -> bytes:
    """One server-sent event."""
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class Subscription:
    """One subscriber: ``snapshot`` (the live calls when it subscribed, an encoded ``snapshot``
    event shared with every subscriber of that read), then ``next()``."""

    def __init__(self, snapshot: bytes):
        self.snapshot = snapshot
        self.queue: asyncio.Queue = asyncio.Queue(MAX_PENDING + 1)
        self.dropped = False

    def put(self, event: bytes) -> None:
        if self.dropped:
            return
        if self.queue.qsize() >= MAX_PENDING:
            self.dropped = True
            self.queue.put_nowait(DROPPED)
            return
        self.queue.put_nowait(event)

    async def next(self, timeout_s: float) -> bytes | None:
        """The next changed call (its ``call`` event, encoded), or None after ``timeout_s`` with
        none. Raises ``OverflowError`` once the subscriber was dropped for falling behind."""
        try:
            event = await asyncio.wait_for(self.queue.get(), timeout_s)
        except TimeoutError:
            return None
        if event is DROPPED:
            raise OverflowError(f"over {MAX_PENDING} call events unread")
        return event


class CallFeed:
    """``read(since_ms)`` gives the versions of the live calls and of those ended since
    (``SqlCallStore.live_and_ended_since``); ``summaries(call_ids)`` what the view shows of them.
    Only the calls that changed are read."""

    def __init__(
        self, read: Callable[[int], Awaitable[Versions]], summaries: Callable[[list[str]], Awaitable[list[dict[str, Any]]]],
        interval_s: float,
    ):  # fmt: skip
        self._read_versions, self._summaries, self.interval_s = read, summaries, interval_s
        self._subscribers: set[Subscription] = set()
        self._task: asyncio.Task | None = None
        self._live: dict[str, int] = {}  # the live calls at the last read: call id -> version
        self._ended_seen: dict[str, int] = {}  # the calls the last read saw ended
        self._snapshot: dict[str, dict[str, Any]] = {}  # the live calls' summaries
        self._snapshot_event: bytes | None = None  # encoded once per change, for new subscribers
        self._since_ms = 0
        self._ready: asyncio.Event | None = None
        self.failing: str | None = None  # the last read's error, while reads fail

    async def subscribe(self) -> Subscription:
        """A new subscriber, with the live calls as of the latest read. Raises
        ``ConnectionError`` while the calls cannot be read."""
        if self._task is None or self._task.done():
            self._ready = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="call-feed")
        try:
            await asyncio.wait_for(self._ready.wait(), FIRST_READ_TIMEOUT_S)
        except TimeoutError:
            raise ConnectionError(f"the call store did not answer within {FIRST_READ_TIMEOUT_S:g} s") from None
        if self.failing:
            raise ConnectionError(self.failing)
        if self._snapshot_event is None:
            self._snapshot_event = event_bytes("snapshot", {"calls": list(self._snapshot.values())})
        subscription = Subscription(self._snapshot_event)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        self._live, self._ended_seen, self._snapshot, self._snapshot_event = {}, {}, {}, None
        self._since_ms = now_ms() - CLOCK_SLACK_MS
        interval = self.interval_s
        first = True
        idle_since: float | None = None
        while True:
            started = time.monotonic()
            try:
                await self._read(first)
                self.failing = None
                first = False
            except Exception as e:  # the database is away: subscribers wait, the feed goes on
                if self.failing is None:
                    log.warning("call-events feed: cannot read the calls: %s", e)
                self.failing = f"the call store does not answer: {type(e).__name__}"
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
        live, ended = await self._read_versions(self._since_ms)
        changed = [c for c, v in live.items() if self._live.get(c) != v]
        changed += [c for c in ended if c not in self._ended_seen]  # (each ending once)
        gone = set(self._live) - set(live) - set(ended)  # deleted, ended before the window, or past a cap
        summaries = {s["call_id"]: s for s in await self._summaries(list(set(changed) | gone))} if changed or gone else {}
        self._since_ms = read_at - CLOCK_SLACK_MS
        self._live, self._ended_seen = live, ended
        before = len(self._snapshot)
        for call_id in set(self._snapshot) - set(live):
            del self._snapshot[call_id]
        for call_id in live:
            if call_id in summaries:
                self._snapshot[call_id] = summaries[call_id]
        if changed or len(self._snapshot) != before:
            self._snapshot_event = None  # (encoded again for the next subscriber)
        if first:
            return
        for call_id in [*changed, *gone]:
            summary = summaries.get(call_id)
            if summary is None:
                continue  # (deleted: nothing to show)
            if call_id in gone and summary["call_status"] in LIVE_STATUSES:
                summary = {**summary, "in_view": False}  # still live, but past a cap: out of the view
            event = event_bytes("call", summary)  # (once, shared by every subscriber)
            for subscription in list(self._subscribers):
                subscription.put(event)
