"""The retell-sdk methods the bridge does not serve answer 501 with a message naming what is
missing (a bare 404 read as a wrong base URL), read from the pinned SDK's own sources so a path
the SDK gains is noticed here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import retell

from bridge.api.unserved import UNSERVED

from .conftest import api_client, retell_client


def sdk_paths() -> set[tuple[str, str]]:
    """Every (method, path template) the installed retell-sdk requests."""
    found = set()
    for source in (Path(retell.__file__).parent / "resources").rglob("*.py"):
        for m in re.finditer(r'self\._(get|post|patch|delete|put)\(\s*(?:path_template\()?\s*f?"([^"]+)"', source.read_text()):
            found.add((m.group(1).upper(), m.group(2)))
    return found


def served_paths(app) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, the 501s aside."""

    def routes(container):
        for route in container.routes:
            if (included := getattr(route, "original_router", None)) is not None:  # (an included router, as FastAPI keeps it)
                yield from routes(included)
            elif getattr(route, "endpoint", None) is not None:
                yield route

    return {(method, route.path) for route in routes(app) if route.endpoint.__name__ != "unserved" for method in getattr(route, "methods", None) or ()}


async def test_every_retell_sdk_path_is_served_or_says_what_is_missing(bridge):
    paths = sdk_paths()
    assert len(paths) > 100  # (the reading of the SDK found its requests)
    served = served_paths(bridge.app)
    assert paths - served - set(UNSERVED) == set(), "retell-sdk paths with neither a route nor a 501"
    assert set(UNSERVED) & served == set(), "a 501 for a path the bridge serves"
    async with api_client(bridge.base_url) as http:
        for method, path in sorted(UNSERVED):
            answer = await http.request(method, re.sub(r"\{[^}]+\}", "x1", path), json={})
            assert answer.status_code == 501, (method, path, answer.status_code, answer.text)
            body = answer.json()
            assert body["status"] == "error" and body["message"].startswith(f"not served by this bridge ({method} ")


async def test_the_sdk_s_own_methods_get_a_501_naming_the_alternative(bridge):
    async with retell_client(bridge) as sdk:
        with pytest.raises(retell.APIStatusError) as rerun:
            await sdk.call.rerun_analysis("c1")
        assert rerun.value.status_code == 501 and "post-call analysis" in rerun.value.message
        with pytest.raises(retell.APIStatusError) as live:
            await sdk.call.update_live("c1")
        assert live.value.status_code == 501 and "PATCH /v2/update-call/{call_id}" in live.value.message
        with pytest.raises(retell.APIStatusError) as agent:
            await sdk.agent.create(response_engine={"type": "retell-llm", "llm_id": "x"}, voice_id="v")
        assert agent.value.status_code == 501 and "agents file" in agent.value.message


async def test_a_501_still_needs_the_api_key(bridge):
    async with api_client(bridge.base_url, api_key="wrong") as http:
        answer = await http.post("/create-agent", json={})
    assert answer.status_code == 401
