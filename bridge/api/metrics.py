"""``GET /metrics``: the Prometheus text format (``bridge.metrics``; docs/operations.md). On the
main port it needs the API key (Prometheus: ``authorization: {credentials: KEY}``); with
``metrics_port`` set, the same metrics are also served without it on that port, for a scraper
inside the cluster. A worker of ``bridge serve --workers N`` answers for them all
(``bridge.metrics.merge_expositions``); ``?scope=worker`` is its own alone."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request, Response

from ..metrics import CONTENT_TYPE_LATEST, all_workers_exposition
from .deps import AUTH, call_service

log = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])

OUTBOX_REFRESH_S = 5.0


@router.get("/metrics", dependencies=AUTH, summary="Prometheus metrics")
async def metrics(request: Request, scope: str = "bridge") -> Response:
    calls = call_service(request)
    others = other_workers(calls.settings)
    if scope == "worker" or not others:
        return Response(calls.metrics.render(), media_type=CONTENT_TYPE_LATEST)
    body = await asyncio.to_thread(all_workers_exposition, calls.metrics, others, (calls.settings.api_keys or [None])[0])
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def other_workers(settings) -> list[str]:
    """The private addresses of this process's sibling workers (none for a single process)."""
    if settings.workers < 2:
        return []
    return [a for a in settings.worker_addresses if a != settings.replica_url]


async def refresh_outbox_gauges(calls) -> None:
    """The webhook outbox's depth and oldest age, read from the store every OUTBOX_REFRESH_S
    (a scrape never waits on the database)."""
    metrics = calls.metrics
    while True:
        try:
            async with asyncio.timeout(OUTBOX_REFRESH_S):
                depth, oldest_ms = await calls.store.outbox_backlog()
            metrics.outbox_depth.set(depth)
            metrics.outbox_oldest.set((oldest_ms or 0) / 1000)
        except Exception as e:  # the database may be away: the gauges keep their last value
            log.warning("webhook outbox gauges not refreshed: %s: %s", type(e).__name__, e)
        await asyncio.sleep(OUTBOX_REFRESH_S)
