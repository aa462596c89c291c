"""Where call records live. ``CallStore`` is the interface the service uses; ``MemoryCallStore``
keeps records in this process (issue 4 adds the durable SQL store behind the same interface).

Status changes are compare-and-set, so a stream token can start a call only once and a call
ends only once, whichever task gets there first."""

from __future__ import annotations

import asyncio
from typing import Any

from .models import CallRecord, CallStatus, DisconnectionReason, now_ms


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

    async def finish(self, call_id: str, reason: DisconnectionReason, **fields: Any) -> CallRecord | None:
        """-> ended / error with ``end_timestamp`` and the reason; None if it already ended."""
        raise NotImplementedError

    async def registered_before(self, timestamp_ms: int) -> list[CallRecord]:
        raise NotImplementedError


class MemoryCallStore(CallStore):
    def __init__(self) -> None:
        self._calls: dict[str, CallRecord] = {}
        self._lock = asyncio.Lock()

    async def create(self, record: CallRecord) -> None:
        async with self._lock:
            if record.call_id in self._calls:
                raise ValueError(f"call {record.call_id} already exists")
            self._calls[record.call_id] = record.model_copy(deep=True)

    async def get(self, call_id: str) -> CallRecord | None:
        record = self._calls.get(call_id)
        return record.model_copy(deep=True) if record else None

    async def update(self, call_id: str, **fields: Any) -> CallRecord | None:
        async with self._lock:
            record = self._calls.get(call_id)
            if record is None:
                return None
            self._calls[call_id] = record = record.model_copy(update=fields)
            return record.model_copy(deep=True)

    async def start(self, call_id: str, **fields: Any) -> CallRecord | None:
        async with self._lock:
            record = self._calls.get(call_id)
            if record is None or record.call_status is not CallStatus.registered:
                return None
            fields = {"call_status": CallStatus.ongoing, "start_timestamp": now_ms(), **fields}
            self._calls[call_id] = record = record.model_copy(update=fields)
            return record.model_copy(deep=True)

    async def finish(self, call_id: str, reason: DisconnectionReason, **fields: Any) -> CallRecord | None:
        async with self._lock:
            record = self._calls.get(call_id)
            if record is None or record.call_status in (CallStatus.ended, CallStatus.error):
                return None
            status = CallStatus.error if reason.is_error else CallStatus.ended
            fields = {"call_status": status, "disconnection_reason": reason, "end_timestamp": now_ms(), **fields}
            self._calls[call_id] = record = record.model_copy(update=fields)
            return record.model_copy(deep=True)

    async def registered_before(self, timestamp_ms: int) -> list[CallRecord]:
        return [
            r.model_copy(deep=True)
            for r in self._calls.values()
            if r.call_status is CallStatus.registered and r.registered_at < timestamp_ms
        ]
