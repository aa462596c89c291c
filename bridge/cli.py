"""``bridge`` command line: ``serve``, ``demo``, ``simulate``."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import typer
import uvicorn

from audio import read_wav, write_wav

from .settings import SettingsError, ensure_dev_secrets, load_settings, signed_url_problem

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Twilio <-> voice agent audio bridge")

SAMPLE = Path(__file__).resolve().parent.parent / "audio" / "samples" / "caller_8k.wav"


def _settings(**overrides):
    try:
        settings = load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None
    try:
        filled = ensure_dev_secrets(settings)
    except SettingsError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None
    except OSError as e:
        typer.secho(f"BRIDGE_DATA_DIR {settings.data_dir} is not a writable directory: {e.strerror or e}", fg="red", err=True)
        raise typer.Exit(2) from None
    if filled:
        typer.secho(
            f"dev secrets for {', '.join(filled)} are in {settings.data_dir / 'dev-secrets.json'} "
            "(set BRIDGE_TWILIO_AUTH_TOKEN and BRIDGE_API_KEYS for a real number)",
            fg="yellow",
            err=True,
        )
    return settings


#: set for the workers of ``serve --workers N``, whose supervisor printed the start-up banner
WORKER_BANNER_SHOWN = "BRIDGE_BANNER_SHOWN"


def startup_banner(settings, port: int) -> str:
    """Where the bridge listens, its dashboard and API reference, the webhook URL to paste into
    Twilio, and what each agent gets."""
    from .settings import describe_agent

    host = settings.host
    local_host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else (f"[{host}]" if ":" in host else host))
    local = f"http://{local_host}:{port}"
    lines = [f"bridge listening on {host}:{port}", f"  dashboard:      {local}/dashboard/   (sign in with an API key: {settings.api_keys_origin})", f"  API reference:  {local}/docs"]
    if settings.public_url:
        lines.append(f"  Twilio webhook: {settings.public_url}/twilio/voice   (your number's 'A call comes in', HTTP POST)")
    else:
        lines.append(
            f"  Twilio webhook: {local}/twilio/voice on this machine; for a real number set BRIDGE_PUBLIC_URL "
            "to the https URL Twilio reaches (e.g. ngrok's) and paste that URL + /twilio/voice into the number"
        )
    lines += [f"  {describe_agent(agent, agent.agent_id == settings.default_agent)}" for agent in settings.agents.values()]
    return "\n".join(lines)


def _announce(settings, text: str) -> None:
    """Print start-up lines: plain text, or with ``BRIDGE_LOG_FORMAT=json`` one log entry a line,
    so a log collector reading the process's output meets nothing but JSON."""
    if settings.log_format != "json":
        typer.echo(text)
        return
    import logging

    for line in text.splitlines():
        logging.getLogger("bridge.cli").info(line.strip())


def _storage_problem(settings) -> str | None:
    """Why the data directory or the call database cannot be used, in one line, or None."""
    from sqlalchemy.engine import make_url

    from .calls.service import claim_instance
    from .store import SqlCallStore
    from .store.schema import database_url

    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        probe = settings.data_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return f"BRIDGE_DATA_DIR {settings.data_dir} is not a writable directory: {e.strerror or e}"

    async def open_and_close() -> None:  # and see that the instance id is free (or frees up)
        store = await SqlCallStore.open(
            settings.database_url, settings.instance_id, settings.data_dir, pool_size=settings.database_pool_size
        )
        try:
            await claim_instance(store, settings)
            await store.release()  # (the app claims it again as it starts)
        finally:
            await store.close()

    try:
        asyncio.run(asyncio.wait_for(open_and_close(), 20 + 4 * settings.heartbeat_interval_s))
    except SettingsError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - any failure: say which database and why, in one line
        where = make_url(database_url(settings.database_url, settings.data_dir)).render_as_string(hide_password=True)
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        return f"cannot open the call database {where} ({type(e).__name__}: {why}); check BRIDGE_DATABASE_URL"
    return None


@app.command()
def serve(
    host: str = typer.Option(None, help="listen address (BRIDGE_HOST, default 127.0.0.1)"),
    port: int = typer.Option(None, help="listen port (BRIDGE_PORT, default 8080)"),
    agents_file: Path = typer.Option(None, help="agents TOML file (BRIDGE_AGENTS_FILE)"),
    public_url: str = typer.Option(None, help="where Twilio reaches the bridge, e.g. https://abc.ngrok.app"),
    workers: str = typer.Option(None, help="worker processes on the port: a number, or auto (one per core) (BRIDGE_WORKERS, default 1)"),
) -> None:
    """Serve the bridge (Twilio webhook, media streams, call API, embedded echo agent)."""
    from . import logs
    from .app import create_app
    from .server import SHUTDOWN_GRACE_S, DrainingServer, server_options
    from .workers import inherited_sockets

    settings = _settings(host=host, port=port, agents_file=agents_file, public_url=public_url, workers=workers)
    if problem := signed_url_problem(settings):
        typer.secho(problem, fg="red", err=True)
        raise typer.Exit(2)
    sockets = inherited_sockets()  # (a worker of bridge serve --workers: its supervisor bound them)
    if sockets is None and settings.workers > 1:
        _supervise(settings, host=host, port=port, agents_file=agents_file, public_url=public_url)
        return
    if sockets is None:
        try:  # the listener first: a bridge that cannot serve must not touch any call
            sockets = [socket.create_server((settings.host, settings.port), family=socket.AF_INET6 if ":" in settings.host else socket.AF_INET)]
        except OSError as e:
            typer.secho(f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e} (BRIDGE_HOST, BRIDGE_PORT)", fg="red", err=True)
            raise typer.Exit(2) from None
    if problem := _storage_problem(settings):
        typer.secho(problem, fg="red", err=True)
        raise typer.Exit(2)
    log_config = logs.configure(settings.log_format)
    if not os.environ.get(WORKER_BANNER_SHOWN):  # (the workers of --workers N: their supervisor printed it)
        _announce(settings, startup_banner(settings, sockets[0].getsockname()[1]))
    app = create_app(settings)
    config = uvicorn.Config(app, log_level="info", log_config=log_config, timeout_graceful_shutdown=SHUTDOWN_GRACE_S, **server_options(app))
    try:
        DrainingServer(config, app.state.calls).run(sockets=sockets)
    except SystemExit:  # uvicorn exits when start-up fails (e.g. the instance id is another live process's)
        problem = getattr(app.state, "startup_error", None)
        if problem is None:
            raise
        typer.secho(problem, fg="red", err=True)
        raise typer.Exit(2) from None


def _supervise(settings, **options) -> None:
    """``bridge serve --workers N``: bind, start the workers, keep them up (``bridge.workers``)."""
    import logging

    from . import logs
    from .workers import Supervisor, plan_workers

    if problem := _storage_problem(settings):  # (once here, rather than N times)
        typer.secho(problem, fg="red", err=True)
        raise typer.Exit(2)
    try:
        workers = plan_workers(settings, settings.workers)
    except OSError as e:
        typer.secho(f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e} (BRIDGE_HOST, BRIDGE_PORT, BRIDGE_REPLICA_URL)", fg="red", err=True)
        raise typer.Exit(2) from None
    logs.configure(settings.log_format)
    logging.getLogger("bridge.workers").setLevel(logging.INFO)
    env = dict(os.environ)
    for name, value in options.items():  # (the command line's options, for the workers as for this process)
        if value is not None:
            env[f"BRIDGE_{name.upper()}"] = str(value)
    port = workers[0].public.getsockname()[1]
    _announce(settings, startup_banner(settings, port))
    _announce(settings, f"{len(workers)} workers on {settings.host}:{port} (one process each; BRIDGE_WORKERS)")
    env[WORKER_BANNER_SHOWN] = "1"
    raise typer.Exit(Supervisor(settings, workers, env).run())


@app.command()
def demo(
    speed: float = typer.Option(1.0, help="how much faster than real time to run the call"),
    out: Path = typer.Option(Path("var/demo-heard.wav"), help="where to write what the caller heard"),
) -> None:
    """Serve on a free port with the embedded defaults and place one simulated call with the
    bundled speech sample; print the call record and where the caller's audio is."""
    from .app import create_app
    from .server import BackgroundServer
    from .dev.simulator import FakeTwilioApi, simulate_call

    settings = _settings()
    pcm, rate, _ = read_wav(SAMPLE)

    async def run():
        fake = FakeTwilioApi(settings.twilio_auth_token)
        settings.twilio_api_base_url = await fake.start()
        server = BackgroundServer(create_app(settings))
        settings.port = int((await server.start()).rsplit(":", 1)[1])
        typer.echo(f"bridge on {server.base_url}, echo agent at {settings.agents['echo'].sample_rate} Hz; calling...")
        try:
            return await simulate_call(
                server.base_url, settings.twilio_auth_token, pcm, api_key=settings.api_keys[0], speed=speed, fake_api=fake
            )
        finally:
            await server.stop()
            await fake.stop()

    result = asyncio.run(run())
    out.parent.mkdir(parents=True, exist_ok=True)
    write_wav(out, result.heard, 8000)
    typer.echo(json.dumps(result.record, indent=2))
    typer.echo(json.dumps(result.summary(), indent=2))
    typer.echo(f"what the caller heard: {out}")
    if not result.record or result.record.get("call_status") != "ended":
        raise typer.Exit(1)


@app.command()
def simulate(
    url: str = typer.Option("http://127.0.0.1:8080", help="the bridge's base URL (as Twilio would call it)"),
    wav: Path = typer.Option(SAMPLE, help="what the caller says: 8 kHz mono 16-bit WAV"),
    auth_token: str = typer.Option(None, help="Twilio auth token the bridge checks (default: dev secrets)"),
    api_key: str = typer.Option(None, help="API key to fetch the call record (default: dev secrets)"),
    agent: str = typer.Option(None, help="call /twilio/voice/AGENT instead of routing by number"),
    to: str = typer.Option("+15550100000", help="called number"),
    speed: float = typer.Option(1.0, help="how much faster than real time"),
    dtmf: list[str] = typer.Option([], help="keypad presses as MS:DIGIT, e.g. 2000:5"),
    tail_ms: int = typer.Option(2000, help="silence after the caller's audio before hanging up"),
    max_call_s: float = typer.Option(120.0, help="the caller hangs up after this long, whatever is still playing"),
    out: Path = typer.Option(None, help="write what the caller heard to this WAV"),
) -> None:
    """Place a simulated Twilio call on a running bridge."""
    import httpx

    from .dev.simulator import simulate_call

    settings = load_settings()
    secrets_file = settings.data_dir / "dev-secrets.json"
    stored = json.loads(secrets_file.read_text()) if secrets_file.exists() else {}
    token_from = "--auth-token"
    if not auth_token:
        auth_token, token_from = os.environ.get("BRIDGE_TWILIO_AUTH_TOKEN"), "BRIDGE_TWILIO_AUTH_TOKEN"
    if not auth_token:
        auth_token, token_from = stored.get("twilio_auth_token"), str(secrets_file)
    api_key = api_key or (os.environ.get("BRIDGE_API_KEYS", "").split(",")[0] or stored.get("api_key"))
    if not auth_token:
        typer.secho(f"no auth token: pass --auth-token or set BRIDGE_TWILIO_AUTH_TOKEN ({secrets_file} has none)", fg="red", err=True)
        raise typer.Exit(2)
    pcm, rate, channels = read_wav(wav)
    if rate != 8000 or channels != 1:
        typer.secho(f"{wav} must be 8 kHz mono (got {rate} Hz, {channels} channels)", fg="red", err=True)
        raise typer.Exit(2)
    presses = []
    for item in dtmf:
        at, _, digit = item.partition(":")
        presses.append((int(at), digit))
    try:
        result = asyncio.run(
            simulate_call(
                url, auth_token, pcm, api_key=api_key, agent_id=agent, to_number=to, speed=speed, dtmf=tuple(presses),
                tail_ms=tail_ms, max_call_s=max_call_s,
            )
        )
    except (httpx.HTTPError, OSError) as e:
        typer.secho(f"cannot reach the bridge at {url} ({type(e).__name__}: {e}): is `bridge serve` running there?", fg="red", err=True)
        raise typer.Exit(1) from None
    if result.status_code == 403:
        typer.secho(
            f"the bridge refused the webhook's signature: the auth token from {token_from} is not the one it checks "
            "with (pass --auth-token, or set BRIDGE_TWILIO_AUTH_TOKEN, as the bridge has it)",
            fg="red", err=True,
        )  # fmt: skip
        raise typer.Exit(1)
    if result.status_code != 200:
        typer.secho(f"webhook answered {result.status_code}: {result.twiml[:200]}", fg="red", err=True)
        raise typer.Exit(1)
    if result.call_id is None and result.protocol_errors:  # (no call: TwiML it cannot run)
        typer.secho("; ".join(result.protocol_errors), fg="red", err=True)
        raise typer.Exit(1)
    if out:
        write_wav(out, result.heard, 8000)
        typer.echo(f"what the caller heard: {out}")
    if result.hit_max_call:
        typer.secho(f"the call reached --max-call-s ({max_call_s:g} s) and the caller hung up", fg="yellow", err=True)
    if result.record_problem:
        typer.secho(f"{result.record_problem} (pass --api-key, or set BRIDGE_API_KEYS, as the bridge has it)", fg="red", err=True)
    else:
        typer.echo(json.dumps(result.record, indent=2))
    typer.echo(json.dumps(result.summary(), indent=2))
    if result.record_problem:
        raise typer.Exit(1)


calls_app = typer.Typer(no_args_is_help=True, help="Call records of a running bridge (local or remote)")
app.add_typer(calls_app, name="calls")


def _api(url: str | None, api_key: str | None):
    import httpx

    settings = load_settings()
    if not api_key:
        secrets_file = settings.data_dir / "dev-secrets.json"
        stored = json.loads(secrets_file.read_text()) if secrets_file.exists() else {}
        api_key = (settings.api_keys or [None])[0] or stored.get("api_key")
    if not api_key:
        typer.secho("no API key: pass --api-key or set BRIDGE_API_KEYS", fg="red", err=True)
        raise typer.Exit(2)
    base = url or settings.public_url or f"http://127.0.0.1:{settings.port}"
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {api_key}"}, timeout=10)


def _get(client, method: str, path: str, **kwargs):
    import httpx

    try:
        r = client.request(method, path, **kwargs)
    except httpx.HTTPError as e:
        typer.secho(f"cannot reach {client.base_url}: {e}", fg="red", err=True)
        raise typer.Exit(1) from None
    if r.status_code >= 400:
        message = r.json().get("message", r.text) if r.headers.get("content-type", "").startswith("application/json") else r.text
        typer.secho(f"{r.status_code}: {message}", fg="red", err=True)
        raise typer.Exit(1)
    return r.json()


def _ms(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def _when(ms) -> str:
    import datetime as dt

    return "-" if ms is None else dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _network(net: dict | None) -> str:
    if not net:
        return "-"
    delay = net.get("inbound_delay_ms") or {}
    return (
        f"delay beyond best p50 {delay.get('p50', '-')} / p99 {delay.get('p99', '-')} / max {delay.get('max', '-')} ms, "
        f"longest stall {net['longest_stall_ms']} ms ({net['stalls']} of 500 ms+), frames {net['frames']}, lost {net['frames_lost']}"
    )


def _latency(latency: dict | None) -> str:
    if not latency or not latency.get("num"):
        return "-"
    return f"p50 {_ms(latency['p50'])} / p90 {_ms(latency['p90'])} / p99 {_ms(latency['p99'])} ms (n={latency['num']})"


@calls_app.command("list")
def calls_list(
    url: str = typer.Option(None, help="the bridge's base URL (default: BRIDGE_PUBLIC_URL or local)"),
    api_key: str = typer.Option(None, help="API key (default: BRIDGE_API_KEYS or dev secrets)"),
    limit: int = typer.Option(20, help="how many calls, newest first"),
    agent: str = typer.Option(None, help="only this agent's calls"),
    status: str = typer.Option(None, help="registered | ongoing | ended | error"),
) -> None:
    """List calls as a table, with their turn latency."""
    from rich.console import Console

    criteria = {}
    if agent:
        criteria["agent"] = [{"agent_id": agent}]
    if status:
        criteria["call_status"] = {"op": "in", "type": "enum", "value": [status]}
    with _api(url, api_key) as client:
        page = _get(client, "POST", "/v3/list-calls", json={"limit": limit, "filter_criteria": criteria})
    console = Console()
    console.print(_calls_table(page, console.width))


def _calls_table(page: dict, width: int):
    """The calls as a table that fits ``width`` columns: below 120 the call id stays whole on
    one line (it is what ``calls show`` takes) and the rest is cut to fit."""
    import datetime as dt

    from rich import box
    from rich.table import Table

    zone = dt.datetime.now().astimezone().strftime("%Z") or "local time"
    title = f"calls ({len(page['items'])}{'+' if page['has_more'] else ''}), times {zone}"
    wide = width >= 120
    table = Table(title=title, box=box.SIMPLE_HEAD if wide else None, pad_edge=False, show_edge=wide, padding=(0, 1) if wide else (0, 1, 0, 0))
    table.add_column("call id", no_wrap=True, min_width=32)
    if wide:
        for column in ("agent", "type", "status", "reason", "from", "to", "started"):
            table.add_column(column, overflow="fold")
    else:
        table.add_column("agent", no_wrap=True, overflow="ellipsis", max_width=10)
        table.add_column("outcome", no_wrap=True, overflow="ellipsis", max_width=14)
        table.add_column("started", no_wrap=True, min_width=7)
    table.add_column("secs", justify="right", no_wrap=True, min_width=5)
    table.add_column("p50", justify="right", no_wrap=True, min_width=7)
    for c in page["items"]:
        secs = (c["end_timestamp"] - c["start_timestamp"]) / 1000 if c["start_timestamp"] and c["end_timestamp"] else None
        p50 = (c.get("e2e_latency") or {}).get("p50")
        tail = ("-" if secs is None else f"{secs:.1f}", "-" if p50 is None else f"{p50:.0f} ms")
        if wide:
            table.add_row(
                c["call_id"], c["agent_id"], c["call_type"], c["call_status"], c["disconnection_reason"] or "-",
                c.get("from_number") or "-", c.get("to_number") or "-", _when(c["start_timestamp"]), *tail,
            )  # fmt: skip
        else:
            outcome = c["disconnection_reason"] or c["call_status"]
            when = "%H:%M" if width < 90 else "%m-%d %H:%M"  # (newest first: the day is in the order)
            started = "-" if c["start_timestamp"] is None else dt.datetime.fromtimestamp(c["start_timestamp"] / 1000).strftime(when)
            table.add_row(c["call_id"], c["agent_id"], outcome, started, *tail)
    return table


@calls_app.command("show")
def calls_show(
    call_id: str,
    url: str = typer.Option(None, help="the bridge's base URL (default: BRIDGE_PUBLIC_URL or local)"),
    api_key: str = typer.Option(None, help="API key (default: BRIDGE_API_KEYS or dev secrets)"),
) -> None:
    """One call: its record, latency summary and transcript."""
    from rich.console import Console
    from rich.table import Table

    with _api(url, api_key) as client:
        c = _get(client, "GET", f"/v2/get-call/{call_id}")
    table = Table(title=f"call {call_id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows = [
        ("agent", c["agent_id"]), ("type", c["call_type"]), ("status", c["call_status"]),
        ("reason", c["disconnection_reason"] or "-"), ("direction", c.get("direction") or "-"),
        ("from / to", f"{c.get('from_number') or '-'} -> {c.get('to_number') or '-'}"),
        ("started", _when(c["start_timestamp"])), ("ended", _when(c["end_timestamp"])),
        ("audio", f"{c['audio_websocket_protocol']} {c['audio_encoding']} {c['sample_rate']} Hz"),
        ("turn latency", _latency(c.get("e2e_latency"))),
        ("agent's own part", _latency(c.get("agent_latency"))),
        ("agent link RTT", _latency(c.get("llm_websocket_network_rtt_latency"))),
        ("caller's network", _network(c.get("caller_network"))),
        ("recording", c.get("recording_url") or "-"), ("public log", c.get("public_log_url") or "-"),
        ("metadata", json.dumps(c.get("metadata")) if c.get("metadata") else "-"),
    ]  # fmt: skip
    for field, value in rows:
        table.add_row(field, str(value))
    console = Console()
    console.print(table)
    if c.get("transcript"):
        console.print(c["transcript"].rstrip())


def main() -> None:  # console-script entry point
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
