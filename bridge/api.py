"""The call API (Retell-compatible). Every error answers ``{"status": "error", "message": ...}``.
This issue serves get-call; issue 4 adds the rest of the seeds' endpoints."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

router = APIRouter(tags=["calls"])


class ApiError(HTTPException):
    pass


def require_api_key(request: Request) -> None:
    keys = request.app.state.services.settings.api_keys
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise ApiError(401, "missing API key: send Authorization: Bearer YOUR_API_KEY")
    if not any(hmac.compare_digest(key.strip(), k) for k in keys):
        raise ApiError(401, "invalid API key")


@router.get("/v2/get-call/{call_id}", dependencies=[Depends(require_api_key)], summary="Get a call")
@router.get("/get-call/{call_id}", dependencies=[Depends(require_api_key)], summary="Get a call (v1 path)")
async def get_call(call_id: str, request: Request) -> JSONResponse:
    record = await request.app.state.services.store.get(call_id)
    if record is None:
        raise ApiError(404, f"call {call_id} not found")
    return JSONResponse(record.public())


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"status": "error", "message": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"status": "error", "message": problems}, status_code=422)
