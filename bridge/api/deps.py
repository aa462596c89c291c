"""What every route of the call API needs: the API key check, the call service, and the call
or agent a path names (404 otherwise)."""

from __future__ import annotations

import hmac
import re

from fastapi import Depends, Request

from ..calls import CallService
from ..models import CallRecord
from ..settings import AgentConfig
from .errors import ApiError

CALL_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def require_api_key(request: Request) -> None:
    keys = call_service(request).settings.api_keys
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "missing API key: send Authorization: Bearer YOUR_API_KEY")
    if not any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in keys):
        raise ApiError(401, "invalid API key")


AUTH = [Depends(require_api_key)]


def call_service(request: Request) -> CallService:
    return request.app.state.calls


async def find_call(request: Request, call_id: str) -> CallRecord:
    record = await call_service(request).store.get(call_id) if CALL_ID.fullmatch(call_id) else None
    if record is None:
        raise ApiError(404, f"call {call_id} not found")
    return record


def find_agent(request: Request, agent_id: str) -> AgentConfig:
    agent = call_service(request).settings.agents.get(agent_id)
    if agent is None:
        raise ApiError(404, f"agent {agent_id} not found")
    return agent
