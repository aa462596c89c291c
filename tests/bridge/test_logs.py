"""``BRIDGE_LOG_FORMAT=json`` on a real ``bridge serve``: every line one JSON object, the call's
lines carry its ``call_id``, and no token or key reaches the log."""

import json
import signal

from bridge.dev.simulator import simulate_call

from .conftest import AUTH_TOKEN, caller_audio
from .test_drain import Replica, fake_twilio  # noqa: F401 - the fixture


async def test_json_logs_name_the_call_and_keep_secrets_out(tmp_path, fake_twilio):  # noqa: F811
    fake, url = fake_twilio
    bridge = Replica(tmp_path, url, log_format="json")
    try:
        await bridge.start()
        result = await simulate_call(bridge.base_url, AUTH_TOKEN, caller_audio(), speed=4.0, tail_ms=1000, fake_api=fake)
        bridge.signal(signal.SIGTERM)
        assert await bridge.exit_code() == 0
    finally:
        bridge.stop()
    text = bridge.log_path.read_text()
    lines = [line for line in text.splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    assert len(entries) >= 5 and all({"ts", "level", "logger", "message"} <= e.keys() for e in entries)
    assert all(line.startswith("{") for line in text.splitlines()), text[:2000]  # the start-up banner too
    assert any(e["logger"] == "bridge.cli" and e["message"].startswith("bridge listening on") for e in entries)
    mine = [e for e in entries if e.get("call_id") == result.call_id]
    assert any("ended" in e["message"] for e in mine), mine
    assert any(e["logger"].startswith("uvicorn") for e in entries)  # uvicorn's lines too
    assert AUTH_TOKEN not in text and "key=" not in text.replace("key=[redacted]", "")
