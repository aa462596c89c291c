"""Logging for ``bridge serve``: human-readable lines by default, or with ``BRIDGE_LOG_FORMAT=json``
one JSON object per line (``ts``, ``level``, ``logger``, ``message``, ``call_id`` wherever one
applies, ``exc`` with the traceback), for log pipelines. Secrets in URLs (web-call access
tokens, the echo agent's key) are redacted in both (``bridge.server.RedactSecrets``).

``call_id`` comes from the log call's ``extra={"call_id": ...}``, or from ``CALL_ID``, which the
relay and the call API set for the task serving a call.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging

CALL_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("call_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        call_id = getattr(record, "call_id", None) or CALL_ID.get()
        if call_id:
            entry["call_id"] = call_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


#: libraries whose INFO lines are their own workings, not the bridge's events: the Twilio
#: client logs every REST request's headers (9 lines a request), alembic each migration step,
#: httpx every request; their warnings and errors still show
QUIET_LOGGERS = ("twilio", "twilio.http_client", "alembic", "httpx", "httpcore", "botocore", "aiobotocore")


def configure(log_format: str) -> dict | None:
    """Set up the root logger; returns uvicorn's ``log_config`` (None: uvicorn's loggers then
    go through the root logger too, so every line has the same format)."""
    from .server import RedactSecrets

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return None
