"""Where calls are kept: the SQL schema and its migrations (``schema``, ``migrations/``), the
call records' store with its compare-and-set changes (``call_store.SqlCallStore``), and the
webhook outbox, written in the same transaction as the change that causes it and delivered in
the background (``outbox.WebhookDispatcher``). SQLite by default, PostgreSQL for replicas.

May import: ``bridge.models``, the settings object (for webhook targets), SQLAlchemy, httpx.
Never the call service, the relays or the routes.
"""

from .call_store import SqlCallStore
from .outbox import WebhookDispatcher, webhook_targets

__all__ = ["SqlCallStore", "WebhookDispatcher", "webhook_targets"]
