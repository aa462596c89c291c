"""Where calls are kept: the SQL schema and its migrations (``schema``, ``migrations/``), the
call records' store with its compare-and-set changes (``call_store.SqlCallStore``), and the
webhook outbox, written in the same transaction as the change that causes it and delivered in
the background (``outbox.WebhookDispatcher``), and the replicas' control channel
(``control.ControlChannel``: LISTEN/NOTIFY), and the calls' files, on this disk or in object
storage (``files.CallFiles``). SQLite by default, PostgreSQL for replicas.

May import: ``bridge.models``, the settings object (for webhook targets), SQLAlchemy, httpx,
asyncpg, aiobotocore.
Never the call service, the relays or the routes.
"""

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from .call_store import SqlCallStore
from .control import ControlChannel
from .files import CallFiles, FilesError, StoredFile
from .outbox import WebhookDispatcher, webhook_targets

#: What a call to the store raises while the database is unreachable (refused, restarting,
#: timed out, or every pooled connection busy for ``pool_timeout``): callers answer "try again
#: shortly", never "bug"
STORE_UNAVAILABLE = (DBAPIError, OSError, TimeoutError, PoolTimeout)

__all__ = ["STORE_UNAVAILABLE", "CallFiles", "ControlChannel", "FilesError", "StoredFile", "SqlCallStore", "WebhookDispatcher", "webhook_targets"]
