"""The dashboard's front end: static files (HTML, CSS and plain JavaScript, no build step), served
by ``bridge.api.dashboard`` at ``/dashboard/``. It holds no data: every call, recording and log
comes from the call API with the API key the person signed in with (kept in the browser's
session storage, never in a URL)."""

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
