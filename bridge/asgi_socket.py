"""The few websocket calls the relay makes, straight on ASGI.

Starlette's ``WebSocket`` runs every message through state checks and an exception-handling
wrapper (10-15 % of the bridge's CPU under load). The media stream is served as a plain ASGI
endpoint instead, through this adapter with the same method names the relay uses."""

from __future__ import annotations

from starlette.datastructures import URL, Headers
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketDisconnect


class AsgiWebSocket:
    def __init__(self, scope, receive, send):
        self.scope, self._receive, self._send = scope, receive, send
        self.headers = Headers(scope=scope)
        self.url = URL(scope=scope)
        self.base_url = HTTPConnection(scope).base_url
        self.closed = False

    async def accept(self) -> None:
        message = await self._receive()
        if message["type"] != "websocket.connect":
            self.closed = True
            raise WebSocketDisconnect(1006)
        await self._send({"type": "websocket.accept"})

    async def receive(self) -> dict:
        message = await self._receive()
        if message["type"] == "websocket.disconnect":
            self.closed = True
        return message

    async def send_text(self, text: str) -> None:
        await self._send({"type": "websocket.send", "text": text})

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Before accept this refuses the upgrade (HTTP 403)."""
        if not self.closed:
            self.closed = True
            await self._send({"type": "websocket.close", "code": code, "reason": reason})


class AsgiWebSocketEndpoint:
    """An ASGI app (not a function, so Starlette adds no per-message wrapper) calling
    ``handler(AsgiWebSocket)`` for each connection."""

    def __init__(self, handler):
        self.handler = handler

    async def __call__(self, scope, receive, send) -> None:
        await self.handler(AsgiWebSocket(scope, receive, send))
