"""The call API's request and response bodies: the seeds' field names and rules, checked by
pydantic before anything is stored, and named in the OpenAPI document at ``/docs``."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model, field_validator, model_validator

from ..models import BOOKKEEPING, CallRecord, Direction, Encoding, Protocol
from ..settings import E164

MAX_METADATA_BYTES = 50 * 1024

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


# --- request bodies --------------------------------------------------------------------------


MAX_METADATA_DEPTH = 32  # nesting levels of objects and arrays: far more than any real metadata


def _shape(value) -> tuple[int, bool]:
    """How deeply objects and arrays nest in ``value``, and whether a key or a string in it holds
    a NUL (iterative: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return deepest, True
        elif isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_METADATA_DEPTH:
                break
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest, False


def _metadata_size(v: dict | None) -> dict | None:
    if v is None:
        return v
    depth, nul = _shape(v)
    if depth > MAX_METADATA_DEPTH:
        raise ValueError(f"nests objects or arrays deeper than {MAX_METADATA_DEPTH} levels")
    if nul:  # (PostgreSQL stores no NUL in text: refused on every database alike)
        raise ValueError("holds a NUL character (\\u0000) in a key or a string")
    try:
        size = len(json.dumps(v, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except (ValueError, UnicodeEncodeError):
        raise ValueError("must be JSON without NaN, infinities or unpaired surrogates") from None
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"is larger than {MAX_METADATA_BYTES // 1024} kB")
    return v


class CallBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    metadata: dict[str, Any] | None = None
    #: key value pairs of strings (the seeds' and the retell-sdk's type)
    retell_llm_dynamic_variables: dict[str, str] | None = None

    _metadata = field_validator("metadata", "retell_llm_dynamic_variables")(_metadata_size)


def e164(v: str | None) -> str | None:
    if v is not None and not E164.fullmatch(v):
        raise ValueError(f"{v!r} is not an E.164 number (like +14155550100)")
    return v


class RegisterCallV1(CallBody):
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

    _numbers = field_validator("from_number", "to_number")(e164)

    @model_validator(mode="after")
    def _twilio_mulaw(self) -> RegisterCallV1:
        twilio = self.audio_websocket_protocol is Protocol.twilio
        if twilio and (self.audio_encoding is not Encoding.mulaw or self.sample_rate != 8000):
            raise ValueError("the twilio protocol (Twilio's media stream) carries mulaw at sample_rate 8000")
        return self


class RegisterPhoneCall(CallBody):
    """The seed's body: only ``agent_id`` is required; numbers nobody gave are ``null`` in the
    record, and the direction is inbound unless said otherwise."""

    agent_id: str = Field(min_length=1)
    from_number: str | None = None
    to_number: str | None = None
    direction: Direction = Direction.inbound

    _numbers = field_validator("from_number", "to_number")(e164)


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


#: the most values an ``in`` filter takes (a list of call ids is bound as that many parameters:
#: SQLite refuses more than 32766)
MAX_IN_VALUES = 1000


class EnumFilter(BaseModel):
    op: Literal["in"] = "in"
    type: Literal["enum"] = "enum"
    value: Annotated[list[SafeText], Field(max_length=MAX_IN_VALUES)]


class StringFilter(BaseModel):
    """A text field's filter, as retell-sdk sends it: eq, ne, sw (starts with), ew (ends with),
    co (contains)."""

    op: Literal["eq", "ne", "sw", "ew", "co"]
    type: Literal["string"] = "string"
    value: SafeText


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
    call_id: StringFilter | EnumFilter | None = None
    from_number: StringFilter | None = None
    to_number: StringFilter | None = None
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


