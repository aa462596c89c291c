"""The CLI in its own process: bridge calls list / show against a live bridge, and serve refusing a setup it cannot run safely."""

import asyncio
import os
import subprocess
import sys

import httpx
import pytest

from .conftest import API_KEY, AUTH_TOKEN, free_port


async def run_cli(*args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bridge", *args], capture_output=True, text=True, timeout=60,
        env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


async def test_calls_list_and_show(start_bridge):
    bridge = await start_bridge()
    result = await bridge.call(dtmf=((300, "5"),))
    listed = await run_cli("calls", "list", "--url", bridge.base_url, "--api-key", API_KEY)
    assert listed.returncode == 0, listed.stderr
    assert result.call_id in listed.stdout and "user_hangup" in listed.stdout and "echo" in listed.stdout
    shown = await run_cli("calls", "show", result.call_id, "--url", bridge.base_url, "--api-key", API_KEY)
    assert shown.returncode == 0, shown.stderr
    assert "turn latency" in shown.stdout and "p50" in shown.stdout and "(n=1)" in shown.stdout
    assert "agent's own part" in shown.stdout and "lost 0" in shown.stdout  # (the media clock's figures)
    assert "User: <dtmf 5>" in shown.stdout and "/v2/recordings/" in shown.stdout


async def test_calls_show_errors_are_clear(start_bridge):
    bridge = await start_bridge()
    missing = await run_cli("calls", "show", "nope", "--url", bridge.base_url, "--api-key", API_KEY)
    assert missing.returncode == 1 and "404: call nope not found" in missing.stderr
    bad_key = await run_cli("calls", "list", "--url", bridge.base_url, "--api-key", "wrong")
    assert bad_key.returncode == 1 and "401: invalid API key" in bad_key.stderr
    down = await run_cli("calls", "list", "--url", "http://127.0.0.1:9", "--api-key", API_KEY)
    assert down.returncode == 1 and "cannot reach" in down.stderr


async def test_serve_with_a_real_token_and_no_public_url_stops_with_the_fix(tmp_path):
    env = {**os.environ, "BRIDGE_TWILIO_AUTH_TOKEN": "a-real-token", "BRIDGE_API_KEYS": "k", "BRIDGE_DATA_DIR": str(tmp_path)}
    env.pop("BRIDGE_PUBLIC_URL", None)
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bridge", "serve", "--port", "0"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "BRIDGE_PUBLIC_URL is not set" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3


async def run_with_env(args: list[str], **env) -> subprocess.CompletedProcess:
    full = {"PATH": "/usr/bin:/bin", "COLUMNS": "250", **env}
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bridge", *args], env=full, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "database_url,says",
    [
        ("mysql://root@127.0.0.1/calls", "database_url: Value error, 'mysql' is not supported"),
        ("postgresql://postgres@127.0.0.1:9/test", "cannot open the call database postgresql+asyncpg://postgres@127.0.0.1:9/test"),
    ],
)
async def test_serve_with_an_unusable_database_says_so_in_a_line(tmp_path, database_url, says):
    secrets = {"BRIDGE_TWILIO_AUTH_TOKEN": "token", "BRIDGE_API_KEYS": "key", "BRIDGE_REQUEST_HOST_SIGNATURES": "1"}
    done = await run_with_env(["serve", "--port", "0"], BRIDGE_DATABASE_URL=database_url, BRIDGE_DATA_DIR=str(tmp_path), **secrets)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3


async def test_serve_on_postgresql_without_shared_secrets_says_so_in_a_line(tmp_path):
    done = await run_with_env(["serve", "--port", "0"], BRIDGE_DATABASE_URL="postgresql://postgres@127.0.0.1:9/test", BRIDGE_DATA_DIR=str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("BRIDGE_TWILIO_AUTH_TOKEN and BRIDGE_API_KEYS must be set on a replica that uses PostgreSQL")
    assert not (tmp_path / "dev-secrets.json").exists()  # none made up


async def test_serve_with_an_unusable_data_dir_says_so_in_a_line(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    done = await run_with_env(["serve", "--port", "0"], BRIDGE_DATA_DIR=str(not_a_dir))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"BRIDGE_DATA_DIR {not_a_dir} is not a writable directory: Not a directory"


async def test_simulate_names_what_is_wrong(start_bridge, tmp_path):
    quick = ["--speed", "16", "--tail-ms", "200", "--max-call-s", "30"]
    nobody = await run_with_env(["simulate", "--url", "http://127.0.0.1:9", "--auth-token", "t", *quick], BRIDGE_DATA_DIR=str(tmp_path))
    assert nobody.returncode == 1 and "cannot reach the bridge at http://127.0.0.1:9" in nobody.stderr
    assert "Traceback" not in nobody.stderr
    bridge = await start_bridge()
    forged = await run_with_env(["simulate", "--url", bridge.base_url, "--auth-token", "not-the-token", *quick])
    assert forged.returncode == 1 and "refused the webhook's signature: the auth token from --auth-token" in forged.stderr
    wrong_key = await run_with_env(
        ["simulate", "--url", bridge.base_url, "--api-key", "wrong", *quick], BRIDGE_TWILIO_AUTH_TOKEN=AUTH_TOKEN
    )
    assert wrong_key.returncode == 1 and "401 for the call record: invalid API key" in wrong_key.stderr
    capped = await run_with_env(
        ["simulate", "--url", bridge.base_url, "--api-key", API_KEY, "--speed", "16", "--max-call-s", "1"],
        BRIDGE_TWILIO_AUTH_TOKEN=AUTH_TOKEN,
    )
    assert capped.returncode == 0 and "the call reached --max-call-s (1 s)" in capped.stderr


async def test_the_readme_sdk_example_runs_as_written_against_bridge_serve(tmp_path):
    """The README's retell-sdk example, run as written (only its port moved to a free one)
    against ``bridge serve`` in its default mode: embedded defaults, dev secrets, no accounts."""
    import re
    from pathlib import Path

    from .conftest import free_port, until

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## The call API") :]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "bridge", "serve", "--port", str(port)], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:

        async def serving() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        await until(serving, timeout=30)
        script = example.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        ran = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert re.fullmatch(r'<Connect><Stream url="wss://YOUR-HOST/audio-websocket/[0-9a-f]{32}"/></Connect>', lines[0]), lines
    assert lines[1:] == ["registered", "2"], lines


async def test_serve_refuses_a_web_agent_that_does_not_say_its_format(tmp_path):
    """A missing sample_rate once meant 24000: a 16 kHz agent got 24 kHz audio, with no error."""
    agents = tmp_path / "agents.toml"
    agents.write_text('[agents.sales]\nurl = "wss://agent.example.com/{call_id}"\nencoding = "s16le"\n')
    done = await run_with_env(["serve", "--port", "0", "--agents-file", str(agents)], BRIDGE_DATA_DIR=str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "agents.sales.sample_rate: required for a web agent" in done.stderr and "agents.sales.encoding" not in done.stderr


async def _serve_until_listening(args: list[str], env: dict, tmp_path) -> tuple[str, str]:
    """Start ``bridge serve``, wait (bounded) for its banner, stop it: (stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "serve", *args, env={"PATH": "/usr/bin:/bin", "BRIDGE_DATA_DIR": str(tmp_path), **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out = b""
    try:
        async with asyncio.timeout(30):
            while b"\n  agent " not in out or not out.endswith(b"\n"):
                chunk = await process.stdout.read(4096)
                if not chunk:
                    break
                out += chunk
    finally:
        process.terminate()
        rest, err = await asyncio.wait_for(process.communicate(), 30)
    return (out + rest).decode(), err.decode()


async def test_serve_says_where_it_listens_the_webhook_to_paste_and_what_each_agent_gets(tmp_path):
    port = free_port()
    agents = tmp_path / "agents.toml"
    agents.write_text(
        '[agents.sales]\nurl = "wss://agent.example.com/{call_id}"\nencoding = "s16le"\nsample_rate = 16000\n'
        'numbers = ["+14155550100"]\ndefault = true\n[agents.echo]\n'
    )
    out, _ = await _serve_until_listening(
        ["--port", str(port), "--agents-file", str(agents)],
        {"BRIDGE_PUBLIC_URL": "https://abc123.ngrok.app", "BRIDGE_TWILIO_AUTH_TOKEN": "t", "BRIDGE_API_KEYS": "k"}, tmp_path,
    )
    assert f"bridge listening on 127.0.0.1:{port}" in out
    assert f"http://127.0.0.1:{port}/dashboard/" in out and f"http://127.0.0.1:{port}/docs" in out
    assert "Twilio webhook: https://abc123.ngrok.app/twilio/voice" in out and "HOST" not in out
    assert "agent sales: web protocol at wss://agent.example.com/{call_id}" in out and "s16le 16000 Hz both ways" in out
    assert "+14155550100; the default for other numbers" in out
    assert "agent echo: the embedded echo agent (no url); s16le 24000 Hz both ways" in out


async def test_serve_on_the_embedded_defaults_says_where_the_dev_key_is(tmp_path):
    port = free_port()
    out, _ = await _serve_until_listening(["--port", str(port)], {}, tmp_path)
    assert f"{tmp_path / 'dev-secrets.json'} (its api_key" in out
    assert f"http://127.0.0.1:{port}/twilio/voice on this machine; for a real number set BRIDGE_PUBLIC_URL" in out


async def test_a_wrong_key_on_the_embedded_defaults_is_told_where_the_dev_key_is(tmp_path):
    from bridge.app import create_app
    from bridge.settings import ensure_dev_secrets, load_settings

    settings = load_settings(data_dir=tmp_path)
    ensure_dev_secrets(settings)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bridge") as http:
            wrong = await http.get("/v2/list-calls", headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401
    assert f"none of the keys in {tmp_path / 'dev-secrets.json'} (its api_key: BRIDGE_API_KEYS is not set" in wrong.text


async def test_calls_list_fits_80_columns_with_every_call_id_whole(start_bridge):
    bridge = await start_bridge()
    result = await bridge.call()
    listed = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bridge", "calls", "list", "--url", bridge.base_url, "--api-key", API_KEY],
        capture_output=True, text=True, timeout=60, env={"COLUMNS": "80", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, listed.stdout
    assert any(line.startswith(result.call_id + " ") for line in lines), listed.stdout
    assert "user_hangup" in listed.stdout and "times " in lines[0]
