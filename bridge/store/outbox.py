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

from ..models import CallRecord, now_ms

log = logging.getLogger(__name__)

ANALYZE = "analyze"
MAX_IN_FLIGHT = 32


def _plain(value):
    """Whole floats as integers, as JavaScript writes them (120.0 -> 120)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def body_text(payload) -> str:
    """The body exactly as ``JSON.stringify(req.body)`` re-serialises it (compact, UTF-8, whole
    floats as integers), so receivers that verify a re-serialised body, as Retell's examples
    do, get the same bytes the signature covers."""
    return json.dumps(_plain(payload), separators=(",", ":"), ensure_ascii=False)


def sign(body: str, key: str, timestamp_ms: int | None = None) -> str:
    """``x-retell-signature``: ``v=<ms>,d=<hex HMAC-SHA256(key, body + str(ms))>``."""
    ms = now_ms() if timestamp_ms is None else timestamp_ms
    digest = hmac.new(key.encode(), (body + str(ms)).encode(), hashlib.sha256).hexdigest()
    return f"v={ms},d={digest}"


def webhook_targets(settings):
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
    def __init__(self, store, settings, http: httpx.AsyncClient, on_failure=None):
        self.store, self.settings, self.http = store, settings, http
        self.on_failure = on_failure  # on_failure(event): a failed attempt (metrics)
        self.key = settings.webhook_signing_key or (settings.api_keys[0] if settings.api_keys else "")
        self.jobs_for = webhook_targets(settings)
        self.in_flight: set[asyncio.Task] = set()

    async def run(self) -> None:
        """Claim due jobs and deliver each in its own task (at most ``MAX_IN_FLIGHT``), so a slow
        receiver never holds up the others. A job's lease outlasts its attempt and the time to
        record it (retried while the database is away), so no other replica delivers it while
        this one still might."""
        lease_s = 2 * self.settings.webhook_timeout_s + 10
        lease_ms = int(lease_s * 1000)
        loop = asyncio.get_running_loop()
        in_flight = self.in_flight
        while True:
            jobs = []
            if len(in_flight) < MAX_IN_FLIGHT:
                try:
                    jobs = await self.store.claim_due(lease_ms, limit=MAX_IN_FLIGHT - len(in_flight))
                except Exception:  # the database may be restarting: try again shortly
                    log.exception("webhook outbox unavailable")
            lease_end = loop.time() + lease_s - 1  # (claimed just now)
            for job in jobs:
                task = asyncio.create_task(self._attempt(job, lease_end))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if not jobs:
                await asyncio.sleep(self.settings.webhook_poll_s)

    async def stop(self, dispatching: asyncio.Task, timeout_s: float) -> int:
        """Stop claiming jobs (``dispatching`` is the task running ``run``) and let the attempts
        under way finish and be recorded, for at most ``timeout_s``: before this replica's
        heartbeat stops, so no other replica takes a job over (and sends it again) while this
        one may still deliver it. Returns the attempts left unfinished."""
        dispatching.cancel()
        await asyncio.wait([dispatching, *self.in_flight], timeout=timeout_s)
        for task in self.in_flight:  # (their jobs' leases run out, and another replica sends them)
            task.cancel()
        return len(self.in_flight)

    async def flush(self, timeout_s: float) -> int:
        """Before the process exits (``run`` still running): wait until no job is due and none
        is being delivered, for at most ``timeout_s``. Returns the jobs still due (a retry whose
        time has not come stays in the outbox, for another replica or the next start)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        due = 0
        while loop.time() < deadline:
            try:
                due = await self.store.outbox_due()
            except Exception:  # the database is away: what is in the outbox stays there
                log.exception("webhook outbox unavailable while flushing")
                return -1
            if not due and not self.in_flight:
                return 0
            await asyncio.sleep(0.1)
        return due + len(self.in_flight)

    async def _attempt(self, job: dict, lease_end: float) -> None:
        try:
            async with asyncio.timeout(self.settings.webhook_timeout_s):  # the whole attempt
                if job["event"] == ANALYZE:
                    await self._analyze(job)
                else:
                    await self._post(job["url"], body_text(job["payload"]), job)
        except Exception as e:  # noqa: BLE001 - any failure is retried, and recorded
            attempts = job["attempts"] + 1
            retry_at = None
            if attempts < self.settings.webhook_max_attempts:
                retry_at = now_ms() + int(self.settings.webhook_retry_base_s * 1000 * 2 ** (attempts - 1))
            log.warning("webhook %s for %s failed (attempt %d): %s", job["event"], job["call_id"], attempts, e)
            if self.on_failure is not None:
                self.on_failure(job["event"])
            error = f"{type(e).__name__}: {e}"
            await self._settle(lambda: self.store.job_failed(job["id"], attempts, retry_at, error), lease_end)
        else:
            await self._settle(lambda: self.store.job_done(job["id"]), lease_end)

    async def _settle(self, update, deadline: float) -> None:
        """Record an attempt (``update()`` makes the store call), retrying while the database
        is unreachable, for as long as the job's lease lasts: a delivered event is then not
        delivered again because the database was away when it went out. (Past the lease the
        job is tried again: at least once, never lost.)"""
        wait = 0.25
        while True:
            try:
                await update()
                return
            except Exception:
                if asyncio.get_running_loop().time() + wait > deadline:
                    log.exception("could not record a webhook attempt: the job will be tried again")
                    return
                await asyncio.sleep(wait)
                wait = min(wait * 2, 2.0)

    async def _post(self, url: str, body: str, job: dict) -> httpx.Response:
        headers = {
            "content-type": "application/json",
            "x-retell-signature": sign(body, self.key),
            "x-bridge-event-id": f"{job['call_id']}:{job['event']}:{job['id']}",  # for deduplication
        }
        response = await self.http.post(url, content=body.encode("utf-8"), headers=headers, timeout=self.settings.webhook_timeout_s)
        if not 200 <= response.status_code < 300:
            raise RuntimeError(f"{url} answered {response.status_code}")
        return response

    async def _analyze(self, job: dict) -> None:
        record = await self.store.get(job["call_id"])
        if record is None:  # deleted meanwhile: nothing to analyse
            return
        body = body_text({"event": "call_ended", "call": record.public()})
        response = await self._post(job["url"], body, job)
        analysis = response.json()
        if not isinstance(analysis, dict):
            raise RuntimeError("the analysis endpoint did not answer a JSON object")
        analysis = analysis.get("call_analysis", analysis)
        updated = await self.store.update(record.call_id, call_analysis=analysis)
        await self.store.enqueue(updated, self.jobs_for("call_analyzed", updated))
