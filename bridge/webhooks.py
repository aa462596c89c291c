"""Call webhooks: ``call_started``, ``call_ended`` and ``call_analyzed``, signed like Retell's so
``retell.lib.verify(body, key, signature)`` accepts them.

Events are written to the outbox in the same transaction as the call change that causes them
(``SqlCallStore``), so a crash or restart loses none; ``WebhookDispatcher`` delivers them in the
background, never on the audio path: each attempt is leased (another replica retries a job only
if this one died holding it), has a 10 s timeout, and a failure is retried with exponential
backoff up to ``webhook_max_attempts``. With ``analysis_url`` set, an ended call is POSTed there
first; what comes back is stored as ``call_analysis`` and sent as ``call_analyzed``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging

import httpx

from .models import CallRecord, now_ms

log = logging.getLogger(__name__)

ANALYZE = "analyze"


def sign(body: str, key: str, timestamp_ms: int | None = None) -> str:
    """``x-retell-signature``: ``v=<ms>,d=<hex HMAC-SHA256(key, body + str(ms))>``."""
    ms = now_ms() if timestamp_ms is None else timestamp_ms
    digest = hmac.new(key.encode(), (body + str(ms)).encode(), hashlib.sha256).hexdigest()
    return f"v={ms},d={digest}"


def targets(settings):
    """The outbox jobs a call event queues: ``(event, record) -> [(event, url)]``."""

    def jobs(event: str, record: CallRecord) -> list[tuple[str, str]]:
        agent = settings.agents.get(record.agent_id)
        url = (agent.webhook_url if agent else None) or settings.webhook_url
        out = [(event, url)] if url else []
        if event == "call_ended" and settings.analysis_url:
            out.append((ANALYZE, settings.analysis_url))
        return out

    return jobs


class WebhookDispatcher:
    def __init__(self, store, settings, http: httpx.AsyncClient):
        self.store, self.settings, self.http = store, settings, http
        self.key = settings.webhook_signing_key or (settings.api_keys[0] if settings.api_keys else "")
        self.jobs_for = targets(settings)

    async def run(self) -> None:
        lease_ms = int((self.settings.webhook_timeout_s + 5) * 1000)
        while True:
            try:
                jobs = await self.store.claim_due(lease_ms)
            except Exception:  # the database may be restarting: try again shortly
                log.exception("webhook outbox unavailable")
                jobs = []
            if jobs:
                await asyncio.gather(*(self._attempt(job) for job in jobs))
            else:
                await asyncio.sleep(self.settings.webhook_poll_s)

    async def _attempt(self, job: dict) -> None:
        try:
            if job["event"] == ANALYZE:
                await self._analyze(job)
            else:
                await self._post(job["url"], json.dumps(job["payload"], separators=(",", ":")), job)
            await self.store.job_done(job["id"])
        except Exception as e:  # noqa: BLE001 - any failure is retried, and recorded
            attempts = job["attempts"] + 1
            retry_at = None
            if attempts < self.settings.webhook_max_attempts:
                retry_at = now_ms() + int(self.settings.webhook_retry_base_s * 1000 * 2 ** (attempts - 1))
            log.warning("webhook %s for %s failed (attempt %d): %s", job["event"], job["call_id"], attempts, e)
            await self.store.job_failed(job["id"], attempts, retry_at, f"{type(e).__name__}: {e}")

    async def _post(self, url: str, body: str, job: dict) -> httpx.Response:
        headers = {
            "content-type": "application/json",
            "x-retell-signature": sign(body, self.key),
            "x-bridge-event-id": f"{job['call_id']}:{job['event']}:{job['id']}",  # for deduplication
        }
        response = await self.http.post(url, content=body, headers=headers, timeout=self.settings.webhook_timeout_s)
        if not 200 <= response.status_code < 300:
            raise RuntimeError(f"{url} answered {response.status_code}")
        return response

    async def _analyze(self, job: dict) -> None:
        record = await self.store.get(job["call_id"])
        if record is None:  # deleted meanwhile: nothing to analyse
            return
        body = json.dumps({"event": "call_ended", "call": record.public()}, separators=(",", ":"))
        response = await self._post(job["url"], body, job)
        analysis = response.json()
        if not isinstance(analysis, dict):
            raise RuntimeError("the analysis endpoint did not answer a JSON object")
        analysis = analysis.get("call_analysis", analysis)
        updated = await self.store.update(record.call_id, call_analysis=analysis)
        await self.store.enqueue(updated, self.jobs_for("call_analyzed", updated))
