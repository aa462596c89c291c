"""A live bridge on a loopback port, the fake Twilio REST API, agents that misbehave, and the
helpers every bridge test shares: ``until`` (poll for a condition), ``wait_for_end``,
``api_client`` (httpx with the API key), ``retell_client`` (the official SDK, strict),
``free_port``."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets

from audio import SPEECH_END, VoiceActivityDetector, read_wav
from tests.audio.signals import tone_pcm
from bridge.app import create_app
from bridge.server import BackgroundServer
from bridge.settings import load_settings
from bridge.dev.simulator import FakeTwilioApi, simulate_call

AUTH_TOKEN = "test-twilio-auth-token"
API_KEY = "key_test"
SAMPLES = Path(__file__).resolve().parents[2] / "audio" / "samples"
TRUTH = json.loads((SAMPLES / "caller_8k.json").read_text())["speech_ms"]


def caller_audio(first_phrase_only: bool = True) -> bytes:
    """The espeak fixture (8 kHz s16le); by default only its first sentence (0.5 s + 3.18 s)."""
    pcm, _, _ = read_wav(SAMPLES / "caller_8k.wav")
    if first_phrase_only:
        pcm = pcm[: int(TRUTH[0][1] * 16) + 1600]  # through the end of sentence one + 100 ms
    return pcm


class Bridge:
    @property
    def store(self):
        return self.calls.store

    def __init__(self, settings, server: BackgroundServer, fake: FakeTwilioApi, app):
        self.settings, self.server, self.fake, self.app = settings, server, fake, app
        self.base_url = server.base_url
        self.calls = app.state.calls

    async def call(self, pcm: bytes | None = None, **options):
        """A simulated Twilio call (``simulate_call``); the simulator saw no frame that Twilio
        would reject, whatever the test is about."""
        options.setdefault("speed", 8.0)
        options.setdefault("tail_ms", 1500)
        result = await simulate_call(
            self.base_url, AUTH_TOKEN, caller_audio() if pcm is None else pcm, api_key=API_KEY, fake_api=self.fake, **options
        )
        assert result.protocol_errors == [], result.protocol_errors
        return result


@pytest.fixture
async def start_bridge(tmp_path):
    """``await start_bridge(agents={...}, **settings)`` -> a running ``Bridge``; ``callee_pcm``
    is what the fake Twilio's callee says on outbound calls."""
    running: list[tuple[BackgroundServer, FakeTwilioApi]] = []

    async def start(callee_pcm: bytes | None = None, **overrides) -> Bridge:
        fake = FakeTwilioApi(AUTH_TOKEN)
        if callee_pcm is not None:
            fake.callee_pcm = callee_pcm
        api = await fake.start()
        overrides.setdefault("data_dir", tmp_path / f"bridge{len(running)}")
        overrides.setdefault("twilio_account_sid", "AC" + "0" * 32)
        overrides.setdefault("request_host_signatures", True)  # loopback: nothing else is signed
        overrides.setdefault("twilio_api_base_url", api)  # (another: Twilio's REST API out of reach)
        settings = load_settings(twilio_auth_token=AUTH_TOKEN, api_keys=API_KEY, **overrides)
        app = create_app(settings)
        server = BackgroundServer(app)
        await server.start()
        settings.internal_url = server.base_url  # where the embedded echo agents are
        running.append((server, fake))
        return Bridge(settings, server, fake, app)

    yield start
    for server, fake in running:
        await server.stop()
        await fake.stop()


@pytest.fixture
async def bridge(request, start_bridge):
    """A running bridge with the test module's ``BRIDGE_SETTINGS`` (default: the embedded defaults)."""
    return await start_bridge(**getattr(request.module, "BRIDGE_SETTINGS", {}))


def retell_client(bridge):
    """The official retell-sdk client pointed at ``bridge``, in strict mode: its own models
    check every answer (``async with retell_client(bridge) as sdk``)."""
    from retell import AsyncRetell

    return AsyncRetell(api_key=API_KEY, base_url=bridge.base_url, _strict_response_validation=True, max_retries=0)


@pytest.fixture
async def sdk(bridge):
    async with retell_client(bridge) as client:
        yield client


def api_client(base_url: str | None = None, api_key: str = API_KEY) -> httpx.AsyncClient:
    """httpx with the API key (``base_url`` optional: full URLs work either way)."""
    return httpx.AsyncClient(base_url=base_url or "", headers={"Authorization": f"Bearer {api_key}"}, timeout=10)


def tampered(token: str) -> str:
    """``token`` with its last character changed (always to a different one)."""
    return token[:-1] + ("1" if token[-1] == "0" else "0")


def free_port() -> int:
    """A loopback port nothing listens on (just now)."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def refusing_port():
    """A loopback port held bound but never listening for the ``with`` block: connecting to it
    is refused, and no other server of the run can take it meanwhile (a port that was only free
    when asked can be a 404-answering test server a moment later)."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


async def until(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll ``predicate()`` (plain or async) until it is truthy; returns its value. Fails the
    test with TimeoutError after ``timeout`` s: a condition, never a fixed sleep."""
    async with asyncio.timeout(timeout):
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(interval)


@pytest.fixture
async def bad_agent():
    """An agent server whose behaviour is chosen by the path: ``/garbage``, ``/abort``,
    ``/close1011``, ``/hangup`` (close 1000 at once), ``/flood`` (24 kHz audio as fast as it can),
    ``/burst`` (5 s of audio in one message, then listens), ``/clear`` (1010 ms, then ``clear``), ``/goodbye`` (3 s, then closes 1000),
    ``/scripted/DELAY``, ``/silent`` (accepts, never speaks)."""

    async def handler(ws):
        path = ws.request.path
        if path.startswith("/scripted/"):  # answers 400 ms of tone DELAY ms after each turn ends
            delay_ms = int(path.split("/")[2])
            vad = VoiceActivityDetector(24000, end_silence_ms=300)
            heard_ms, answer_at = 0.0, []
            tone = tone_pcm(24000, 400, 500)
            async for message in ws:
                if not isinstance(message, bytes):
                    continue
                heard_ms += len(message) / 48
                answer_at += [e.at_ms + delay_ms for e in vad.process(message) if e.kind == SPEECH_END]
                if answer_at and heard_ms >= answer_at[0]:  # the caller's audio keeps the clock
                    answer_at.pop(0)
                    await ws.send(tone)
        elif path.startswith("/clear"):  # 1010 ms at once, then takes it back, then listens
            await ws.recv()
            await ws.send(tone_pcm(24000, 1010))
            await ws.send("clear")
            async for _ in ws:
                pass
        elif path.startswith("/burst"):  # 5 s of audio at once, then it listens
            await ws.recv()
            await ws.send(tone_pcm(24000, 5000))
            async for _ in ws:
                pass
        elif path.startswith("/goodbye"):  # 3 s of audio at once, then a clean hang-up
            await ws.recv()
            await ws.send(tone_pcm(24000, 3000))
            await ws.close(1000, "goodbye")
        elif path.startswith("/flood"):
            await ws.recv()
            chunk = tone_pcm(24000, 1000)
            try:
                while True:
                    await ws.send(chunk)
            except websockets.ConnectionClosed:
                return
        elif path.startswith("/garbage"):
            await ws.recv()
            await ws.send("this is not the web protocol")
            await asyncio.sleep(5)
        elif path.startswith("/abort"):
            await ws.recv()
            ws.transport.abort()  # no close frame: the connection just dies
        elif path.startswith("/close1011"):
            await ws.recv()
            await ws.close(1011, "agent crashed")
        elif path.startswith("/hangup"):
            await ws.close(1000, "bye")
        else:
            async for _ in ws:
                pass

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


@pytest.fixture
async def black_hole():
    """A TCP server that accepts connections and never answers (a hung agent)."""
    writers = []

    async def hold(reader, writer):
        writers.append(writer)
        await reader.read()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    for w in writers:
        w.close()
    server.close()


def envelope_ms(pcm: bytes, threshold: float = 300.0) -> list[tuple[int, int]]:
    """Non-silent stretches (ms) of 8 kHz audio, in 20 ms frames, gaps under 300 ms merged."""
    x = np.frombuffer(pcm, "<i2").astype(float)
    frames = x[: len(x) // 160 * 160].reshape(-1, 160)
    loud = np.sqrt((frames**2).mean(axis=1)) > threshold
    spans, start, quiet = [], None, 0
    for i, on in enumerate(loud):
        if on:
            start = i if start is None else start
            quiet = 0
        elif start is not None:
            quiet += 1
            if quiet >= 15:
                spans.append((start * 20, (i - quiet + 1) * 20))
                start, quiet = None, 0
    if start is not None:
        spans.append((start * 20, (len(loud) - quiet) * 20))
    return spans


def best_correlation(heard: bytes, said: bytes) -> tuple[float, int]:
    """Normalised cross-correlation of ``said`` against the best-matching stretch of ``heard``:
    (peak value, lag in samples)."""
    h = np.frombuffer(heard, "<i2").astype(float)
    s = np.frombuffer(said, "<i2").astype(float)
    n = 1 << int(np.ceil(np.log2(len(h) + len(s))))
    corr = np.fft.irfft(np.fft.rfft(h, n) * np.conj(np.fft.rfft(s, n)), n)[: len(h) - len(s) + 1]
    lag = int(np.argmax(corr))
    window = h[lag : lag + len(s)]
    return float(corr[lag] / (np.linalg.norm(window) * np.linalg.norm(s) + 1e-9)), lag


def hung_up_cleanly(result) -> bool:
    """Twilio hung the simulated call up without a word after the stream: the bridge closed it
    and answered the ``<Connect action>`` with ``<Hangup/>`` (no fallback message)."""
    return result.ended_by == "bridge" and result.after == ["Hangup"] and result.fallback == [] and not result.action_error


async def ongoing_calls(bridge) -> list:
    """The records of the calls ongoing now (for ``until``: empty is falsy)."""
    return (await bridge.store.list(statuses=["ongoing"]))[0]


async def call_status(bridge, call_id: str, status: str):
    """The record if the call's status is ``status`` now (for ``until``), else None."""
    record = await bridge.store.get(call_id)
    return record if record is not None and record.call_status.value == status else None


async def wait_for_end(bridge, call_id: str, timeout: float = 5.0):
    """The call's record once it has ended (ended or error), polling the store."""

    async def ended():
        record = await bridge.store.get(call_id)
        return record if record.call_status.value in ("ended", "error") else None

    return await until(ended, timeout)
