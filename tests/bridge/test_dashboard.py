"""The dashboard (``/dashboard/``) in headless Chromium (Debian's, driven by Playwright), served
by a running bridge, with simulated Twilio calls to the echo agent:

- sign in; a call appears live and ends without a reload; its page shows the turn-latency chart
  and both waveforms, and the recording plays (its duration checked against the record);
- listen to an ongoing call from the dashboard: the page receives the caller's audio;
- talk to the agent from the browser's (fake) microphone through the dashboard's own web client;
- a wrong or missing key shows the sign-in page and nothing else: no call data in the page;
- ``/docs`` and ``/redoc`` render with every request answered by the bridge (no CDN).

Screenshots of each page are kept in ``BRIDGE_TEST_ARTIFACTS`` (default ``var/test-artifacts``)
under ``dashboard/``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from .conftest import API_KEY, api_client, best_correlation, caller_audio, until, wait_for_end
from .test_listen import first_voiced
from .test_browser import CHROMIUM_FLAGS, _chromium, _unavailable, microphone  # noqa: F401 - microphone is a fixture

ARTIFACTS = Path(os.environ.get("BRIDGE_TEST_ARTIFACTS") or Path(__file__).resolve().parents[2] / "var" / "test-artifacts") / "dashboard"
LEAD = bytes(8000 * 2 * 3)  # three seconds of silence before the caller speaks (the listener is in by then)
BRIDGE_SETTINGS = dict(feed_interval_s=0.2)  # (a live call shows within 0.2 s)


@pytest.fixture
async def browser(microphone):  # noqa: F811
    chromium = _chromium()
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _unavailable("Playwright's Python package is not installed (pip install -e '.[test]')")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")  # Debian's Chromium only, never a download
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={microphone}"]
        )
        try:
            yield browser
        finally:
            await browser.close()


class Tab:
    """A page of the dashboard, with what it requested and what its console said."""

    def __init__(self, page, base_url: str):
        self.page, self.base_url = page, base_url
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.outside: list[str] = []  # requests to anything but the bridge (refused)
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        # what the page's Content-Security-Policy blocked never reaches the network (nor the route
        # that notes requests to outside): the console says so
        self.blocked: list[str] = []
        page.on("console", lambda m: "Content Security Policy" in m.text and self.blocked.append(m.text))

    def troubles(self) -> list[str]:
        """What went wrong in the page: script errors, requests to outside, what its CSP blocked."""
        return [*self.errors, *self.outside, *self.blocked]

    async def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path

    async def sign_in(self, key: str = API_KEY) -> None:
        await self.page.fill("#api-key", key)
        await self.page.click("#signin-form button[type=submit]")


@pytest.fixture
async def open_dashboard(browser, bridge):
    contexts = []

    async def open_(path: str = "/dashboard/", on=None) -> Tab:
        """The page at ``path`` of ``on`` (default: the test's bridge)."""
        target = on or bridge
        context = await browser.new_context(
            viewport={"width": 1280, "height": 800}, permissions=["microphone", "clipboard-read", "clipboard-write"],
            timezone_id="Asia/Kolkata",  # (not the machine's: the page must say which zone its times are in)
        )
        contexts.append(context)
        page = await context.new_page()
        tab = Tab(page, target.base_url)
        own = urlsplit(target.base_url).netloc

        async def only_the_bridge(route):  # no CDN, nothing from outside: refused and noted
            if urlsplit(route.request.url).netloc != own and not route.request.url.startswith(("data:", "blob:")):
                tab.outside.append(route.request.url)
                await route.abort()
            else:
                await route.continue_()

        await context.route("**/*", only_the_bridge)
        await page.goto(target.base_url + path)
        return tab

    yield open_
    for context in contexts:
        await context.close()


async def _ongoing_call(bridge, pcm: bytes, **options) -> tuple[asyncio.Task, str]:
    call = asyncio.create_task(bridge.call(pcm, speed=1.0, **options))

    async def ongoing():
        live = (await bridge.store.list(statuses=["ongoing"]))[0]
        return live[0].call_id if live else None

    return call, await until(ongoing, timeout=10)


async def test_sign_in_watch_a_call_live_and_read_its_page(open_dashboard, bridge):
    tab = await open_dashboard()
    page = tab.page
    await tab.shot("01-sign-in")
    await tab.sign_in()
    await page.wait_for_selector("#feed-status:has-text('live')")
    await page.evaluate("window.notReloaded = true")
    await tab.shot("02-calls")

    call, call_id = await _ongoing_call(bridge, bytes(8000 * 2) + caller_audio(first_phrase_only=False), dtmf=((6000, "7"),))
    row = f"#live-calls [data-call-id='{call_id}']"
    await page.wait_for_selector(row, timeout=10_000)  # appeared live, from the call-events feed
    await page.wait_for_selector(f"{row} button.listen")
    await tab.shot("03-live-call")
    await call
    record = await wait_for_end(bridge, call_id)
    await page.wait_for_selector(row, state="detached", timeout=10_000)  # ended: gone from the live list
    await page.wait_for_selector(f"#calls-table tr[data-call-id='{call_id}'] .status:has-text('ended')", timeout=10_000)
    assert await page.evaluate("window.notReloaded === true")  # no reload did it

    await page.click(f"#calls-table tr[data-call-id='{call_id}'] a")
    await page.wait_for_selector("#call-page")
    chart = await page.wait_for_selector("#latency-chart svg[data-turns]", timeout=10_000)
    turns = int(await chart.get_attribute("data-turns"))
    assert turns >= 1 and turns == record.e2e_latency.num, (turns, record.e2e_latency)
    assert await page.locator("#latency-chart svg circle, #latency-chart svg path, #latency-chart svg polyline").count() > 0
    for side in ("caller", "agent"):
        canvas = await page.wait_for_selector(f"canvas#wave-{side}[data-drawn='1']", timeout=10_000)
        inked = await canvas.evaluate(
            """(c) => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                        const seen = new Set(); for (let i = 0; i < d.length; i += 4) seen.add(d[i] << 16 | d[i+1] << 8 | d[i+2]);
                        return seen.size; }"""
        )
        assert inked > 2, f"the {side} waveform is blank"
    assert await page.locator("#timeline").inner_text() != ""
    # the agent's own part of the turns, and what the network did to the caller's frames
    assert "samples" in await page.locator("#agent-latency").inner_text()
    network = await page.locator("#network").inner_text()
    assert f"{record.caller_network['frames']} · lost 0" in network and "Twilio's timestamps" in network, network
    transcript = await page.locator("#transcript").inner_text()
    assert transcript.lower().count("echo") >= 1, transcript  # (the echo agent's utterances)
    keys = await page.locator("#transcript .dtmf").all_inner_texts()
    assert len(keys) == 1 and "7" in keys[0], keys  # the keypad press, where it happened
    rtt = await page.locator("#rtt").inner_text()
    assert rtt.strip()

    # the recording plays, and lasts as long as the call on the record
    audio = page.locator("audio#recording")
    await until(lambda: audio.evaluate("(a) => a.readyState >= 1 && isFinite(a.duration)"), timeout=10)
    duration = await audio.evaluate("(a) => a.duration")
    on_record = (record.end_timestamp - record.start_timestamp) / 1000
    print(f"\nrecording {duration:.2f} s in the page, call {on_record:.2f} s on the record")
    assert abs(duration - on_record) < 1.0, (duration, on_record)
    await audio.evaluate("(a) => { a.muted = true; return a.play(); }")
    await until(lambda: audio.evaluate("(a) => a.currentTime > 0.3"), timeout=10)
    await tab.shot("04-call-page")
    assert tab.troubles() == [], tab.troubles()


async def test_the_console_overview_agents_search_copy_and_the_zone(open_dashboard, bridge):
    """The operator's console: an overview of the window's calls, the agents page, search by call
    id and by number, ids copied whole, times with their zone, a registered call waiting (not
    live), and a live call's transcript as it goes."""
    done = [await bridge.call(to_number=f"+1415555{n:04d}") for n in (1234, 5678)]
    async with api_client(bridge.base_url) as http:
        waiting = (await http.post("/v2/register-phone-call", json={"agent_id": "echo", "to_number": "+14155559999"})).json()
    tab = await open_dashboard()
    page = tab.page
    await tab.sign_in()
    await page.wait_for_selector(f"#calls-table tr[data-call-id='{done[0].call_id}']", timeout=10_000)
    # times say their zone (the browser's, not the bridge's); a registered call is waiting
    assert "(IST)" in await page.locator("#calls-table thead").inner_text() or "GMT+5:30" in await page.locator("#calls-table thead").inner_text()
    row = page.locator(f"#calls-table tr[data-call-id='{waiting['call_id']}']")
    assert (await row.locator(".duration").inner_text()) == "waiting"
    # the id is copied whole
    await row.locator("button.copy").click()
    assert await page.evaluate("navigator.clipboard.readText()") == waiting["call_id"]
    # search: a call id's start, then a number (from or to)
    await page.fill("#filter-call-id", done[1].call_id[:9])
    await page.press("#filter-call-id", "Enter")
    shown = "() => [...document.querySelectorAll('#calls-table tbody tr[data-call-id]')].map(r => r.dataset.callId).join()"
    await until(lambda: page.evaluate(f"({shown})() === {done[1].call_id!r}"), timeout=10)
    assert await page.locator(f"#calls-table tr[data-call-id='{done[1].call_id}']").count() == 1
    await page.fill("#filter-call-id", "")
    await page.fill("#filter-number", "5551234")
    await page.press("#filter-number", "Enter")
    await until(lambda: page.evaluate(f"({shown})() === {done[0].call_id!r}"), timeout=10)
    await tab.shot("13-search")
    # the overview: the window's calls, how they ended, the latency over time
    await page.click("nav a[href='#/overview']")
    await page.wait_for_selector("#overview-volume svg[data-calls]")
    assert int(await page.locator("#overview-volume svg").get_attribute("data-calls")) == 2  # (the waiting one has not started)
    assert (await page.locator("#tile-calls .tile-value").inner_text()) == "2"
    assert (await page.locator("#tile-live .tile-value").inner_text()) == "1"  # (it is waiting)
    assert await page.locator("#overview-outcomes tr[data-reason='user_hangup'] td.num").inner_text() == "2"
    assert int(await page.locator("#overview-latency svg").get_attribute("data-points")) >= 1
    assert "IST" in await page.locator(".caption").inner_text() or "GMT+5:30" in await page.locator(".caption").inner_text()
    await tab.shot("14-overview")
    # the agents page
    await page.click("nav a[href='#/agents']")
    agent = page.locator("#agents-table tr[data-agent-id='echo']")
    await agent.wait_for()
    cells = await agent.locator("td").all_inner_texts()
    assert "s16le · 24000 Hz" in cells[1] and cells[3] == "2", cells
    await tab.shot("15-agents")
    # a live call's page shows the transcript as it goes (from the public log)
    call, call_id = await _ongoing_call(bridge, caller_audio(first_phrase_only=False) + bytes(8000 * 2 * 6))
    await page.goto(f"{tab.base_url}/dashboard/#/calls/{call_id}")
    await page.wait_for_selector("#transcript .turn-user", timeout=20_000)
    assert (await bridge.store.get(call_id)).call_status.value == "ongoing"
    assert await page.locator("#call-page .page-title button.copy").count() == 1
    await tab.shot("16-live-transcript")
    await call
    # a phone's width: the top bar wraps and nothing is cut
    await page.set_viewport_size({"width": 420, "height": 800})
    await page.goto(f"{tab.base_url}/dashboard/#/calls")
    await page.wait_for_selector("#calls-table tr[data-call-id]")
    assert await page.evaluate("document.documentElement.scrollWidth") <= 420
    for selector in ("#signout", "nav a[href='#/talk']", ".brand"):
        box = await page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 420, (selector, box)
    await tab.shot("17-narrow")
    assert tab.troubles() == [], tab.troubles()


async def test_listen_to_an_ongoing_call_from_the_dashboard(open_dashboard, bridge):
    tab = await open_dashboard()
    page = tab.page
    await tab.sign_in()
    await page.wait_for_selector("#feed-status:has-text('live')")
    said = caller_audio()
    call, call_id = await _ongoing_call(bridge, LEAD + said + bytes(8000))
    await page.click(f"#live-calls [data-call-id='{call_id}'] button.listen", timeout=10_000)
    await page.wait_for_selector("#listener")
    await until(lambda: page.evaluate("window.bridgeListen && window.bridgeListen.received.caller.length > 50"), timeout=10)
    await tab.shot("05-listening")
    result = await call
    await until(lambda: page.evaluate("window.bridgeListen.ended !== null && window.bridgeListen.ended !== undefined"), timeout=10)
    got = await page.evaluate(
        """() => { const s = window.bridgeListen; const pack = (list) => list.map(c => [c.position, Array.from(c.samples)]);
                   return {rate: s.sampleRate, caller: pack(s.received.caller), agent: pack(s.received.agent),
                           ended: s.ended, closeCode: s.closeCode}; }"""
    )
    record = await wait_for_end(bridge, call_id)
    assert got["rate"] == 8000 and got["closeCode"] == 1000 and got["ended"]["reason"] == record.disconnection_reason.value

    def channel(chunks) -> bytes:
        end = max(p + len(s) for p, s in chunks)
        out = np.zeros(end, "<i2")
        for p, s in chunks:
            out[p : p + len(s)] = s
        return out.tobytes()

    caller_peak, _ = best_correlation(channel(got["caller"]), said)
    agent_peak, _ = best_correlation(channel(got["agent"]), first_voiced(result.heard))
    print(f"\nthe page heard the caller at correlation {caller_peak:.3f} and the agent at {agent_peak:.3f}")
    assert caller_peak > 0.95 and agent_peak > 0.9, (caller_peak, agent_peak)
    await tab.shot("06-listen-ended")
    assert tab.troubles() == [], tab.troubles()
    assert not any(API_KEY in url for url in tab.requests)


async def test_talk_to_the_agent_from_the_browser(open_dashboard, bridge):
    tab = await open_dashboard()
    page = tab.page
    await tab.sign_in()
    await page.click("a[href='#/talk']")
    await page.wait_for_selector("#talk-page")
    await page.wait_for_selector("#talk-agent option[value='echo']", state="attached")
    await page.click("#talk-start")
    await until(lambda: page.evaluate("window.bridgeTalk && window.bridgeTalk.state === 'in-call' || window.bridgeTalk.sentBytes > 0"), timeout=10)
    # the fake microphone says the caller's phrase; the echo agent says it back
    await until(lambda: page.evaluate("window.bridgeTalk.receivedBytes > 48000"), timeout=20)
    await tab.shot("07-talk")
    call_id = await page.evaluate("window.bridgeTalk.callId")
    await page.click("#talk-stop")
    record = await wait_for_end(bridge, call_id, timeout=10)
    stats = await page.evaluate("window.bridgeTalk")
    print(f"\ntalk page: sent {stats['sentBytes']} B, received {stats['receivedBytes']} B; record {record.disconnection_reason.value}")
    assert record.call_type.value == "web_call" and record.disconnection_reason.value == "user_hangup"
    assert record.sample_rate == 24000 and record.e2e_latency is not None  # the agent answered a turn it heard
    await tab.shot("08-talk-ended")
    assert tab.troubles() == [], tab.troubles()


async def test_listening_to_a_call_that_opted_out_is_refused_in_the_page(open_dashboard, start_bridge):
    from bridge.settings import AgentConfig

    private = await start_bridge(agents={"private": AgentConfig(agent_id="private", opt_out_sensitive_data_storage=True, default=True)})
    tab = await open_dashboard(on=private)
    page = tab.page
    await tab.sign_in()
    await page.wait_for_selector("#feed-status:has-text('live')")
    call, call_id = await _ongoing_call(private, caller_audio() * 2)
    await page.click(f"#live-calls [data-call-id='{call_id}'] button.listen", timeout=10_000)
    status = page.locator("#listen-status")
    await status.filter(has_text="opted out of sensitive data storage").wait_for(timeout=10_000)
    await tab.shot("12-listen-refused")
    assert await page.evaluate("!window.bridgeListen || window.bridgeListen.received.caller.length === 0")
    async with api_client(private.base_url) as http:
        await http.post(f"/v2/stop-call/{call_id}")
    await call


async def test_a_wrong_or_missing_key_shows_the_sign_in_page_and_no_data(open_dashboard, bridge):
    done = await bridge.call(caller_audio())
    assert done.call_id
    tab = await open_dashboard()
    page = tab.page
    html = await page.content()
    assert done.call_id not in html and "calls-table" not in html
    await tab.sign_in("not-a-key")
    await page.wait_for_selector("#signin-error:not(:empty)")
    await tab.shot("09-wrong-key")
    html = await page.content()
    assert done.call_id not in html and "calls-table" not in html and "not-a-key" not in html
    assert await page.locator("#signin").is_visible() and await page.locator("#calls-table").count() == 0
    assert await page.evaluate("sessionStorage.length") == 0
    # nothing the page can read holds data: the sign-in check is the only request it made with a key
    keyed = [u for u in tab.requests if "/v2/" in u or "/v3/" in u]
    assert all(u.endswith("/v3/list-calls") for u in keyed), keyed
    assert not any("not-a-key" in u for u in tab.requests)

    # signed in, then out: the data goes with the key
    await tab.sign_in()
    await page.wait_for_selector(f"#calls-table tr[data-call-id='{done.call_id}']")
    assert await page.evaluate(f"sessionStorage.getItem('bridge.apiKey') === {API_KEY!r}")
    await page.click("#signout")
    await page.wait_for_selector("#signin-form")
    assert done.call_id not in await page.content()
    assert tab.troubles() == [], tab.troubles()


async def test_the_api_docs_render_with_nothing_from_outside(open_dashboard):
    tab = await open_dashboard("/docs")
    page = tab.page
    await page.wait_for_selector(".opblock", timeout=15_000)  # Swagger UI rendered the OpenAPI document
    assert await page.locator(".opblock").count() > 20
    await tab.shot("10-docs")
    await page.goto(tab.base_url + "/redoc")
    await page.wait_for_selector("[role=menuitem], .menu-content", timeout=15_000)
    await tab.shot("11-redoc")
    await page.wait_for_load_state("networkidle")
    assert tab.outside == [] and tab.blocked == [], (tab.outside, tab.blocked)  # (was: ReDoc's logo from its CDN)


async def test_the_api_docs_authorize_then_try_it_out_succeeds(open_dashboard):
    """Swagger UI's Authorize takes an API key (the bearer scheme), and Try it out then gets 200;
    a wrong key gets the 401 that names where the keys are."""
    tab = await open_dashboard("/docs")
    page = tab.page
    operation = page.locator("#operations-live-list_agents_v2_list_agents_get")
    await operation.wait_for(timeout=15_000)

    async def try_it_out() -> str:
        if not await operation.locator(".try-out__btn").is_visible():  # (expand the operation)
            await operation.locator(".opblock-summary").click()
        if await operation.locator(".try-out__btn.cancel").count() == 0:
            await operation.locator(".try-out__btn").click()
        answer = operation.locator(".live-responses-table tbody .response")
        if await operation.locator(".btn-clear").count():  # the last answer goes first: never read it as this one
            await operation.locator(".btn-clear").click()
            await answer.wait_for(state="detached", timeout=5_000)
        async with page.expect_response(lambda r: "/v2/list-agents" in r.url, timeout=10_000):
            await operation.locator(".execute").click()
        await answer.wait_for(timeout=10_000)
        return " ".join((await answer.inner_text()).split())

    async def authorize(key: str) -> None:
        await page.locator(".auth-wrapper .authorize").click()
        modal = page.locator(".modal-ux")
        await modal.wait_for(timeout=5_000)
        if await modal.locator("button[aria-label='Remove authorization']").count():
            await modal.locator("button[aria-label='Remove authorization']").click()
        await modal.locator("#auth-bearer-value").fill(key)
        await modal.locator("button[aria-label='Apply credentials']").click()
        await modal.locator("button.btn-done").click()

    assert (await try_it_out()).startswith("401")  # (no key yet)
    await authorize(API_KEY)
    answer = await try_it_out()
    assert answer.startswith("200") and '"agent_id"' in answer and "echo" in answer, answer
    await tab.shot("12-docs-try-it-out")
    await authorize("not-a-key")
    answer = await try_it_out()
    assert answer.startswith("401") and "invalid API key" in answer, answer
    assert tab.troubles() == [], tab.troubles()


def csp(header: str) -> dict[str, list[str]]:
    """A Content-Security-Policy parsed into its directives (each once: a repeated one is an error)."""
    directives: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in header.split(";"))):
        name, *values = part.split()
        assert name.lower() not in directives, f"{name} twice in {header!r}"
        directives[name.lower()] = values
    return directives


async def test_the_pages_answer_head_and_the_dashboard_page_comes_only_with_its_headers(bridge):
    """(no browser) HEAD where GET answers, as HTTP asks and load balancers probe; the page
    itself only at /dashboard/, where its Content-Security-Policy goes with it (was: also as a
    static file, without one); ReDoc's bundle with no CDN address in it."""
    pages = ("/livez", "/healthz", "/readyz", "/dashboard/", "/docs", "/redoc", "/docs/redoc.js", "/favicon.ico", "/dashboard/static/dashboard.js")
    async with httpx.AsyncClient(base_url=bridge.base_url) as http:  # (no key: all public)
        for path in pages:
            get, head = await http.get(path), await http.head(path)
            assert get.status_code == head.status_code == 200 and get.content and head.content == b"", (path, head.status_code)
            assert head.headers["content-type"] == get.headers["content-type"], path
        page = await http.get("/dashboard/")
        assert csp(page.headers["content-security-policy"]) == {
            "default-src": ["'self'"], "script-src": ["'self'"], "style-src": ["'self'"], "img-src": ["'self'", "data:", "blob:"],
            "media-src": ["'self'", "blob:"], "connect-src": ["'self'", "ws:", "wss:"], "worker-src": ["'self'", "blob:"],
            "frame-ancestors": ["'none'"], "base-uri": ["'none'"], "form-action": ["'none'"],
        }  # fmt: skip
        docs = csp((await http.get("/docs")).headers["content-security-policy"])
        assert docs["frame-ancestors"] == ["'none'"] and docs["base-uri"] == ["'none'"] and docs["connect-src"] == ["'self'"]
        assert docs["default-src"] == ["'self'"] and all("*" not in v and "http" not in v for values in docs.values() for v in values)
        assert (await http.get("/dashboard/static/index.html")).status_code == 404
        assert (await http.get("/dashboard/static/./index.html")).status_code == 404
        assert "cdn." not in (await http.get("/docs/redoc.js")).text


async def test_a_transferred_call_says_where_to_in_the_list_its_summary_and_its_timeline(open_dashboard, start_bridge):
    from .test_call_control import TARGET, ControlAgent, agents

    agent = ControlAgent()
    await agent.start()
    try:
        agent.requests["cold"] = [{"event_type": "press_digit", "digits": "5"}, {"event_type": "transfer_call", "to": TARGET}]
        transferring = await start_bridge(agents=agents(agent, "cold"), **BRIDGE_SETTINGS)
        result = await transferring.call(bytes(3200), speed=2.0, tail_ms=4000)
        await wait_for_end(transferring, result.call_id)
    finally:
        await agent.stop()
    tab = await open_dashboard(on=transferring)
    page = tab.page
    await tab.sign_in()
    row = page.locator(f"#calls-table tr[data-call-id='{result.call_id}']")
    await row.locator(".reason").filter(has_text=f"call_transfer → {TARGET}").wait_for(timeout=10_000)
    await row.locator("a").click()
    await page.wait_for_selector("#call-page")
    await page.locator(".summary .transfer").filter(has_text=TARGET).wait_for(timeout=10_000)
    await page.wait_for_selector(".timeline tr.ev-transfer", timeout=10_000)
    steps = await page.locator(".timeline tr .ev-name").all_inner_texts()
    for kind in ("call_control", "press_digit", "call_control_result", "transfer"):
        assert kind in steps, steps
    tools = await page.locator("#transcript .tool").all_inner_texts()
    assert tools == ["press_digit(digits=5)", "ok", f"transfer_call(to={TARGET}, mode=cold)", "ok"], tools
    colour = await page.locator(".timeline tr.ev-transfer .ev-name").evaluate("(e) => getComputedStyle(e).color")
    assert colour == "rgb(15, 118, 110)", colour  # (the call-control colour, not the default)
    await tab.shot("13-transferred-call")
    assert tab.troubles() == [], tab.troubles()
