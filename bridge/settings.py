"""One settings object: environment variables (prefix ``BRIDGE_``) plus an optional agents file.

The agents file is TOML, one table per agent::

    [agents.sales]
    url = "wss://agent.example.com/audio-websocket/{call_id}"   # {call_id} is required
    protocol = "web"            # web | twilio
    encoding = "s16le"          # s16le | mulaw: required for a web agent (twilio protocol: mulaw)
    sample_rate = 24000         # 8000..48000: required for a web agent (twilio protocol: 8000)
    end_call_after_silence_ms = 600000   # optional, >= 10000
    max_call_duration_ms = 3600000
    numbers = ["+14155550100"]  # calls to these numbers go to this agent
    default = true              # calls to other numbers too

    [agents.assistant]          # a hosted voice model (docs/agents.md)
    protocol = "openai-realtime"   # or gemini-live
    api_key_env = "OPENAI_API_KEY"
    # registrar = "internal"    # or: registrar = { url = "https://registrar.example.com", api_key = "..." }
    #                           # (it answers POST /register-call with a call_id of 1-64 of A-Z a-z 0-9 _ . -)

With no agents file, one agent ``echo`` (the embedded echo agent) takes every call; a table with
no ``url`` is the echo agent too. Anything invalid fails at start-up with ``SettingsError``
naming the field; ``describe_agent`` is the start-up line saying what each agent gets.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import tomllib
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from audio import TWILIO_FORMAT, AudioFormat

from .models import Encoding
from .protocol.control import TOOL_SCHEMAS
from .protocol.hosted import AgentSetup, ProviderSpec, Tool
from .protocol.hosted.providers import SPECS, TRANSLATORS

E164 = re.compile(r"\+[1-9]\d{1,14}")  # use fullmatch: $ would accept a trailing newline
ECHO_AGENT_ID = "echo"
DATABASE_SCHEMES = ("sqlite:///", "sqlite+aiosqlite:///", "postgres://", "postgresql://", "postgresql+asyncpg://")


class SettingsError(ValueError):
    """Invalid configuration; the message names the field."""


class ExternalRegistrar(BaseModel):
    """A service that speaks the v1 ``POST /register-call`` contract and returns the call id."""

    model_config = ConfigDict(extra="forbid")
    url: str
    api_key: str

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http(s) URL")
        return v.rstrip("/")


class AgentProtocol(str, Enum):
    """What the agent speaks: the audio websocket's ``web`` or ``twilio`` protocol, or a hosted
    voice model's own (``bridge.protocol.hosted``)."""

    web = "web"
    twilio = "twilio"
    openai_realtime = "openai-realtime"
    gemini_live = "gemini-live"
    deepgram_agent = "deepgram-agent"
    elevenlabs_agent = "elevenlabs-agent"

    @property
    def hosted(self) -> bool:
        return self.value in SPECS


class ToolConfig(BaseModel):
    """A function a hosted model may call: ``tools = [{name = ..., description = ..., parameters = {...}}]``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = {"type": "object", "properties": {}}  # a JSON Schema


#: Settings of a hosted model's agent only
HOSTED_FIELDS = ("api_key_env", "instructions", "voice", "greeting", "tools_url", "tools", "session", "provider_agent_id", "signed_url")


def voicemail_problem(agent: AgentConfig, action: str) -> str | None:
    """What is wrong with leaving a voicemail this way for this agent (None: nothing)."""
    if action == "message" and agent.protocol is AgentProtocol.twilio:
        return (
            "voicemail_action 'message' tells the agent of the beep, and the twilio protocol has no event for it: "
            "use 'static' with a voicemail_message, or 'hangup'"
        )
    return None


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent_id: str
    protocol: AgentProtocol = AgentProtocol.web
    url: str | None = None  # None: the embedded echo agent (a hosted model: its provider's own URL)
    encoding: Encoding = Encoding.s16le
    sample_rate: int = Field(24000, ge=8000, le=48000)
    end_call_after_silence_ms: int | None = Field(None, ge=10000)
    max_call_duration_ms: int = Field(3_600_000, gt=0)
    registrar: Literal["internal"] | ExternalRegistrar = "internal"
    webhook_url: str | None = None  # call webhooks for this agent (default: the global one)
    #: sent on the upgrade of every agent socket, e.g. {Authorization = "Bearer ..."}
    headers: dict[str, str] = {}
    #: web protocol: the first message to the agent is {"event_type": "call_details", "call": ...}
    send_call_details: bool = False
    opt_out_sensitive_data_storage: bool = False  # no recording, transcript or log for its calls
    numbers: list[str] = []
    default: bool = False
    # --- the agent controls the call (docs/protocol.md, "Controlling the call") ---------------
    #: where its calls may be transferred: glob patterns, e.g. ["+1415555*", "sip:*@pbx.example.com"]
    #: (none: no transfers)
    transfer_destinations: list[str] = []
    transfer_timeout_s: float = Field(30.0, ge=5, le=120)  # a transfer's target rings this long
    #: a hosted model's built-in tools (transfer_call needs transfer_destinations)
    call_tools: list[Literal["transfer_call", "press_digit", "end_call"]] = []
    #: outbound calls: answering-machine detection (async, DetectMessageEnd), and what then
    voicemail_detection: bool = False
    voicemail_action: Literal["hangup", "message", "static"] = "hangup"
    #: static: what Twilio says at the beep (none, and no voicemail_audio_url: it hangs up);
    #: message: a hint for the agent
    voicemail_message: str = Field("", max_length=2000)
    #: static: an audio file Twilio plays at the beep (<Play>), before voicemail_message if both
    voicemail_audio_url: str = Field("", max_length=2000, pattern=r"^(https?://\S+)?$")
    voicemail_max_s: float = Field(60.0, ge=5, le=600)  # an agent leaving its message has this long
    # --- a hosted model (protocol openai-realtime, gemini-live...): docs/agents.md -------------
    #: the environment variable holding the provider's API key (the key is never in this file)
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    instructions: str | None = None
    voice: str | None = None
    greeting: str | None = None  # what the agent says first
    tools_url: str | None = None  # the model's function calls are POSTed here (signed)
    tools: list[ToolConfig] = []
    tool_timeout_s: float = Field(10.0, gt=0, le=60)
    #: merged into the provider's session / setup object (checked with its SDK's types)
    session: dict[str, Any] = {}
    #: the provider's own agent, for a provider that keeps agents (ElevenLabs: its agent_id)
    provider_agent_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,128}$")
    #: ElevenLabs: fetch a signed URL for each call (the key then never reaches the socket)
    signed_url: bool = False

    @field_validator("url")
    @classmethod
    def _websocket(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if not re.match(r"^wss?://[^/\s]+", v):
            raise ValueError("must be a ws:// or wss:// URL")
        protocol = info.data.get("protocol")
        if "{call_id}" not in v and not (protocol and protocol.hosted):  # (a hosted model's URL names no call)
            raise ValueError("must contain {call_id}")
        return v

    @field_validator("tools_url")
    @classmethod
    def _tools_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http(s) URL")
        return v

    @field_validator("headers")
    @classmethod
    def _header_fields(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"{name!r} is not an HTTP header name")
            if re.search(r"[\r\n\x00]", value):
                raise ValueError(f"the value of {name} has a line break or NUL")
            if name.lower() in ("host", "upgrade", "connection", "content-length") or name.lower().startswith("sec-websocket-"):
                raise ValueError(f"{name} is set by the websocket handshake itself")
        return v

    @field_validator("transfer_destinations")
    @classmethod
    def _destination_patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not re.fullmatch(r"(\+[0-9*?\[\]]{1,16}|sips?:[^\s<>\"]{3,200})", pattern):
                raise ValueError(f"{pattern!r} is neither an E.164 pattern (+1415555*) nor a SIP one (sip:*@pbx.example.com)")
        return v

    @field_validator("numbers")
    @classmethod
    def _e164(cls, v: list[str]) -> list[str]:
        for number in v:
            if not E164.fullmatch(number):
                raise ValueError(f"{number!r} is not an E.164 number (like +14155550100)")
        return v

    @model_validator(mode="after")
    def _fits_its_protocol(self) -> AgentConfig:
        if self.protocol.hosted:
            spec = SPECS[self.protocol.value]
            if given := sorted({"encoding", "sample_rate", "send_call_details"} & self.model_fields_set):
                raise ValueError(f"{', '.join(given)} do not apply to {spec.name}: it speaks {_format(spec)}; remove them")
            if not self.api_key_env:
                raise ValueError(f"api_key_env is required: the environment variable that holds the {spec.name} API key")
            if self.tools and not self.tools_url:
                raise ValueError("tools need tools_url: where the model's function calls are POSTed")
            if "transfer_call" in self.call_tools and not self.transfer_destinations:
                raise ValueError("call_tools transfer_call needs transfer_destinations: where calls may be transferred")
            if self.protocol is AgentProtocol.elevenlabs_agent and not (self.provider_agent_id or "agent_id=" in (self.url or "")):
                raise ValueError("an ElevenLabs agent needs its id: provider_agent_id = \"...\" (or agent_id=... in the url)")
            if self.signed_url and self.protocol is not AgentProtocol.elevenlabs_agent:
                raise ValueError("signed_url applies to ElevenLabs Agents only")
            if problem := voicemail_problem(self, self.voicemail_action):
                raise ValueError(problem)
            return self
        if self.call_tools:
            raise ValueError("call_tools are a hosted model's: an agent on the audio websocket sends transfer_call, press_digit and end_call events")
        if given := [name for name in HOSTED_FIELDS if name in self.model_fields_set]:
            raise ValueError(f"{', '.join(given)} apply only to a hosted model's protocol ({', '.join(SPECS)})")
        if self.protocol is AgentProtocol.twilio:  # (its one format: what is not stated is not a guess)
            if "encoding" not in self.model_fields_set:
                self.encoding = Encoding.mulaw
            if "sample_rate" not in self.model_fields_set:
                self.sample_rate = 8000
        if self.protocol is AgentProtocol.twilio and (self.encoding is not Encoding.mulaw or self.sample_rate != 8000):
            raise ValueError("the twilio protocol carries mulaw at 8000 Hz: set encoding = 'mulaw', sample_rate = 8000")
        if problem := voicemail_problem(self, self.voicemail_action):
            raise ValueError(problem)
        return self

    @property
    def hosted(self) -> ProviderSpec | None:
        """The hosted model's provider, or None for an agent on the audio websocket."""
        return SPECS.get(self.protocol.value)

    @property
    def formats(self) -> tuple[AudioFormat, AudioFormat]:
        """(what the agent takes, what it sends)."""
        if spec := self.hosted:
            return spec.in_format, spec.out_format
        if self.protocol is AgentProtocol.twilio:
            return TWILIO_FORMAT, TWILIO_FORMAT
        own = AudioFormat(self.encoding.value, self.sample_rate)
        return own, own

    def hosted_setup(self, outbound: bool, variables: dict[str, Any] | None = None) -> AgentSetup:
        tools = [Tool(t.name, t.description, t.parameters) for t in self.tools]
        tools += [Tool(name, TOOL_SCHEMAS[name]["description"], TOOL_SCHEMAS[name]["parameters"]) for name in self.call_tools]
        return AgentSetup(
            instructions=self.instructions, voice=self.voice, greeting=self.greeting, session=self.session, outbound=outbound,
            tools=tuple(tools), variables=variables or {},
        )  # fmt: skip

    def may_transfer_to(self, destination: str) -> bool:
        return any(fnmatch.fnmatchcase(destination, pattern) for pattern in self.transfer_destinations)

    def websocket_url(self, call_id: str, internal_base: str, internal_key: str = "") -> str:
        """The agent's audio websocket for one call (no url: the embedded echo agent, which
        takes only sockets that carry ``internal_key``, the bridge's own for this call; a
        hosted model: its provider's)."""
        if spec := self.hosted:
            url = self.url or spec.default_url
            if self.provider_agent_id and "agent_id=" not in url:
                url += ("&" if "?" in url else "?") + f"agent_id={self.provider_agent_id}"
            return url
        if self.url:
            return self.url.replace("{call_id}", call_id)
        base = internal_base.replace("http", "ws", 1)
        if self.protocol is AgentProtocol.twilio:
            return f"{base}/agents/echo-twilio/audio-websocket/{call_id}?key={internal_key}"
        query = f"encoding={self.encoding.value}&sample_rate={self.sample_rate}&key={internal_key}"
        return f"{base}/agents/echo/audio-websocket/{call_id}?{query}"


def cpu_count(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its affinity (a container's cpuset, ``taskset``), capped
    by its cgroup's CPU quota (a Kubernetes CPU limit, ``podman --cpus``), rounded up;
    ``os.cpu_count()`` alone counts the whole host's."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # (no cgroup v2 quota: the affinity is the limit)
    return max(1, cores)


class Settings(BaseSettings):
    """Environment: ``BRIDGE_PUBLIC_URL``, ``BRIDGE_TWILIO_AUTH_TOKEN``, ``BRIDGE_API_KEYS`` (comma
    separated), ``BRIDGE_AGENTS_FILE`` ... (every field below, upper case, ``BRIDGE_`` prefix)."""

    model_config = SettingsConfigDict(env_prefix="BRIDGE_", extra="ignore")

    #: Where Twilio reaches the bridge, e.g. https://abc123.ngrok.app (signatures are checked
    #: against it). Unset: built from X-Forwarded-* if trusted, else from the request itself.
    public_url: str | None = None
    trust_forwarded_headers: bool = False
    #: Check signatures against each request's own Host (no public_url, no trusted proxy): right
    #: only for local development, where nothing else is signed with the same auth token. With
    #: it, a request Twilio signed for another app on the same account would be accepted.
    request_host_signatures: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: How the bridge reaches its own embedded agents (default http://127.0.0.1:PORT).
    internal_url: str | None = None
    #: How the other replicas reach this one (a listener's socket that lands on another replica
    #: is passed to the one relaying the call): default http://HOST:PORT, with this machine's
    #: address when HOST is 0.0.0.0 (the pod's IP on Kubernetes)
    replica_url: str | None = None

    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = None
    twilio_api_base_url: str = "https://api.twilio.com"
    api_keys: Annotated[list[str], NoDecode] = []
    #: SQLite file (default: DATA_DIR/bridge.db) or postgresql://user@host/db
    database_url: str | None = None
    #: PostgreSQL: connections each bridge process keeps (each worker of ``--workers N`` has
    #: its own; one more each listens for the control channel). Opened as needed and kept, never
    #: opened for a burst and closed after it; a statement that finds them all busy waits for
    #: one. Replicas x workers x (this + 1) must fit the server's ``max_connections``
    database_pool_size: int = Field(10, ge=1, le=500)
    data_dir: Path = Path("var")
    #: Where recordings and public logs are written (default: data_dir): a volume every replica
    #: mounts makes them readable through any replica
    files_dir: Path | None = None
    #: Object storage for recordings and public logs, s3://BUCKET/PREFIX (AWS S3, MinIO, R2, GCS
    #: interoperability...): uploaded when a call ends, served by every replica. Credentials come
    #: from the usual AWS_* variables (or the platform's identity).
    files_url: str | None = None
    #: The S3 API's address for a store other than AWS (e.g. http://minio:9000)
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    #: How often files whose upload failed (the store was down) are uploaded again
    files_retry_s: float = Field(30.0, gt=0)
    #: Stable name of this replica (its calls are its own to recover after a crash): the host name
    #: by default, which is the pod name on Kubernetes.
    instance_id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128)
    heartbeat_interval_s: float = Field(5.0, gt=0)
    agents_file: Path | None = None
    #: Worker processes of ``bridge serve`` on this machine, all on one port (``bridge.workers``):
    #: 1 (one process), a number, or "auto" (one per core this process may use). Each worker is
    #: a replica of its own (instance id INSTANCE_ID-N), on SQLite as on PostgreSQL.
    workers: int = Field(1, ge=1, le=256)
    #: Set by ``bridge serve --workers`` for its workers, not by hand: every worker's private
    #: address (its own /metrics, the listen sockets passed to it), this one's included
    worker_addresses: Annotated[list[str], NoDecode] = []

    stream_token_ttl_s: float = Field(30.0, gt=0)
    stream_start_timeout_s: float = Field(10.0, gt=0)  # from the media upgrade to Twilio's start
    web_call_token_ttl_s: float = Field(30.0, gt=0)  # a web call's access token
    listen_token_ttl_s: float = Field(60.0, gt=0)  # a listen-live token, to open its socket (once)
    #: A live listener this far behind (seconds of the call's audio unsent) is dropped: it never
    #: holds the call's audio or timing
    listen_max_lag_s: float = Field(2.0, gt=0, le=30)
    #: How often the dashboard's call-events feed reads the live calls from the database
    feed_interval_s: float = Field(1.0, gt=0, le=60)
    registered_call_timeout_s: float = Field(60.0, gt=0)
    agent_connect_timeout_s: float = Field(5.0, gt=0)
    send_timeout_s: float = Field(5.0, gt=0)
    keepalive_interval_s: float = Field(5.0, gt=0)
    #: Twilio streams media all the time (silence included): nothing for this long is a dead stream.
    no_audio_timeout_s: float = Field(10.0, gt=0)
    #: An agent socket that does not answer a websocket ping within this is a lost connection.
    agent_ping_timeout_s: float = Field(10.0, gt=0)
    media_frame_ms: int = Field(20, ge=20, le=60)
    mark_interval_ms: int = Field(100, ge=20)
    fallback_message: str = "Sorry, we could not connect your call. Please try again later."
    #: Every request a caller waits on (Twilio's voice webhook and callbacks, a media stream's
    #: start) is answered within this, the fallback when the database does not answer in time:
    #: Twilio gives up on a webhook after 15 s, and plays its own error then
    twilio_request_timeout_s: float = Field(4.0, gt=0, le=12)
    #: The largest request body the call API reads (413 beyond; Twilio's forms have their own,
    #: smaller cap). Metadata and dynamic variables are at most 50 kB each.
    max_request_bytes: int = Field(1 << 20, ge=64 * 1024)
    #: A connection that has not sent a whole request head this long after it opened (or after
    #: its last answer) is dropped; at most max_waiting_connections wait for their head at once.
    request_head_timeout_s: float = Field(10.0, gt=0)
    max_waiting_connections: int = Field(256, ge=1)
    #: Twilio's REST API limit for starting calls (1 a second by default on an account)
    twilio_calls_per_second: float = Field(1.0, gt=0)
    dial_queue_timeout_s: float = Field(10.0, ge=0)
    #: Call webhooks (call_started / call_ended / call_analyzed), signed with x-retell-signature
    #: using webhook_signing_key (default: the first API key, as Retell signs with the API key).
    webhook_url: str | None = None
    webhook_signing_key: str | None = None
    #: POST ended calls here; the JSON answer becomes call_analysis and a call_analyzed webhook.
    analysis_url: str | None = None
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_retry_base_s: float = Field(2.0, gt=0)
    webhook_max_attempts: int = Field(4, ge=1)  # the first try and three retries
    webhook_poll_s: float = Field(0.5, gt=0)
    #: Recordings older than this are deleted (None: kept)
    recording_retention_days: float | None = Field(None, gt=0)
    #: How often the relay checks silence / duration limits and the Twilio watchdog
    limits_tick_s: float = Field(0.2, gt=0)
    #: On SIGTERM: how long live calls may go on (new calls go to other replicas meanwhile);
    #: calls still live then end as max_duration_reached and a Twilio caller hears drain_message
    drain_timeout_s: float = Field(3600.0, ge=0)
    drain_message: str = "Sorry, we have to end this call now. Please call again."
    #: /readyz answers 503 from this many live calls on (None: no limit)
    max_live_calls: int | None = Field(None, ge=1)
    #: "json": one JSON object per log line (with call_id where one applies); "text" for people
    log_format: Literal["text", "json"] = "text"
    #: Per-call metrics (frames, sampled delay, RTT, turn latency); off saves what bench.load shows
    metrics: bool = True
    #: Serve /metrics without the API key on this port too (for a scraper inside the cluster)
    metrics_port: int | None = Field(None, ge=0, le=65535)
    #: Start a PostgreSQL-backed replica even though live replicas hold other shared secrets
    #: (only while rotating them: tokens one replica issues then fail on the others)
    allow_secret_mismatch: bool = False
    echo_sample_rate: int = Field(24000, ge=8000, le=48000)
    echo_end_silence_ms: int = Field(600, ge=100)

    agents: dict[str, AgentConfig] = {}
    routes: dict[str, str] = {}  # E.164 number -> agent id
    default_agent: str | None = None
    #: where the API key is when none was set (the embedded defaults: ``ensure_dev_secrets``)
    _dev_secrets_file: Path | None = PrivateAttr(None)

    @property
    def api_keys_origin(self) -> str:
        """Where this bridge's API keys come from, for the people holding a wrong one."""
        if self._dev_secrets_file is not None:
            return f"{self._dev_secrets_file} (its api_key: BRIDGE_API_KEYS is not set, so the bridge made one there)"
        return "BRIDGE_API_KEYS"

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return cpu_count()
        return v

    @field_validator("api_keys", "worker_addresses", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @field_validator("database_url")
    @classmethod
    def _database(cls, v: str | None) -> str | None:
        if v and not v.startswith(DATABASE_SCHEMES):
            scheme = v.split("://", 1)[0] if "://" in v else v[:20]
            raise ValueError(f"{scheme!r} is not supported: use sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB")
        return v

    @field_validator("files_url")
    @classmethod
    def _files_url(cls, v: str | None) -> str | None:
        if v and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?", v):
            raise ValueError("must be s3://BUCKET or s3://BUCKET/PREFIX (a valid bucket name)")
        return v

    @field_validator("public_url", "internal_url", "replica_url")
    @classmethod
    def _base_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not re.match(r"^https?://[^/\s]+$", v.rstrip("/")):
            raise ValueError("must be an http(s) base URL without a path, like https://abc.ngrok.app")
        return v.rstrip("/")

    @property
    def internal_base(self) -> str:
        return self.internal_url or f"http://127.0.0.1:{self.port}"

    @property
    def replica_base(self) -> str:
        """``replica_url``, or http://HOST:PORT (this machine's address for a wildcard HOST)."""
        if self.replica_url:
            return self.replica_url
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            try:
                host = socket.gethostbyname(socket.gethostname())
            except OSError:
                host = "127.0.0.1"
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def agent_for_number(self, number: str | None) -> AgentConfig | None:
        agent_id = self.routes.get(number or "", self.default_agent)
        return self.agents.get(agent_id) if agent_id else None


def describe_agent(agent: AgentConfig, default: bool = False) -> str:
    """One line saying what an agent will get, every choice left to a default included (printed
    at start-up: nothing an agent receives is chosen silently)."""
    taken, sent = agent.formats
    fmt = lambda f: f"{f.encoding} {f.sample_rate} Hz"  # noqa: E731
    audio = f"{fmt(taken)} both ways" if taken == sent else f"{fmt(taken)} in, {fmt(sent)} out"
    if spec := agent.hosted:
        where = f"{spec.name} at {agent.websocket_url('', '')}"
    elif agent.url is None:
        where = "the embedded echo agent (no url)"
    else:
        where = f"{agent.protocol.value} protocol at {agent.url}"
        if agent.protocol is AgentProtocol.web:
            where += ", call_details " + ("sent first" if agent.send_call_details else "not sent (send_call_details = false)")
    routes = ", ".join(agent.numbers) or "no numbers"
    return f"agent {agent.agent_id}: {where}; {audio}; {routes}" + ("; the default for other numbers" if default else "")


def _format(spec: ProviderSpec) -> str:
    both = spec.in_format == spec.out_format
    fmt = lambda f: f"{f.encoding} {f.sample_rate // 1000} kHz"  # noqa: E731
    return f"{fmt(spec.in_format)} both ways" if both else f"{fmt(spec.in_format)} in, {fmt(spec.out_format)} out"


def _field_path(error: dict) -> str:
    return ".".join(str(p) for p in error["loc"]) or "settings"


def _raise(e: ValidationError, prefix: str = "") -> None:
    def where(err: dict) -> str:  # (a check of the whole table names the table: agents.NAME)
        return f"{prefix}{_field_path(err)}" if err["loc"] or not prefix else prefix.rstrip(".")

    problems = "; ".join(f"{where(err)}: {err['msg']}" for err in e.errors())
    raise SettingsError(f"invalid settings: {problems}") from None


def load_agents(path: Path) -> dict[str, AgentConfig]:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"agents_file: {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"agents_file: {path} is not valid TOML: {e}") from None
    unknown = set(raw) - {"agents"}
    if unknown:
        raise SettingsError(f"agents_file: unknown top-level keys {sorted(unknown)}; expected [agents.NAME] tables")
    agents = {}
    for agent_id, table in (raw.get("agents") or {}).items():
        if not isinstance(table, dict):
            raise SettingsError(f"agents.{agent_id}: must be a table")
        try:
            agents[agent_id] = AgentConfig(agent_id=agent_id, **table)
        except ValidationError as e:
            _raise(e, f"agents.{agent_id}.")
        if problem := _unstated_format(agent_id, table):
            raise SettingsError(problem)
    if not agents:
        raise SettingsError(f"agents_file: {path} defines no [agents.NAME] table")
    return agents


#: what a web agent's table must say, and how to say it
WEB_FORMAT_FIELDS = {
    "encoding": 'the samples its audio websocket takes and sends: encoding = "s16le" or "mulaw"',
    "sample_rate": "the rate of its audio, 8000-48000 Hz: e.g. sample_rate = 16000",
}


def _unstated_format(agent_id: str, table: dict) -> str | None:
    """A ``web`` agent of its own (with a ``url``) must state its audio format: a rate guessed
    for it (24000 once was) gives a 16 kHz agent audio at the wrong speed, with no error. The
    embedded echo agent (no ``url``) takes any format, so it may leave both out."""
    if table.get("protocol", "web") != "web" or table.get("url") is None:
        return None
    missing = [name for name in WEB_FORMAT_FIELDS if name not in table]
    if not missing:
        return None
    fields = ", ".join(f"agents.{agent_id}.{name}" for name in missing)
    how = "; ".join(WEB_FORMAT_FIELDS[name] for name in missing)
    return f"invalid settings: {fields}: required for a web agent, nothing is assumed ({how})"


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (and the agents file it names); keyword arguments override both."""
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        _raise(e)
    if not settings.agents:
        if settings.agents_file is not None:
            settings.agents = load_agents(settings.agents_file)
        else:
            settings.agents = {
                ECHO_AGENT_ID: AgentConfig(agent_id=ECHO_AGENT_ID, sample_rate=settings.echo_sample_rate, default=True)
            }
    routes: dict[str, str] = {}
    defaults = []
    for agent in settings.agents.values():
        if agent.hosted:
            check_hosted_agent(agent)
        for number in agent.numbers:
            if number in routes:
                raise SettingsError(f"agents.{agent.agent_id}.numbers: {number} already routes to {routes[number]}")
            routes[number] = agent.agent_id
        if agent.default:
            defaults.append(agent.agent_id)
    if len(defaults) > 1:
        raise SettingsError(f"agents: only one agent may be default, got {defaults}")
    if not defaults and len(settings.agents) == 1:
        defaults = list(settings.agents)
    settings.routes = routes
    settings.default_agent = defaults[0] if defaults else None
    return settings


def check_hosted_agent(agent: AgentConfig) -> None:
    """A hosted model's agent can reach its provider: its SDK extra is installed, its key's
    variable is set, and the provider's SDK types accept the set-up it will send (the
    ``session`` table merged in). Raises ``SettingsError`` naming the agent and the fix."""
    from .provider_types import MessageProblem, check_message, sdk_installed

    spec, where = agent.hosted, f"agents.{agent.agent_id}"
    if not sdk_installed(spec):
        raise SettingsError(f"{where}: protocol {spec.protocol} needs the {spec.extra} extra: pip install 'twilio-audio-bridge[{spec.extra}]'")
    if not os.environ.get(agent.api_key_env):
        raise SettingsError(
            f"{where}.api_key_env: the environment variable {agent.api_key_env} is not set: export {agent.api_key_env}=... "
            f"(the {spec.name} API key)"
        )  # fmt: skip
    for outbound in (False, True):
        translator = TRANSLATORS[spec.protocol](agent.hosted_setup(outbound))
        for message in translator.start():
            try:
                check_message(spec, message)
            except MessageProblem as e:
                raise SettingsError(f"{where}.session: {spec.name} would refuse this agent's set-up: {e}") from None


def signed_url_problem(settings: Settings) -> str | None:
    """Why the bridge cannot know the URL Twilio signs, or None: with a Twilio auth token of
    one's own, signatures need the public URL (or a proxy trusted to name it)."""
    if settings.public_url or settings.trust_forwarded_headers or settings.request_host_signatures:
        return None
    return (
        "BRIDGE_PUBLIC_URL is not set, so webhook signatures could only be checked against each "
        "request's own Host header, which would accept requests Twilio signed for another app on "
        "your account. Set BRIDGE_PUBLIC_URL to the URL Twilio calls (e.g. https://abc.ngrok.app), "
        "or BRIDGE_TRUST_FORWARDED_HEADERS=1 behind a proxy that sets X-Forwarded-Host, or "
        "BRIDGE_REQUEST_HOST_SIGNATURES=1 for local development only."
    )


def is_shared_database(settings: Settings) -> bool:
    """PostgreSQL: other replicas may share the database (and the calls)."""
    return bool(settings.database_url) and settings.database_url.startswith(("postgres://", "postgresql"))


def shared_secrets_problem(settings: Settings) -> str | None:
    """Why this replica cannot share a database with others, or None. A call's webhook, stream,
    status callbacks and API requests may each reach a different replica, so every replica
    needs the same secrets, set by the operator (never made up on one machine)."""
    if not is_shared_database(settings):
        return None
    missing = [
        name
        for name, value in (
            ("BRIDGE_TWILIO_AUTH_TOKEN", settings.twilio_auth_token),
            ("BRIDGE_API_KEYS", settings.api_keys),
        )
        if not value
    ]
    if missing:
        return (
            f"{' and '.join(missing)} must be set on a replica that uses PostgreSQL (BRIDGE_DATABASE_URL): "
            "every replica behind the load balancer checks the tokens and signatures the others issue, "
            "so set the same values on all of them"
        )
    return None


def secrets_fingerprint(settings: Settings) -> str:
    """What replicas compare to find one configured with other secrets: an HMAC (keyed with the
    auth token) of the API keys, the webhook signing key and the public URL. It reveals none."""
    shared = json.dumps([sorted(settings.api_keys), settings.webhook_signing_key, settings.public_url])
    return hmac.new((settings.twilio_auth_token or "").encode(), shared.encode(), hashlib.sha256).hexdigest()[
        :32
    ]


def ensure_dev_secrets(settings: Settings) -> list[str]:
    """A fresh machine has no Twilio auth token and no API key: make random ones, kept in
    ``data_dir/dev-secrets.json`` so ``bridge simulate`` on the same machine can use them.
    Returns the names of the settings that were filled in."""
    filled = []
    if settings.twilio_auth_token and settings.api_keys:
        return filled
    if problem := shared_secrets_problem(settings):
        raise SettingsError(problem)
    path = settings.data_dir / "dev-secrets.json"
    try:
        stored = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        stored = {}
    stored.setdefault("twilio_auth_token", secrets.token_hex(16))
    stored.setdefault("api_key", "key_" + secrets.token_hex(16))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=1))
    path.chmod(0o600)
    if not settings.twilio_auth_token:
        settings.twilio_auth_token = stored["twilio_auth_token"]
        settings.request_host_signatures = True  # a token only this machine knows signs nothing else
        filled.append("twilio_auth_token")
    if not settings.api_keys:
        settings.api_keys = [stored["api_key"]]
        settings._dev_secrets_file = path
        filled.append("api_keys")
    return filled
