"""The rate at which this instance asks Twilio to place calls (Twilio's default account limit is
1 call per second): callers queue in order, and one that would wait too long is refused."""

from __future__ import annotations

import asyncio
import time


class TooManyCalls(Exception):
    """The dial queue is longer than the caller may wait (the API answers 429)."""


class DialThrottle:
    """At most ``rate`` starts a second; waiters queue in order."""

    def __init__(self, rate: float):
        self.rate = rate
        self.interval = 1.0 / rate
        self.next_slot = 0.0
        self.lock = asyncio.Lock()

    async def wait(self, max_wait: float) -> None:
        async with self.lock:
            now = time.monotonic()
            slot = max(now, self.next_slot)
            if slot - now > max_wait:
                raise TooManyCalls(f"too many calls: Twilio accepts {self.rate:g} a second; try again shortly")
            self.next_slot = slot + self.interval
        await asyncio.sleep(slot - now)


class SharedDialThrottle:
    """The same rate across every replica sharing the database: each start takes the next slot
    of one shared schedule (``SqlCallStore.take_slot``, on the database's clock), so N replicas
    together start at most ``rate`` calls a second, in the order they asked."""

    def __init__(self, store, rate: float, name: str):
        self.store = store
        self.rate = rate
        self.name = name

    async def wait(self, max_wait: float) -> None:
        delay = await self.store.take_slot(self.name, 1.0 / self.rate, max_wait)
        if delay is None:
            raise TooManyCalls(f"too many calls: Twilio accepts {self.rate:g} a second; try again shortly")
        await asyncio.sleep(delay)
