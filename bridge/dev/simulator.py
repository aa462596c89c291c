"""A Twilio simulator: places a call on the bridge the way Twilio does, without a phone.

It POSTs the signed voice webhook, reads the TwiML (following ``<Redirect>``, as a draining
replica answers), opens the ``<Stream>`` URL (with the ``X-Twilio-Signature`` of the
upgrade), sends ``connected`` / ``start`` / ``media`` from 8 kHz
audio paced in real time (or ``speed`` times faster), plays what comes back 20 ms per frame on
the caller's clock (a faster run hears the same, shifted only by the bridge's and agent's own
processing time times ``speed``), echoes each ``mark`` when the audio
queued before it has played, honours ``clear`` (drops the queue, echoes pending marks at once),
sends DTMF on request and ``stop`` at the end. A ``Network`` between the caller and the bridge
can stall, delay, drop, duplicate and reorder the caller's frames (seeded), each frame keeping
Twilio's ``chunk`` and ``timestamp``. If the bridge closes the stream, it asks the
``<Connect action>`` URL what to do and runs the TwiML it answers (as Twilio does), or, without
an action, runs the TwiML after ``</Connect>``; unless the call was hung up through the REST
API: a small fake Twilio REST server (``FakeTwilioApi``) takes that request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import secrets
import time
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass, field

import httpx
import websockets
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from twilio.request_validator import RequestValidator
from websockets.exceptions import ConnectionClosed

from audio import pcm_to_ulaw, ulaw_to_pcm

from ..server import BackgroundServer

FRAME_MS = 20
FRAME_BYTES = 160  # mu-law 8 kHz
MAX_REDIRECTS = 10  # <Redirect>s followed in a row before the simulated call gives up
#: what Twilio says when a TwiML URL does not answer a document
TWILIO_APPLICATION_ERROR = "We are sorry, an application error has occurred. Goodbye."


@dataclass(frozen=True)
class Network:
    """What the caller's network does to its frames on the way to the bridge (media, mark
    echoes, DTMF: everything after ``start``), on the caller's clock, seeded. Frames keep their
    ``chunk`` and ``timestamp``; like TCP, a delayed frame never overtakes an earlier one unless
    ``reorder`` says so. What comes back to the caller is not touched."""

    stalls: tuple[tuple[int, int], ...] = ()  # (at_ms, for_ms): nothing arrives, then all of it at once
    jitter_ms: int = 0  # each frame up to this much later
    drop: float = 0.0  # the chance a media frame is lost (its chunk never comes)
    duplicate: float = 0.0  # the chance a media frame comes twice
    reorder: float = 0.0  # the chance a media frame comes after the next one
    seed: int = 0


def sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


@dataclass
class SimulationResult:
    call_sid: str
    status_code: int  # of the webhook
    twiml: str = ""
    call_id: str | None = None
    heard: bytes = b""  # s16le 8 kHz: what the caller heard, on the caller's clock
    sent_ms: int = 0  # caller audio sent (including the silent tail)
    media_received: int = 0
    media_at: list[float] = field(default_factory=list)  # when each media frame arrived (time.monotonic)
    said_at: list[float] = field(default_factory=list)  # when each caller frame was said (time.monotonic, before any Network)
    #: with a ``Network``: the chunks it lost, duplicated and reordered
    chunks_dropped: list[int] = field(default_factory=list)
    chunks_duplicated: list[int] = field(default_factory=list)
    chunks_reordered: list[int] = field(default_factory=list)
    marks_echoed: list[str] = field(default_factory=list)
    clears: int = 0
    protocol_errors: list[str] = field(default_factory=list)  # frames Twilio would reject
    ended_by: str = ""  # "caller" (stop sent), "bridge" (stream closed), "rest" (hung up via API)
    close_code: int | None = None
    stream_started: bool = False  # the media stream was opened
    #: TwiML verbs run after the stream ("Verb: text"): the <Connect action>'s answer, or the
    #: verbs after </Connect>
    after: list[str] = field(default_factory=list)
    fallback: list[str] = field(default_factory=list)  # of those, what the caller heard (Say, Play)
    action_requests: int = 0  # <Connect action> requests made
    dialed: dict | None = None  # a <Dial> Twilio ran after the stream: {"to", "caller_id", "timeout", "send_digits"}
    conference: str | None = None  # a conference the caller was put in after the stream
    action_error: str = ""  # why the last one got no answer (the bridge was gone)
    record: dict | None = None
    record_problem: str = ""  # why the record could not be read (a wrong API key...)
    hit_max_call: bool = False  # the caller hung up at max_call_s, not when done talking
    redirects: list[str] = field(default_factory=list)  # <Redirect> URLs followed before the answer

    def summary(self) -> dict:
        return {
            "call_id": self.call_id,
            "ended_by": self.ended_by,
            "heard_ms": len(self.heard) // 16,
            "media_received": self.media_received,
            "marks_echoed": len(self.marks_echoed),
            "clears": self.clears,
            "after": self.after,
            "fallback": self.fallback,
            "redirects": self.redirects,
        }


class FakeTwilioApi:
    """Just enough of Twilio's REST API for the bridge: hang-ups (``Calls/{sid}.json``) and
    outbound calls (``Calls.json``), whose outcome ``dial_outcome(params)`` picks: ``refuse``
    (400, an invalid number), ``busy`` / ``failed`` / ``no-answer`` (a status callback), ``human``
    (the voice URL is fetched and the callee, ``callee_pcm``, talks on a media stream), ``machine``
    (the same, plus an async AMD callback saying ``machine_end_beep`` after ``amd_after_ms``),
    ``ringing`` (accepted, then nothing: the callee's phone rings until someone hangs it up)."""

    def __init__(self, auth_token: str):
        self.auth_token = auth_token
        self.hangups: dict[str, asyncio.Event] = {}
        self.requests: list[tuple[str, dict]] = []
        self.created: list[dict] = []  # params of every Calls.json request
        self.created_at: list[float] = []  # when each came (time.monotonic())
        self.outbound: dict[str, asyncio.Task] = {}  # CallSid -> the callee's simulation
        self.dial_outcome = lambda params: "human"
        self.callee_pcm = b""
        self.amd_after_ms = 600
        self.amd_answer = "machine_end_beep"  # what async AMD says of a "machine" outcome
        self.target_ring_s = 0.3  # how long a warm transfer's target rings before it answers
        #: conferences (a warm transfer joins its caller and target): room -> call SIDs in it
        self.conferences: dict[str, list[str]] = {}
        #: what each transfer target leg heard Twilio <Say> (call SID -> sentences)
        self.said: dict[str, list[str]] = {}
        self.legs: dict[str, dict] = {}  # a transfer leg's params and how it went
        self.base_url = ""
        self._server: BackgroundServer | None = None

    def watch(self, call_sid: str) -> asyncio.Event:
        return self.hangups.setdefault(call_sid, asyncio.Event())

    async def _update_call(self, request: Request) -> JSONResponse:
        account = request.path_params["account"]
        if not self._authorized(request):
            return JSONResponse({"code": 20003, "message": "Authenticate", "status": 401}, status_code=401)
        form = dict(await request.form())
        call_sid = request.path_params["call"]
        self.requests.append((call_sid, form))
        if form.get("Status") == "completed" or form.get("Twiml"):  # (new TwiML ends the stream)
            self.watch(call_sid).set()
            if call_sid in self.legs:
                self.legs[call_sid]["ended"] = "hung up through the API"
        return JSONResponse({"sid": call_sid, "account_sid": account, "status": form.get("Status", "in-progress")})

    def _authorized(self, request: Request) -> bool:
        account = request.path_params["account"]
        expected = "Basic " + base64.b64encode(f"{account}:{self.auth_token}".encode()).decode()
        return request.headers.get("authorization", "") == expected

    async def _create_call(self, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return JSONResponse({"code": 20003, "message": "Authenticate", "status": 401}, status_code=401)
        form = await request.form()
        params = {k: (form.getlist(k) if k == "StatusCallbackEvent" else form[k]) for k in form}
        self.created.append(params)
        self.created_at.append(time.monotonic())
        outcome = self.dial_outcome(params)
        if outcome == "refuse":
            message = f"The 'To' number {params.get('To')} is not a valid phone number."
            return JSONResponse({"code": 21211, "message": message, "more_info": "", "status": 400}, status_code=400)
        account, call_sid = request.path_params["account"], sid("CA")
        self.outbound[call_sid] = asyncio.create_task(self._drive(call_sid, account, params, outcome))
        return JSONResponse(
            {"sid": call_sid, "account_sid": account, "to": params.get("To"), "from": params.get("From"), "status": "queued"},
            status_code=201,
        )

    async def _drive(self, call_sid: str, account: str, params: dict, outcome: str):
        validator = RequestValidator(self.auth_token)
        base = {"CallSid": call_sid, "AccountSid": account, "From": params["From"], "To": params["To"], "Direction": "outbound-api"}
        async with httpx.AsyncClient(timeout=10) as http:

            async def callback(url: str, extra: dict) -> httpx.Response:
                form = {**base, **extra}
                return await http.post(url, data=form, headers={"X-Twilio-Signature": validator.compute_signature(url, form)})

            if outcome == "ringing":
                return None
            if outcome in ("busy", "failed", "no-answer"):
                await asyncio.sleep(0.05)
                self.legs.setdefault(call_sid, {"params": params})["ended"] = outcome
                await callback(params["StatusCallback"], {"CallStatus": outcome})
                return None
            if "/twilio/transfer/" in params.get("Url", ""):  # a warm transfer's leg to its target
                return await self._drive_target(call_sid, params, outcome, callback)
            amd = None
            if outcome == "machine" and params.get("AsyncAmdStatusCallback"):
                amd = (self.amd_after_ms, lambda: callback(params["AsyncAmdStatusCallback"], {"AnsweredBy": self.amd_answer}))
            result = await simulate_call(
                "", self.auth_token, self.callee_pcm, voice_url=params["Url"], call_sid=call_sid, account_sid=account,
                from_number=params["From"], to_number=params["To"], direction="outbound-api", fake_api=self,
                speed=4.0, tail_ms=1000, amd=amd,
            )  # fmt: skip
            await callback(params["StatusCallback"], {"CallStatus": "completed"})
            return result

    async def _drive_target(self, call_sid: str, params: dict, outcome: str, callback) -> None:
        """A transfer's target answering (``human``) or its voicemail (``machine``): Twilio asks
        its Url (``AnsweredBy`` from the synchronous AMD), says what it is told to say, follows
        ``<Redirect>``, and joins ``<Dial><Conference>``; a target that talks stays ~2 s."""
        leg = self.legs.setdefault(call_sid, {"params": params})
        await asyncio.sleep(self.target_ring_s)
        answered_by = "human" if outcome == "human" else "machine_end_beep"
        url, extra = params["Url"], {"CallStatus": "in-progress", "AnsweredBy": answered_by}
        for _ in range(MAX_REDIRECTS):
            response = await callback(url, extra)
            root = ET.fromstring(response.text)
            url = None
            for verb in root:
                if verb.tag == "Say":
                    self.said.setdefault(call_sid, []).append((verb.text or "").strip())
                elif verb.tag == "Redirect":
                    url, extra = (verb.text or "").strip(), {"CallStatus": "in-progress"}
                    break
                elif verb.tag == "Dial" and verb.find("Conference") is not None:
                    room = (verb.find("Conference").text or "").strip()
                    self.conferences.setdefault(room, []).append(call_sid)
                    leg["joined"] = room
                    await asyncio.sleep(2.0)
                elif verb.tag == "Hangup":
                    break
            if url is None:
                break
        leg.setdefault("ended", "completed")
        await callback(params["StatusCallback"], {"CallStatus": "completed"})

    async def start(self, host: str = "127.0.0.1") -> str:
        app = Starlette(routes=[
            Route("/2010-04-01/Accounts/{account}/Calls.json", self._create_call, methods=["POST"]),
            Route("/2010-04-01/Accounts/{account}/Calls/{call}.json", self._update_call, methods=["POST"]),
        ])  # fmt: skip
        self._server = BackgroundServer(app, host, lifespan="off")
        self.base_url = await self._server.start()
        return self.base_url

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()


class _Player:
    """What Twilio does with the server's frames: a queue of audio and marks, played 20 ms at a
    time on the caller's clock."""

    def __init__(self) -> None:
        self.queue: deque[list] = deque()  # ["audio", bytearray] | ["mark", name]
        self.heard = bytearray()

    def add_audio(self, data: bytes) -> None:
        if self.queue and self.queue[-1][0] == "audio":
            self.queue[-1][1] += data
        else:
            self.queue.append(["audio", bytearray(data)])

    def add_mark(self, name: str) -> None:
        self.queue.append(["mark", name])

    def clear(self) -> list[str]:
        marks = [item[1] for item in self.queue if item[0] == "mark"]
        self.queue.clear()
        return marks

    def play(self, nbytes: int) -> list[str]:
        """Play ``nbytes`` of audio (silence if the queue runs dry); returns marks reached."""
        reached, played = [], bytearray()
        while self.queue and (len(played) < nbytes or self.queue[0][0] == "mark"):
            kind, item = self.queue[0]
            if kind == "mark":
                reached.append(item)
                self.queue.popleft()
                continue
            take = item[: nbytes - len(played)]
            played += take
            del item[: len(take)]
            if not item:
                self.queue.popleft()
        played += b"\xff" * (nbytes - len(played))  # mu-law silence
        self.heard += ulaw_to_pcm(bytes(played))
        return reached

    @property
    def playing(self) -> bool:
        return any(kind == "audio" for kind, _ in self.queue)


def first_redirect(twiml: str) -> tuple[str, str] | None:
    """The ``<Redirect>`` Twilio follows in a TwiML document, if it comes before any
    ``<Connect>``: (its URL as written, its method). Raises ``ET.ParseError``."""
    for verb in ET.fromstring(twiml):
        if verb.tag == "Connect":
            return None
        if verb.tag == "Redirect":
            return (verb.text or "").strip(), (verb.get("method") or "POST").upper()
    return None


async def _fetch_twiml(http: httpx.AsyncClient, validator: RequestValidator, url: str, method: str, params: dict) -> httpx.Response:
    """Request a TwiML document as Twilio does, signed: a POST with the call's parameters as its
    form, or a GET with them in the query (signed over the whole URL)."""
    if method == "GET":
        url = str(httpx.URL(url).copy_merge_params(params))
        return await http.get(url, headers={"X-Twilio-Signature": validator.compute_signature(url, {})})
    return await http.post(url, data=params, headers={"X-Twilio-Signature": validator.compute_signature(url, params)})


def connect_action(twiml: str) -> tuple[str, str] | None:
    """The ``<Connect action>`` of a TwiML document, if any: (its URL as written, its method)."""
    for verb in ET.fromstring(twiml):
        if verb.tag == "Connect" and verb.get("action"):
            return verb.get("action"), (verb.get("method") or "POST").upper()
    return None


def _run_after(result: SimulationResult, verbs: list[tuple[str, str]], twiml: str | None = None, fake_api=None) -> None:
    result.after = [f"{verb}: {text}".rstrip(": ") for verb, text in verbs]
    result.fallback = [line for line, (verb, _) in zip(result.after, verbs) if verb in ("Say", "Play")]
    if twiml is None:
        return
    for verb in ET.fromstring(twiml):  # a <Dial>: where the call went on to
        if verb.tag != "Dial":
            continue
        number, sip, room = verb.find("Number"), verb.find("Sip"), verb.find("Conference")
        if room is not None:
            result.conference = (room.text or "").strip()
            if fake_api is not None:
                fake_api.conferences.setdefault(result.conference, []).append(result.call_sid)
        else:
            target = number if number is not None else sip
            result.dialed = {
                "to": (target.text or "").strip() if target is not None else (verb.text or "").strip(),
                "caller_id": verb.get("callerId"), "timeout": verb.get("timeout"),
                "send_digits": number.get("sendDigits") if number is not None else None,
            }  # fmt: skip


def parse_twiml(twiml: str) -> tuple[str | None, dict[str, str], list[tuple[str, str]]]:
    """(stream url, stream parameters, verbs after </Connect> as (verb, text))."""
    root = ET.fromstring(twiml)
    url, params, after, seen_connect = None, {}, [], False
    for verb in root:
        if verb.tag == "Connect":
            seen_connect = True
            stream = verb.find("Stream")
            if stream is not None:
                url = stream.get("url")
                params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
        elif seen_connect or url is None:
            after.append((verb.tag, (verb.text or "").strip()))
    return url, params, after


async def simulate_call(
    base_url: str,
    auth_token: str,
    caller_pcm: bytes,
    *,
    api_key: str | None = None,
    agent_id: str | None = None,
    to_number: str = "+15550100000",
    from_number: str = "+15550199999",
    speed: float = 1.0,
    dtmf: tuple[tuple[int, str], ...] = (),
    tail_ms: int = 2000,
    max_call_s: float = 120.0,
    fake_api: FakeTwilioApi | None = None,
    account_sid: str | None = None,
    voice_url: str | None = None,
    call_sid: str | None = None,
    direction: str = "inbound",
    amd=None,
    network: Network | None = None,
) -> SimulationResult:
    """Place one simulated inbound call. ``caller_pcm`` is s16le 8 kHz mono; ``dtmf`` is
    ``(at_ms, digit)`` pairs on the caller's clock. After the caller's audio, silence is sent for
    at least ``tail_ms`` and until the agent's queued audio has played; then ``stop``."""
    call_sid, account_sid = call_sid or sid("CA"), account_sid or sid("AC")
    validator = RequestValidator(auth_token)
    url, method = voice_url or f"{base_url.rstrip('/')}/twilio/voice" + (f"/{agent_id}" if agent_id else ""), "POST"
    params = {
        "CallSid": call_sid, "AccountSid": account_sid, "From": from_number, "To": to_number,
        "Caller": from_number, "Called": to_number, "Direction": direction,
        "CallStatus": "ringing" if direction == "inbound" else "in-progress", "ApiVersion": "2010-04-01",
    }  # fmt: skip
    async with httpx.AsyncClient(timeout=10) as http:
        result = SimulationResult(call_sid, 0)
        for _ in range(MAX_REDIRECTS + 1):
            response = await _fetch_twiml(http, validator, url, method, params)
            result.status_code, result.twiml = response.status_code, response.text
            if response.status_code != 200:
                return result
            try:
                redirect = first_redirect(response.text)
            except ET.ParseError as e:
                result.protocol_errors.append(f"the webhook's answer is not TwiML: {e}")
                return result
            if redirect is None:
                break
            # as Twilio does: the call's parameters to the new URL (relative to the document's)
            url, method = str(response.url.join(redirect[0])), redirect[1]
            result.redirects.append(url)
        else:
            result.protocol_errors.append(f"more than {MAX_REDIRECTS} <Redirect>s in a row")
            return result
        stream_url, stream_params, after = parse_twiml(response.text)
        # the bridge's own TwiML names the call in a parameter; a user's own webhook in the URL
        # of the seeds' audio websocket (wss://HOST/audio-websocket/{call_id})
        result.call_id = stream_params.get("call_id") or _audio_websocket_call_id(stream_url)
        if stream_url is None:
            _run_after(result, after)
            result.ended_by = "bridge"
            return result
        action = connect_action(response.text)
        hangup = fake_api.watch(call_sid) if fake_api else asyncio.Event()
        await _stream(result, stream_url, stream_params, validator, account_sid, caller_pcm, speed, dtmf, tail_ms, max_call_s, hangup, amd, network)
        if result.ended_by == "rest" and fake_api is not None:  # a REST update with new TwiML: it runs now
            updates = [form["Twiml"] for sid, form in fake_api.requests if sid == call_sid and form.get("Twiml")]
            if updates:
                _run_after(result, parse_twiml(updates[-1])[2], updates[-1], fake_api)
        if result.ended_by == "bridge" and action is not None:  # Twilio asks what to do next
            action_url = str(response.url.join(action[0]))
            result.action_requests += 1
            try:
                answer = await _fetch_twiml(http, validator, action_url, action[1], {**params, "CallStatus": "in-progress"})
            except httpx.HTTPError as e:  # (the bridge is gone: Twilio says its own error)
                result.action_error = f"{type(e).__name__}: {e}"
                answer = None
            if answer is None:
                _run_after(result, [("Say", TWILIO_APPLICATION_ERROR)])
            elif answer.status_code != 200:
                result.protocol_errors.append(f"the <Connect action> answered {answer.status_code}: {answer.text[:120]}")
                _run_after(result, [("Say", TWILIO_APPLICATION_ERROR)])
            else:
                try:
                    _run_after(result, parse_twiml(answer.text)[2], answer.text, fake_api)
                except ET.ParseError as e:
                    result.protocol_errors.append(f"the <Connect action>'s answer is not TwiML: {e}")
        elif result.ended_by == "bridge":
            _run_after(result, after)
        if api_key and result.call_id:
            try:
                result.record = await fetch_record(http, base_url, api_key, result.call_id)
            except RecordUnavailable as e:
                result.record_problem = str(e)
    return result


def _audio_websocket_call_id(url: str | None) -> str | None:
    head, marker, call_id = (url or "").partition("/audio-websocket/")
    return call_id.partition("?")[0] or None if marker else None


class RecordUnavailable(Exception):
    """The bridge will not give the call's record (its answer says why)."""


async def fetch_record(http: httpx.AsyncClient, base_url: str, api_key: str, call_id: str, wait_s: float = 5.0) -> dict | None:
    """The call record once it has ended (polls briefly: the bridge records the end last).
    Raises ``RecordUnavailable`` if the bridge refuses (a wrong API key answers 401)."""
    deadline = time.monotonic() + wait_s
    record = None
    while time.monotonic() < deadline:
        r = await http.get(f"{base_url.rstrip('/')}/v2/get-call/{call_id}", headers={"Authorization": f"Bearer {api_key}"})
        if r.status_code == 200:
            record = r.json()
            if record["call_status"] in ("ended", "error"):
                return record
        elif 400 <= r.status_code < 500:
            try:
                message = r.json().get("message", r.text)
            except ValueError:
                message = r.text
            raise RecordUnavailable(f"the bridge answered {r.status_code} for the call record: {message}")
        await asyncio.sleep(0.05)
    return record


class _Wire:
    """The caller's frames on their way to the bridge, through a ``Network`` (or straight)."""

    def __init__(self, ws, network: Network | None, result: SimulationResult):
        self.ws, self.network, self.result = ws, network, result
        self.random = random.Random(network.seed if network else 0)
        self.queue: deque[tuple[float, str]] = deque()  # (deliver at ms, frame), in order
        self.last_at = 0.0
        self.held: tuple[int, str] | None = None  # a frame reordered after the next one

    async def send(self, message: str, t_ms: int, chunk: int | None = None) -> None:
        network = self.network
        if network is None:
            await self.ws.send(message)
            return
        rnd = self.random
        if chunk is not None:
            if network.drop and rnd.random() < network.drop:
                self.result.chunks_dropped.append(chunk)
                return
            if self.held is None and network.reorder and rnd.random() < network.reorder:
                self.held = (chunk, message)
                self.result.chunks_reordered.append(chunk)
                return
        at = float(t_ms)
        for start, length in network.stalls:
            if start <= at < start + length:
                at = start + length
        if network.jitter_ms:
            at += rnd.uniform(0, network.jitter_ms)
        self.last_at = at = max(at, self.last_at)
        self.queue.append((at, message))
        if chunk is not None:
            if network.duplicate and rnd.random() < network.duplicate:
                self.result.chunks_duplicated.append(chunk)
                self.queue.append((at, message))
            if self.held is not None and self.held[0] != chunk:
                self.queue.append((at, self.held[1]))
                self.held = None
        await self.deliver(t_ms)

    async def deliver(self, t_ms: float) -> None:
        """Send what has reached the bridge by ``t_ms`` on the caller's clock."""
        while self.queue and self.queue[0][0] <= t_ms:
            await self.ws.send(self.queue.popleft()[1])

    async def flush(self) -> None:
        if self.held is not None:
            self.queue.append((self.last_at, self.held[1]))
            self.held = None
        while self.queue:
            await self.ws.send(self.queue.popleft()[1])


async def _stream(result, stream_url, stream_params, validator, account_sid, caller_pcm, speed, dtmf, tail_ms, max_call_s, hangup, amd=None, network=None):
    stream_sid = sid("MZ")
    headers = {"X-Twilio-Signature": validator.compute_signature(stream_url, {})}
    player = _Player()
    pending_dtmf = sorted(dtmf)
    caller = pcm_to_ulaw(caller_pcm[: len(caller_pcm) // 2 * 2])
    try:
        ws = await websockets.connect(stream_url, additional_headers=headers, open_timeout=10, compression=None)
    except (OSError, websockets.InvalidHandshake) as e:
        result.ended_by = "bridge"
        result.protocol_errors.append(f"stream refused: {e}")
        return
    result.stream_started = True
    bridge_closed = asyncio.Event()
    wire = _Wire(ws, network, result)
    clock = [0]  # the caller's clock (ms): when a mark echo leaves

    async def send_mark_echoes(names: list[str]) -> None:
        for name in names:
            result.marks_echoed.append(name)
            await wire.send(json.dumps({"event": "mark", "sequenceNumber": str(seq()), "streamSid": stream_sid, "mark": {"name": name}}), clock[0])

    counter = iter(range(1, 1 << 62))

    def seq() -> int:
        return next(counter)

    async def receive() -> None:
        try:
            async for message in ws:
                if not isinstance(message, str):
                    result.protocol_errors.append("binary frame (Twilio error 31950)")
                    continue
                try:
                    frame = json.loads(message)
                    event = frame["event"]
                except (ValueError, KeyError, TypeError):
                    result.protocol_errors.append(f"not a Twilio frame: {message[:60]!r}")
                    continue
                if frame.get("streamSid") != stream_sid:
                    result.protocol_errors.append(f"{event} for streamSid {frame.get('streamSid')!r}")
                try:
                    if event == "media":
                        player.add_audio(base64.b64decode(frame["media"]["payload"], validate=True))
                        result.media_received += 1
                        result.media_at.append(time.monotonic())
                    elif event == "mark":
                        player.add_mark(str(frame["mark"]["name"]))
                except (KeyError, TypeError, ValueError):
                    result.protocol_errors.append(f"malformed {event} frame: {message[:80]!r}")
                    continue
                if event in ("media", "mark"):
                    continue
                if event == "clear":
                    result.clears += 1
                    await send_mark_echoes(player.clear())
                else:
                    result.protocol_errors.append(f"unexpected event {event!r} (Twilio error 31951)")
        except ConnectionClosed:
            pass
        finally:
            result.close_code = ws.close_code
            bridge_closed.set()

    receiver = asyncio.create_task(receive())
    background: list[asyncio.Task] = []
    try:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(json.dumps({
            "event": "start", "sequenceNumber": str(seq()), "streamSid": stream_sid,
            "start": {
                "streamSid": stream_sid, "accountSid": account_sid, "callSid": result.call_sid,
                "tracks": ["inbound"], "customParameters": stream_params,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }))  # fmt: skip
        started = time.monotonic()
        frame = 0
        caller_frames = -(-len(caller) // FRAME_BYTES)
        while True:
            t_ms = clock[0] = frame * FRAME_MS
            if hangup.is_set():  # a call completed through the API never runs more TwiML
                result.ended_by = "rest"
                break
            if bridge_closed.is_set():
                await asyncio.sleep(0.2)  # Twilio hears about a REST hang-up and the close together
                result.ended_by = "rest" if hangup.is_set() else "bridge"
                break
            done_talking = frame >= caller_frames and t_ms >= caller_frames * FRAME_MS + tail_ms and not player.playing
            if done_talking or t_ms >= max_call_s * 1000:
                result.ended_by = "caller"
                result.hit_max_call = not done_talking
                break
            if speed > 0:  # pace on the caller's clock
                delay = started + t_ms / 1000 / speed - time.monotonic()
                await asyncio.sleep(max(0.0, delay))
            else:
                await asyncio.sleep(0)
            if amd is not None and t_ms >= amd[0]:  # async AMD answers while the call goes on
                background.append(asyncio.create_task(amd[1]()))
                amd = None
            while pending_dtmf and pending_dtmf[0][0] <= t_ms:
                _, digit = pending_dtmf.pop(0)
                await wire.send(json.dumps({"event": "dtmf", "streamSid": stream_sid, "sequenceNumber": str(seq()), "dtmf": {"track": "inbound_track", "digit": digit}}), t_ms)
            result.said_at.append(time.monotonic())
            chunk = caller[frame * FRAME_BYTES : (frame + 1) * FRAME_BYTES] or b"\xff" * FRAME_BYTES
            chunk = chunk.ljust(FRAME_BYTES, b"\xff")
            await wire.send(json.dumps({
                "event": "media", "sequenceNumber": str(seq()), "streamSid": stream_sid,
                "media": {"track": "inbound", "chunk": str(frame + 1), "timestamp": str(t_ms), "payload": base64.b64encode(chunk).decode()},
            }), t_ms, frame + 1)  # fmt: skip
            await send_mark_echoes(player.play(FRAME_BYTES))
            frame += 1
            result.sent_ms = frame * FRAME_MS
        if result.ended_by in ("caller", "rest"):
            with contextlib.suppress(ConnectionClosed):
                await wire.flush()
                await ws.send(json.dumps({"event": "stop", "sequenceNumber": str(seq()), "streamSid": stream_sid, "stop": {"accountSid": account_sid, "callSid": result.call_sid}}))
    except ConnectionClosed:
        result.ended_by = "rest" if hangup.is_set() else "bridge"
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 2)
        await asyncio.wait_for(receiver, 5)
        await asyncio.gather(*background, return_exceptions=True)
        result.heard = bytes(player.heard)
