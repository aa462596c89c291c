"""The official web client of the audio websocket, ``retell-client-js-sdk`` 1.3.3 from npm,
unchanged, in headless Chromium (Debian's, driven by Playwright) with a fake microphone playing
a WAV: through ``/audio-websocket/{call_id}`` after a v1 register-call, and through a
create-web-call's token in its ``customEndpoint``.

The client is installed by this module into a cache folder (``BRIDGE_TEST_CACHE``, default
``~/.cache/twilio-audio-bridge``) with npm, and bundled for the page with esbuild. Without
Chromium, npm or Playwright the tests skip and say why; with ``BRIDGE_REQUIRE_SERVICES=1`` (CI)
they fail instead.

Version 1.3.3 reads the microphone's input in its audio worklet without checking it exists;
about one start in three throws once and then sends and plays nothing, whatever the server. A
start that has sent nothing within 1.5 s is stopped and a new call placed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from audio import Resampler, write_wav
from bridge.server import BackgroundServer

from .conftest import api_client, best_correlation, caller_audio, retell_client, until, wait_for_end

CLIENT_VERSION = "1.3.3"
ESBUILD_VERSION = "0.28.2"
RATE = 24000
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run",
    "--disable-sync", "--disable-quic", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]  # fmt: skip
START_TIMEOUT_S = 1.5  # the client bug: a start that sent nothing by then never will
MAX_STARTS = 8
TALK_S = 8.5  # from the first frame sent, on the page's audio clock: the phrase, its echo and a little more


def _unavailable(problem: str):
    if os.environ.get("BRIDGE_REQUIRE_SERVICES") == "1":
        pytest.fail(problem)
    pytest.skip(problem)


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        _unavailable("Chromium is not installed (apt-get install -y chromium)")
    return path


@pytest.fixture(scope="session")
def retell_web_client() -> str:
    """The bundled ``retell-client-js-sdk`` (a script defining ``Retell.RetellWebClient``)."""
    cache = Path(os.environ.get("BRIDGE_TEST_CACHE") or Path.home() / ".cache" / "twilio-audio-bridge") / "npm"
    bundle = cache / f"retell-client-js-sdk-{CLIENT_VERSION}.js"
    if not bundle.exists():
        if shutil.which("npm") is None:
            _unavailable("npm is not installed (apt-get install -y npm): it installs retell-client-js-sdk")
        cache.mkdir(parents=True, exist_ok=True)
        install = subprocess.run(
            ["npm", "install", "--prefix", str(cache), "--no-audit", "--no-fund", "--no-save",
             f"retell-client-js-sdk@{CLIENT_VERSION}", f"esbuild@{ESBUILD_VERSION}"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if install.returncode != 0:
            _unavailable(f"npm install failed: {install.stderr[-500:]}")
        entry = cache / "node_modules" / "retell-client-js-sdk" / "dist" / "index.modern.mjs"
        built = subprocess.run(
            [str(cache / "node_modules" / ".bin" / "esbuild"), str(entry), "--bundle", "--format=iife", "--global-name=Retell",
             "--platform=browser", f"--outfile={bundle}"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if built.returncode != 0:
            _unavailable(f"esbuild failed: {built.stderr[-500:]}")
    return bundle.read_text()


@pytest.fixture(scope="session")
def microphone(tmp_path_factory) -> Path:
    """The fake microphone's WAV (Chromium loops it): the caller's first phrase, then 3 s of
    silence, at 48 kHz."""
    pcm = caller_audio()  # s16le 8 kHz: the first phrase and a little silence
    pcm = Resampler(8000, 48000).process(pcm + bytes(8000 * 2 * 3))
    path = tmp_path_factory.mktemp("mic") / "caller.wav"
    write_wav(path, pcm, 48000)
    return path


#: The page: records what the client sends (its websocket's binary frames) and what it plays
#: (its ``audio`` events: every render quantum of its output), its ``update`` events and how
#: the conversation ended. ``sentAt`` is how many quanta had played when the first frame went
#: out: it puts both recordings on one clock.
HARNESS = """
window.test = {sent: [], played: [], updates: [], errors: [], ended: null, sentAt: null, client: null};
const send = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
  if (typeof data !== "string" && this.readyState === 1) {
    if (test.sentAt === null) test.sentAt = test.played.length;
    test.sent.push(new Uint8Array(data.buffer ? data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength) : data));
  }
  return send.call(this, data);
};
window.startCall = async (endpoint, callId, sampleRate) => {
  const client = new Retell.RetellWebClient(endpoint);
  test.client = client;
  client.on("audio", (a) => test.played.push(new Uint8Array(a)));
  client.on("update", (u) => test.updates.push(u));
  client.on("error", (e) => test.errors.push(String(e)));
  client.on("conversationEnded", (e) => { test.ended = e; });
  await client.startConversation({callId, sampleRate, enableUpdate: true});
};
const b64 = (chunks) => {
  let n = 0; for (const c of chunks) n += c.length;
  const all = new Uint8Array(n); let i = 0; for (const c of chunks) { all.set(c, i); i += c.length; }
  let s = ""; for (let j = 0; j < all.length; j += 0x8000) s += String.fromCharCode.apply(null, all.subarray(j, j + 0x8000));
  return btoa(s);
};
window.stopCall = () => { test.client.stopConversation(); };
window.results = () => ({sent: b64(test.sent), played: b64(test.played), sentAt: test.sentAt, updates: test.updates,
                         errors: test.errors, ended: test.ended});
window.reset = () => { Object.assign(test, {sent: [], played: [], updates: [], errors: [], ended: null, sentAt: null}); };
"""


def voiced_spans(pcm: bytes, rate: int, threshold: float = 300.0) -> list[tuple[int, int]]:
    """Voiced stretches (samples) of s16le audio, in 20 ms frames, gaps under 300 ms merged."""
    frame = rate // 50
    x = np.frombuffer(pcm[: len(pcm) // 2 * 2], "<i2").astype(float)
    frames = x[: len(x) // frame * frame].reshape(-1, frame)
    loud = np.sqrt((frames**2).mean(axis=1)) > threshold
    spans, start, quiet = [], None, 0
    for i, on in enumerate(loud):
        if on:
            start, quiet = (i if start is None else start), 0
        elif start is not None:
            quiet += 1
            if quiet >= 15:
                spans.append((start * frame, (i - quiet + 1) * frame))
                start, quiet = None, 0
    if start is not None:
        spans.append((start * frame, (len(loud) - quiet) * frame))
    return spans


@pytest.fixture
async def page(retell_web_client, microphone, bridge):
    chromium = _chromium()
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _unavailable("Playwright's Python package is not installed (pip install -e '.[test]')")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")  # Debian's Chromium only, never a download
    html = f"<!doctype html><html><body><script>{retell_web_client}</script><script>{HARNESS}</script></body></html>"

    async def serve_page(request) -> HTMLResponse:
        return HTMLResponse(html)

    # the web page, served from its own origin on loopback (a secure context, as localhost is),
    # as a developer's page would be
    async with BackgroundServer(Starlette(routes=[Route("/", serve_page)])) as site, async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={microphone}"]
        )
        try:
            context = await browser.new_context(permissions=["microphone"])
            tab = await context.new_page()
            await tab.goto(f"{site.base_url}/")
            yield tab
        finally:
            await browser.close()


async def converse(page, new_call, endpoint_for) -> tuple[str, dict, int]:
    """Start a conversation for a call from ``new_call()`` on ``endpoint_for(call_id)``, talk for
    TALK_S after it first sends, stop it; a start the client bug killed (nothing sent within
    1.5 s) is given up and a new call placed. -> (call id, what the page recorded, starts it took)."""
    for starts in range(1, MAX_STARTS + 1):
        call_id = await new_call()
        endpoint = endpoint_for(call_id)
        await page.evaluate("reset()")
        await page.evaluate("([e, c, r]) => startCall(e, c, r)", [endpoint, call_id, RATE])
        await asyncio.sleep(START_TIMEOUT_S)
        if await page.evaluate("test.sent.length") > 0:
            talked = f"test.played.length - test.sentAt >= {int(TALK_S * RATE / 128)}"  # (the page's clock: a slow machine plays no less)
            await until(lambda: page.evaluate(talked), timeout=30, interval=0.1)  # noqa: B023 - awaited here
            await page.evaluate("stopCall()")
            await asyncio.sleep(0.5)
            return call_id, await page.evaluate("results()"), starts
        await page.evaluate("stopCall()")  # the worklet died: this start will never talk
    pytest.fail(f"the web client sent nothing in {MAX_STARTS} starts")


def echo_figures(result: dict) -> dict:
    """Correlation of what the client played with what it sent, and the time from the end of
    the caller's first phrase to the first echo it played (ms)."""
    sent, played = base64.b64decode(result["sent"]), base64.b64decode(result["played"])
    offset = (result["sentAt"] or 0) * 128  # samples the client had played when it first sent
    spans = voiced_spans(sent, RATE)
    assert spans, "the client sent no voice"
    start, end = spans[0]
    said = sent[start * 2 : end * 2]
    corr, lag = best_correlation(played, said)
    heard = voiced_spans(played, RATE)
    first_echo = next((s for s, _ in heard if s > offset + start), None)
    return {
        "correlation": round(corr, 3),
        "phrase_ms": round((end - start) / RATE * 1000),
        "first_echo_after_phrase_end_ms": None if first_echo is None else round((first_echo - offset - end) / RATE * 1000),
        "echo_lag_ms": round((lag - offset - start) / RATE * 1000),
        "sent_s": round(len(sent) / 2 / RATE, 2),
    }


async def test_the_retell_web_client_talks_through_the_audio_websocket(page, bridge):
    async def new_call() -> str:
        async with api_client(bridge.base_url) as http:
            r = await http.post("/register-call", json={
                "agent_id": "echo", "audio_websocket_protocol": "web", "audio_encoding": "s16le", "sample_rate": RATE,
            })  # fmt: skip
        return r.json()["call_id"]

    endpoint = f"{bridge.base_url.replace('http', 'ws')}/audio-websocket/"
    call_id, result, starts = await converse(page, new_call, lambda call_id: endpoint)
    figures = echo_figures(result)
    print(f"\nretell-client-js-sdk {CLIENT_VERSION} via /audio-websocket: {figures}, starts {starts}")
    assert figures["correlation"] >= 0.9, figures
    assert result["updates"] and result["updates"][-1]["transcript"][0]["role"] == "user", result["updates"]
    assert result["ended"] is not None and result["errors"] == [], result
    record = await wait_for_end(bridge, call_id)
    print("record:", json.dumps({k: v for k, v in record.public().items() if k in RECORD_FIELDS}))
    assert record.disconnection_reason.value == "user_hangup", record.error_detail
    assert record.transcript and record.e2e_latency is not None


async def test_the_retell_web_client_opens_a_web_call_with_its_access_token(page, bridge):
    """``customEndpoint`` = ``ws://BRIDGE/web-call/{access_token}/``: the client appends the call id."""
    tokens: dict[str, str] = {}

    async def new_call() -> str:
        async with retell_client(bridge) as sdk:
            call = await sdk.call.create_web_call(agent_id="echo")
        tokens[call.call_id] = call.access_token
        return call.call_id

    def endpoint_for(call_id: str) -> str:
        return f"{bridge.base_url.replace('http', 'ws')}/web-call/{tokens[call_id]}/"

    call_id, result, starts = await converse(page, new_call, endpoint_for)
    figures = echo_figures(result)
    print(f"\nretell-client-js-sdk {CLIENT_VERSION} via /web-call/{{token}}/: {figures}, starts {starts}")
    assert figures["correlation"] >= 0.9, figures
    assert result["updates"], "no update events"
    record = await wait_for_end(bridge, call_id)
    print("record:", json.dumps({k: v for k, v in record.public().items() if k in RECORD_FIELDS}))
    assert record.disconnection_reason.value == "user_hangup", record.error_detail
    assert record.call_type.value == "web_call" and record.recording_url


RECORD_FIELDS = (
    "call_type", "call_status", "disconnection_reason", "audio_websocket_protocol", "audio_encoding", "sample_rate",
    "e2e_latency", "transcript",
)  # fmt: skip
