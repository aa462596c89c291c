"""The call API, Retell-compatible: the seeds' paths, field names and validation, so the official
``retell-sdk`` client works against the bridge unchanged (it honours ``RETELL_BASE_URL``).

Errors always answer ``{"status": "error", "message": ...}``: 400 for a body that is not JSON,
401 for a missing or wrong API key, 404 for an unknown call or agent, 422 for a body that breaks
the rules (missing or mistyped fields, rates out of range, metadata over 50 kB, ...), 500 for a
bug. Nothing is stored unless the whole request is valid."""

from __future__ import annotations

import logging
from typing import Literal

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from ..calls.registrar import call_fields, new_call_id
from ..models import CallRecord, CallStatus, CallType, Direction, DisconnectionReason, Protocol
from .deps import AUTH, call_service, find_agent, find_call
from .errors import ERRORS, ApiError
from .schemas import (
    MAX_MS, CallList, CallObject, EnumFilter, ListCalls, ListFilter, RegisterCallV1, RegisterPhoneCall, SafeText,
    UpdateCall,
)  # fmt: skip

log = logging.getLogger(__name__)
router = APIRouter(tags=["calls"])

#: A page of calls stops early (``has_more``, with its ``pagination_key``) once it holds this
#: much JSON: a thousand calls of 50 kB metadata would be 50 MB built on the event loop.
MAX_PAGE_BYTES = 2 * 1024 * 1024


def _created(record: CallRecord) -> JSONResponse:
    return JSONResponse(record.public(), status_code=201)


def _enum_values(criterion: EnumFilter | None, name: str, allowed: set[str], never: set[str] = frozenset()) -> list[str]:
    """The values to match; ``never`` are values the SDK may send that no bridge call has."""
    if criterion is None:
        return []
    unknown = set(criterion.value) - allowed - never
    if unknown:
        raise ApiError(422, f"filter_criteria.{name}: unknown value(s) {sorted(unknown)}; one of {sorted(allowed)}")
    values = [v for v in criterion.value if v in allowed]
    return values or ["\x01none"]  # only values no call has: match nothing


@router.post("/register-call", dependencies=AUTH, status_code=201, summary="Register a call (v1)", response_model=CallObject, responses=ERRORS)
async def register_call_v1(request: Request, body: RegisterCallV1) -> JSONResponse:
    find_agent(request, body.agent_id)
    # a call registered for a web client is a web call (its end, if nobody joins, too)
    web = body.audio_websocket_protocol is Protocol.web
    record = CallRecord(
        call_id=new_call_id(), call_type=CallType.web_call if web else CallType.phone_call, **body.model_dump(exclude_none=False)
    )
    await call_service(request).register(record)
    return _created(record)


@router.post(
    "/v2/register-phone-call", dependencies=AUTH, status_code=201, summary="Register a phone call",
    response_model=CallObject, responses=ERRORS,
)  # fmt: skip
async def register_phone_call(request: Request, body: RegisterPhoneCall) -> JSONResponse:
    agent = find_agent(request, body.agent_id)
    fields = call_fields(agent, from_number=body.from_number, to_number=body.to_number, direction=body.direction)
    record = CallRecord(
        call_id=new_call_id(),
        call_type=CallType.phone_call,
        metadata=body.metadata,
        retell_llm_dynamic_variables=body.retell_llm_dynamic_variables,
        **fields,
    )
    await call_service(request).register(record)
    return _created(record)


@router.get("/v2/get-call/{call_id}", dependencies=AUTH, summary="Get a call", response_model=CallObject, responses=ERRORS)
@router.get("/get-call/{call_id}", dependencies=AUTH, summary="Get a call (v1 path)", response_model=CallObject, responses=ERRORS)
async def get_call(call_id: str, request: Request) -> JSONResponse:
    return JSONResponse((await find_call(request, call_id)).public())


def _text_filters(f: ListFilter) -> list[tuple[str, str, str | list[str]]]:
    """The call id and number filters, as (column, op, value)."""
    return [(name, c.op, c.value) for name in ("call_id", "from_number", "to_number") if (c := getattr(f, name)) is not None]


@router.post(
    "/v3/list-calls", dependencies=AUTH, summary="List calls (filters, sort, cursor pages)", response_model=CallList,
    responses=ERRORS,
)  # fmt: skip
async def list_calls_v3(request: Request, body: ListCalls = Body(default_factory=ListCalls)) -> JSONResponse:
    f = body.filter_criteria or ListFilter()
    try:
        start_after, start_before = f.start_timestamp.bounds() if f.start_timestamp else (None, None)
        page, cursor = await call_service(request).store.list(
            agent_ids=[a.agent_id for a in f.agent or []],
            statuses=_enum_values(f.call_status, "call_status", {s.value for s in CallStatus}, {"not_connected"}),
            directions=_enum_values(f.direction, "direction", {d.value for d in Direction}),
            call_types=_enum_values(f.call_type, "call_type", {t.value for t in CallType}),
            text=_text_filters(f),
            start_after=start_after,
            start_before=start_before,
            descending=body.sort_order == "descending",
            limit=body.limit,
            cursor=body.pagination_key,
            skip=body.skip,
            max_bytes=MAX_PAGE_BYTES,
        )
    except ValueError as e:
        raise ApiError(422, str(e)) from None
    return JSONResponse({"items": [r.public() for r in page], "has_more": cursor is not None, "pagination_key": cursor})


@router.get(
    "/v2/list-calls", dependencies=AUTH, summary="List calls (v2: query parameters, a JSON array)",
    response_model=list[CallObject], responses=ERRORS,
)  # fmt: skip
async def list_calls_v2(
    request: Request,
    agent_id: list[SafeText] = Query(default=[]),
    call_status: list[CallStatus] = Query(default=[]),
    direction: list[Direction] = Query(default=[]),
    start_after: int | None = Query(None, ge=0, le=MAX_MS),
    start_before: int | None = Query(None, ge=0, le=MAX_MS),
    sort_order: Literal["ascending", "descending"] = "descending",
    limit: int = Query(50, ge=1, le=1000),
    pagination_key: str | None = Query(None, max_length=512),
) -> Response:
    try:
        page, cursor = await call_service(request).store.list(
            agent_ids=agent_id,
            statuses=[s.value for s in call_status],
            directions=[d.value for d in direction],
            start_after=start_after,
            start_before=start_before,
            descending=sort_order == "descending",
            limit=limit,
            cursor=pagination_key,
            max_bytes=MAX_PAGE_BYTES,
        )
    except ValueError as e:
        raise ApiError(422, str(e)) from None
    headers = {"X-Pagination-Key": cursor} if cursor else {}
    return JSONResponse([r.public() for r in page], headers=headers)


@router.patch(
    "/v2/update-call/{call_id}", dependencies=AUTH, summary="Update a call's metadata", response_model=CallObject,
    responses=ERRORS,
)  # fmt: skip
async def update_call(call_id: str, request: Request, body: UpdateCall) -> JSONResponse:
    await find_call(request, call_id)
    changes = body.model_dump(exclude_unset=True)
    record = await call_service(request).store.update(call_id, **changes) if changes else await find_call(request, call_id)
    if record is None:  # deleted meanwhile
        raise ApiError(404, f"call {call_id} not found")
    return JSONResponse(record.public())


@router.delete("/v2/delete-call/{call_id}", dependencies=AUTH, status_code=204, summary="Delete a call", responses=ERRORS)
async def delete_call(call_id: str, request: Request) -> Response:
    record = await find_call(request, call_id)
    if record.call_status in (CallStatus.registered, CallStatus.ongoing):
        raise ApiError(422, f"call {call_id} is {record.call_status.value}: stop it before deleting it")
    await call_service(request).delete(call_id)
    return Response(status_code=204)


@router.post("/v2/stop-call/{call_id}", dependencies=AUTH, status_code=204, summary="Stop a live call", responses=ERRORS)
async def stop_call(call_id: str, request: Request) -> Response:
    """Ends a live call on both legs: the agent socket is closed and the phone call is hung up
    through Twilio (recorded as agent_hangup: the business side ended it)."""
    record = await find_call(request, call_id)
    if record.call_status not in (CallStatus.registered, CallStatus.ongoing):
        raise ApiError(422, f"call {call_id} is not live (it is {record.call_status.value})")
    await call_service(request).stop(record, DisconnectionReason.agent_hangup, "stopped through the API")
    return Response(status_code=204)


async def _call_file(request: Request, call_id: str, kind: str, what: str) -> Response:
    """A call's file from this disk (being written, or kept here), else from object storage,
    where the replica that relayed the call uploaded it (``Range`` requests either way)."""
    record = await find_call(request, call_id)
    files = call_service(request).files
    path = files.path(kind, call_id)
    if path.exists():
        return FileResponse(path, media_type=files.media_type(kind))
    try:
        stored = await files.fetch(kind, call_id, request.headers.get("range"), head=request.method == "HEAD")
    except ValueError as e:
        raise ApiError(416, str(e)) from None
    except Exception as e:  # the object store is down or refuses us
        log.error("call %s: its %s cannot be read from object storage: %s", call_id, what, e)
        raise ApiError(503, f"the {what} store does not answer; try again shortly") from None
    if stored is None:
        if record.call_status is CallStatus.ongoing and files.remote:
            raise ApiError(404, f"call {call_id} is live on another replica: its {what} is readable once it ends")
        raise ApiError(404, f"call {call_id} has no {what}")
    return StreamingResponse(stored.chunks, status_code=stored.status, headers=stored.headers)


@router.get("/v2/recordings/{call_id}.wav", dependencies=AUTH, summary="A call's stereo recording (caller left, agent right)")
@router.head("/v2/recordings/{call_id}.wav", dependencies=AUTH, include_in_schema=False)
async def recording(call_id: str, request: Request) -> Response:
    return await _call_file(request, call_id, "recording", "recording")


@router.get("/v2/public-logs/{call_id}.jsonl", dependencies=AUTH, summary="A call's public log (JSON lines)")
@router.head("/v2/public-logs/{call_id}.jsonl", dependencies=AUTH, include_in_schema=False)
async def public_log(call_id: str, request: Request) -> Response:
    return await _call_file(request, call_id, "log", "public log")


