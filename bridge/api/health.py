"""Health for load balancers and orchestrators (docs/operations.md):

- ``GET /livez``: the process and its event loop are alive. The loop's own ticker
  (``LoopWatch``) must have run within ``STALL_S``: a loop that was blocked answers 503 once it
  can answer at all, and a loop blocked for good answers nothing (the probe's timeout fails it).
- ``GET /readyz``: this replica should get new calls: the call store answers, the replica is
  not draining (SIGTERM), and it relays fewer than ``max_live_calls``. 503 with the reasons
  otherwise.
- ``GET /healthz``: the old name of ``/livez``.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .deps import call_service

router = APIRouter(tags=["health"])  # (each answers HEAD too: load balancers may probe with it)

TICK_S = 0.5
STALL_S = 5.0  # the loop late by this much is not alive
STORE_TIMEOUT_S = 2.0


class LoopWatch:
    """Ticks on the event loop; ``lag_s`` is how late the last tick ran, ``since_tick_s`` how
    long ago it ran."""

    def __init__(self) -> None:
        self.last_tick = time.monotonic()
        self.lag_s = 0.0

    async def run(self) -> None:
        while True:
            expected = time.monotonic() + TICK_S
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            self.lag_s = max(0.0, now - expected)
            self.last_tick = now

    def since_tick_s(self) -> float:
        return time.monotonic() - self.last_tick


@router.get("/livez", summary="The process and its event loop are alive")
@router.head("/livez", include_in_schema=False)
@router.get("/healthz", summary="The old name of /livez")
@router.head("/healthz", include_in_schema=False)
async def livez(request: Request) -> JSONResponse:
    watch: LoopWatch = request.app.state.loop_watch
    late = max(watch.since_tick_s() - TICK_S, watch.lag_s)
    body = {"status": "ok" if late < STALL_S else "stalled", "loop_lag_ms": round(watch.lag_s * 1000, 1)}
    return JSONResponse(body, status_code=200 if late < STALL_S else 503)


@router.get("/readyz", summary="This replica takes new calls")
@router.head("/readyz", include_in_schema=False)
async def readyz(request: Request) -> JSONResponse:
    calls = call_service(request)
    problems = []
    if calls.draining:
        problems.append("draining")
    limit = calls.settings.max_live_calls
    if limit is not None and calls.live_calls >= limit:
        problems.append(f"{calls.live_calls} live calls (max_live_calls {limit})")
    try:
        async with asyncio.timeout(STORE_TIMEOUT_S):
            await calls.store.ping()
    except Exception as e:  # any failure to answer is "not ready"
        problems.append(f"call store unavailable: {type(e).__name__}")
    body = {"status": "not ready" if problems else "ready", "live_calls": calls.live_calls, "problems": problems}
    return JSONResponse(body, status_code=503 if problems else 200)
