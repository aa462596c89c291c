"""``GET /metrics``: the Prometheus text format (``bridge.metrics``; docs/operations.md). On the
main port it needs the API key (Prometheus: ``authorization: {credentials: KEY}``); with
``metrics_port`` set, the same metrics are also served without it on that port, for a scraper
inside the cluster."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request, Response

from ..metrics import CONTENT_TYPE_LATEST
from .deps import AUTH, call_service

log = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])

OUTBOX_REFRESH_S = 5.0


@router.get("/metrics", dependencies=AUTH, summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    return Response(call_service(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


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
