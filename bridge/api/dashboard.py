"""The dashboard's pages and the API documentation, with every asset served by the bridge (no
CDN: both work offline).

- ``GET /dashboard/``: the dashboard (``bridge/dashboard/static``). Its files are public and
  hold no data; the page asks the call API for everything with the key the person signed in with.
- ``GET /docs``: Swagger UI, ``GET /redoc``: ReDoc, their scripts and styles from the
  ``fastapi-offline`` package under ``/docs/assets/``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from ..dashboard import STATIC_DIR

router = APIRouter(include_in_schema=False)

DASHBOARD = "/dashboard"
GET_AND_HEAD = ["GET", "HEAD"]  # (a server that answers GET answers HEAD)
DOCS_ASSETS = "/docs/assets"
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
#: The dashboard's own files are never cached stale across an upgrade; they are small
NO_CACHE = {"Cache-Control": "no-cache"}
#: The page may load only what the bridge itself serves (no CDN, no inline script from a
#: response that echoes input): scripts, styles, media and sockets from this origin
DASHBOARD_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
    "connect-src 'self' ws: wss:; worker-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


#: The documentation pages: their own inline start-up script and styles, all else from the bridge
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "worker-src 'self' blob:; connect-src 'self'; font-src 'self' data:; frame-ancestors 'none'; base-uri 'none'"
)


def _docs_page(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


@router.api_route(DASHBOARD, methods=GET_AND_HEAD)
async def dashboard_root() -> RedirectResponse:
    return RedirectResponse(f"{DASHBOARD}/", status_code=308)


@router.api_route(f"{DASHBOARD}/", methods=GET_AND_HEAD)
async def dashboard() -> FileResponse:
    headers = {**NO_CACHE, "Content-Security-Policy": DASHBOARD_CSP, "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=headers)


@router.api_route("/favicon.ico", methods=GET_AND_HEAD)
async def favicon() -> FileResponse:
    """(browsers ask for it on their own)"""
    return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


@router.api_route("/docs", methods=GET_AND_HEAD)
async def swagger_ui(request: Request) -> HTMLResponse:
    app = request.app
    return _docs_page(get_swagger_ui_html(
        openapi_url=app.openapi_url,
        title=f"{app.title} - API",
        oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
        swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
    ))  # fmt: skip


@router.api_route("/docs/oauth2-redirect", methods=GET_AND_HEAD)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.api_route("/redoc", methods=GET_AND_HEAD)
async def redoc(request: Request) -> HTMLResponse:
    app = request.app
    return _docs_page(get_redoc_html(
        openapi_url=app.openapi_url, title=f"{app.title} - API", redoc_js_url=REDOC_JS,
        redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False,
    ))  # fmt: skip


#: ReDoc's bundle, as fastapi-offline ships it but for the one URL it would fetch from a CDN (the
#: logo in its footer), which points at the bridge's own icon instead
REDOC_JS = "/docs/redoc.js"
REDOC_CDN_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"


@functools.cache
def _redoc_bundle() -> bytes:  # (read once, about 1 MB)
    return (DOCS_ASSETS_DIR / "redoc.standalone.js").read_bytes().replace(REDOC_CDN_LOGO, b"/favicon.ico")


@router.api_route(REDOC_JS, methods=GET_AND_HEAD)
async def redoc_js() -> Response:
    return Response(_redoc_bundle(), media_type="text/javascript; charset=utf-8", headers={"Cache-Control": "max-age=86400"})


class DashboardFiles(StaticFiles):
    """The dashboard's modules, revalidated on every load (an upgrade never mixes old and new).
    The page itself is served at ``/dashboard/`` only, with its security headers."""

    async def get_response(self, path: str, scope) -> Response:
        if path == "index.html":
            raise HTTPException(404)
        return await super().get_response(path, scope)

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update({**NO_CACHE, "X-Content-Type-Options": "nosniff"})
        return response


def mount_assets(app: FastAPI) -> None:
    """The static files: the dashboard's, and the documentation pages' (from fastapi-offline)."""
    app.mount(f"{DASHBOARD}/static", DashboardFiles(directory=STATIC_DIR), name="dashboard-static")
    app.mount(DOCS_ASSETS, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")
