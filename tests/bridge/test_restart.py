"""The bridge process is killed (SIGKILL) during a call and started again: the call reads back
as ended with a reason, and every webhook event is delivered exactly once."""

import asyncio
import json
import os
import signal
import subprocess
import sys

import httpx
import numpy as np

from audio import read_wav

from bridge.server import BackgroundServer
from bridge.dev.simulator import FakeTwilioApi, simulate_call

from bridge.store import SqlCallStore

from .conftest import (
    API_KEY, AUTH_TOKEN, api_client, call_status, caller_audio, free_port, retell_client, until, wait_for_end,
)  # fmt: skip
from .test_webhooks import Receiver, all_delivered


async def start_process(env: dict, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "serve", "--port", str(port)],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    async with httpx.AsyncClient() as http:
        async with asyncio.timeout(30):
            while True:
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        return process
                except httpx.TransportError:
                    pass
                assert process.poll() is None, "the bridge process died during start-up"
                await asyncio.sleep(0.1)


async def test_a_call_cut_by_a_crash_is_ended_and_its_webhooks_arrive_once(database_url, tmp_path):
    receiver = Receiver()
    fake = FakeTwilioApi(AUTH_TOKEN)
    await fake.start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        "BRIDGE_DATA_DIR": str(tmp_path), "BRIDGE_DATABASE_URL": database_url, "BRIDGE_INSTANCE_ID": "restart-test",
        "BRIDGE_TWILIO_AUTH_TOKEN": AUTH_TOKEN, "BRIDGE_API_KEYS": API_KEY, "BRIDGE_TWILIO_API_BASE_URL": fake.base_url,
        "BRIDGE_WEBHOOK_POLL_S": "0.05", "BRIDGE_WEBHOOK_RETRY_BASE_S": "0.1", "BRIDGE_REQUEST_HOST_SIGNATURES": "1",
        "BRIDGE_HEARTBEAT_INTERVAL_S": "0.5",  # the killed process's lease (3 heartbeats) runs out in 1.5 s
    }  # fmt: skip
    async with BackgroundServer(receiver.app) as hooks:
        env["BRIDGE_WEBHOOK_URL"] = f"{hooks.base_url}/hook"
        process = await start_process(env, port)
        try:
            call = asyncio.create_task(simulate_call(base, AUTH_TOKEN, caller_audio(), speed=1.0, tail_ms=60000, fake_api=fake))
            # the call is live, call_started was delivered, and the caller's first words are
            # in the recording (0.8 s of stereo 16-bit 8 kHz past the header)
            started = await until(lambda: [e for e in receiver.events if e["event"] == "call_started"], timeout=20)
            recording = tmp_path / "recordings" / f"{started[0]['call']['call_id']}.wav"
            await until(lambda: recording.exists() and recording.stat().st_size >= 44 + 0.8 * 32000, timeout=20)
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            result = await call
            assert result.ended_by == "bridge"  # Twilio saw the stream die (and ran the fallback)
            process = await start_process(env, port)
            async with api_client(base) as http:
                record = (await http.get(f"/v2/get-call/{result.call_id}")).json()
            assert record["call_status"] == "error" and record["disconnection_reason"] == "error_unknown"
            assert record["end_timestamp"] >= record["start_timestamp"]
            # the recording cut by the crash was repaired at start-up: a playable WAV
            async with api_client() as http:
                wav = (await http.get(record["recording_url"])).content
            path = tmp_path / "after-crash.wav"
            path.write_bytes(wav)
            pcm, rate, channels = read_wav(path)
            assert (rate, channels) == (8000, 2) and len(pcm) == len(wav) - 44
            left = np.frombuffer(pcm, "<i2").reshape(-1, 2)[:, 0]
            assert len(left) >= 8000 * 0.5 and left.any()  # the caller's first words are in it
            await until(lambda: receiver.kinds(result.call_id) == ["call_started", "call_ended"])
            store = await SqlCallStore.open(database_url, "test-observer", tmp_path)
            try:  # every job delivered: nothing more can come
                await until(lambda: all_delivered(store, result.call_id, 2))
            finally:
                await store.close()
            assert receiver.kinds(result.call_id) == ["call_started", "call_ended"]
            assert receiver.bad_signatures == 0
            ended = receiver.events[-1]["call"]
            assert ended["call_status"] == "error" and ended["disconnection_reason"] == "error_unknown"
        finally:
            process.kill()
            process.wait(10)
            await fake.stop()


async def test_calls_only_registered_survive_a_restart(start_bridge, tmp_path):
    """A call registered by the voice webhook (its TwiML not yet acted on), by the API and by
    create-web-call, then the bridge restarts: none of them is ended by the restart, the stream
    token still opens the phone call's stream, and the others end by their own timeout."""
    from .test_media_stream import open_stream, register

    data_dir = tmp_path / "restarting"
    first = await start_bridge(data_dir=data_dir)
    url, params = await register(first)  # the voice webhook's TwiML, not yet acted on
    async with retell_client(first) as sdk:
        api_call = await sdk.call.register_phone_call(agent_id="echo", from_number="+14155550100", to_number="+14155550111")
        web_call = await sdk.call.create_web_call(agent_id="echo")
    await first.server.stop()
    second = await start_bridge(data_dir=data_dir, registered_call_timeout_s=3)
    url = url.replace(first.base_url.replace("http", "ws"), second.base_url.replace("http", "ws"))
    for call_id in (params["call_id"], api_call.call_id, web_call.call_id):
        assert (await second.store.get(call_id)).call_status.value == "registered"
    stream = await open_stream(url, params)
    await until(lambda: call_status(second, params["call_id"], "ongoing"))
    await stream.send(json.dumps({"event": "stop", "stop": {}}))
    assert (await wait_for_end(second, params["call_id"])).disconnection_reason.value == "user_hangup"
    swept = {call_id: (await wait_for_end(second, call_id, timeout=15)).disconnection_reason.value
             for call_id in (api_call.call_id, web_call.call_id)}  # fmt: skip
    assert swept == {api_call.call_id: "registered_call_timeout", web_call.call_id: "error_user_not_joined"}


async def test_a_second_process_with_the_same_identity_stops_before_touching_a_call(tmp_path, database_url):
    """Two `bridge serve` on one data directory (one host name, one instance id): the second
    stops with a message naming BRIDGE_INSTANCE_ID, on another port as on the same one, and the
    first one's live call goes on to its real end."""
    fake = FakeTwilioApi(AUTH_TOKEN)
    await fake.start()
    port = free_port()
    env = {
        "BRIDGE_DATA_DIR": str(tmp_path), "BRIDGE_DATABASE_URL": database_url, "BRIDGE_TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "BRIDGE_API_KEYS": API_KEY, "BRIDGE_TWILIO_API_BASE_URL": fake.base_url, "BRIDGE_REQUEST_HOST_SIGNATURES": "1",
        "BRIDGE_HEARTBEAT_INTERVAL_S": "0.5",
    }  # fmt: skip
    first = await start_process(env, port)
    try:
        call = asyncio.create_task(
            simulate_call(f"http://127.0.0.1:{port}", AUTH_TOKEN, caller_audio(), api_key=API_KEY, speed=1.0, tail_ms=4000, fake_api=fake)
        )
        await until(lambda: call_started(f"http://127.0.0.1:{port}"), timeout=20)
        for second_port in (port, free_port()):
            second = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "bridge", "serve", "--port", str(second_port)],
                env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
            expected = "cannot listen on" if second_port == port else "is held by another live process"
            assert expected in second.stderr, second.stderr
        result = await call
        assert result.ended_by == "caller" and result.record["disconnection_reason"] == "user_hangup"
    finally:
        first.kill()
        first.wait(10)
        await fake.stop()


async def call_started(base: str) -> bool:
    async with api_client(base) as http:
        calls = (await http.post("/v3/list-calls", json={})).json()["items"]
    return any(c["call_status"] == "ongoing" for c in calls)
