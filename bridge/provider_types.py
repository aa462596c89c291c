"""What the bridge sends a hosted voice model, checked with that provider's official SDK types
(``openai.types.realtime``, ``google.genai.types``): at start-up, each hosted agent's first
messages (its set-up with the agents file's ``session`` table merged in), so a wrong name or a
bad value stops start-up naming the agent instead of failing every call; in the tests, every
message the bridge sends. Unknown fields fail too (the OpenAI SDK's models allow them: they are
looked for here).

The SDKs are the optional extras ``[openai]`` and ``[gemini]``; they are imported only here and
only when an agent needs one.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from typing import Any

from .protocol.hosted import ProviderSpec


class MessageProblem(ValueError):
    """A message the provider's SDK types refuse (the text says where and why)."""


def sdk_installed(spec: ProviderSpec) -> bool:
    try:
        return importlib.util.find_spec(spec.sdk) is not None
    except ModuleNotFoundError:  # (a parent package missing: google, for google.genai)
        return False


def check_message(spec: ProviderSpec, message: str | bytes | dict) -> dict[str, Any]:
    """Validate one client message to the provider against its SDK's types; returns it parsed
    (a binary frame, Deepgram's audio: ``{"audio": bytes}``). Raises ``MessageProblem``."""
    if isinstance(message, bytes) and spec.protocol == "deepgram-agent":
        return {"audio": message}
    try:
        data = json.loads(message) if isinstance(message, str | bytes) else message
    except ValueError as e:
        raise MessageProblem(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise MessageProblem("not a JSON object")
    checks = {"openai-realtime": _check_openai, "gemini-live": _check_gemini, "deepgram-agent": _check_deepgram, "elevenlabs-agent": _check_elevenlabs}
    if spec.protocol not in checks:
        raise MessageProblem(f"no SDK check for {spec.protocol}")
    checks[spec.protocol](data)
    return data


def _check_deepgram(data: dict[str, Any]) -> None:
    import pydantic
    from deepgram.agent.v1 import types

    models = {
        "Settings": types.AgentV1Settings, "KeepAlive": types.AgentV1KeepAlive,
        "FunctionCallResponse": types.AgentV1SendFunctionCallResponse, "InjectUserMessage": types.AgentV1InjectUserMessage,
        "InjectAgentMessage": types.AgentV1InjectAgentMessage, "UpdatePrompt": types.AgentV1UpdatePrompt,
        "UpdateSpeak": types.AgentV1UpdateSpeak,
    }  # fmt: skip (the client messages of deepgram-sdk's agent socket: its send_* methods)
    model = models.get(data.get("type"))
    if model is None:
        raise MessageProblem(f"{data.get('type')!r} is not a Deepgram Voice Agent client message")
    try:
        parsed = model.model_validate(data)
    except pydantic.ValidationError as e:
        raise MessageProblem(_first_error(e)) from None
    if extra := _unknown_fields(parsed, data["type"]):
        raise MessageProblem(f"unknown field {extra}")


#: what the elevenlabs SDK's conversational_ai/conversation.py sends, field by field
ELEVENLABS_MESSAGES = {
    "pong": {"type": str, "event_id": int},
    "client_tool_result": {"type": str, "tool_call_id": str, "result": str, "is_error": bool},
    "user_message": {"type": str, "text": str},
    "contextual_update": {"type": str, "text": str},
    "user_activity": {"type": str},
}


def _check_elevenlabs(data: dict[str, Any]) -> None:
    import pydantic
    from elevenlabs.types import ConversationInitiationClientDataRequestInput

    if "user_audio_chunk" in data:
        if set(data) != {"user_audio_chunk"} or not isinstance(data["user_audio_chunk"], str):
            raise MessageProblem("a user_audio_chunk message has only that field, a base64 string")
        return
    kind = data.get("type")
    if kind == "conversation_initiation_client_data":
        body = {k: v for k, v in data.items() if k != "type"}
        try:
            parsed = ConversationInitiationClientDataRequestInput.model_validate(body)
        except pydantic.ValidationError as e:
            raise MessageProblem(_first_error(e)) from None
        if extra := _unknown_fields(parsed, kind):
            raise MessageProblem(f"unknown field {extra}")
        return
    fields = ELEVENLABS_MESSAGES.get(kind)
    if fields is None:
        raise MessageProblem(f"{kind!r} is not an ElevenLabs Agents client message")
    if set(data) != set(fields) or not all(isinstance(data[k], t) and not (t is int and isinstance(data[k], bool)) for k, t in fields.items()):
        raise MessageProblem(f"a {kind} message has exactly {sorted(fields)}: got {data}")


def _check_openai(data: dict[str, Any]) -> None:
    import pydantic
    from openai.types.realtime import RealtimeClientEvent

    try:
        event = pydantic.TypeAdapter(RealtimeClientEvent).validate_python(data)
    except pydantic.ValidationError as e:
        raise MessageProblem(_first_error(e)) from None
    if extra := _unknown_fields(event, data.get("type", "event")):
        raise MessageProblem(f"unknown field {extra}")


def _check_gemini(data: dict[str, Any]) -> None:
    import pydantic
    from google.genai import types

    if len(data) != 1:
        raise MessageProblem(f"a Gemini Live client message has exactly one field, not {sorted(data)}")
    try:
        types.LiveClientMessage.model_validate(data)  # (camelCase aliases; extra fields forbidden)
    except pydantic.ValidationError as e:
        raise MessageProblem(_first_error(e)) from None


def _unknown_fields(model, path: str) -> str | None:
    """The path of a field the SDK's model kept as an extra (it has no such field), if any."""
    import pydantic

    if isinstance(model, pydantic.BaseModel):
        for name in model.__pydantic_extra__ or {}:
            return f"{path}.{name}"
        for name in type(model).model_fields:
            if found := _unknown_fields(getattr(model, name), f"{path}.{name}"):
                return found
    elif isinstance(model, list | tuple):
        for i, item in enumerate(model):
            if found := _unknown_fields(item, f"{path}[{i}]"):
                return found
    elif isinstance(model, dict):
        for key, item in model.items():
            if found := _unknown_fields(item, f"{path}.{key}"):
                return found
    return None


def _first_error(error) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" + (f" ({len(error.errors()) - 1} more)" if len(error.errors()) > 1 else "")
