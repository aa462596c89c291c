"""``cancel_requested()``: whether the running task has been asked to stop, for the background
loops that catch ``Exception`` to ride out a database outage.

A cancellation must come out of a database call as ``CancelledError``, but any ``handle_error``
listener that raises replaces it with its own exception: the store's statement timer did that
(SQLAlchemy 2.1 leaves ``ExceptionContext.cursor`` unset, so reading it raised
``AttributeError``), and the webhook dispatcher, taking it for an outage, ran on after the app
cancelled it, past this replica's last heartbeat, while another replica re-sent its jobs. Such
loops check this and raise ``CancelledError`` again, whatever a listener or driver did."""

from __future__ import annotations

import asyncio


def cancel_requested() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
