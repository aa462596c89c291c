"""Endings that could not be stored yet: a call that ends while the database is unreachable is
kept, written to the local spool at once (``data_dir/spool/endings/{call_id}.json``), and
stored as soon as the database answers again; a spool left by a process that had to exit is
stored at the next start-up, before start-up recovery, so the record and its ``call_ended``
webhook end up as if the database had never gone away (the end time is the moment the call
ended, not the moment it was stored)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from pydantic_core import to_jsonable_python

from ..models import DisconnectionReason, Latency

log = logging.getLogger(__name__)

RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0
LATENCY_FIELDS = ("e2e_latency", "agent_latency", "llm_websocket_network_rtt_latency")


class EndingSpool:
    def __init__(self, store, folder: Path):
        self.store, self.folder = store, folder
        self._pending: dict[str, tuple[DisconnectionReason, dict[str, Any]]] = {}
        self._retrying: asyncio.Task | None = None

    @property
    def pending(self) -> list[str]:
        """The calls whose ending is not in the database yet."""
        return list(self._pending)

    async def store_ending(self, call_id: str, reason: DisconnectionReason, fields: dict[str, Any]) -> None:
        """Store the ending now if the database answers, else keep it and retry in the
        background until it does. It is on disk before the first try, so a process stopped
        in the middle (cancelled, killed) loses nothing either."""
        self._save(call_id, reason, fields)
        try:
            await self._write(call_id, reason, fields)
        except Exception as e:  # noqa: BLE001 - whatever stops the write, the ending is kept
            log.error("call %s: its ending (%s) is kept until the database answers: %s", call_id, reason.value, e)
            self._keep(call_id, reason, fields)
        else:
            self._forget(call_id)

    def _keep(self, call_id: str, reason: DisconnectionReason, fields: dict[str, Any]) -> None:
        self._pending[call_id] = (reason, fields)
        if self._retrying is None or self._retrying.done():
            self._retrying = asyncio.create_task(self._retry())

    def _forget(self, call_id: str) -> None:
        (self.folder / f"{call_id}.json").unlink(missing_ok=True)

    async def replay(self) -> int:
        """Store the endings a previous process spooled (at start-up). Returns how many."""
        stored = 0
        for path in sorted(self.folder.glob("*.json")):
            try:
                saved = json.loads(path.read_text())
                reason, fields = DisconnectionReason(saved["reason"]), _revive(saved["fields"])
            except (OSError, ValueError, KeyError) as e:
                log.error("spooled ending %s cannot be read (%s): left in place", path.name, e)
                continue
            try:
                await self._write(saved["call_id"], reason, fields)
            except Exception as e:  # noqa: BLE001 - keep it, and retry with the others
                log.error("spooled ending of %s not stored yet: %s", saved["call_id"], e)
                self._keep(saved["call_id"], reason, fields)
                continue
            path.unlink(missing_ok=True)
            log.warning("call %s: its ending (%s) was stored from the spool", saved["call_id"], reason.value)
            stored += 1
        return stored

    async def close(self) -> None:
        """Stop retrying (what is pending stays on disk for the next start-up)."""
        if self._retrying is not None:
            self._retrying.cancel()
            await asyncio.gather(self._retrying, return_exceptions=True)

    async def _retry(self) -> None:
        wait = RETRY_FIRST_S
        while self._pending:
            await asyncio.sleep(wait)
            for call_id, (reason, fields) in list(self._pending.items()):
                try:
                    await self._write(call_id, reason, fields)
                except Exception as e:  # noqa: BLE001 - still down: later
                    log.warning("call %s: ending still not stored: %s", call_id, e)
                    wait = min(wait * 2, RETRY_MAX_S)
                    break
                del self._pending[call_id]
                self._forget(call_id)
                log.warning("call %s: its ending (%s) is stored", call_id, reason.value)
            else:
                wait = RETRY_FIRST_S

    async def _write(self, call_id: str, reason: DisconnectionReason, fields: dict[str, Any]) -> None:
        # (a call reaped while this replica's lease had expired is ended already: not overwritten)
        ended = await self.store.finish(call_id, reason, **fields)
        if ended is None:  # ended elsewhere first (reaped while cut off): keep what we measured
            kept = {k: v for k, v in fields.items() if v is not None and k not in ("error_detail", "end_timestamp")}
            if kept:
                await self.store.update(call_id, **kept)

    def _save(self, call_id: str, reason: DisconnectionReason, fields: dict[str, Any]) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            temporary = self.folder / f".{call_id}.tmp"
            temporary.write_text(json.dumps({"call_id": call_id, "reason": reason.value, "fields": to_jsonable_python(fields)}))
            os.replace(temporary, self.folder / f"{call_id}.json")
        except OSError as e:  # the disk too: the ending lives in memory only, and is retried
            log.error("call %s: its ending cannot be spooled either: %s", call_id, e)


def _revive(fields: dict[str, Any]) -> dict[str, Any]:
    """Spooled fields back to what the record holds (latency objects)."""
    revived = dict(fields)
    for name in LATENCY_FIELDS:
        if isinstance(revived.get(name), dict):
            revived[name] = Latency.model_validate(revived[name])
    return revived
