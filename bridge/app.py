"""The FastAPI application, wired: build the call service and the recording writer, mount the
routes and the two live-call sockets, and start the background jobs. No behaviour of its own."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

from fastapi import FastAPI
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from audio.filters import plan

from .api import calls, control, dashboard, health, live, metrics, outbound, twilio_voice, unserved, web_calls
from .api.deps import MAX_FORM_BYTES, RequestGate
from .api.errors import install_error_handlers
from .calls import CallService
from .media import connection
from .media.file_writer import FileWriter
from .media.listen import handle_listen_live
from .media.relay import AUDIO_WEBSOCKET_PREFIX, WEB_CALL_PREFIX, handle_audio_websocket, handle_media_stream, handle_web_call
from .protocol.listen import LISTEN_PREFIX
from .protocol.twilio import MEDIA_PATH
from .server import redact_secrets_in_logs
from .settings import Settings, SettingsError, load_settings
from .store import WebhookDispatcher

log = logging.getLogger(__name__)
BACKGROUND_STOP_S = 5.0  # how long the background jobs get to stop when the app does


def _design(rate: int) -> None:
    plan(8000, rate), plan(rate, 8000)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    call_service = CallService(settings)
    files = FileWriter()  # recordings' writes, off the event loop
    loop_watch = health.LoopWatch()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for agent in settings.agents.values():  # design every filter before the first call
            rates = {f.sample_rate for f in agent.formats}
            if agent.protocol.value == "elevenlabs-agent":  # (its formats are its own settings: any of these)
                rates |= {16000, 22050, 24000, 44100, 48000}
            for rate in rates - {8000}:
                await asyncio.to_thread(_design, rate)
        redact_secrets_in_logs()  # (uvicorn has configured its loggers by now)
        try:
            await call_service.open()
        except SettingsError as e:  # uvicorn exits on its own; bridge serve says why in a line
            app.state.startup_error = str(e)
            raise
        failures = call_service.metrics.webhook_failures
        dispatcher = WebhookDispatcher(call_service.store, settings, call_service.http, on_failure=lambda event: failures.labels(event).inc())
        jobs = call_service.background_jobs() + [loop_watch.run(), metrics.refresh_outbox_gauges(call_service)]
        background = [asyncio.create_task(job) for job in jobs]
        dispatching = asyncio.create_task(dispatcher.run())
        metrics_server = None
        # Everything built so far (the app, its libraries, the store) lives as long as the
        # process: keep it out of the cyclic collector's full passes, which otherwise walk a
        # heap of ~1M objects and stall every call's audio for tens of ms.
        gc.collect()
        gc.freeze()
        try:
            # the metrics alone, without the API key, on their own port (by the first worker, for all)
            if settings.metrics_port is not None and settings.replica_url == (settings.worker_addresses or [settings.replica_url])[0]:
                from prometheus_client import CollectorRegistry, start_http_server

                from .metrics import AllWorkers

                registry = call_service.metrics.registry
                if others := metrics.other_workers(settings):
                    registry = CollectorRegistry(auto_describe=False)
                    registry.register(AllWorkers(call_service.metrics, others, (settings.api_keys or [None])[0]))
                metrics_server, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=registry)
            yield
        finally:
            # what the calls that just ended owe their webhooks goes out before the process does
            # (webhook_timeout_s + 5 s in all)
            flush_end = asyncio.get_running_loop().time() + settings.webhook_timeout_s + 5
            left = await dispatcher.flush(settings.webhook_timeout_s)
            if left:
                log.warning("%s webhook job(s) left in the outbox for the next start (or another replica)", left)
            # then the attempts under way finish while this replica still heartbeats: none is taken
            # over by another replica (and sent twice) because this one stopped heartbeating first
            unfinished = await dispatcher.stop(dispatching, max(1.0, flush_end - asyncio.get_running_loop().time()))
            if unfinished:
                log.warning("%d webhook attempt(s) cut off: another replica sends them again when their lease ends", unfinished)
            if metrics_server is not None:
                metrics_server.shutdown()
            call_service.stopping = True  # (loops that swallowed a cancellation end by this)
            for task in background:
                task.cancel()
            _, stuck = await asyncio.wait(background, timeout=BACKGROUND_STOP_S)
            for task in stuck:  # a library swallowed the cancellation mid-await: never hang the exit
                log.error("background job %s did not stop within %g s: left behind", task.get_coro(), BACKGROUND_STOP_S)
            await call_service.close()
            await asyncio.to_thread(files.stop)

    app = FastAPI(
        title="twilio-audio-bridge",
        summary="Twilio Media Streams <-> voice agent audio websockets, with a Retell-compatible call API",
        lifespan=lifespan,
        docs_url=None,  # served by the dashboard's router, from local assets (no CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.calls = call_service
    app.state.loop_watch = loop_watch
    install_error_handlers(app)
    # the key and the declared size are checked before any body is read; bodies sent in chunks
    # are cut off at the same cap while they are read (413 either way)
    app.add_middleware(RequestGate, settings=settings)
    app.include_router(twilio_voice.router, max_body_size=MAX_FORM_BYTES)
    app.include_router(control.twilio_router, max_body_size=MAX_FORM_BYTES)
    app.include_router(outbound.twilio_router, max_body_size=MAX_FORM_BYTES)
    for module in (calls, control, outbound, web_calls, live):
        app.include_router(module.router, max_body_size=settings.max_request_bytes)

    if any(agent.url is None for agent in settings.agents.values()):  # an agent is the embedded echo
        from .dev import echo_agent

        app.include_router(echo_agent.router)

    def live_call(handler):
        async def serve(websocket: connection.ServerConnection) -> None:
            call_service.sockets += 1  # (set-up included: the drain waits for these too)
            try:
                await handler(websocket, call_service, files)
            finally:
                call_service.sockets -= 1

        return serve

    async def listener(websocket: connection.ServerConnection) -> None:
        await handle_listen_live(websocket, call_service)

    # The live calls' sockets run on the bridge's own lean websocket protocol, handed to uvicorn
    # as its websocket implementation (``bridge serve`` and ``BackgroundServer`` do this):
    # ``uvicorn.Config(app, ws=app.state.ws_protocol)``. Other websockets go to the ASGI app.
    app.state.ws_protocol = connection.UpgradeProtocol.with_routes({
        MEDIA_PATH: live_call(handle_media_stream),
        AUDIO_WEBSOCKET_PREFIX: live_call(handle_audio_websocket),
        WEB_CALL_PREFIX: live_call(handle_web_call),
        LISTEN_PREFIX: listener,  # (not a live call: the drain does not wait for listeners)
    })  # fmt: skip

    async def live_call_on_plain_asgi(websocket: WebSocket) -> None:
        log.error("%s reached the ASGI app: serve with `bridge serve` (or uvicorn ws=app.state.ws_protocol)", websocket.url.path)
        await websocket.close(1011)

    for path in (MEDIA_PATH, AUDIO_WEBSOCKET_PREFIX + "{path:path}", WEB_CALL_PREFIX + "{path:path}", LISTEN_PREFIX + "{path:path}"):
        app.router.routes.append(WebSocketRoute(path, live_call_on_plain_asgi))

    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(dashboard.router)
    app.include_router(unserved.router)  # (last: retell-sdk methods with no route here answer 501, naming what is missing)
    dashboard.mount_assets(app)
    return app
