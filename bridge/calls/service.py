"""``CallService``: the lifecycle of every call behind one narrow interface.

A call is registered (the voice webhook, the call API, create-web-call, a dial), started when its
media arrives (the Twilio stream or the browser's socket, with a single-use token), live while a
relay in this process holds it, and ended once, with everything measured. The relays
(``bridge.media``) and the HTTP routes (``bridge.api``) both go through this service; neither
imports the other. It also keeps what belongs to no single request: recovery at start-up, the
sweep of calls registered but never connected, the instance heartbeat, retention, and where a
call's files live.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import httpx
from twilio.base.exceptions import TwilioException

from audio import repair_wav

from ..metrics import Metrics
from ..models import CallRecord, CallStatus, CallType, Direction, DisconnectionReason, is_call_id, now_ms
from ..settings import (
    AgentConfig,
    Settings,
    SettingsError,
    secrets_fingerprint,
    shared_secrets_problem,
    signed_url_problem,
)
from ..store import STORE_UNAVAILABLE, CallFiles, ControlChannel, FilesError, SqlCallStore, webhook_targets
from ..store.control import WorkerGroup
from ..store.files import UPLOAD_TIMEOUT_S
from ..store.outbox import sign
from .endings import EndingSpool
from .feed import MAX_ENDED, MAX_ONGOING, MAX_REGISTERED, CallFeed
from .registrar import register_call
from .throttle import DialThrottle, SharedDialThrottle
from .tokens import StreamTokens, TokenError, internal_key
from .twilio_rest import TwilioRest

log = logging.getLogger(__name__)

MAX_SWEEP_INTERVAL_S = 2.0
OUTBOUND_RING_S = 120  # Twilio rings for 60 s by default; calls.create takes `timeout` up to 600
OUTBOX_KEEP_DAYS = 7
RETENTION_INTERVAL_S = 3600.0
RESTART_DETAIL = "the bridge instance restarted while the call was live"
#: the detail of a call ended by another replica because the one relaying it is gone
REAPED_DETAIL = "the replica relaying the call stopped answering (its lease expired)"
DIAL_TIMEOUT_S = 15.0  # Twilio's calls.create answers in well under a second
INSTANCE_LEASE_HEARTBEATS = 3  # a holder whose heartbeat is older than this many intervals is gone
CALL_ID_HEADER = "X-Bridge-Call-Id"
MAX_NOTES = 20  # notes kept on one call (refused sockets cost a write each: bounded)
#: The detail of a call ended because its replica's drain deadline passed (``drain_timeout_s``)
DRAIN_DETAIL = "the replica's drain deadline passed"
#: why a replica stops relaying a call another replica ended: it reaped the call while this one's
#: lease had expired, or ended it after a stop-call this one did not answer
LOST_DETAIL = "another replica ended the call while this replica did not answer for it"
#: stop-call on a call relayed elsewhere: how long to wait for its replica to end it before the
#: command is sent again, and, after a second wait, before the call is hung up through Twilio
#: and ended here
CONTROL_WAIT_S = 1.0
CONTROL_POLL_S = 0.02
#: the most of a tool's answer given to the model (a model's context is not a file store)
MAX_TOOL_OUTPUT = 64 * 1024
#: a stop for a call not relayed here yet (being set up) is kept this long for its relay
PENDING_STOP_S = 30.0
MAX_PENDING_STOPS = 10_000
#: how long this replica remembers how a call ended (its relay's word, here or on another
#: replica), for Twilio's stream-ended callback and stop-call; at most this many calls
ENDINGS_KEPT_S = 120.0
MAX_ENDINGS_KEPT = 20_000
ENDING_POLL_S = 0.05
#: Twilio asks the stream-ended callback this soon after a stream closes (the drain waits for it)
ANSWER_DUE_S = 5.0
#: a relay announcing an ending to the other replicas waits for the database at most this long
ANNOUNCE_TIMEOUT_S = 2.0
#: once a call's relay said it is ending it, stop-call waits this long for its record to say so
#: (recording flushed, files uploaded, the ending stored) before it answers anyway
ENDING_STORED_S = 10.0
#: at exit, how long uploads of ended calls' files under way may still take
UPLOADS_AT_EXIT_S = 20.0
#: reaping a gone replica's calls: Twilio REST hang-ups at once (Twilio allows an account about 100)
REAP_HANG_UPS_AT_ONCE = 10

#: ``stop(reason, detail)``: how the relay holding a live call is asked to end it
StopCall = Callable[[DisconnectionReason, str], None]
#: ``control(request) -> call_control_result``: how the relay holding a call is asked to control it
ControlCall = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
#: a control request waits this long for the replica relaying the call to take it (``control_ack``)
CONTROL_ACK_S = 3.0
#: ... and this long for its result (a warm transfer rings its target first)
CONTROL_ANSWER_S = 90.0
MAX_CONTROL_RESULTS = 10_000


@dataclass(frozen=True)
class Outcome:
    """How a call ended, for what Twilio does after its stream: ``reason`` None when nobody
    knows (a failure); ``next_twiml`` what comes next when not a plain hang-up (a transfer)."""

    reason: DisconnectionReason | None
    detail: str = ""
    next_twiml: str | None = None


class CallRefused(Exception):
    """A stream or web-call socket that may not start the call. ``call_id`` is set when the call
    exists (the refusal is then noted on its record); ``status`` is the HTTP status that says it
    (403 unless set)."""

    def __init__(self, reason: str, call_id: str | None = None, status: int = 403):
        super().__init__(reason)
        self.call_id = call_id
        self.status = status


def not_startable(record: CallRecord) -> str:
    """Why a call that is not ``registered`` any more cannot be connected."""
    if record.call_status is CallStatus.ongoing:
        return "the call is already connected (its audio websocket is single use)"
    reason = record.disconnection_reason.value if record.disconnection_reason else record.call_status.value
    return f"the call has ended ({reason})"


class ProviderUnreachable(Exception):
    """A hosted model's endpoint could not be had (its signed URL was refused, or not fetched)."""


class ToolFailed(Exception):
    """A hosted model's function call that got no answer from its tools_url (the text says why)."""


class DialRefused(Exception):
    """Twilio refused to place an outbound call, or could not be reached (``unreachable``); the
    record ends as ``dial_failed``."""

    def __init__(self, detail: str, unreachable: bool = False):
        super().__init__(detail)
        self.unreachable = unreachable


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def claim_instance(store: SqlCallStore, settings: Settings) -> None:
    """Take ``settings.instance_id`` for this process under a lease of three heartbeats. A
    holder that stopped without releasing it (a crash) is waited out; one whose heartbeat keeps
    coming is another live process with the same id: raise ``SettingsError`` before any call
    is touched."""
    lease_s = INSTANCE_LEASE_HEARTBEATS * settings.heartbeat_interval_s
    deadline = time.monotonic() + lease_s + settings.heartbeat_interval_s
    fingerprint = secrets_fingerprint(settings)
    while (age := await store.claim(int(lease_s * 1000), fingerprint, settings.replica_base)) is not None:
        if time.monotonic() > deadline:
            raise SettingsError(
                f"instance id {settings.instance_id!r} is held by another live process (its heartbeat is "
                f"{age:.1f} s old): give each process its own BRIDGE_INSTANCE_ID"
            )
        log.warning("instance id %s is held (heartbeat %.1f s old): waiting for its lease", settings.instance_id, age)
        await asyncio.sleep(min(1.0, settings.heartbeat_interval_s / 2))
    if not store.shared:
        return
    if settings.replica_url is None and _is_loopback(urlsplit(settings.replica_base).hostname or ""):
        log.warning(
            "this replica's address for the others is %s (loopback): a listen-live socket that lands on a replica on "
            "another machine cannot be passed here; set BRIDGE_REPLICA_URL to an address the other replicas reach",
            settings.replica_base,
        )  # fmt: skip
    others = {
        name: theirs
        for name, theirs in (await store.live_fingerprints(int(lease_s * 1000))).items()
        if theirs not in (None, fingerprint)  # (none: a version before fingerprints)
    }
    if others:
        problem = (
            f"replica(s) {', '.join(sorted(others))} hold other shared secrets (BRIDGE_TWILIO_AUTH_TOKEN, "
            "BRIDGE_API_KEYS, BRIDGE_WEBHOOK_SIGNING_KEY or BRIDGE_PUBLIC_URL differ): tokens and signatures "
            "one issues would fail on the other. Set the same values on every replica "
            "(BRIDGE_ALLOW_SECRET_MISMATCH=1 starts anyway, for a rotation)"
        )
        if not settings.allow_secret_mismatch:
            await store.release()
            raise SettingsError(problem)
        log.error("%s", problem)


def worker_group(settings: Settings) -> WorkerGroup | None:
    """This process's workers, when it is one of ``bridge serve --workers N`` (N > 1)."""
    if settings.workers < 2 or not settings.worker_addresses or settings.replica_url not in settings.worker_addresses:
        return None
    secret = json.dumps([settings.twilio_auth_token, sorted(settings.api_keys), str(settings.data_dir.resolve())])
    key = hashlib.sha256(b"bridge-workers:" + secret.encode()).digest()
    return WorkerGroup(settings.replica_url, tuple(settings.worker_addresses), key)


class CallService:
    def __init__(self, settings: Settings):
        if not settings.twilio_auth_token:
            raise SettingsError("twilio_auth_token is required (set BRIDGE_TWILIO_AUTH_TOKEN)")
        if problem := signed_url_problem(settings) or shared_secrets_problem(settings):
            raise SettingsError(problem)
        self.settings = settings
        self.stream_tokens = StreamTokens(settings.twilio_auth_token, settings.stream_token_ttl_s)
        self.web_tokens = StreamTokens(settings.twilio_auth_token, settings.web_call_token_ttl_s, purpose="web", label="access token")
        self.listen_tokens = StreamTokens(settings.twilio_auth_token, settings.listen_token_ttl_s, purpose="listen", label="listen token")
        #: listen tokens spent on this replica (single use): participant id -> when it expires
        self._listens_spent: dict[str, float] = {}
        #: the media layer's listen taps of the calls relayed here (call id -> tap)
        self.listen_taps: dict[str, Any] = {}
        self.feed = CallFeed(
            lambda since_ms: self.store.live_and_ended_since(since_ms, MAX_ONGOING, MAX_REGISTERED, MAX_ENDED),
            lambda call_ids: self.store.summaries(call_ids),
            settings.feed_interval_s,
        )  # (the dashboard's live view: read while someone watches)
        self.twilio_rest = TwilioRest(settings.twilio_api_base_url, settings.twilio_auth_token, settings.twilio_account_sid)
        try:
            self.files = CallFiles(settings.files_dir or settings.data_dir, settings.files_url, settings.s3_endpoint_url, settings.s3_region)
        except FilesError as e:
            raise SettingsError(str(e)) from None
        self.dial_throttle: DialThrottle | SharedDialThrottle = DialThrottle(settings.twilio_calls_per_second)
        self.store: SqlCallStore | None = None  # set by open()
        self.control: ControlChannel | None = None  # set by open(): commands to the replica relaying a call
        self.endings: EndingSpool | None = None
        self.http: httpx.AsyncClient | None = None
        self._live: dict[str, StopCall] = {}
        #: uploads of ended calls' files under way (call id -> task): one a call at a time
        self._uploads: dict[str, asyncio.Task] = {}
        #: stops for calls not relayed here yet (their relay is being set up): call id ->
        #: (reason, detail, until when the stop holds)
        self._pending_stops: dict[str, tuple[DisconnectionReason, str, float]] = {}
        #: how calls ended, by their relays' word (``ending``): call id -> (outcome, when)
        self._endings: OrderedDict[str, tuple[Outcome, float]] = OrderedDict()
        #: the relays here that take control requests (call id -> handler), and warm transfers' events
        self._controls: dict[str, ControlCall] = {}
        self._transfer_handlers: dict[str, Callable[[str, str, str], None]] = {}
        #: control requests done (call id:request id -> its result): a retry is answered once
        self._control_results: OrderedDict[str, asyncio.Future] = OrderedDict()
        #: control requests asked of another replica: ask id -> (taken, answered)
        self._control_waiters: dict[str, tuple[asyncio.Future, asyncio.Future]] = {}
        self._announcing: set[asyncio.Task] = set()
        #: streams a relay here closed whose stream-ended question is due: call id -> until when
        self._answers_due: dict[str, float] = {}
        #: since when this replica's heartbeats have all been stored (None: the last one failed)
        self._healthy_since: float | None = None
        #: stream tokens this process gave Twilio, not yet used: call id -> when the token expires
        self._streams_due: dict[str, float] = {}
        #: SIGTERM came: not ready, new calls go to other replicas, live ones go on (``drain``)
        self.draining = False
        #: live-call sockets being served (being set up, relayed or closed): the drain waits
        self.sockets = 0
        #: the server was told to stop now: long-lived streams (the call-events feed) end
        self.shutting_down = False
        #: the app is stopping: the background jobs' loops end (even if a cancellation was lost
        #: inside a database driver, which was seen to leave the sweep looping)
        self.stopping = False
        self._live_labels: dict[str, tuple[str, str, str]] = {}  # call id -> (agent, direction, call type)
        self.metrics = Metrics(live_calls=lambda: list(self._live_labels.values()), draining=lambda: self.draining)

    # --- the service's own start and stop ---------------------------------------------------

    async def open(self) -> None:
        """Open the store (migrating it), end the calls this instance left live when it last
        stopped, and make the HTTP client for registrars."""
        settings = self.settings
        try:
            await self.files.open()
        except FilesError as e:
            raise SettingsError(str(e)) from None
        store = await SqlCallStore.open(
            settings.database_url, settings.instance_id, settings.data_dir, settings.workers, settings.database_pool_size
        )
        store.webhook_targets = webhook_targets(settings)
        store.time_statements(lambda kind, seconds: self.metrics.store_latency.labels(kind).observe(seconds))
        self.store = store
        try:
            await claim_instance(store, settings)
        except BaseException:
            await store.close()
            raise
        try:
            self.endings = EndingSpool(store, settings.data_dir / "spool" / "endings")
            await self.endings.replay()  # endings a previous process could not store: the truth first
            await self.recover()  # (only once the id is ours: no other live process relays its calls)
            await store.release_leases()
            if store.shared:  # every replica takes its dial slots from one schedule
                name = f"twilio-calls:{settings.twilio_account_sid or 'default'}"
                self.dial_throttle = SharedDialThrottle(store, settings.twilio_calls_per_second, name)
            self.control = ControlChannel(store.engine, self._on_command, worker_group(settings))
        except BaseException:  # the next start must not wait out a lease this one still held
            await self.endings.close()
            with contextlib.suppress(Exception):
                await store.release()
            await store.close()
            raise
        self.http = httpx.AsyncClient(timeout=10)

    async def close(self) -> None:
        await self.feed.close()
        if self._uploads:  # (a replaced pod's disk goes with it: let them finish, for a while)
            _done, late = await asyncio.wait(list(self._uploads.values()), timeout=UPLOADS_AT_EXIT_S)
            for task in late:  # (their files stay here; a restart with this disk uploads them)
                log.warning("files of call %s: not uploaded within %g s of the exit", task.get_name(), UPLOADS_AT_EXIT_S)
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self.endings is not None:
            await self.endings.close()
        if self.http is not None:
            await self.http.aclose()
        await self.twilio_rest.close()
        await self.files.close()
        if self.store is not None:
            try:
                await self.store.release()
            except Exception:  # the database may be gone: the lease then expires by itself
                log.exception("could not release instance id %s", self.settings.instance_id)
            await self.store.close()

    def background_jobs(self) -> list[Coroutine[Any, Any, None]]:
        """What runs for as long as the service does (the app starts and cancels them)."""
        jobs = [self.sweep_registered(), self.heartbeat(), self.enforce_retention(), self.control.run(lambda: self.stopping)]
        if self.files.remote:
            jobs.append(self.upload_left_files())
        return jobs

    # --- where things are --------------------------------------------------------------------

    def public_base(self, headers, request_base: str) -> str:
        """The base URL Twilio uses for us: configured, else trusted X-Forwarded-*, else the
        request's own (right on loopback, wrong behind a proxy: configure public_url there)."""
        if self.settings.public_url:
            return self.settings.public_url
        if self.settings.trust_forwarded_headers and headers.get("x-forwarded-host"):
            proto = headers.get("x-forwarded-proto", "https").split(",")[0].strip()
            return f"{proto}://{headers['x-forwarded-host'].split(',')[0].strip()}"
        return request_base.rstrip("/")

    def recording_path(self, call_id: str) -> Path:
        return self.files.path("recording", call_id)

    def log_path(self, call_id: str) -> Path:
        return self.files.path("log", call_id)

    def agent(self, record: CallRecord) -> AgentConfig | None:
        return self.settings.agents.get(record.agent_id)

    def agent_url(self, record: CallRecord) -> str | None:
        """Where the call's agent listens (None: its agent is not configured)."""
        agent = self.agent(record)
        if agent is None:
            return None
        key = internal_key(self.settings.twilio_auth_token, record.call_id)
        return agent.websocket_url(record.call_id, self.settings.internal_base, key)

    def agent_headers(self, record: CallRecord) -> list[tuple[str, str]]:
        """The headers of the upgrade to the call's agent: the call id, and the agent's own
        (``headers`` in the agents file, e.g. ``Authorization``)."""
        agent = self.agent(record)
        return [(CALL_ID_HEADER, record.call_id), *((agent.headers if agent else {}).items())]

    def agent_context(self, record: CallRecord) -> dict[str, str]:
        """The call's context as string parameters (a ``twilio``-protocol agent gets them in
        ``start.customParameters``): ids, numbers, direction, and metadata and dynamic
        variables as JSON."""
        context = {
            "call_id": record.call_id, "agent_id": record.agent_id, "from_number": record.from_number,
            "to_number": record.to_number, "direction": record.direction.value if record.direction else None,
        }  # fmt: skip
        if record.metadata is not None:
            context["metadata"] = json.dumps(record.metadata, separators=(",", ":"))
        if record.retell_llm_dynamic_variables is not None:
            context["retell_llm_dynamic_variables"] = json.dumps(record.retell_llm_dynamic_variables, separators=(",", ":"))
        return {k: v for k, v in context.items() if v is not None}

    def call_details(self, record: CallRecord) -> dict:
        """The call object an agent may ask for (``send_call_details``): the call API's, less
        the web call's access token."""
        return {k: v for k, v in record.public().items() if k != "access_token"}

    async def provider_endpoint(self, record: CallRecord) -> tuple[str, list[tuple[str, str]]]:
        """Where a hosted model's socket opens, and the upgrade's headers: its API key (read
        from the agent's ``api_key_env`` now: never stored, logged or shown), the call id (for
        a proxy in between) and the agent's own. With ``signed_url`` (ElevenLabs) a URL signed
        for this call is fetched first, and the socket carries no key. Raises
        ``ProviderUnreachable``."""
        agent = self.agent(record)
        spec = agent.hosted
        key = os.environ.get(agent.api_key_env or "", "")
        url = agent.websocket_url(record.call_id, self.settings.internal_base)
        own = [(CALL_ID_HEADER, record.call_id), *agent.headers.items()]
        if not agent.signed_url:
            return url, [(spec.key_header, spec.key_prefix + key), *own]
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        fetch = urlunsplit(("https" if parts.scheme == "wss" else "http", parts.netloc, parts.path.rstrip("/") + "/get-signed-url", urlencode({"agent_id": query.get("agent_id", "")}), ""))
        try:
            answer = await self.http.get(fetch, headers={spec.key_header: spec.key_prefix + key}, timeout=self.settings.agent_connect_timeout_s)
            answer.raise_for_status()
            signed = answer.json()["signed_url"]
        except httpx.HTTPStatusError as e:
            raise ProviderUnreachable(f"the signed URL was refused: {e.response.status_code} {e.response.text[:200]}") from None
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            raise ProviderUnreachable(f"no signed URL from {parts.netloc}: {type(e).__name__}: {e}") from None
        return signed, own

    def dynamic_variables(self, record: CallRecord) -> dict[str, Any]:
        """A hosted model's variables for the call (docs/agents.md): its ids, numbers and
        direction, its metadata's scalar values as ``metadata_<key>``, and its
        ``retell_llm_dynamic_variables`` (which win)."""
        variables: dict[str, Any] = {
            "call_id": record.call_id, "from_number": record.from_number, "to_number": record.to_number,
            "direction": record.direction.value if record.direction else None,
        }  # fmt: skip
        for key, value in (record.metadata or {}).items():
            if isinstance(value, str | int | float | bool):
                variables[f"metadata_{key}"] = value
        variables.update(record.retell_llm_dynamic_variables or {})
        return {k: v for k, v in variables.items() if v is not None}

    async def call_tool(self, record: CallRecord, call_id: str, name: str, arguments: dict[str, Any]) -> str:
        """A hosted model's function call, POSTed to its agent's ``tools_url`` as JSON
        (``{"call_id", "tool_call_id", "name", "arguments"}``), signed like the call webhooks
        (``x-retell-signature``), within the agent's ``tool_timeout_s``: returns the answer's
        body (the function's output, for the model). Raises ``ToolFailed`` saying why."""
        agent = self.agent(record)
        if agent is None or not agent.tools_url:
            raise ToolFailed(f"no tools_url for agent {record.agent_id}")
        body = json.dumps({"call_id": record.call_id, "tool_call_id": call_id, "name": name, "arguments": arguments}, separators=(",", ":"))
        key = self.settings.webhook_signing_key or (self.settings.api_keys[0] if self.settings.api_keys else "")
        headers = {"content-type": "application/json", "x-retell-signature": sign(body, key), CALL_ID_HEADER: record.call_id}
        try:
            response = await self.http.post(agent.tools_url, content=body, headers=headers, timeout=agent.tool_timeout_s)
        except httpx.TimeoutException:
            raise ToolFailed(f"{agent.tools_url} did not answer within {agent.tool_timeout_s:g} s") from None
        except httpx.HTTPError as e:
            raise ToolFailed(f"{agent.tools_url} could not be reached: {type(e).__name__}: {e}".rstrip(": ")) from None
        if not 200 <= response.status_code < 300:
            raise ToolFailed(f"{agent.tools_url} answered {response.status_code}: {response.text[:200]}")
        return response.text[:MAX_TOOL_OUTPUT] or "{}"

    def is_private(self, record: CallRecord) -> bool:
        """opt_out_sensitive_data_storage, on the call or its agent: no recording, log or
        transcript is kept."""
        agent = self.agent(record)
        return bool(record.opt_out_sensitive_data_storage or (agent and agent.opt_out_sensitive_data_storage))

    # --- registering -------------------------------------------------------------------------

    async def register(self, record: CallRecord) -> CallRecord:
        """Store a call built by the API (status ``registered``)."""
        await self.store.create(record)
        return record

    async def register_phone_call(self, agent: AgentConfig, **fields: Any) -> CallRecord:
        """Register a phone call for ``agent``, with its own or an external registrar."""
        return await register_call(self.store, agent, http=self.http, **fields)

    def stream_token(self, call_id: str) -> str:
        """A fresh single-use token for the call's media stream (goes into the TwiML)."""
        self._prune_streams_due()
        self._streams_due.pop(call_id, None)  # (a retried webhook: to the end of the order)
        self._streams_due[call_id] = time.monotonic() + self.settings.stream_token_ttl_s
        return self.stream_tokens.issue(call_id)

    def _prune_streams_due(self) -> None:
        """Forget the streams whose tokens expired (the oldest first: one TTL for all), such as
        those that went to another replica."""
        now, due = time.monotonic(), self._streams_due
        while due:
            call_id = next(iter(due))
            if due[call_id] >= now:
                break
            del due[call_id]

    async def register_web_call(self, record: CallRecord) -> tuple[CallRecord, str, int]:
        """Store a web call with its access token: ``(record, token, expires_at_ms)``."""
        token = self.web_tokens.issue(record.call_id)
        record.access_token = token
        await self.store.create(record)
        return record, token, int(token.split(".", 1)[0])

    async def dial(self, record: CallRecord, params: dict[str, Any]) -> CallRecord:
        """Register an outbound call and ask Twilio to place it (``calls.create`` with
        ``params``), within the account's rate. Raises ``TooManyCalls`` (nothing stored) or
        ``DialRefused`` (the record ends as ``dial_failed``)."""
        await self.dial_throttle.wait(self.settings.dial_queue_timeout_s)
        await self.store.create(record)
        try:
            async with asyncio.timeout(DIAL_TIMEOUT_S):
                call = await self.twilio_rest.client().calls.create_async(**params)
        except TwilioException as e:
            detail = getattr(e, "msg", None) or str(e)
            await self._finish(record.call_id, DisconnectionReason.dial_failed, error_detail=f"Twilio refused: {detail}")
            raise DialRefused(detail) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            detail = f"Twilio could not be reached: {type(e).__name__}: {e}".rstrip(": ")
            await self._finish(record.call_id, DisconnectionReason.dial_failed, error_detail=detail)
            raise DialRefused(detail, unreachable=True) from None
        return await self.store.update(record.call_id, twilio_call_sid=call.sid, twilio_account_sid=call.account_sid)

    # --- starting, the live registry, ending -------------------------------------------------

    async def find(self, call_id: str | None) -> CallRecord | None:
        """The call ``call_id`` names, or None (never asking the database about what is no
        call id: both databases then answer alike)."""
        return await self.store.get(call_id) if is_call_id(call_id) else None

    async def start_stream(self, call_id: str | None, token: str | None, call_sid: str | None, account_sid: str | None, public_base: str) -> CallRecord:
        """A Twilio media stream's ``start`` (on the bridge's own ``/twilio/media``) names a call
        and its single-use stream token: check both and start the call. Raises ``CallRefused``."""
        if not call_id:
            raise CallRefused("start without a call_id parameter")
        if not is_call_id(call_id):
            raise CallRefused("unknown call")
        self._streams_due.pop(call_id, None)
        try:
            self.stream_tokens.check(call_id, token)
        except TokenError as e:  # (a valid token names a call this bridge registered)
            known = await self.find(call_id) is not None
            raise CallRefused(str(e) if known else "unknown call", call_id if known else None) from None
        return await self.start_call(call_id, public_base, twilio_call_sid=call_sid, twilio_account_sid=account_sid)

    async def start_call(
        self, call_id: str, public_base: str, *, twilio_call_sid: str | None = None, twilio_account_sid: str | None = None,
        **fields: Any,
    ) -> CallRecord:
        """Mark a registered call ongoing, once (the caller's socket is here): with Twilio's ids
        if the caller is Twilio, where its files will be, and ``fields`` (the web client's
        format). Raises ``CallRefused`` saying why the call cannot start (unknown, already
        connected, ended)."""

        def fields_for(record: CallRecord) -> dict:
            more = {
                "twilio_call_sid": record.twilio_call_sid or twilio_call_sid,
                "twilio_account_sid": record.twilio_account_sid or twilio_account_sid,
                **fields,
            }
            if not self.is_private(record):
                more["recording_url"] = f"{public_base}/v2/recordings/{call_id}.wav"
                more["public_log_url"] = f"{public_base}/v2/public-logs/{call_id}.jsonl"
            return more

        started = await self.store.start(call_id, fields_for)  # one read and one write
        if started is None:
            record = await self.store.get(call_id)
            if record is None:
                raise CallRefused("unknown call")
            raise CallRefused(not_startable(record), call_id)
        return started

    async def check_web_call(self, call_id: str, token: str | None) -> CallRecord:
        """The web call a browser's access token opens. Raises ``CallRefused``."""
        record = await self.find(call_id)
        if record is None or record.call_type is not CallType.web_call:
            raise CallRefused("unknown web call")
        try:
            self.web_tokens.check(call_id, token)
        except TokenError as e:
            raise CallRefused(str(e), call_id) from None
        return record

    # --- live listening ----------------------------------------------------------------------

    def listen_token(self, record: CallRecord) -> tuple[str, int, str]:
        """A subscribe-only token for an ongoing call's audio: ``(token, expires_at_ms,
        participant_id)``. It opens one listen-only socket, within ``listen_token_ttl_s``.
        Raises ``CallRefused`` (``status`` 409: not ongoing; 403: the call is private)."""
        if record.call_status is not CallStatus.ongoing:
            raise CallRefused(f"call {record.call_id} is {record.call_status.value}: only an ongoing call can be listened to", status=409)
        if self.is_private(record):
            raise CallRefused(
                f"call {record.call_id} opted out of sensitive data storage: it cannot be listened to", status=403
            )  # fmt: skip
        token = self.listen_tokens.issue(record.call_id)
        expires_at, participant, _ = token.split(".")
        return token, int(expires_at), f"listener_{participant}"

    def check_listen_token(self, call_id: str, token: str | None, spend: bool) -> str:
        """The participant id of a valid listen token for ``call_id``; with ``spend``, marks it
        used (only the replica relaying the call spends it). Raises ``CallRefused``."""
        try:
            self.listen_tokens.check(call_id, token)
        except TokenError as e:
            raise CallRefused(str(e), call_id, status=403) from None
        expires_at, participant, _ = token.split(".")
        participant = f"listener_{participant}"
        if spend:
            now, spent = time.time() * 1000, self._listens_spent
            for old in [p for p, until in spent.items() if until < now]:
                del spent[old]
            if participant in spent:
                raise CallRefused("listen token already used", call_id, status=403)
            spent[participant] = int(expires_at)
        return participant

    async def relay_address(self, call_id: str) -> tuple[str, str | None] | None:
        """The replica relaying an ongoing call and its address, or None."""
        lease_ms = int(INSTANCE_LEASE_HEARTBEATS * self.settings.heartbeat_interval_s * 1000)
        return await self.store.relay_address(call_id, lease_ms)

    def attach(self, record: CallRecord, stop: StopCall) -> None:
        """A relay in this process holds the call from now on; ``stop`` asks it to end it."""
        self._live[record.call_id] = stop
        direction = record.direction.value if record.direction else "none"
        self._live_labels[record.call_id] = (record.agent_id, direction, record.call_type.value)
        pending = self._pending_stops.pop(record.call_id, None)
        if pending is not None and pending[2] > time.monotonic():  # stop-call came during the set-up
            stop(pending[0], pending[1])

    def detach(self, call_id: str) -> None:
        self._controls.pop(call_id, None)
        self._transfer_handlers.pop(call_id, None)
        self._live.pop(call_id, None)
        self._live_labels.pop(call_id, None)

    @property
    def live_calls(self) -> int:
        """Calls relayed by this process now."""
        return len(self._live)

    def streams_due(self) -> int:
        """Calls this process answered with TwiML whose stream has not arrived here yet (and may)."""
        self._prune_streams_due()
        return len(self._streams_due)

    async def streams_still_due(self) -> int:
        """``streams_due``, less the calls whose stream started on another replica (their record
        is no longer ``registered``): behind a load balancer a draining replica does not wait
        out the tokens it gave for streams that went elsewhere."""
        if not self.streams_due():
            return 0
        try:
            states = await self.store.states(list(self._streams_due))
        except Exception:  # the database is away: wait on what this replica knows
            return len(self._streams_due)
        for call_id in list(self._streams_due):
            state = states.get(call_id)
            if state is None or state[0] is not CallStatus.registered:
                self._streams_due.pop(call_id, None)
        return len(self._streams_due)

    def end_live_calls(self, reason: DisconnectionReason, detail: str) -> int:
        """Ask every relay here to end its call (the drain's deadline); returns how many."""
        stops = list(self._live.values())
        for stop in stops:
            stop(reason, detail)
        return len(stops)

    def _stop_here(self, call_id: str, reason: DisconnectionReason, detail: str) -> bool:
        stop = self._live.get(call_id)
        if stop is None:
            return False
        stop(reason, detail)
        return True

    def _stop_when_attached(self, call_id: str, reason: DisconnectionReason, detail: str) -> None:
        """Stop the call at once if relayed here, else as soon as a relay here attaches it
        (within PENDING_STOP_S): a stop that comes while its relay is being set up holds."""
        if self._stop_here(call_id, reason, detail):
            return
        now, pending = time.monotonic(), self._pending_stops
        while pending and (len(pending) >= MAX_PENDING_STOPS or next(iter(pending.values()))[2] < now):
            del pending[next(iter(pending))]  # (the oldest first: one lifetime for all)
        pending[call_id] = (reason, detail, now + PENDING_STOP_S)

    def _on_command(self, command: dict) -> None:
        """A command from the control channel (any replica's, this one's included): ``stop`` a
        call relayed here; a call relayed somewhere has ``ended`` (how, for ``stream_outcome``
        and ``stop``); ``control`` a call relayed here (``control_call``), whose
        ``control_result`` comes back the same way; a warm transfer's ``transfer_event``."""
        op, call_id = command.get("op"), command.get("call_id")
        if not is_call_id(call_id):
            return
        if op == "control":
            if (handler := self._controls.get(call_id)) is not None:
                asyncio.ensure_future(self._answer_control(call_id, handler, command))
            return
        if op in ("control_ack", "control_result"):
            if (waiters := self._control_waiters.get(str(command.get("ask")))) is not None:
                waiter = waiters[0 if op == "control_ack" else 1]
                if not waiter.done():
                    waiter.set_result(command.get("result"))
            return
        if op == "transfer_event":
            if (handler := self._transfer_handlers.get(call_id)) is not None:
                handler(str(command.get("event")), str(command.get("detail", ""))[:500], str(command.get("leg", ""))[:64])
            return
        if op not in ("stop", "ended"):
            return
        try:
            reason = DisconnectionReason(command.get("reason"))
        except ValueError:
            log.error("control channel: %s with an unknown reason %r", op, command.get("reason"))
            return
        detail = str(command.get("detail", ""))[:500]
        if op == "stop":
            self._stop_when_attached(call_id, reason, detail)
        else:
            next_twiml = command.get("next_twiml")
            self._keep_ending(call_id, Outcome(reason, detail, next_twiml if isinstance(next_twiml, str) else None))

    # --- how a live call ended, before its record says so -------------------------------------

    def ending(self, call_id: str, reason: DisconnectionReason, detail: str, next_twiml: str | None = None) -> None:
        """A relay here is ending the call (before it closes the caller's socket): said at once
        to this replica's ``stream_outcome`` and ``stop``, and to the other replicas' through
        the control channel (in the background, bounded: the caller's socket never waits).
        ``next_twiml``: what Twilio does after the stream, if not a plain hang-up (a transfer)."""
        self._keep_ending(call_id, Outcome(reason, detail, next_twiml))
        if self.control is not None and self.control.shared:
            command = {"op": "ended", "call_id": call_id, "reason": reason.value, "detail": detail[:500], "next_twiml": next_twiml}
            self._announce(command)

    def _announce(self, command: dict) -> None:
        task = asyncio.ensure_future(self._send_command(command))
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _send_command(self, command: dict) -> None:
        try:
            async with asyncio.timeout(ANNOUNCE_TIMEOUT_S):
                await self.control.send(command)
        except Exception as e:  # noqa: BLE001 - the others read the record instead
            log.warning("call %s: %s could not be told to the other replicas: %s: %s", command["call_id"], command["op"], type(e).__name__, e)

    def _keep_ending(self, call_id: str, outcome: Outcome) -> None:
        endings, now = self._endings, time.monotonic()
        endings.pop(call_id, None)
        endings[call_id] = (outcome, now)
        while endings and (len(endings) > MAX_ENDINGS_KEPT or next(iter(endings.values()))[1] < now - ENDINGS_KEPT_S):
            endings.popitem(last=False)  # (the oldest first: one lifetime for all)

    def expect_stream_ended(self, call_id: str) -> None:
        """A relay here closed a Twilio stream that asks what to do after it (``<Connect
        action>``): Twilio's question is due within ANSWER_DUE_S (the drain waits for it)."""
        self._answers_due[call_id] = time.monotonic() + ANSWER_DUE_S

    def stream_answers_due(self) -> int:
        """Stream-ended questions Twilio has yet to ask this replica (at most ANSWER_DUE_S old)."""
        now, due = time.monotonic(), self._answers_due
        for call_id in [c for c, until in due.items() if until < now]:
            del due[call_id]
        return len(due)

    def ended_here(self, call_id: str) -> Outcome | None:
        """How the call ended, if a relay (on any replica) said so in the last ENDINGS_KEPT_S."""
        kept = self._endings.get(call_id)
        return None if kept is None else kept[0]

    async def stream_outcome(self, call_id: str, wait_s: float) -> Outcome:
        """How the call whose Twilio stream just ended ended (Twilio's ``<Connect action>``
        asks): from its relay (here, or on another replica through the control channel) or its
        record, waiting at most ``wait_s`` for either; ``reason`` None when there is no answer:
        the call was never connected, or its relay went away with it (a failure either way)."""
        self._answers_due.pop(call_id, None)
        deadline = time.monotonic() + wait_s
        while True:
            if (said := self.ended_here(call_id)) is not None:
                return said
            record = await self.find(call_id)
            if record is None:
                return Outcome(None, "unknown call")
            if record.call_status in (CallStatus.ended, CallStatus.error):
                return Outcome(record.disconnection_reason, record.error_detail or "", record.next_twiml)
            if record.call_status is CallStatus.registered:
                return Outcome(None, "its stream ended before the call started")
            if time.monotonic() >= deadline:
                return Outcome(None, f"its relay said nothing of its ending within {wait_s:g} s")
            await asyncio.sleep(ENDING_POLL_S)

    # --- controlling a live call: transfer, keys, end -----------------------------------------

    def attach_control(self, call_id: str, handler: ControlCall, on_transfer_event: Callable[[str, str, str], None]) -> None:
        """A relay here takes control requests for the call (``handler(request) -> result``)
        and its warm transfer's events."""
        self._controls[call_id] = handler
        self._transfer_handlers[call_id] = on_transfer_event

    async def control_call(self, record: CallRecord, request: dict[str, Any], request_id: str | None = None) -> dict[str, Any]:
        """Ask the relay holding the call (here, or on another replica through the control
        channel) to transfer it, press keys or end it. Returns the result it answered
        (``call_control_result``), or one saying that no replica relays the call (none took it
        within CONTROL_ACK_S) or that its answer did not come within CONTROL_ANSWER_S. A
        request id repeated (a retry) gets the first request's result, done once."""
        request_id = request_id or secrets.token_hex(8)
        call_id = record.call_id
        if (handler := self._controls.get(call_id)) is not None:
            return await self._control_once(call_id, handler, request, request_id)
        action = str(request.get("event_type") or request.get("action"))
        if self.control is None or not self.control.shared:
            return {"event_type": "call_control_result", "action": action, "ok": False, "reason": "the call is not relayed (it is ending)"}
        loop = asyncio.get_running_loop()
        ask = secrets.token_hex(8)  # (this asking's own: two retries in flight are two askings of one request)
        ack, answer = self._control_waiters[ask] = (loop.create_future(), loop.create_future())
        try:
            await self.control.send({"op": "control", "call_id": call_id, "request": request, "request_id": request_id, "ask": ask})
            try:
                await asyncio.wait_for(asyncio.shield(ack), CONTROL_ACK_S)
            except TimeoutError:
                return {"event_type": "call_control_result", "action": action, "ok": False, "reason": "no replica relays the call (it is ending)"}
            return await asyncio.wait_for(answer, CONTROL_ANSWER_S)
        except TimeoutError:
            return {"event_type": "call_control_result", "action": action, "ok": False, "reason": "the replica relaying the call did not answer"}
        finally:
            self._control_waiters.pop(ask, None)

    async def _answer_control(self, call_id: str, handler: ControlCall, command: dict) -> None:
        ask = str(command.get("ask"))[:64]
        await self._send_command({"op": "control_ack", "call_id": call_id, "ask": ask})
        result = await self._control_once(call_id, handler, command.get("request") or {}, str(command.get("request_id"))[:128])
        await self._send_command({"op": "control_result", "call_id": call_id, "ask": ask, "result": result})

    async def _control_once(self, call_id: str, handler: ControlCall, request: dict[str, Any], request_id: str) -> dict[str, Any]:
        done = self._control_results
        key = f"{call_id}:{request_id}"
        if key not in done:
            done[key] = asyncio.ensure_future(handler(request))
            while len(done) > MAX_CONTROL_RESULTS:
                done.popitem(last=False)
        return await asyncio.shield(done[key])

    def transfer_event(self, call_id: str, event: str, detail: str = "", leg: str = "") -> None:
        """A warm transfer's target leg says something (answered, voicemail, joined, failed):
        to the relay holding the call, here or on another replica."""
        if (handler := self._transfer_handlers.get(call_id)) is not None:
            handler(event, detail, leg)
        elif self.control is not None and self.control.shared:
            self._announce({"op": "transfer_event", "call_id": call_id, "event": event, "detail": detail, "leg": leg})

    async def end(self, call_id: str, reason: DisconnectionReason, detail: str = "", measured: dict[str, Any] | None = None) -> None:
        """Record how a live call ended, with what its relay measured (latency, transcript...),
        as of now. If the database does not answer, the ending is kept (and spooled to disk)
        and stored as soon as it does (``EndingSpool``). If the call was ended elsewhere first
        (stop-call on another replica), its measurements are kept."""
        fields = {**(measured or {}), "end_timestamp": now_ms()}
        if detail:
            fields["error_detail"] = detail
        log.info("call %s ended: %s %s", call_id, reason.value, detail)
        await self._publish_files(call_id)  # (readable through every replica before the record says it ended)
        self.metrics.calls_ended.labels(reason.value).inc()
        await self.endings.store_ending(call_id, reason, fields)

    async def _publish_files(self, call_id: str) -> bool:
        """Upload a call's files to object storage (if set); False if it failed (logged), or
        goes on past UPLOAD_TIMEOUT_S (in the background: never cut off and started again)."""
        if not self.files.remote:
            return True
        task = self._uploads.get(call_id)
        if task is None:
            task = self._uploads[call_id] = asyncio.create_task(self._upload_files(call_id), name=call_id)
        try:
            return await asyncio.wait_for(asyncio.shield(task), UPLOAD_TIMEOUT_S)
        except TimeoutError:
            log.info("call %s: its files are still uploading after %g s: that goes on", call_id, UPLOAD_TIMEOUT_S)
            return False

    async def _upload_files(self, call_id: str) -> bool:
        try:
            problem = await self.files.publish(call_id)
        finally:
            self._uploads.pop(call_id, None)
        if problem:
            log.warning("call %s: %s (retried every %g s)", call_id, problem, self.settings.files_retry_s)
        return problem is None

    async def upload_left_files(self) -> None:
        """Files of calls that ended here but could not be uploaded (the object store was
        down, or this replica restarted): uploaded again every ``files_retry_s``."""
        while not self.stopping:
            try:
                left = [call_id for call_id in self.files.local_call_ids() if call_id not in self._live and call_id not in self._uploads]
                for call_id, (status, owner) in (await self.store.states(left)).items():
                    if status in (CallStatus.ended, CallStatus.error) and owner == self.settings.instance_id:
                        if await self._publish_files(call_id):
                            log.info("call %s: its files are uploaded", call_id)
            except Exception:
                log.exception("uploading left files failed")
            await asyncio.sleep(self.settings.files_retry_s)

    async def delete(self, call_id: str) -> bool:
        """Delete an ended call: its record, then its files (here and in object storage)."""
        deleted = await self.store.delete(call_id)
        if deleted:
            try:
                await self.files.delete(call_id)
            except Exception as e:  # the record is gone: its files go with the retention
                log.warning("call %s: its files could not be deleted: %s", call_id, e)
        return deleted

    async def _finish(self, call_id: str, reason: DisconnectionReason, **options: Any) -> CallRecord | None:
        """End a call that no relay holds (never connected, dial failed...), counted."""
        ended = await self.store.finish(call_id, reason, **options)
        if ended is not None:
            self.metrics.calls_ended.labels(reason.value).inc()
        return ended

    async def hang_up(self, record: CallRecord, say: str | None = None, note: bool = True) -> str | None:
        """End the phone call through Twilio REST (no fallback TwiML is played), after Twilio
        says ``say`` to the caller if given. Returns None, or why it failed: logged at WARNING
        and, with ``note``, noted on the call (its record and public log)."""
        if not record.twilio_call_sid:
            return "the call has no Twilio call SID"
        problem = await self.twilio_rest.hangup(record.twilio_call_sid, record.twilio_account_sid, say=say)
        if problem and note:
            with contextlib.suppress(*STORE_UNAVAILABLE):  # (the log line has it)
                await self.note(record.call_id, f"Twilio REST hang-up failed: {problem}")
        return problem

    async def hang_up_leg(self, call_sid: str) -> None:
        """End a call of the bridge's own that is not a call record's (a warm transfer's leg)."""
        await self.twilio_rest.hangup(call_sid)

    async def note(self, call_id: str, text: str) -> None:
        """Add a line to the call's record (why a socket was refused, a file that could not be
        written...), and, unless the call is private, to its public log (``note`` events, with
        ``unix_ms``: they may come before the call starts), whose URL the record then gives
        (with ``public_url`` set; else once the call starts). At most MAX_NOTES a call, however
        many come at once on however many replicas: more are only logged."""
        record = await self.store.add_note(call_id, text, MAX_NOTES)
        if record is None:
            known = await self.store.get(call_id) is not None
            log.warning("call %s: %s (not noted: %s)", call_id, text, "too many notes" if known else "unknown call")
            return
        if self.is_private(record) or (self.files.remote and call_id not in self._live):
            return  # (in object storage, the public log is the relaying replica's: the record has the note)
        path = self.log_path(call_id)
        line = json.dumps({"event": "note", "unix_ms": now_ms(), "text": text}, separators=(",", ":"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as log_file:
                log_file.write(line + "\n")
        except OSError as e:
            log.warning("call %s: cannot write its public log: %s", call_id, e)
            return
        base = self.settings.public_url  # (never a refused request's own Host)
        if record.public_log_url is None and base:
            await self.store.update(call_id, public_log_url=f"{base}/v2/public-logs/{call_id}.jsonl")

    # --- control from outside the relay -------------------------------------------------------

    async def stop(self, record: CallRecord, reason: DisconnectionReason, detail: str) -> None:
        """End a live call on both legs (stop-call), with the same record wherever it is relayed.

        A call relayed here ends at once with ``reason``: its relay closes the agent socket and
        hangs the phone call up through Twilio (so Twilio's own ``stop`` is not taken for the
        caller's hang-up). A call relayed by another replica gets the command through the
        control channel and ends there the same way; this returns once its record says it
        ended. If it has not within CONTROL_WAIT_S the command is sent again; after that its
        replica is gone or cut off: a phone call is hung up through Twilio, and the call ends
        here with ``reason`` (a web call too: its replica, if it comes back, lets it go within
        a sweep, ``drop_lost_calls``). A call only registered is hung up and ends here; a stop
        also holds for a relay being set up (the stream arrived just now). Returns once the record says the call
        ended (or after 2 * CONTROL_WAIT_S: a web client may still be playing the agent's last
        words)."""
        call_id = record.call_id
        if self._stop_here(call_id, reason, detail):  # (the record says so once its relay is done)
            await self._ended_within(call_id, 2 * CONTROL_WAIT_S)
            return
        command = {"op": "stop", "call_id": call_id, "reason": reason.value, "detail": detail}
        if record.call_status is CallStatus.registered:
            await self.control.send(command)  # (its stream may be arriving on some replica now)
            await self.hang_up(record)
            if await self._finish(call_id, reason, error_detail=detail, only_if=CallStatus.registered):
                return
        for _attempt in range(2):
            await self.control.send(command)
            if await self._ended_within(call_id, CONTROL_WAIT_S):
                return
        waited = f"the replica relaying it did not end it within {2 * CONTROL_WAIT_S:g} s"
        log.warning("call %s: %s: hanging it up through Twilio and ending it here", call_id, waited)
        await self.hang_up(record)
        await self._finish(call_id, reason, only_if=CallStatus.ongoing, error_detail=f"{detail} ({waited}: ended by {self.settings.instance_id})")

    async def _ended_within(self, call_id: str, timeout_s: float) -> bool:
        """Whether the call ends within ``timeout_s``: its record says so, or its relay said it
        is ending it (then this waits, at most ENDING_STORED_S, for the record to say so too)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.ended_here(call_id) is not None:
                deadline = time.monotonic() + ENDING_STORED_S
                while not await self._has_ended(call_id) and time.monotonic() < deadline:
                    await asyncio.sleep(CONTROL_POLL_S)
                return True
            if await self._has_ended(call_id):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(CONTROL_POLL_S)

    async def _has_ended(self, call_id: str) -> bool:
        record = await self.store.get(call_id)
        return record is None or record.call_status in (CallStatus.ended, CallStatus.error)

    async def machine_answered(self, record: CallRecord, reason: DisconnectionReason, detail: str) -> None:
        """Answering-machine detection said a machine answered: the relay holding the call
        (here or on another replica) hangs up and records it, as ``stop`` does."""
        await self.stop(record, reason, detail)

    async def dial_ended(self, call_id: str, reason: DisconnectionReason, detail: str) -> None:
        """Twilio's status callback: the dialed call ended before any stream (busy, no answer,
        hung up while connecting). A call whose stream started ends by its stream."""
        await self._finish(call_id, reason, only_if=CallStatus.registered, error_detail=detail)

    # --- recovery and the background jobs ------------------------------------------------------

    async def recover(self) -> None:
        """End the calls this instance left live when it stopped, and make what their
        recordings hold playable."""
        for record in await self.store.recover(DisconnectionReason.error_unknown, RESTART_DETAIL):
            log.warning("call %s was live when this instance stopped: ended", record.call_id)
            path = self.recording_path(record.call_id)
            if path.exists():
                try:
                    repair_wav(path)
                except ValueError as e:
                    log.warning("recording %s cannot be repaired: %s", path, e)

    async def enforce_retention(self) -> None:
        """Hourly: delete recordings (and public logs) older than recording_retention_days, and
        webhook jobs created more than OUTBOX_KEEP_DAYS ago that are settled (delivered or given
        up: with the default retries a job settles within a minute of its creation)."""
        while not self.stopping:
            await self.retention_pass()
            await asyncio.sleep(RETENTION_INTERVAL_S)

    async def retention_pass(self, now: float | None = None) -> None:
        days = self.settings.recording_retention_days
        now = time.time() if now is None else now
        if days:
            try:
                if deleted := await self.files.delete_older_than(now - days * 86400):
                    log.info("%d recording(s) and log(s) deleted (older than %g days)", deleted, days)
            except Exception:
                log.exception("deleting old recordings failed")
        try:
            await self.store.purge_outbox(int(now * 1000) - OUTBOX_KEEP_DAYS * 86_400_000)
        except Exception:
            log.exception("outbox purge failed")

    async def heartbeat(self) -> None:
        self._healthy_since = time.monotonic()
        while not self.stopping:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            try:
                if not await self.store.heartbeat():
                    log.error(
                        "instance id %s was taken over by another process (this one missed its lease): "
                        "its calls may be recovered there", self.settings.instance_id,
                    )  # fmt: skip
            except Exception:  # the database may be restarting: keep serving, retry next time
                self._healthy_since = None  # (and reap nobody until our own lease has held again)
                log.exception("heartbeat failed")
            else:
                if self._healthy_since is None:
                    self._healthy_since = time.monotonic()

    async def sweep_registered(self) -> None:
        """Calls registered but never connected end as registered_call_timeout (web calls nobody
        joined as error_user_not_joined). An outbound call may ring for a while first: it gets
        OUTBOUND_RING_S more, and is hung up through Twilio when it is swept."""
        timeout_ms = int(self.settings.registered_call_timeout_s * 1000)
        while not self.stopping:
            await asyncio.sleep(min(MAX_SWEEP_INTERVAL_S, self.settings.registered_call_timeout_s / 2))
            try:
                for record in await self.store.registered_before(now_ms() - timeout_ms):
                    await self._sweep(record, timeout_ms)
                await self.reap_orphans()
                await self.drop_lost_calls()
            except Exception:  # the database may be restarting: keep sweeping next time
                log.exception("sweep of registered calls failed")

    async def reap_orphans(self) -> int:
        """End the live calls of replicas that are gone (their lease expired, or they stopped
        with calls live): each once, whichever replica gets there first, with its webhooks.
        Returns how many this replica ended."""
        lease_ms = int(INSTANCE_LEASE_HEARTBEATS * self.settings.heartbeat_interval_s * 1000)
        if self._healthy_since is None or time.monotonic() - self._healthy_since < lease_ms / 1000:
            return 0  # after a database outage every lease looks expired: wait until ours has held for one
        if released := await self.store.release_stale_leases(lease_ms):  # (at least once, soon)
            log.warning("%d webhook job(s) a gone replica was delivering are due again", released)
        ended = []
        for call_id, owner in await self.store.orphans(lease_ms):
            detail = f"{REAPED_DETAIL}: {owner}"
            record = await self._finish(call_id, DisconnectionReason.error_unknown, only_if=CallStatus.ongoing, owner=owner, error_detail=detail)
            if record is not None:
                log.warning("call %s ended: %s", call_id, detail)
                ended.append(record)
        # (a replica cut off, not dead, may still hold the phone calls: their callers hear silence
        # until Twilio is told, so a dead replica's hundred calls are not told one by one)
        limit = asyncio.Semaphore(REAP_HANG_UPS_AT_ONCE)

        async def hang_up(record: CallRecord) -> None:
            async with limit:
                await self.hang_up(record)

        await asyncio.gather(*(hang_up(record) for record in ended))
        return len(ended)

    async def drop_lost_calls(self) -> int:
        """Stop relaying the calls that are no longer this replica's: another one ended them
        while this replica did not answer for them (reaped while its lease had expired, cut off
        from the database or paused; or a stop-call it did not answer).
        Their records stand as written there. Returns how many."""
        lost = await self.store.not_mine(list(self._live))
        for call_id in lost:
            log.error("call %s: %s: its relay here stops", call_id, LOST_DETAIL)
            self._stop_here(call_id, DisconnectionReason.error_unknown, LOST_DETAIL)
        return len(lost)

    async def _sweep(self, record: CallRecord, timeout_ms: int) -> None:
        dialed = record.direction is Direction.outbound and record.twilio_call_sid
        if dialed and record.registered_at > now_ms() - timeout_ms - OUTBOUND_RING_S * 1000:
            return  # still ringing, perhaps
        web = record.call_type is CallType.web_call
        ended = await self._finish(  # unless its stream started meanwhile
            record.call_id,
            DisconnectionReason.error_user_not_joined if web else DisconnectionReason.registered_call_timeout,
            only_if=CallStatus.registered,
            error_detail=f"no media stream within {timeout_ms / 1000:g} s",
        )
        if ended is not None and dialed:
            await self.hang_up(record)
