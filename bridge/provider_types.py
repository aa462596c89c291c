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
    """Validate one client message to the provider against its SDK's types; returns it parsed.
    Raises ``MessageProblem``."""
    data = json.loads(message) if isinstance(message, str | bytes) else message
    if spec.protocol == "openai-realtime":
        _check_openai(data)
    elif spec.protocol == "gemini-live":
        _check_gemini(data)
    else:
        raise MessageProblem(f"no SDK check for {spec.protocol}")
    return data


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
