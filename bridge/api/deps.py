"""What every route of the call API needs: the API key check, the call service, and the call
or agent a path names (404 otherwise)."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .. import logs
from ..calls import CallService
from ..models import CallRecord, is_call_id
from ..settings import AgentConfig
from .errors import ApiError



def api_key_problem(keys: list[str], authorization: str, origin: str = "BRIDGE_API_KEYS") -> str | None:
    """What is wrong with an ``Authorization`` header for the call API, or None if its bearer
    key is one of ``keys`` (compared in constant time); ``origin`` says where the keys are."""
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return "missing API key: send Authorization: Bearer YOUR_API_KEY"
    if not any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in keys):
        return f"invalid API key: it is none of the keys in {origin}"
    return None


#: the OpenAPI security scheme of the call API (``/docs``' Authorize button); the check itself is
#: ``require_api_key`` (and ``RequestGate``, before a body is read)
BEARER = HTTPBearer(
    auto_error=False, scheme_name="apiKey", description="One of the bridge's API keys (BRIDGE_API_KEYS; on the embedded defaults, dev-secrets.json)"
)


def require_api_key(request: Request, _credentials: HTTPAuthorizationCredentials | None = Depends(BEARER)) -> None:
    settings = call_service(request).settings
    problem = api_key_problem(settings.api_keys, request.headers.get("authorization", ""), settings.api_keys_origin)
    if problem:
        raise ApiError(401, problem)


#: HTTP paths that need no API key: Twilio's callbacks carry a signature instead
PUBLIC_PATHS = (
    "/healthz", "/livez", "/readyz", "/docs", "/docs/oauth2-redirect", "/docs/redoc.js", "/openapi.json", "/redoc", "/dashboard", "/favicon.ico",
)
#: Path prefixes that need no API key: the dashboard's and the docs' static files (they hold no
#: data: the dashboard asks the call API for everything with the key the person signed in with)
PUBLIC_PREFIXES = ("/dashboard/", "/docs/assets/")
TWILIO_PREFIX = "/twilio/"
#: Twilio's webhook forms are a few hundred bytes
MAX_FORM_BYTES = 64 * 1024


class RequestGate:
    """Every HTTP request, before anything reads its body: the call API's key is checked (401 at
    once without a valid one: FastAPI reads and parses a body before it runs a route's
    dependencies), and a declared ``Content-Length`` over the route's cap is answered 413 at
    once (Twilio's callbacks: ``MAX_FORM_BYTES``; the call API: ``max_request_bytes``). A body
    sent in chunks is cut off at the same cap as it is read (the routers' ``max_body_size``)."""

    def __init__(self, app, settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        twilio = path.startswith(TWILIO_PREFIX)
        headers = dict(scope["headers"])
        problem = None
        if not twilio and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
            settings = self.settings
            problem = api_key_problem(settings.api_keys, headers.get(b"authorization", b"").decode("latin-1"), settings.api_keys_origin)
            status = 401
        declared = headers.get(b"content-length")
        cap = MAX_FORM_BYTES if twilio else self.settings.max_request_bytes
        if problem is None and declared is not None and (not declared.isdigit() or int(declared) > cap):
            problem, status = f"the body is over {cap} bytes", 413
        if problem is None:
            await self.app(scope, receive, send)
            return
        response = JSONResponse({"status": "error", "message": problem}, status_code=status, headers={"Connection": "close"})
        await response(scope, receive, send)


AUTH = [Depends(require_api_key)]


def call_service(request: Request) -> CallService:
    return request.app.state.calls


async def find_call(request: Request, call_id: str) -> CallRecord:
    if not is_call_id(call_id):
        raise ApiError(404, f"call {call_id[:64]!r}{'...' if len(call_id) > 64 else ''} not found: not a call id")
    record = await call_service(request).store.get(call_id)
    if record is None:
        raise ApiError(404, f"call {call_id} not found")
    logs.CALL_ID.set(call_id)  # the request's log lines name the call
    return record


def find_agent(request: Request, agent_id: str) -> AgentConfig:
    agent = call_service(request).settings.agents.get(agent_id)
    if agent is None:
        raise ApiError(404, f"agent {agent_id} not found")
    return agent
