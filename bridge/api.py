"""The call API, Retell-compatible: the seeds' paths, field names and validation, so the official
``retell-sdk`` client works against the bridge unchanged (it honours ``RETELL_BASE_URL``).

Errors always answer ``{"status": "error", "message": ...}``: 400 for a body that is not JSON,
401 for a missing or wrong API key, 404 for an unknown call or agent, 422 for a body that breaks
the rules (missing or mistyped fields, rates out of range, metadata over 50 kB, ...), 500 for a
bug. Nothing is stored unless the whole request is valid."""

from __future__ import annotations

import hmac
import json
import logging
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model, field_validator, model_validator
from starlette.exceptions import HTTPException

from .models import BOOKKEEPING, CallRecord, CallStatus, CallType, Direction, DisconnectionReason, Encoding, Protocol
from .registrar import call_fields, new_call_id
from .settings import E164

log = logging.getLogger(__name__)
router = APIRouter(tags=["calls"])
MAX_METADATA_BYTES = 50 * 1024


class ApiError(HTTPException):
    pass


def require_api_key(request: Request) -> None:
    keys = request.app.state.services.settings.api_keys
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "missing API key: send Authorization: Bearer YOUR_API_KEY")
    if not any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in keys):
        raise ApiError(401, "invalid API key")


# --- response bodies (for the OpenAPI document at /docs) ---------------------------------------

CallObject = create_model(
    "CallObject",
    __doc__="The call object (the seeds' get-call response): null where the bridge knows nothing. "
    "e2e_latency, llm_websocket_network_rtt_latency: milliseconds; llm_latency stays null (the "
    "bridge cannot see inside the agent); access_token only on web calls.",
    **{name: (field.annotation, field) for name, field in CallRecord.model_fields.items() if name not in BOOKKEEPING},
)


class CallList(BaseModel):
    items: list[CallObject]  # type: ignore[valid-type]
    has_more: bool
    pagination_key: str | None = Field(None, description="pass back to get the next page")


class ErrorBody(BaseModel):
    status: Literal["error"] = "error"
    message: str


ERRORS = {code: {"model": ErrorBody, "description": what} for code, what in (
    (400, "the body is not JSON"), (401, "missing or invalid API key"), (404, "unknown call or agent"),
    (422, "the body breaks a rule"), (429, "too many requests"), (500, "internal error"),
)}  # fmt: skip


# --- request bodies --------------------------------------------------------------------------


def _metadata_size(v: dict | None) -> dict | None:
    if v is None:
        return v
    try:
        size = len(json.dumps(v, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except (ValueError, UnicodeEncodeError):
        raise ValueError("must be JSON without NaN, infinities or unpaired surrogates") from None
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"is larger than {MAX_METADATA_BYTES // 1024} kB")
    return v


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    metadata: dict[str, Any] | None = None
    #: key value pairs of strings (the seeds' and the retell-sdk's type)
    retell_llm_dynamic_variables: dict[str, str] | None = None

    _metadata = field_validator("metadata", "retell_llm_dynamic_variables")(_metadata_size)


def _e164(v: str | None) -> str | None:
    if v is not None and not E164.fullmatch(v):
        raise ValueError(f"{v!r} is not an E.164 number (like +14155550100)")
    return v


class RegisterCallV1(_Body):
    agent_id: str = Field(min_length=1)
    audio_websocket_protocol: Protocol
    audio_encoding: Encoding
    sample_rate: int = Field(ge=8000, le=48000)
    end_call_after_silence_ms: int | None = Field(None, ge=10000)
    from_number: str | None = None
    to_number: str | None = None
    direction: Direction | None = None
    drop_call_if_machine_detected: bool | None = None
    opt_out_sensitive_data_storage: bool | None = None

    _numbers = field_validator("from_number", "to_number")(_e164)

    @model_validator(mode="after")
    def _twilio_mulaw(self) -> RegisterCallV1:
        if (
            self.audio_websocket_protocol is Protocol.twilio
            and self.audio_encoding is Encoding.mulaw
            and self.sample_rate != 8000
        ):
            raise ValueError("mulaw on the twilio protocol must be at sample_rate 8000")
        return self


class RegisterPhoneCall(_Body):
    """The retell-sdk's phone_call object needs both numbers and a direction: the numbers are
    required here, and the direction is inbound unless said otherwise."""

    agent_id: str = Field(min_length=1)
    from_number: str
    to_number: str
    direction: Direction = Direction.inbound

    _numbers = field_validator("from_number", "to_number")(_e164)


class UpdateCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    metadata: dict[str, Any] | None = None
    opt_out_sensitive_data_storage: bool | None = None

    _metadata = field_validator("metadata")(_metadata_size)


MAX_MS = 2**53  # timestamps beyond this are not times (and overflow the database's BIGINT)
SafeText = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00]*$")]


class AgentFilter(BaseModel):
    agent_id: SafeText
    version: list[float] | None = None  # agents from the agents file have one version


class EnumFilter(BaseModel):
    op: Literal["in"] = "in"
    type: Literal["enum"] = "enum"
    value: list[SafeText]


class TimeFilter(BaseModel):
    op: Literal["bt", "eq", "ge", "gt", "le", "lt"]
    type: Literal["range", "number"] | None = None
    value: Annotated[int, Field(ge=0, le=MAX_MS)] | Annotated[list[Annotated[int, Field(ge=0, le=MAX_MS)]], Field(min_length=2, max_length=2)]

    def bounds(self) -> tuple[int | None, int | None]:
        v = self.value
        if self.op == "bt":
            if not isinstance(v, list):
                raise ValueError("filter_criteria.start_timestamp: bt takes [from_ms, to_ms]")
            return v[0], v[1]
        if isinstance(v, list):
            raise ValueError(f"filter_criteria.start_timestamp: {self.op} takes one number")
        return {"eq": (v, v), "ge": (v, None), "gt": (v + 1, None), "le": (None, v), "lt": (None, v - 1)}[self.op]


class ListFilter(BaseModel):
    """``filter_criteria`` of POST /v3/list-calls: the retell-sdk's shape, the fields the bridge
    can filter on (others are refused, not silently ignored)."""

    model_config = ConfigDict(extra="forbid")
    agent: list[AgentFilter] | None = None
    call_status: EnumFilter | None = None
    direction: EnumFilter | None = None
    call_type: EnumFilter | None = None
    start_timestamp: TimeFilter | None = None


class ListCalls(BaseModel):
    model_config = ConfigDict(extra="ignore")
    filter_criteria: ListFilter | None = None
    sort_order: Literal["ascending", "descending"] = "descending"
    limit: int = Field(50, ge=1, le=1000)
    pagination_key: str | None = Field(None, max_length=512)
    skip: int = Field(0, ge=0, le=100_000)


# --- helpers ---------------------------------------------------------------------------------


def services(request: Request):
    return request.app.state.services


CALL_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


async def _call(request: Request, call_id: str) -> CallRecord:
    record = await services(request).store.get(call_id) if CALL_ID.fullmatch(call_id) else None
    if record is None:
        raise ApiError(404, f"call {call_id} not found")
    return record


def _agent(request: Request, agent_id: str):
    agent = services(request).settings.agents.get(agent_id)
    if agent is None:
        raise ApiError(404, f"agent {agent_id} not found")
    return agent


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


# --- endpoints -------------------------------------------------------------------------------

AUTH = [Depends(require_api_key)]


@router.post("/register-call", dependencies=AUTH, status_code=201, summary="Register a call (v1)", response_model=CallObject, responses=ERRORS)
async def register_call_v1(request: Request, body: RegisterCallV1) -> JSONResponse:
    _agent(request, body.agent_id)
    record = CallRecord(call_id=new_call_id(), **body.model_dump(exclude_none=False))
    await services(request).store.create(record)
    return _created(record)


@router.post(
    "/v2/register-phone-call", dependencies=AUTH, status_code=201, summary="Register a phone call",
    response_model=CallObject, responses=ERRORS,
)  # fmt: skip
async def register_phone_call(request: Request, body: RegisterPhoneCall) -> JSONResponse:
    agent = _agent(request, body.agent_id)
    fields = call_fields(agent, from_number=body.from_number, to_number=body.to_number, direction=body.direction)
    record = CallRecord(
        call_id=new_call_id(),
        call_type=CallType.phone_call,
        metadata=body.metadata,
        retell_llm_dynamic_variables=body.retell_llm_dynamic_variables,
        **fields,
    )
    await services(request).store.create(record)
    return _created(record)


@router.get("/v2/get-call/{call_id}", dependencies=AUTH, summary="Get a call", response_model=CallObject, responses=ERRORS)
@router.get("/get-call/{call_id}", dependencies=AUTH, summary="Get a call (v1 path)", response_model=CallObject, responses=ERRORS)
async def get_call(call_id: str, request: Request) -> JSONResponse:
    return JSONResponse((await _call(request, call_id)).public())


@router.post(
    "/v3/list-calls", dependencies=AUTH, summary="List calls (filters, sort, cursor pages)", response_model=CallList,
    responses=ERRORS,
)  # fmt: skip
async def list_calls_v3(request: Request, body: ListCalls = Body(default_factory=ListCalls)) -> JSONResponse:
    f = body.filter_criteria or ListFilter()
    try:
        start_after, start_before = f.start_timestamp.bounds() if f.start_timestamp else (None, None)
        page, cursor = await services(request).store.list(
            agent_ids=[a.agent_id for a in f.agent or []],
            statuses=_enum_values(f.call_status, "call_status", {s.value for s in CallStatus}, {"not_connected"}),
            directions=_enum_values(f.direction, "direction", {d.value for d in Direction}),
            call_types=_enum_values(f.call_type, "call_type", {t.value for t in CallType}),
            start_after=start_after,
            start_before=start_before,
            descending=body.sort_order == "descending",
            limit=body.limit,
            cursor=body.pagination_key,
            skip=body.skip,
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
        page, cursor = await services(request).store.list(
            agent_ids=agent_id,
            statuses=[s.value for s in call_status],
            directions=[d.value for d in direction],
            start_after=start_after,
            start_before=start_before,
            descending=sort_order == "descending",
            limit=limit,
            cursor=pagination_key,
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
    await _call(request, call_id)
    changes = body.model_dump(exclude_unset=True)
    record = await services(request).store.update(call_id, **changes) if changes else await _call(request, call_id)
    if record is None:  # deleted meanwhile
        raise ApiError(404, f"call {call_id} not found")
    return JSONResponse(record.public())


@router.delete("/v2/delete-call/{call_id}", dependencies=AUTH, status_code=204, summary="Delete a call", responses=ERRORS)
async def delete_call(call_id: str, request: Request) -> Response:
    record = await _call(request, call_id)
    if record.call_status in (CallStatus.registered, CallStatus.ongoing):
        raise ApiError(422, f"call {call_id} is {record.call_status.value}: stop it before deleting it")
    await services(request).store.delete(call_id)
    return Response(status_code=204)


@router.post("/v2/stop-call/{call_id}", dependencies=AUTH, status_code=204, summary="Stop a live call", responses=ERRORS)
async def stop_call(call_id: str, request: Request) -> Response:
    """Ends a live call on both legs: the agent socket is closed and the phone call is hung up
    through Twilio (recorded as agent_hangup: the business side ended it)."""
    record = await _call(request, call_id)
    if record.call_status not in (CallStatus.registered, CallStatus.ongoing):
        raise ApiError(422, f"call {call_id} is not live (it is {record.call_status.value})")
    svc = services(request)
    if record.twilio_call_sid:
        await svc.twilio_rest.hangup(record.twilio_call_sid, record.twilio_account_sid)
    if not svc.stop_local_call(call_id, DisconnectionReason.agent_hangup, "stopped through the API"):
        # registered, or relayed by another replica (Twilio's hang-up ends the stream there,
        # which records the end with everything it measured)
        await svc.store.finish(
            call_id, DisconnectionReason.agent_hangup, error_detail="stopped through the API", only_if=CallStatus.registered
        )
    return Response(status_code=204)


async def _call_file(request: Request, call_id: str, path, what: str, media_type: str) -> Response:
    await _call(request, call_id)
    if not path.exists():
        raise ApiError(404, f"call {call_id} has no {what}")
    return FileResponse(path, media_type=media_type)


@router.get("/v2/recordings/{call_id}.wav", dependencies=AUTH, summary="A call's stereo recording (caller left, agent right)")
async def recording(call_id: str, request: Request) -> Response:
    return await _call_file(request, call_id, services(request).recording_path(call_id), "recording", "audio/wav")


@router.get("/v2/public-logs/{call_id}.jsonl", dependencies=AUTH, summary="A call's public log (JSON lines)")
async def public_log(call_id: str, request: Request) -> Response:
    return await _call_file(request, call_id, services(request).log_path(call_id), "public log", "application/x-ndjson")


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

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"status": "error", "message": "internal error"}, status_code=500)
