"""Run an ASGI app with uvicorn inside the current event loop (the demo, the simulator's fake
Twilio API and the tests use it to serve on a free loopback port)."""

from __future__ import annotations

import asyncio
import logging
import re

import uvicorn

from .protocol.websocket import MAX_MESSAGE_BYTES


def ws_protocol(app):
    """The app's own websocket protocol if it has one (the bridge's media stream), else
    uvicorn's websockets implementation."""
    state = getattr(app, "state", None)
    return getattr(state, "ws_protocol", None) or "websockets-sansio"


#: query parameters that carry secrets: web-call access tokens, the echo agent's key
SECRET_PARAMETER = re.compile(r"\b(access_token|token|key)=[^&\s\"']+")


class RedactSecrets(logging.Filter):
    """Replaces secrets in logged URLs (uvicorn's access log and websocket lines name the full
    path with its query) with ``[redacted]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(
                SECRET_PARAMETER.sub(r"\1=[redacted]", a) if isinstance(a, str) else a for a in record.args
            )
        elif isinstance(record.msg, str):
            record.msg = SECRET_PARAMETER.sub(r"\1=[redacted]", record.msg)
        return True


def redact_secrets_in_logs() -> None:
    """Install ``RedactSecrets`` on uvicorn's loggers (after uvicorn has configured them)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())


def websocket_options(app) -> dict:
    """uvicorn's websocket options for ``app``: its own protocol for the media stream, and the
    media stream's message cap on every other websocket too (web calls; uvicorn's default is
    16 MiB)."""
    return {"ws": ws_protocol(app), "ws_max_size": MAX_MESSAGE_BYTES}


class BackgroundServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, lifespan: str = "on"):
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan=lifespan, timeout_graceful_shutdown=1,
            **websocket_options(app),
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.host = host
        self._task: asyncio.Task | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> str:
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("server stopped during start-up")
            await asyncio.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self.base_url

    async def stop(self) -> None:
        if self._task is not None:
            self.server.should_exit = True
            await self._task
            self._task = None

    async def __aenter__(self) -> BackgroundServer:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
