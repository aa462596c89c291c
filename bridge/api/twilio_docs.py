"""How Twilio's callbacks appear in ``/openapi.json`` and ``/docs``: what Twilio posts (a signed
form, not JSON), and that the answer is TwiML (or an empty 204). FastAPI cannot see either from
the routes, which read the raw form so the signature is checked before anything else."""

from __future__ import annotations

from typing import Any

from fastapi import Response

#: what every Twilio callback carries
CALL_FIELDS = {
    "CallSid": "the call's Twilio SID (CA + 32 hex digits)",
    "AccountSid": "the Twilio account's SID (AC + 32 hex digits)",
    "From": "the caller: an E.164 number, a SIP URI or a client: identity",
    "To": "the number called",
    "CallStatus": "queued, ringing, in-progress, completed, busy, failed, no-answer or canceled",
    "Direction": "inbound, or outbound-api for a call the bridge dialed",
    "ApiVersion": "2010-04-01",
}
SIGNATURE = {
    "name": "X-Twilio-Signature",
    "in": "header",
    "required": True,
    "description": (
        "Twilio's HMAC-SHA1 of the URL and the form, with the account's auth token (BRIDGE_TWILIO_AUTH_TOKEN): "
        "a request without a valid one is answered 403, so these routes cannot be tried from this page"
    ),
    "schema": {"type": "string"},
}
FORBIDDEN = {
    403: {
        "description": "no valid X-Twilio-Signature",
        "content": {"application/json": {"example": {"status": "error", "message": "invalid or missing X-Twilio-Signature"}}},
    }
}


def twilio_callback(fields: dict[str, str], *, twiml: str | None, answers: str) -> dict[str, Any]:
    """The route options of a Twilio callback: ``fields`` beyond ``CALL_FIELDS`` (name ->
    meaning), and an example of the TwiML it answers (None: an empty 204)."""
    form = {**CALL_FIELDS, **fields}
    body = {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "properties": {name: {"type": "string", "description": meaning} for name, meaning in form.items()},
                    "required": ["CallSid", "AccountSid"],
                }
            }
        },
    }
    if twiml is None:
        responses: dict[int | str, Any] = {204: {"description": answers}}
        status = 204
    else:
        responses = {200: {"description": answers, "content": {"application/xml": {"schema": {"type": "string"}, "example": twiml}}}}
        status = 200
    return {
        "status_code": status,
        "response_class": Response,
        "responses": {**responses, **FORBIDDEN},
        "openapi_extra": {"requestBody": body, "parameters": [SIGNATURE]},
    }


CONNECT_EXAMPLE = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Connect action="https://bridge.example.com/twilio/stream-ended/'
    '6f1c0e4b2a9d4c1e8b7a5d3f2e1c0b9a" method="POST"><Stream url="wss://bridge.example.com/twilio/media">'
    '<Parameter name="call_id" value="6f1c0e4b2a9d4c1e8b7a5d3f2e1c0b9a" /><Parameter name="token" value="..." />'
    '<Parameter name="bridge_action" value="1" /></Stream></Connect></Response>'
)
HANGUP_EXAMPLE = '<?xml version="1.0" encoding="UTF-8"?><Response><Hangup /></Response>'
