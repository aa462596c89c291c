"""Prometheus metrics (``prometheus-client``), one registry per app (docs/operations.md lists
and explains each).

Nothing here runs per audio frame: a relay keeps its call's counts in its ``CallSession`` (as it
always did) and hands the new part to ``CallMetrics.flush`` about once a second and when the
call ends; the added delay through the bridge is timed on one frame in ``DELAY_SAMPLE_EVERY``.
Live calls, the outbox backlog and draining are read when ``/metrics`` is scraped.

The workers of one ``bridge serve --workers N`` are one bridge to a scraper: whichever answers
``/metrics`` reads the others' own (``?scope=worker``, over their private addresses) and adds
them up (``merge_expositions``): counters and histograms summed, live gauges summed, gauges of
the whole database or the whole process group (the outbox, draining) their highest; and
``bridge_workers`` says how many answered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

#: one frame in this many, per direction and call, is timed through the bridge
DELAY_SAMPLE_EVERY = 50
FLUSH_INTERVAL_S = 1.0

_MS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_DELAY = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05)
_TURN = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_NETWORK = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SETUP = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

__all__ = ["CONTENT_TYPE_LATEST", "CallMetrics", "Metrics", "merge_expositions"]

#: gauges that say one thing of the whole bridge (every worker reads the same database, and
#: drains together): the highest, not the sum
_HIGHEST = {"bridge_draining", "bridge_webhook_outbox_depth", "bridge_webhook_outbox_oldest_age_seconds"}
#: how long a worker's own metrics may take to come, when another worker is scraped
WORKER_SCRAPE_TIMEOUT_S = 2.0


class Metrics:
    """The bridge's metrics. ``live_calls`` and ``backlog`` are read at scrape time
    (``collect_live``, ``outbox``)."""

    def __init__(self, live_calls: Callable[[], list[tuple[str, str, str]]] | None = None, draining: Callable[[], bool] | None = None):
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.calls_ended = Counter("bridge_calls_ended", "Calls ended, by disconnection_reason", ["reason"], registry=registry)
        self.call_setup = Histogram(
            "bridge_call_setup_seconds", "From the caller's socket to the agent's socket open", buckets=_SETUP, registry=registry
        )
        self.added_delay = Histogram(
            "bridge_added_delay_seconds", "Time a frame spends in the bridge (sampled), by direction", ["direction"],
            buckets=_DELAY, registry=registry,
        )  # fmt: skip
        self.frames = Counter("bridge_frames", "Audio frames relayed, by direction (in: from the caller)", ["direction"], registry=registry)
        self.frames_dropped = Counter(
            "bridge_frames_dropped", "Agent audio frames thrown away by a clear before they were sent", registry=registry
        )
        self.agent_connect_failures = Counter(
            "bridge_agent_connect_failures", "Agent websockets that could not be opened, by agent", ["agent"], registry=registry
        )
        self.agent_rtt = Histogram("bridge_agent_rtt_seconds", "Round trip to the agent (its pings)", buckets=_MS, registry=registry)
        self.turn_latency = Histogram(
            "bridge_turn_latency_seconds", "From the end of the caller's turn to the agent's first audio", buckets=_TURN, registry=registry
        )
        self.agent_latency = Histogram(
            "bridge_agent_latency_seconds", "The agent's own part of a turn: from when the bridge had the end of speech to its first audio",
            buckets=_TURN, registry=registry,
        )  # fmt: skip
        self.caller_frames_lost = Counter(
            "bridge_caller_frames_lost", "Twilio media frames that never came (gaps in their chunk numbers)", registry=registry
        )
        self.caller_stalls = Counter(
            "bridge_caller_stalls", "Times no frame came from Twilio for 0.5 s or more during a call (noted on its public log)",
            registry=registry,
        )  # fmt: skip
        self.caller_delay_p99 = Histogram(
            "bridge_caller_inbound_delay_p99_seconds", "Each ended call's p99 inbound delay beyond its best frame (caller_network)",
            buckets=_NETWORK, registry=registry,
        )  # fmt: skip
        self.webhook_failures = Counter("bridge_webhook_delivery_failures", "Webhook attempts that failed", ["event"], registry=registry)
        self.store_latency = Histogram(
            "bridge_store_operation_seconds", "Call store operations, by operation", ["operation"], buckets=_MS, registry=registry
        )
        self.listeners = Gauge("bridge_listeners", "Live listeners on the calls this replica relays", registry=registry)
        self.listener_events = Counter(
            "bridge_listener_events", "Listeners that joined, left, or were dropped for falling behind, by event", ["event"],
            registry=registry,
        )  # fmt: skip
        self.outbox_depth = Gauge("bridge_webhook_outbox_depth", "Webhook jobs not yet delivered nor given up", registry=registry)
        self.outbox_oldest = Gauge("bridge_webhook_outbox_oldest_age_seconds", "Age of the oldest of them", registry=registry)
        # the labelled children flushes use most, looked up once
        self.frames_in, self.frames_out = self.frames.labels("in"), self.frames.labels("out")
        self.delay_in, self.delay_out = self.added_delay.labels("in"), self.added_delay.labels("out")
        self._live_calls = live_calls
        self._draining = draining
        registry.register(_Live(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def call(self) -> CallMetrics:
        return CallMetrics(self)


class _Live:
    """Live calls by agent, direction and call type, and draining, read at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        live = GaugeMetricFamily("bridge_live_calls", "Calls relayed by this replica now", labels=["agent", "direction", "call_type"])
        counts: dict[tuple[str, str, str], int] = {}
        for labels in self.metrics._live_calls() if self.metrics._live_calls else []:
            counts[labels] = counts.get(labels, 0) + 1
        for labels, n in counts.items():
            live.add_metric(list(labels), n)
        yield live
        draining = GaugeMetricFamily("bridge_draining", "1 while this replica drains (SIGTERM)")
        draining.add_metric([], 1 if self.metrics._draining and self.metrics._draining() else 0)
        yield draining


class CallMetrics:
    """One call's share: what its relay counted since the last flush."""

    __slots__ = ("metrics", "_frames_in", "_frames_out", "_dropped", "_rtt", "_turns", "_agent_turns", "_lost", "_stalls", "_delays_in", "_delays_out")

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._frames_in = self._frames_out = self._dropped = self._rtt = self._turns = self._agent_turns = self._lost = self._stalls = 0
        self._delays_in: list[float] = []
        self._delays_out: list[float] = []

    def delay(self, inbound: bool, seconds: float) -> None:
        (self._delays_in if inbound else self._delays_out).append(seconds)

    def flush(self, frames_in: int, frames_out: int, dropped: int, rtt_ms: list[float], turns_ms: list[float]) -> None:
        """The call's running totals (frames each way, frames a clear dropped, the RTT and
        turn-latency samples so far): what is new since the last flush goes into the metrics."""
        m = self.metrics
        if frames_in > self._frames_in:
            m.frames_in.inc(frames_in - self._frames_in)
            self._frames_in = frames_in
        if frames_out > self._frames_out:
            m.frames_out.inc(frames_out - self._frames_out)
            self._frames_out = frames_out
        for ms in rtt_ms[self._rtt :]:
            m.agent_rtt.observe(ms / 1000)
        self._rtt = len(rtt_ms)
        for ms in turns_ms[self._turns :]:
            m.turn_latency.observe(ms / 1000)
        self._turns = len(turns_ms)
        for histogram, delays in ((m.delay_in, self._delays_in), (m.delay_out, self._delays_out)):
            for seconds in delays:
                histogram.observe(seconds)
            delays.clear()
        if dropped > self._dropped:
            m.frames_dropped.inc(dropped - self._dropped)
            self._dropped = dropped

    def flush_network(self, agent_ms: list[float], clock, ended: bool = False) -> None:
        """The agent's own turn latencies so far, and the caller leg's media clock (``None`` for a
        web caller): new frames lost and stalls; at the call's end, its p99 inbound delay."""
        m = self.metrics
        for ms in agent_ms[self._agent_turns :]:
            m.agent_latency.observe(ms / 1000)
        self._agent_turns = len(agent_ms)
        if clock is None:
            return
        if clock.lost > self._lost:
            m.caller_frames_lost.inc(clock.lost - self._lost)
        if clock.stalls > self._stalls:
            m.caller_stalls.inc(clock.stalls - self._stalls)
        self._lost, self._stalls = max(self._lost, clock.lost), clock.stalls
        if ended:
            delay = clock.summary()["inbound_delay_ms"]
            if delay is not None:
                m.caller_delay_p99.observe(delay["p99"] / 1000)


def merge_expositions(texts: Iterable[str]) -> bytes:
    """The text expositions of several workers, as one bridge's (see the module's docstring)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, float]] = {}
    answered = 0
    for text in texts:
        answered += 1
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            samples = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif sample.name.endswith("_created"):  # (when the series began: the earliest)
                    samples[key] = min(samples[key], sample.value)
                elif family.name in _HIGHEST:
                    samples[key] = max(samples[key], sample.value)
                else:
                    samples[key] += sample.value
    workers = Metric("bridge_workers", "Worker processes whose metrics these are (bridge serve --workers)", "gauge")
    workers.add_sample("bridge_workers", {}, answered)
    families["bridge_workers"], values["bridge_workers"] = workers, {}
    for name, merged in families.items():
        for (sample_name, labels), value in values[name].items():
            merged.add_sample(sample_name, dict(labels), value)

    class _Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


def all_workers_exposition(metrics: Metrics, others: list[str], api_key: str | None) -> bytes:
    """This worker's metrics and those of the ``others`` (their private base URLs) that answer
    within ``WORKER_SCRAPE_TIMEOUT_S``, merged. Blocking: run it in a thread."""
    import httpx

    texts = [metrics.render().decode()]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=WORKER_SCRAPE_TIMEOUT_S, headers=headers) as http:
        for base in others:
            try:
                response = http.get(f"{base}/metrics", params={"scope": "worker"})
                response.raise_for_status()
                texts.append(response.text)
            except httpx.HTTPError as e:  # (a worker being restarted: bridge_workers says one is missing)
                log.warning("metrics of worker %s not read: %s: %s", base, type(e).__name__, e)
    return merge_expositions(texts)


class AllWorkers:
    """A registry's collector for the metrics port: every worker's metrics, merged."""

    def __init__(self, metrics: Metrics, others: list[str], api_key: str | None):
        self.metrics, self.others, self.api_key = metrics, others, api_key

    def collect(self):
        return text_string_to_metric_families(all_workers_exposition(self.metrics, self.others, self.api_key).decode())
