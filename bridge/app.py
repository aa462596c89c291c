"""The FastAPI application: the app's own wiring (``Services``), its routes and background jobs."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastapi import FastAPI
from starlette.routing import WebSocketRoute

from audio import repair_wav
from audio.filters import plan

from . import api, echo_agent, outbound, twilio_webhook, web_call
from .models import CallStatus, CallType, Direction, DisconnectionReason, now_ms
from .observer import percentiles
from .outbound import CallThrottle
from . import ws_io
from .file_writer import FileWriter
from .relay import MEDIA_PATH, handle_media_stream
from .session import CallSession
from .settings import Settings, load_settings
from .sql_store import SqlCallStore
from .tokens import StreamTokens
from .twilio_rest import TwilioRest
from .webhooks import WebhookDispatcher, targets

log = logging.getLogger(__name__)

MAX_SWEEP_INTERVAL_S = 2.0
OUTBOUND_RING_S = 120  # Twilio rings for 60 s by default; calls.create takes `timeout` up to 600
OUTBOX_KEEP_DAYS = 7


RESTART_DETAIL = "the bridge instance restarted while the call was live"


@dataclass
class Services:
    settings: Settings
    tokens: StreamTokens
    twilio_rest: TwilioRest
    store: SqlCallStore | None = None
    http: httpx.AsyncClient | None = None
    background: list[asyncio.Task] = field(default_factory=list)
    live_calls: dict[str, Callable[[DisconnectionReason, str], None]] = field(default_factory=dict)
    dial_throttle: CallThrottle | None = None
    web_tokens: StreamTokens | None = None
    file_writer: FileWriter = field(default_factory=FileWriter)  # recordings' writes, off the loop

    def stop_local_call(self, call_id: str, reason: DisconnectionReason, detail: str) -> bool:
        """Ask the relay of a call running in this process to end it; False if it is not here."""
        stop = self.live_calls.get(call_id)
        if stop is None:
            return False
        stop(reason, detail)
        return True

    def public_base(self, headers, request_base: str) -> str:
        """The base URL Twilio uses for us: configured, else trusted X-Forwarded-*, else the
        request's own (right on loopback, wrong behind a proxy: configure public_url there)."""
        if self.settings.public_url:
            return self.settings.public_url
        if self.settings.trust_forwarded_headers and headers.get("x-forwarded-host"):
            proto = headers.get("x-forwarded-proto", "https").split(",")[0].strip()
            return f"{proto}://{headers['x-forwarded-host'].split(',')[0].strip()}"
        return request_base.rstrip("/")

    async def note(self, call_id: str, text: str) -> None:
        await self.store.add_note(call_id, text)

    def recording_path(self, call_id: str) -> Path:
        return self.settings.data_dir / "recordings" / f"{call_id}.wav"

    def log_path(self, call_id: str) -> Path:
        return self.settings.data_dir / "logs" / f"{call_id}.jsonl"

    async def end_call(self, call_id: str, reason: DisconnectionReason, detail: str, session: CallSession) -> None:
        observer = session.observer
        observer.close()
        try:  # the recording is complete on disk before the record says the call ended
            await asyncio.wait_for(asyncio.wrap_future(self.file_writer.barrier()), 10)
        except TimeoutError:
            log.error("call %s: the recording's writes are still queued after 10 s", call_id)
        fields = {
            "e2e_latency": percentiles(observer.turn_latencies_ms),
            "llm_websocket_network_rtt_latency": percentiles(session.stats.rtt_ms),
        }
        if session.transcript and not observer.private:
            # word timings only if the agent sent them (the web protocol's update carries none)
            fields["transcript_object"] = [{**u, "words": u.get("words", [])} for u in session.transcript]
            fields["transcript"] = "".join(f"{u['role'].capitalize()}: {u['content']}\n" for u in session.transcript)
        if not observer.private and (session.transcript or session.stats.dtmf):
            fields["transcript_with_tool_calls"] = observer.woven_transcript(session.transcript)
        if detail:
            fields["error_detail"] = detail
        ended = await self.store.finish(call_id, reason, **fields)
        log.info("call %s ended: %s %s", call_id, reason.value, detail)
        if ended is None:  # ended elsewhere first (stop-call on another replica): keep what we measured
            fields.pop("error_detail", None)
            await self.store.update(call_id, **{k: v for k, v in fields.items() if v is not None})

    async def enforce_retention(self) -> None:
        """Hourly: delete recordings (and public logs) older than recording_retention_days, and
        webhook jobs settled more than OUTBOX_KEEP_DAYS ago."""
        while True:
            days = self.settings.recording_retention_days
            if days:
                cutoff = time.time() - days * 86400
                for folder, pattern in (("recordings", "*.wav"), ("logs", "*.jsonl")):
                    for path in (self.settings.data_dir / folder).glob(pattern):
                        with contextlib.suppress(FileNotFoundError):
                            if path.stat().st_mtime < cutoff:
                                path.unlink()
                                log.info("%s deleted (older than %g days)", path.name, days)
            try:
                await self.store.purge_outbox(now_ms() - OUTBOX_KEEP_DAYS * 86_400_000)
            except Exception:
                log.exception("outbox purge failed")
            await asyncio.sleep(3600)

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            try:
                await self.store.heartbeat()
            except Exception:  # the database may be restarting: keep serving, retry next time
                log.exception("heartbeat failed")

    async def sweep_registered(self) -> None:
        """Calls registered but never connected end as registered_call_timeout (web calls nobody
        joined as error_user_not_joined). An outbound call may ring for a while first: it gets
        OUTBOUND_RING_S more, and is hung up through Twilio when it is swept."""
        timeout_ms = int(self.settings.registered_call_timeout_s * 1000)
        while True:
            await asyncio.sleep(min(MAX_SWEEP_INTERVAL_S, self.settings.registered_call_timeout_s / 2))
            try:
                for record in await self.store.registered_before(now_ms() - timeout_ms):
                    await self._sweep(record, timeout_ms)
            except Exception:  # the database may be restarting: keep sweeping next time
                log.exception("sweep of registered calls failed")

    async def _sweep(self, record, timeout_ms: int) -> None:
        dialed = record.direction is Direction.outbound and record.twilio_call_sid
        if dialed and record.registered_at > now_ms() - timeout_ms - OUTBOUND_RING_S * 1000:
            return  # still ringing, perhaps
        web = record.call_type is CallType.web_call
        ended = await self.store.finish(  # unless its stream started meanwhile
            record.call_id,
            DisconnectionReason.error_user_not_joined if web else DisconnectionReason.registered_call_timeout,
            only_if=CallStatus.registered,
            error_detail=f"no media stream within {timeout_ms / 1000:g} s",
        )
        if ended is not None and dialed:
            await self.twilio_rest.hangup(record.twilio_call_sid, record.twilio_account_sid)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    if not settings.twilio_auth_token:
        raise ValueError("twilio_auth_token is required (set BRIDGE_TWILIO_AUTH_TOKEN)")
    services = Services(
        settings=settings,
        tokens=StreamTokens(settings.twilio_auth_token, settings.stream_token_ttl_s),
        twilio_rest=TwilioRest(settings.twilio_api_base_url, settings.twilio_auth_token, settings.twilio_account_sid),
        dial_throttle=CallThrottle(settings.twilio_calls_per_second),
        web_tokens=StreamTokens(settings.twilio_auth_token, settings.web_call_token_ttl_s, purpose="web"),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for agent in settings.agents.values():  # design every filter before the first call
            if agent.sample_rate != 8000:
                plan(8000, agent.sample_rate), plan(agent.sample_rate, 8000)
        store = await SqlCallStore.open(settings.database_url, settings.instance_id, settings.data_dir)
        store.webhook_targets = targets(settings)
        services.store = store
        for record in await store.recover(DisconnectionReason.error_unknown, RESTART_DETAIL):
            log.warning("call %s was live when this instance stopped: ended", record.call_id)
            path = services.recording_path(record.call_id)
            if path.exists():  # make what was recorded before the crash playable
                try:
                    repair_wav(path)
                except ValueError as e:
                    log.warning("recording %s cannot be repaired: %s", path, e)
        await store.release_leases()
        services.http = httpx.AsyncClient(timeout=10)
        services.background += [
            asyncio.create_task(services.sweep_registered()),
            asyncio.create_task(services.heartbeat()),
            asyncio.create_task(WebhookDispatcher(store, settings, services.http).run()),
            asyncio.create_task(services.enforce_retention()),
        ]
        # Everything built so far (the app, its libraries, the store) lives as long as the
        # process: keep it out of the cyclic collector's full passes, which otherwise walk a
        # heap of ~1M objects and stall every call's audio for tens of ms.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            for task in services.background:
                task.cancel()
            await asyncio.gather(*services.background, return_exceptions=True)
            await services.http.aclose()
            await services.twilio_rest.close()
            await store.close()
            await asyncio.to_thread(services.file_writer.stop)

    app = FastAPI(
        title="twilio-audio-bridge",
        summary="Twilio Media Streams <-> voice agent audio websockets, with a Retell-compatible call API",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.services = services
    api.install_error_handlers(app)
    app.include_router(twilio_webhook.router)
    app.include_router(api.router)
    app.include_router(outbound.router)
    app.include_router(web_call.router)
    app.include_router(echo_agent.router)

    async def twilio_media(connection: ws_io.ServerConnection) -> None:
        await handle_media_stream(connection, services)

    # The media stream runs on the bridge's own lean websocket protocol, handed to uvicorn as
    # its websocket implementation (``bridge serve`` and ``BackgroundServer`` do this):
    # ``uvicorn.Config(app, ws=app.state.ws_protocol)``. Other websockets go to the ASGI app.
    app.state.ws_protocol = ws_io.UpgradeProtocol.with_routes({MEDIA_PATH: twilio_media})

    async def media_on_plain_asgi(scope, receive, send) -> None:
        log.error("%s reached the ASGI app: serve with `bridge serve` (or uvicorn ws=app.state.ws_protocol)", MEDIA_PATH)
        await send({"type": "websocket.close", "code": 1011})

    app.router.routes.append(WebSocketRoute(MEDIA_PATH, media_on_plain_asgi))

    @app.get("/healthz", include_in_schema=False)
    async def health() -> dict:
        return {"status": "ok"}

    return app
