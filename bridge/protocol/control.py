"""What an agent may ask of its call (sans-I/O), and the bridge's answer: transfer it, press
keys towards the callee, end it. The same requests come as ``web``-protocol events, as API
bodies and as a hosted model's built-in tools (docs/protocol.md, "Controlling the call"):

- ``{"event_type": "transfer_call", "to": "+14155550100", "mode": "cold", "caller_id": "agent",
  "extension": "123#", "message": "..."}``: ``to`` an E.164 number or a SIP URI; ``mode``
  ``cold`` (default) or ``warm``; ``caller_id`` ``agent`` (the agent's number, default) or
  ``caller``; ``message`` what a warm transfer tells the target before joining;
- ``{"event_type": "press_digit", "digits": "1w2#"}`` (``w``: half a second's pause);
- ``{"event_type": "end_call"}``: as closing with 1000, after the last audio was heard.

Each is answered ``{"event_type": "call_control_result", "action": ..., "ok": ..., "reason": ...}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

E164 = re.compile(r"\+[1-9]\d{1,14}")
SIP_URI = re.compile(r"sips?:[^\s<>\"@]+@[A-Za-z0-9.-]+(:\d+)?(;[^\s<>\"]*)?")
DIGITS = re.compile(r"[0-9*#A-Dw]{1,64}")
EXTENSION = re.compile(r"[0-9*#w]{1,32}")
MAX_MESSAGE_CHARS = 1000
MAX_SIP_CHARS = 256
ACTIONS = ("transfer_call", "press_digit", "end_call")


class ControlError(ValueError):
    """A request that cannot be done as asked: the text is the answer's ``reason``."""


@dataclass(frozen=True, slots=True)
class TransferCall:
    to: str
    mode: str = "cold"
    caller_id: str = "agent"
    extension: str | None = None
    message: str | None = None
    action = "transfer_call"

    @property
    def sip(self) -> bool:
        return self.to.startswith(("sip:", "sips:"))


@dataclass(frozen=True, slots=True)
class PressDigit:
    digits: str
    action = "press_digit"


@dataclass(frozen=True, slots=True)
class EndCall:
    action = "end_call"


Control = TransferCall | PressDigit | EndCall


@dataclass(frozen=True, slots=True)
class BadControl:
    """A control request that was refused as it came (the agent is told why)."""

    action: str
    reason: str


def parse(event: dict[str, Any]) -> Control:
    """A control request from its fields (``event_type`` or ``action`` names it). Raises
    ``ControlError`` saying what is wrong."""
    action = event.get("event_type") or event.get("action")
    if action == "end_call":
        return EndCall()
    if action == "press_digit":
        digits = event.get("digits")
        if not isinstance(digits, str) or not DIGITS.fullmatch(digits):
            raise ControlError("digits must be 1-64 of 0-9 * # A-D, and w for a half-second pause")
        return PressDigit(digits)
    if action == "transfer_call":
        to = event.get("to")
        if not isinstance(to, str) or len(to) > MAX_SIP_CHARS or not (E164.fullmatch(to) or SIP_URI.fullmatch(to)):
            raise ControlError("to must be an E.164 number (like +14155550100) or a SIP URI (sip:user@host)")
        mode, caller_id = event.get("mode") or "cold", event.get("caller_id") or "agent"
        if mode not in ("cold", "warm"):
            raise ControlError("mode must be cold or warm")
        if caller_id not in ("agent", "caller"):
            raise ControlError("caller_id must be agent or caller")
        extension = event.get("extension") or None
        if extension is not None and (not isinstance(extension, str) or not EXTENSION.fullmatch(extension)):
            raise ControlError("extension must be 1-32 of 0-9 * #, and w for a half-second pause")
        message = event.get("message") or None
        if message is not None and (not isinstance(message, str) or len(message) > MAX_MESSAGE_CHARS):
            raise ControlError(f"message must be text of at most {MAX_MESSAGE_CHARS} characters")
        if mode == "cold" and message:
            raise ControlError("message is what a warm transfer tells the target: a cold transfer has none")
        return TransferCall(to, mode, caller_id, extension, message)
    raise ControlError(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")


def result(action: str, ok: bool, reason: str | None = None) -> dict[str, Any]:
    return {"event_type": "call_control_result", "action": action, "ok": ok, "reason": reason}


def result_event(action: str, ok: bool, reason: str | None = None) -> str:
    return orjson.dumps(result(action, ok, reason)).decode()


#: The built-in tools a hosted model may call (``call_tools`` in the agents file), as JSON Schema
TOOL_SCHEMAS: dict[str, dict[str, Any]] = {
    "transfer_call": {
        "description": "Transfer the phone call to another number or SIP address. Cold: hand the caller over now. Warm: brief the target with a message first; if it does not answer, the caller comes back to you.",
        "parameters": {
            "type": "object",
            "properties": {
                "to": {"type": "string", "description": "E.164 number like +14155550100, or sip:user@host"},
                "mode": {"type": "string", "enum": ["cold", "warm"]},
                "extension": {"type": "string", "description": "digits to press once the target answers"},
                "message": {"type": "string", "description": "warm: what the target hears before joining"},
            },
            "required": ["to"],
        },
    },
    "press_digit": {
        "description": "Press keys on the phone's keypad towards the callee (an IVR menu). w is a half-second pause.",
        "parameters": {"type": "object", "properties": {"digits": {"type": "string"}}, "required": ["digits"]},
    },
    "end_call": {"description": "Hang up the call, once your last words have been heard.", "parameters": {"type": "object", "properties": {}}},
}
