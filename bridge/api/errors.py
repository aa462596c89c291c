"""Error answers of the HTTP API: always ``{"status": "error", "message": ...}``, so the
retell-sdk's error classes get a message they can show. 400 for a body that is not JSON, 401
for a missing or wrong API key, 404 for an unknown call or agent, 422 for a body that breaks the
rules, 429 when Twilio's dial rate is exhausted, 500 for a bug (logged, never detailed)."""

from __future__ import annotations

import logging
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from ..calls import STORE_UNAVAILABLE

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5


class ApiError(HTTPException):
    pass


class ErrorBody(BaseModel):
    status: Literal["error"] = "error"
    message: str


ERRORS = {code: {"model": ErrorBody, "description": what} for code, what in (
    (400, "the body is not JSON"), (401, "missing or invalid API key"), (404, "unknown call or agent"),
    (422, "the body breaks a rule"), (429, "too many requests"), (500, "internal error"),
    (503, "the call database is unavailable (Retry-After)"),
)}  # fmt: skip


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"status": "error", "message": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"status": "error", "message": "the body is not valid JSON"}, status_code=400)
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in errors)
        return JSONResponse({"status": "error", "message": problems}, status_code=422)

    async def store_unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s: the call database is unavailable: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        body = {"status": "error", "message": "the call database is unavailable; try again shortly"}
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    for unavailable in STORE_UNAVAILABLE:
        app.add_exception_handler(unavailable, store_unavailable)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"status": "error", "message": "internal error"}, status_code=500)
