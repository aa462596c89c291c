"""The call record, in the seeds' schema (the Retell-compatible call object), and its enums."""

from __future__ import annotations

import re
import time
from enum import Enum
from typing import Any

from pydantic import BaseModel, Field


#: What a call id may be: every path that names a call (the API's, the call sockets', the
#: listen sockets', Twilio's callbacks) answers "unknown call" for anything else, before the
#: database is asked, so both databases answer alike (PostgreSQL refuses a NUL, SQLite not)
VALID_CALL_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: The longest caller or callee the record keeps (``from_number`` / ``to_number``): E.164
#: numbers, SIP URIs (``sip:+14155550100@trunk.example.pstn.twilio.com``), ``client:`` identities
MAX_PARTY_CHARS = 256


def is_call_id(value: object) -> bool:
    """Whether ``value`` can name a call (``VALID_CALL_ID``)."""
    return isinstance(value, str) and VALID_CALL_ID.fullmatch(value) is not None


class CallStatus(str, Enum):
    registered = "registered"
    ongoing = "ongoing"
    ended = "ended"
    error = "error"


class Protocol(str, Enum):
    web = "web"
    twilio = "twilio"


class Encoding(str, Enum):
    s16le = "s16le"
    mulaw = "mulaw"


class Direction(str, Enum):
    inbound = "inbound"
    outbound = "outbound"


class CallType(str, Enum):
    phone_call = "phone_call"
    web_call = "web_call"


class DisconnectionReason(str, Enum):
    user_hangup = "user_hangup"
    agent_hangup = "agent_hangup"
    call_transfer = "call_transfer"
    voicemail_reached = "voicemail_reached"
    inactivity = "inactivity"
    machine_detected = "machine_detected"
    max_duration_reached = "max_duration_reached"
    concurrency_limit_reached = "concurrency_limit_reached"
    no_valid_payment = "no_valid_payment"
    scam_detected = "scam_detected"
    error_inbound_webhook = "error_inbound_webhook"
    dial_busy = "dial_busy"
    dial_failed = "dial_failed"
    dial_no_answer = "dial_no_answer"
    error_llm_websocket_open = "error_llm_websocket_open"
    error_llm_websocket_lost_connection = "error_llm_websocket_lost_connection"
    error_llm_websocket_runtime = "error_llm_websocket_runtime"
    error_llm_websocket_corrupt_payload = "error_llm_websocket_corrupt_payload"
    error_frontend_corrupted_payload = "error_frontend_corrupted_payload"
    error_twilio = "error_twilio"
    error_no_audio_received = "error_no_audio_received"
    error_asr = "error_asr"
    error_retell = "error_retell"
    error_unknown = "error_unknown"
    error_user_not_joined = "error_user_not_joined"
    registered_call_timeout = "registered_call_timeout"

    @property
    def is_error(self) -> bool:
        return self.value.startswith("error_") or self is DisconnectionReason.registered_call_timeout


class Latency(BaseModel):
    """Percentiles of one latency series, in milliseconds (the seeds' latency object)."""

    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None
    min: float | None = None
    num: int = 0


def now_ms() -> int:
    return int(time.time() * 1000)


class CallRecord(BaseModel):
    """Every field of the seeds' get-call response; ``None`` where the bridge knows nothing.
    Fields after ``call_analysis`` are the bridge's own bookkeeping (not in the public schema)."""

    call_id: str
    agent_id: str
    agent_version: int = 0  # agents from the agents file have one version (the retell-sdk needs the field)
    call_type: CallType = CallType.phone_call
    audio_websocket_protocol: Protocol
    audio_encoding: Encoding
    sample_rate: int
    call_status: CallStatus = CallStatus.registered
    end_call_after_silence_ms: int | None = None
    from_number: str | None = None
    to_number: str | None = None
    direction: Direction | None = None
    metadata: dict[str, Any] | None = None
    retell_llm_dynamic_variables: dict[str, Any] | None = None
    drop_call_if_machine_detected: bool | None = None
    opt_out_sensitive_data_storage: bool | None = None
    start_timestamp: int | None = None
    end_timestamp: int | None = None
    transcript: str | None = None
    transcript_object: list[dict[str, Any]] | None = None
    transcript_with_tool_calls: list[dict[str, Any]] | None = None
    recording_url: str | None = None
    public_log_url: str | None = None
    e2e_latency: Latency | None = None
    llm_latency: Latency | None = None
    llm_websocket_network_rtt_latency: Latency | None = None
    disconnection_reason: DisconnectionReason | None = None
    call_analysis: dict[str, Any] | None = None
    access_token: str | None = None  # web calls only (the web_call object carries it)
    #: where the call was transferred (E.164 or SIP URI), when it ended as call_transfer
    transfer_destination: str | None = None
    #: an outbound call that reached a voicemail: {"answered_by", "action", "message"} (what was left)
    voicemail: dict[str, Any] | None = None
    #: the agent's own part of each turn's latency: from when the bridge had the caller's end of
    #: speech to the agent's first audio (e2e_latency is what the caller lived; docs/calls.md)
    agent_latency: Latency | None = None
    #: what the network did to the caller's audio (a phone call's; docs/calls.md): inbound delay
    #: beyond the call's best frame, stalls, late bursts, frames lost, duplicated, reordered
    caller_network: dict[str, Any] | None = None
    # --- bridge bookkeeping (stored, never served) ---
    twilio_call_sid: str | None = None
    twilio_account_sid: str | None = None
    registered_at: int = Field(default_factory=now_ms)
    error_detail: str | None = None
    notes: list[str] = Field(default_factory=list)  # e.g. rejected stream attempts
    #: what Twilio does once the stream ends, when not a plain hang-up (a transfer's <Dial>)
    next_twiml: str | None = None
    #: a warm transfer under way: {"to", "message", "room"}
    transfer: dict[str, Any] | None = None
    #: an outbound call's own voicemail settings (create-phone-call), over its agent's
    voicemail_options: dict[str, Any] | None = None

    def public(self) -> dict[str, Any]:
        """The call object as the API serves it."""
        body = self.model_dump(mode="json", exclude=BOOKKEEPING)
        if self.call_type is not CallType.web_call:
            del body["access_token"]
        return body


BOOKKEEPING = {"twilio_call_sid", "twilio_account_sid", "registered_at", "error_detail", "notes", "next_twiml", "transfer", "voicemail_options"}
