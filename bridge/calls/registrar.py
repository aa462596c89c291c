"""Call registration: the bridge's own (a record in the store) or an external service that
speaks the v1 ``POST /register-call`` contract and answers with the call object."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from ..models import CallRecord, CallType, Direction, Encoding, Protocol, is_call_id
from ..settings import AgentConfig, ExternalRegistrar
from ..store import SqlCallStore


class RegistrationError(RuntimeError):
    pass


def new_call_id() -> str:
    return uuid.uuid4().hex


def call_fields(agent: AgentConfig, **extra: Any) -> dict[str, Any]:
    """A phone call's fields. The record's ``audio_websocket_protocol``, ``audio_encoding`` and
    ``sample_rate`` are the caller's leg, the websocket its call id opens (as in the seeds): for
    a phone call, Twilio's media stream. The agent's leg is the agent's own (the agents file)."""
    return {
        "agent_id": agent.agent_id,
        "audio_websocket_protocol": Protocol.twilio,
        "audio_encoding": Encoding.mulaw,
        "sample_rate": 8000,
        "end_call_after_silence_ms": agent.end_call_after_silence_ms,
        **extra,
    }


async def register_call(
    store: SqlCallStore,
    agent: AgentConfig,
    *,
    from_number: str | None,
    to_number: str | None,
    direction: Direction | None,
    twilio_call_sid: str | None = None,
    twilio_account_sid: str | None = None,
    http: httpx.AsyncClient | None = None,
    notes: list[str] | None = None,
) -> CallRecord:
    """Register a phone call for ``agent`` and store its record (status ``registered``), with
    ``notes`` on it (what was wrong with what Twilio sent)."""
    fields = call_fields(agent, from_number=from_number, to_number=to_number, direction=direction)
    if isinstance(agent.registrar, ExternalRegistrar):
        call_id = await _register_externally(agent.registrar, fields, http)
    else:
        call_id = new_call_id()
    record = CallRecord(
        call_id=call_id,
        call_type=CallType.phone_call,
        twilio_call_sid=twilio_call_sid,
        twilio_account_sid=twilio_account_sid,
        notes=list(notes or ()),
        **fields,
    )
    try:
        await store.create(record)
    except Exception as e:  # e.g. an external registrar handing out a call id twice
        detail = (str(getattr(e, "orig", None) or e).strip().splitlines() or [""])[0][:300]
        raise RegistrationError(f"cannot store call {call_id}: {type(e).__name__}: {detail}".rstrip(": ")) from e
    return record


async def _register_externally(
    registrar: ExternalRegistrar, fields: dict[str, Any], http: httpx.AsyncClient | None
) -> str:
    body = {k: (v.value if hasattr(v, "value") else v) for k, v in fields.items() if v is not None}
    client = http or httpx.AsyncClient(timeout=10)
    try:
        response = await client.post(
            f"{registrar.url}/register-call", json=body, headers={"Authorization": f"Bearer {registrar.api_key}"}
        )
    except httpx.HTTPError as e:
        raise RegistrationError(f"registrar {registrar.url} unreachable: {e}") from e
    finally:
        if http is None:
            await client.aclose()
    if response.status_code not in (200, 201):
        raise RegistrationError(f"registrar answered {response.status_code}: {response.text[:200]}")
    try:
        call_id = response.json()["call_id"]
    except (ValueError, KeyError, TypeError):
        raise RegistrationError("registrar's answer has no call_id") from None
    if not is_call_id(call_id):
        # (it names the call's files and URLs: a slash or a megabyte there must not get in)
        raise RegistrationError(f"registrar's call_id {str(call_id)[:64]!r} is not a call id (1-64 of A-Z a-z 0-9 _ . -)")
    return call_id
