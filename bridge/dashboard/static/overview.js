// The Overview view (#/overview): the calls of a recent window (the last hour, day or week) at a
// glance: how many, how they ended, turn latency, and both over time; live calls from the feed.
//
// Everything is computed in the page from POST /v3/list-calls (the window's calls, newest first,
// at most MAX_CALLS of them: the view says when it stopped there).

import { requestJson } from "./api.js";
import { el, formatMs, formatTime, isLive, notice, replaceChildren, svg, timeZoneName } from "./dom.js";

export const WINDOWS = {
  "1h": { label: "Last hour", ms: 3600e3, bucket: 5 * 60e3 },
  "24h": { label: "Last 24 hours", ms: 24 * 3600e3, bucket: 3600e3 },
  "7d": { label: "Last 7 days", ms: 7 * 24 * 3600e3, bucket: 6 * 3600e3 },
};
const MAX_CALLS = 2000;
const PAGE = 500;
const REFRESH_MS = 30000;
const MIN_RELOAD_MS = 10000;

let rememberedWindow = "24h";

/** The calls that started in the last `windowMs` (plus those registered and not yet started),
 *  newest first, at most `max`; `capped` says whether there were more. */
export async function recentCalls(windowMs, max = MAX_CALLS) {
  const since = Date.now() - windowMs;
  const calls = [];
  let key = null;
  let capped = false;
  for (;;) {
    const body = { limit: PAGE, sort_order: "descending", filter_criteria: { start_timestamp: { op: "ge", type: "number", value: Math.floor(since) } } };
    if (key) body.pagination_key = key;
    const page = await requestJson("/v3/list-calls", { method: "POST", json: body });
    calls.push(...page.items);
    if (!page.has_more) break;
    if (calls.length >= max) {
      capped = true;
      break;
    }
    key = page.pagination_key;
  }
  return { calls: calls.slice(0, max), capped, since };
}

export function mountOverview(container, app) {
  const view = new OverviewView(app);
  container.append(view.element);
  view.start();
  return () => view.destroy();
}

class OverviewView {
  constructor(app) {
    this.app = app;
    this.token = 0;
    this.windowPicker = el(
      "select",
      { id: "overview-window", "aria-label": "Window", on: { change: () => this.load() } },
      Object.entries(WINDOWS).map(([value, w]) => el("option", { value, text: w.label })),
    );
    this.windowPicker.value = rememberedWindow;
    this.tiles = el("div", { id: "overview-tiles", class: "tiles" }, notice("Loading…"));
    this.outcomes = el("div", { id: "overview-outcomes" }, notice("Loading…"));
    this.volume = el("div", { id: "overview-volume" }, notice("Loading…"));
    this.latency = el("div", { id: "overview-latency" }, notice("Loading…"));
    this.agents = el("div", { id: "overview-agents" }, notice("Loading…"));
    this.caption = el("p", { class: "muted caption" });
    const card = (title, body, id) => el("section", { class: "card", id }, el("div", { class: "card-head" }, el("h2", { text: title })), body);
    this.element = el(
      "div",
      { id: "overview", class: "overview" },
      el("div", { class: "page-head" }, el("h1", { text: "Overview" }), el("div", { class: "page-actions" }, this.windowPicker)),
      this.caption,
      this.tiles,
      el("div", { class: "grid-2" }, card("Calls over time", this.volume), card("How calls ended", this.outcomes)),
      el("div", { class: "grid-2" }, card("Turn latency over time (p50 of each call's p50)", this.latency), card("By agent", this.agents)),
    );
  }

  start() {
    this.unsubscribe = this.app.feed.subscribe((event) => {
      if (event.type === "snapshot" || (event.type === "call" && !isLive(event.call))) this.scheduleReload();
      else if (event.type === "call") this.renderLiveTile();
    });
    this.load();
    this.timer = setInterval(() => this.load(), REFRESH_MS);
  }

  destroy() {
    this.token += 1;
    this.unsubscribe?.();
    clearInterval(this.timer);
    clearTimeout(this.reloadTimer);
  }

  /** A call ended: read the window again once the calls ending together have ended, and at
   *  most every MIN_RELOAD_MS (a busy bridge ends calls every second: each read is up to
   *  MAX_CALLS records). */
  scheduleReload() {
    if (this.reloadTimer) return;
    const wait = Math.max(1500, (this.lastLoad ?? 0) + MIN_RELOAD_MS - Date.now());
    this.reloadTimer = setTimeout(() => {
      this.reloadTimer = null;
      this.load();
    }, wait);
  }

  async load() {
    const token = ++this.token;
    this.lastLoad = Date.now();
    rememberedWindow = this.windowPicker.value;
    const window_ = WINDOWS[rememberedWindow];
    let result;
    try {
      result = await recentCalls(window_.ms);
    } catch (e) {
      if (token !== this.token) return;
      replaceChildren(this.tiles, notice(`Calls could not be listed: ${e.message}`, "error"));
      return;
    }
    if (token !== this.token) return;
    const stats = summarize(result.calls, result.since, window_.bucket);
    this.stats = stats;
    this.caption.textContent =
      `${window_.label}: since ${formatTime(result.since)}; times in ${timeZoneName()}.` +
      (result.capped ? ` Only the latest ${MAX_CALLS} calls are counted.` : "");
    this.renderTiles(stats);
    replaceChildren(this.volume, barChart(stats.buckets, "volume"));
    replaceChildren(this.latency, lineChart(stats.buckets));
    replaceChildren(this.outcomes, outcomeTable(stats));
    replaceChildren(this.agents, agentTable(stats));
  }

  renderTiles(stats) {
    const tile = (id, label, value, detail = "") =>
      el("div", { class: "tile", id }, el("div", { class: "tile-label", text: label }), el("div", { class: "tile-value", text: value }), el("div", { class: "tile-detail muted", text: detail }));
    this.liveTile = tile("tile-live", "Live now", String(this.liveCount()), "ongoing and waiting");
    replaceChildren(
      this.tiles,
      tile("tile-calls", "Calls", String(stats.total), `${stats.ended} ended`),
      this.liveTile,
      tile("tile-failed", "Failed", String(stats.failed), stats.ended ? `${Math.round((100 * stats.failed) / stats.ended)} % of ended calls` : ""),
      tile("tile-latency", "Turn latency p50", formatMs(stats.latencyP50), stats.latencyP90 === null ? "no turns measured" : `p90 ${formatMs(stats.latencyP90)} (of the calls' p50s)`),
      tile("tile-duration", "Average length", stats.meanDurationS === null ? "—" : `${Math.round(stats.meanDurationS)} s`, "of ended calls"),
    );
  }

  liveCount() {
    return [...this.app.feed.live.values()].filter(isLive).length;
  }

  renderLiveTile() {
    const value = this.liveTile?.querySelector(".tile-value");
    if (value) value.textContent = String(this.liveCount());
  }
}

/** What the view shows of a window's calls. */
export function summarize(calls, since, bucketMs) {
  const now = Date.now();
  const first = Math.floor(since / bucketMs) * bucketMs;
  const buckets = [];
  for (let t = first; t <= now; t += bucketMs) buckets.push({ start: t, calls: 0, failed: 0, latencies: [] });
  const reasons = new Map();
  const agents = new Map();
  const latencies = [];
  let ended = 0;
  let failed = 0;
  let durationSum = 0;
  let durations = 0;
  for (const call of calls) {
    const started = call.start_timestamp;
    const bucket = Number.isFinite(started) ? buckets[Math.floor((started - first) / bucketMs)] : undefined;
    const p50 = call.e2e_latency?.p50;
    const isFailure = call.call_status === "error" || /^error_/.test(call.disconnection_reason ?? "");
    const agent = agents.get(call.agent_id) ?? { agent_id: call.agent_id ?? "—", calls: 0, failed: 0, latencies: [] };
    agents.set(call.agent_id, agent);
    agent.calls += 1;
    if (bucket) bucket.calls += 1;
    if (call.disconnection_reason) reasons.set(call.disconnection_reason, (reasons.get(call.disconnection_reason) ?? 0) + 1);
    if (call.call_status === "ended" || call.call_status === "error") {
      ended += 1;
      if (Number.isFinite(call.end_timestamp) && Number.isFinite(started)) {
        durationSum += (call.end_timestamp - started) / 1000;
        durations += 1;
      }
    }
    if (isFailure) {
      failed += 1;
      agent.failed += 1;
      if (bucket) bucket.failed += 1;
    }
    if (Number.isFinite(p50)) {
      latencies.push(p50);
      agent.latencies.push(p50);
      if (bucket) bucket.latencies.push(p50);
    }
  }
  return {
    total: calls.length,
    ended,
    failed,
    meanDurationS: durations ? durationSum / durations : null,
    latencyP50: quantile(latencies, 0.5),
    latencyP90: quantile(latencies, 0.9),
    reasons: [...reasons.entries()].sort((a, b) => b[1] - a[1]),
    agents: [...agents.values()].map((a) => ({ ...a, p50: quantile(a.latencies, 0.5) })).sort((a, b) => b.calls - a.calls),
    buckets: buckets.map((b) => ({ ...b, p50: quantile(b.latencies, 0.5) })),
  };
}

function quantile(values, q) {
  if (values.length === 0) return null;
  const sorted = [...values].sort((a, b) => a - b);
  const at = (sorted.length - 1) * q;
  const low = Math.floor(at);
  return sorted[low] + (sorted[Math.min(low + 1, sorted.length - 1)] - sorted[low]) * (at - low);
}

const W = 560;
const H = 200;
const M = { top: 12, right: 12, bottom: 30, left: 52 };

function axes(root, yMax, buckets, yLabel) {
  const plot = { x: M.left, y: M.top, w: W - M.left - M.right, h: H - M.top - M.bottom };
  for (const f of [0, 0.5, 1]) {
    const y = plot.y + plot.h - f * plot.h;
    root.append(svg("line", { x1: plot.x, x2: plot.x + plot.w, y1: y, y2: y, class: "grid" }));
    root.append(svg("text", { x: plot.x - 6, y: y + 4, class: "tick", "text-anchor": "end" }, yLabel(f * yMax)));
  }
  const every = Math.max(1, Math.ceil(buckets.length / 6));
  buckets.forEach((b, i) => {
    if (i % every) return;
    const x = plot.x + ((i + 0.5) / buckets.length) * plot.w;
    const d = new Date(b.start);
    const pad = (n) => String(n).padStart(2, "0");
    const label = buckets.length > 30 && b.start % (24 * 3600e3) !== 0 ? `${pad(d.getHours())}:${pad(d.getMinutes())}` : `${d.getMonth() + 1}/${d.getDate()} ${pad(d.getHours())}h`;
    root.append(svg("text", { x, y: H - 10, class: "tick", "text-anchor": "middle" }, label));
  });
  return plot;
}

/** Calls a bucket, the failed part in its own colour. */
function barChart(buckets, id) {
  const total = buckets.reduce((n, b) => n + b.calls, 0);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": `Calls over time, ${total} calls`, "data-calls": total, id: `${id}-chart` });
  const yMax = Math.max(1, ...buckets.map((b) => b.calls));
  const plot = axes(root, yMax, buckets, (v) => String(Math.round(v)));
  const slot = plot.w / buckets.length;
  buckets.forEach((b, i) => {
    if (!b.calls) return;
    const x = plot.x + i * slot + slot * 0.15;
    const h = (b.calls / yMax) * plot.h;
    const hf = (b.failed / yMax) * plot.h;
    const bar = svg("rect", { x, y: plot.y + plot.h - h, width: slot * 0.7, height: h - hf, class: "bar" });
    bar.append(svg("title", {}, `${formatTime(b.start)}: ${b.calls} calls, ${b.failed} failed`));
    root.append(bar);
    if (hf > 0) root.append(svg("rect", { x, y: plot.y + plot.h - hf, width: slot * 0.7, height: hf, class: "bar bar-failed" }));
  });
  return root;
}

/** The p50 of each bucket's calls' p50 turn latency, as points joined by a line. */
function lineChart(buckets) {
  const points = buckets.map((b, i) => [i, b.p50]).filter(([, v]) => v !== null);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": `Turn latency over time, ${points.length} points`, "data-points": points.length });
  const yMax = Math.max(100, ...points.map(([, v]) => v)) * 1.1;
  const plot = axes(root, yMax, buckets, (v) => `${Math.round(v)} ms`);
  if (points.length === 0) {
    root.append(svg("text", { x: plot.x + plot.w / 2, y: plot.y + plot.h / 2, class: "empty", "text-anchor": "middle" }, "no turns measured in this window"));
    return root;
  }
  const xy = ([i, v]) => [plot.x + ((i + 0.5) / buckets.length) * plot.w, plot.y + plot.h - (v / yMax) * plot.h];
  root.append(svg("polyline", { points: points.map((p) => xy(p).join(",")).join(" "), class: "line" }));
  for (const p of points) {
    const [x, y] = xy(p);
    const dot = svg("circle", { cx: x, cy: y, r: 3, class: "dot" });
    dot.append(svg("title", {}, `${formatTime(buckets[p[0]].start)}: ${Math.round(p[1])} ms`));
    root.append(dot);
  }
  return root;
}

function outcomeTable(stats) {
  if (stats.reasons.length === 0) return notice("No call has ended in this window.");
  const most = stats.reasons[0][1];
  return el(
    "table",
    { class: "data-table compact outcomes" },
    el("tbody", {}, stats.reasons.map(([reason, n]) =>
      el("tr", { dataset: { reason }, class: /^error_/.test(reason) ? "failed" : "" },
        el("td", { class: "mono", text: reason }),
        el("td", { class: "num", text: String(n) }),
        el("td", { class: "meter-cell" }, meterBar((100 * n) / most))),
    )),
  ); // fmt: skip
}

/** A bar of `percent` % (its width set through the CSSOM: the page's CSP allows no style attribute). */
function meterBar(percent) {
  const bar = el("span", { class: "meter-bar" });
  bar.style.width = `${Math.max(2, percent)}%`;
  return bar;
}

function agentTable(stats) {
  if (stats.agents.length === 0) return notice("No calls in this window.");
  const head = el("thead", {}, el("tr", {}, ["Agent", "Calls", "Failed", "Latency p50"].map((h) => el("th", { scope: "col", text: h }))));
  return el(
    "table",
    { class: "data-table compact" },
    head,
    el("tbody", {}, stats.agents.map((a) =>
      el("tr", { dataset: { agentId: a.agent_id } },
        el("td", {}, el("a", { href: `#/agents`, text: a.agent_id })),
        el("td", { class: "num", text: String(a.calls) }),
        el("td", { class: "num", text: String(a.failed) }),
        el("td", { class: "num", text: formatMs(a.p50) })),
    )),
  ); // fmt: skip
}
