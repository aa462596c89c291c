"""Where call records live: ``CallStore`` is the interface the service uses (``SqlCallStore`` in
``sql_store.py`` implements it on SQLite or PostgreSQL).

Status changes are compare-and-set, so a stream token can start a call only once and a call
ends only once, whichever task or replica gets there first."""

from __future__ import annotations

from typing import Any

from .models import CallRecord, CallStatus, DisconnectionReason


class CallStore:
    async def create(self, record: CallRecord) -> None:
        raise NotImplementedError

    async def get(self, call_id: str) -> CallRecord | None:
        raise NotImplementedError

    async def update(self, call_id: str, **fields: Any) -> CallRecord | None:
        raise NotImplementedError

    async def start(self, call_id: str, **fields: Any) -> CallRecord | None:
        """registered -> ongoing (with ``start_timestamp``); None if the call is not registered."""
        raise NotImplementedError

    async def finish(
        self, call_id: str, reason: DisconnectionReason, *, only_if: CallStatus | None = None, owner: str | None = None,
        **fields: Any,
    ) -> CallRecord | None:
        """-> ended / error with ``end_timestamp`` and the reason; None if it already ended (or,
        with ``only_if``, if its status is not that one any more; with ``owner``, if another
        instance owns it now)."""
        raise NotImplementedError

    async def by_twilio_sid(self, call_sid: str) -> CallRecord | None:
        """The call registered for a Twilio CallSid, if any."""
        raise NotImplementedError

    async def registered_before(self, timestamp_ms: int) -> list[CallRecord]:
        """This instance's calls still registered that were registered before the time."""
        raise NotImplementedError
