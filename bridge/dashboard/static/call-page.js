// A call's page (#/calls/<call_id>): the record's summary, the public log as a timeline, the
// turn latency chart, the agent link's round trip, the transcript and the recording.
//
// A live call's page refreshes itself: on the call-events feed's word for this call, and every
// POLL_MS while the call is live (in case the feed is down). The recording is loaded once the
// call is over (it is still being written before).

import { ApiError, request, requestJson } from "./api.js";
import { latencyChart, percentileTable } from "./chart.js";
import { callDuration, copyButton, el, formatDuration, formatTime, isLive, notice, replaceChildren, statusPill } from "./dom.js";
import { RecordingPlayer } from "./waveform.js";

const POLL_MS = 2000;
// Runs of the same event longer than this are folded (e.g. many `transcript` updates in a row).
const FOLD_RUN = 6;

export function mountCallPage(container, app, callId) {
  const page = new CallPage(app, callId);
  container.append(page.element);
  page.start();
  return () => page.destroy();
}

class CallPage {
  constructor(app, callId) {
    this.app = app;
    this.callId = callId;
    this.call = null;
    this.player = null;
    this.destroyed = false;
    this.recordingShown = false;

    this.title = el("div", { class: "page-title" }, el("h1", {}, "Call ", el("span", { class: "mono call-id", text: callId })), copyButton(callId));
    this.actions = el("div", { class: "page-actions" });
    this.summary = el("div", { class: "summary" }, notice("Loading…"));
    this.recording = el("div", { id: "recording-section" }, notice("Loading…"));
    this.chart = el("div", { id: "latency-chart" }, notice("Loading…"));
    this.e2e = el("div", { id: "e2e" });
    this.agentLatency = el("div", { id: "agent-latency" });
    this.network = el("div", { id: "network" });
    this.rtt = el("div", { id: "rtt" }, notice("Loading…"));
    this.transcript = el("div", { id: "transcript", class: "transcript" }, notice("Loading…"));
    this.timeline = el("div", { id: "timeline" }, notice("Loading…"));

    const card = (title, ...body) => el("section", { class: "card" }, el("div", { class: "card-head" }, el("h2", { text: title })), ...body);
    this.element = el(
      "div",
      { id: "call-page", class: "call-page" },
      el("div", { class: "page-head" }, el("a", { href: "#/calls", class: "back", text: "← Calls" }), this.title, this.actions),
      card("Summary", this.summary),
      card("Recording", this.recording),
      card(
        "Latency",
        el(
          "div",
          { class: "latency-layout" },
          this.chart,
          el("div", { class: "latency-side" }, el("h3", { text: "Turn latency (the record's e2e_latency)" }), this.e2e,
            el("h3", { text: "The agent's own part (agent_latency)" }), this.agentLatency,
            el("h3", { text: "Agent link round trip" }), this.rtt,
            el("h3", { text: "Caller's network (caller_network)" }), this.network),
        ),
      ),
      el("div", { class: "grid-2" }, card("Transcript", this.transcript), card("Public log", this.timeline)),
    );
  }

  start() {
    this.unsubscribe = this.app.feed.subscribe((event) => {
      if (event.type === "call" && event.call.call_id === this.callId) this.refresh();
    });
    this.refresh();
  }

  destroy() {
    this.destroyed = true;
    this.unsubscribe?.();
    clearTimeout(this.pollTimer);
    this.player?.destroy();
  }

  /** Reads the record again and shows what changed; polls while the call is live. */
  async refresh() {
    clearTimeout(this.pollTimer);
    let call;
    try {
      call = await requestJson(`/v2/get-call/${encodeURIComponent(this.callId)}`);
    } catch (e) {
      if (this.destroyed) return;
      if (e instanceof ApiError && e.status === 404) {
        replaceChildren(this.element, el("div", { class: "page-head" }, el("a", { href: "#/calls", class: "back", text: "← Calls" })), notice(`Not found: ${e.message}`, "error"));
        return;
      }
      replaceChildren(this.summary, notice(`The call could not be read: ${e.message}`, "error"));
      this.pollTimer = setTimeout(() => this.refresh(), POLL_MS * 2);
      return;
    }
    if (this.destroyed) return;
    const wasLive = this.call ? isLive(this.call) : null;
    this.call = call;
    this.renderSummary(call);
    this.renderActions(call);
    this.renderTranscript(call);
    this.renderPercentiles(call);
    if (isLive(call)) {
      this.pollTimer = setTimeout(() => this.refresh(), POLL_MS);
      replaceChildren(this.recording, notice("The recording can be played once the call is over."));
      this.loadLog(call); // as written so far
    } else if (wasLive !== false || !this.recordingShown) {
      // first view of a finished call, or the call just ended
      this.loadLog(call);
      this.loadRecording(call);
    }
  }

  // --- summary -----------------------------------------------------------------------------

  renderSummary(call) {
    const duration = callDuration(call);
    const rows = [
      ["Status", statusPill(call.call_status)],
      ["Disconnection reason", call.disconnection_reason ?? "—"],
      ["Agent", call.agent_id ?? "—"],
      ["Call type", call.call_type ?? "—"],
      ["Direction", call.direction ?? "—"],
      ["From", call.from_number ?? "—"],
      ["To", call.to_number ?? "—"],
      ["Started", formatTime(call.start_timestamp)],
      ["Ended", formatTime(call.end_timestamp)],
      ["Duration", call.call_status === "registered" ? "waiting (registered: no audio yet)" : duration === null ? "—" : formatDuration(duration) + (isLive(call) ? " (live)" : "")],
      ["Audio (caller's leg)", [call.audio_websocket_protocol, call.audio_encoding, call.sample_rate && `${call.sample_rate} Hz`].filter(Boolean).join(" · ") || "—"],
      ["Sensitive data", call.opt_out_sensitive_data_storage ? "not stored (opted out)" : "stored"],
    ];
    if (call.transfer_destination) rows.splice(2, 0, ["Transferred to", el("span", { class: "mono transfer", text: call.transfer_destination })]);
    if (call.voicemail) {
      const v = call.voicemail;
      const left = v.action === "hangup" ? "none (hung up)" : v.message ? `“${v.message}”` : "none";
      rows.splice(2, 0, ["Voicemail", el("span", { class: "voicemail", text: `${v.answered_by ?? "?"} · ${v.action ?? "?"} · message: ${left}` })]);
    }
    const list = el("dl", { class: "facts" }, rows.map(([name, value]) => el("div", { class: "fact" }, el("dt", { text: name }), el("dd", {}, value))));
    const extras = [];
    if (call.metadata && Object.keys(call.metadata).length) {
      extras.push(el("div", { class: "json-block" }, el("h3", { text: "Metadata" }), el("pre", { class: "json", text: JSON.stringify(call.metadata, null, 2) })));
    }
    if (call.retell_llm_dynamic_variables && Object.keys(call.retell_llm_dynamic_variables).length) {
      extras.push(
        el("div", { class: "json-block" }, el("h3", { text: "Dynamic variables" }), el("pre", { class: "json", text: JSON.stringify(call.retell_llm_dynamic_variables, null, 2) })),
      );
    }
    replaceChildren(this.summary, list, extras);
  }

  renderActions(call) {
    const buttons = [];
    if (call.call_status === "ongoing") {
      buttons.push(el("button", { type: "button", class: "listen primary", on: { click: () => this.app.listen(call.call_id) } }, "Listen"));
    }
    replaceChildren(this.actions, buttons);
  }

  /** The record's percentiles: the turn latency and the agent link's round trip. */
  renderPercentiles(call) {
    replaceChildren(this.e2e, percentileTable(call.e2e_latency) ?? notice(isLive(call) ? "Measured when the call ends." : "No turns measured."));
    replaceChildren(this.agentLatency, percentileTable(call.agent_latency) ?? notice(isLive(call) ? "Measured when the call ends." : "No turns measured."));
    replaceChildren(this.rtt, percentileTable(call.llm_websocket_network_rtt_latency) ?? notice("Not measured."));
    replaceChildren(this.network, networkTable(call.caller_network) ?? notice(isLive(call) ? "Measured when the call ends." : "Not measured (a web call)."));
  }

  // --- transcript --------------------------------------------------------------------------

  renderTranscript(call) {
    const items = call.transcript_with_tool_calls ?? call.transcript_object;
    if (!items || items.length === 0) {
      const why = call.opt_out_sensitive_data_storage ? "No transcript: the call opted out of sensitive data storage." : "No transcript.";
      replaceChildren(this.transcript, notice(isLive(call) ? "No transcript yet." : why));
      return;
    }
    const nodes = [];
    let lastDigit = null; // the bridge also writes a key press as a user turn "<dtmf 5>"
    for (const item of items) {
      const dtmf = item.role === "dtmf" ? item.digit : /^<dtmf (.+)>$/.exec(item.content ?? "")?.[1];
      if (dtmf !== undefined) {
        if (item.role !== "dtmf" && lastDigit === dtmf) {
          lastDigit = null; // the same press, told twice
          continue;
        }
        lastDigit = item.role === "dtmf" ? dtmf : null;
        nodes.push(el("div", { class: "turn turn-dtmf" }, el("span", { class: "dtmf", text: `keypad: ${dtmf}` })));
        continue;
      }
      lastDigit = null;
      if (item.role === "agent" || item.role === "user") {
        nodes.push(
          el("div", { class: `turn turn-${item.role}` }, el("span", { class: "speaker", text: item.role === "user" ? "caller" : "agent" }), el("p", { class: "bubble", text: item.content ?? "" })),
        );
      } else if (item.role === "tool_call_invocation") {
        nodes.push(el("div", { class: "turn turn-tool" }, el("span", { class: "speaker", text: "tool call" }), el("code", { class: "tool", text: `${item.name}(${toolArguments(item.arguments)})` })));
      } else if (item.role === "tool_call_result") {
        nodes.push(el("div", { class: "turn turn-tool" }, el("span", { class: "speaker", text: "result" }), el("code", { class: "tool", text: item.content ?? "" })));
      } else {
        // anything newer: shown as it is
        const { role, ...rest } = item;
        nodes.push(el("div", { class: "turn turn-other" }, el("span", { class: "speaker", text: role ?? "event" }), el("pre", { class: "json", text: JSON.stringify(rest) })));
      }
    }
    replaceChildren(this.transcript, nodes);
  }

  /** A live call's transcript so far, from its public log (the record gets the whole
   *  transcript when the call ends): each utterance once another follows it. */
  renderLiveTranscript(events) {
    const nodes = [];
    for (const event of events) {
      if (event.event === "dtmf") nodes.push(el("div", { class: "turn turn-dtmf" }, el("span", { class: "dtmf", text: `keypad: ${event.digit ?? "?"}` })));
      if (event.event !== "transcript" || !Array.isArray(event.settled)) continue;
      for (const item of event.settled) {
        if (item?.role !== "agent" && item?.role !== "user") continue;
        nodes.push(el("div", { class: `turn turn-${item.role}` }, el("span", { class: "speaker", text: item.role === "user" ? "caller" : "agent" }), el("p", { class: "bubble", text: item.content ?? "" })));
      }
    }
    if (nodes.length === 0) return; // ("No transcript yet.")
    nodes.push(notice("Live: the utterance under way shows once the next one starts; the whole transcript comes when the call ends."));
    replaceChildren(this.transcript, nodes);
  }

  // --- the public log: timeline and latency chart -------------------------------------------

  async loadLog(call) {
    let text = null;
    let problem = null;
    try {
      text = await (await request(`/v2/public-logs/${encodeURIComponent(call.call_id)}.jsonl`)).text();
    } catch (e) {
      problem = e instanceof ApiError && e.status === 404 ? "No public log." : `The public log could not be read: ${e.message}`;
    }
    if (this.destroyed || this.call !== call) return; // a newer refresh is on its way
    if (problem) {
      const kind = problem.startsWith("No public log") ? "muted" : "error";
      replaceChildren(this.timeline, notice(problem, kind));
      replaceChildren(this.chart, latencyChart([], call.e2e_latency, "no public log"));
      return;
    }
    const events = parseLog(text);
    this.renderTimeline(events);
    if (isLive(call) && !(call.transcript_with_tool_calls ?? call.transcript_object)?.length) this.renderLiveTranscript(events);
    const turns = events.filter((e) => e.event === "turn" && Number.isFinite(e.latency_ms));
    const empty = isLive(call) ? "no turns yet" : "no turns in this call";
    replaceChildren(this.chart, latencyChart(turns, call.e2e_latency, empty)); // says so itself when empty
  }

  renderTimeline(events) {
    if (events.length === 0) {
      replaceChildren(this.timeline, notice("The public log is empty."));
      return;
    }
    const tbody = el("tbody");
    // consecutive events of the same kind form a run; long runs are folded behind a button
    for (let i = 0; i < events.length; ) {
      let j = i;
      while (j < events.length && events[j].event === events[i].event) j++;
      const run = events.slice(i, j);
      if (run.length > FOLD_RUN) {
        const shown = run.slice(0, 2);
        const hidden = run.slice(2).map(timelineRow);
        hidden.forEach((row) => (row.hidden = true));
        const toggle = el("button", { type: "button", class: "link" }, `… ${hidden.length} more ${run[0].event} events`);
        const foldRow = el("tr", { class: "fold" }, el("td", { colspan: 3 }, toggle));
        toggle.addEventListener("click", () => {
          hidden.forEach((row) => (row.hidden = false));
          foldRow.remove();
        });
        tbody.append(...shown.map(timelineRow), foldRow, ...hidden);
      } else {
        tbody.append(...run.map(timelineRow));
      }
      i = j;
    }
    const head = el("thead", {}, el("tr", {}, el("th", { scope: "col", class: "num", text: "t (s)" }), el("th", { scope: "col", text: "event" }), el("th", { scope: "col", text: "details" })));
    replaceChildren(this.timeline, el("div", { class: "timeline-wrap" }, el("table", { class: "data-table compact timeline" }, head, tbody)));
  }

  // --- the recording -----------------------------------------------------------------------

  async loadRecording(call) {
    this.recordingShown = true;
    this.player?.destroy();
    this.player = null;
    replaceChildren(this.recording, notice("Loading the recording…"));
    let buffer;
    try {
      const response = await request(`/v2/recordings/${encodeURIComponent(call.call_id)}.wav`);
      buffer = await response.arrayBuffer();
    } catch (e) {
      if (this.destroyed) return;
      if (e instanceof ApiError && e.status === 404) {
        const why = call.opt_out_sensitive_data_storage ? "No recording: the call opted out of sensitive data storage." : "No recording.";
        replaceChildren(this.recording, notice(why));
      } else {
        replaceChildren(this.recording, notice(`The recording could not be read: ${e.message}`, "error"));
      }
      return;
    }
    if (this.destroyed) return;
    try {
      this.player = new RecordingPlayer(buffer);
    } catch (e) {
      replaceChildren(this.recording, notice(`The recording cannot be shown: ${e.message}`, "error"));
      return;
    }
    replaceChildren(this.recording, this.player.element);
    this.player.attached();
  }
}

/** The public log's JSON lines, in time order (lines that are not JSON objects are skipped). */
function parseLog(text) {
  const events = [];
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    try {
      const event = JSON.parse(line);
      if (event && typeof event === "object" && !Array.isArray(event)) events.push(event);
    } catch {
      // a line cut short (the call is still writing it): skipped
    }
  }
  // Array.prototype.sort is stable: events logged at the same time keep their order.
  return events.sort((a, b) => (a.t_ms ?? 0) - (b.t_ms ?? 0));
}

function timelineRow(event) {
  const { t_ms: t, event: name, ...details } = event;
  const text = Object.entries(details)
    .map(([key, value]) => `${key}=${formatValue(value)}`)
    .join("  ");
  return el(
    "tr",
    { class: `ev ev-${String(name).replace(/[^a-z0-9_]/gi, "")}` },
    el("td", { class: "num mono", text: Number.isFinite(t) ? (t / 1000).toFixed(2) : "—" }),
    el("td", {}, el("span", { class: "ev-name", text: name ?? "?" })),
    el("td", { class: "details mono", text }),
  );
}

/** A tool call's arguments (a JSON object as text) as `key=value, ...`; other text as it is. */
function toolArguments(text) {
  try {
    const args = JSON.parse(text ?? "{}");
    if (args && typeof args === "object" && !Array.isArray(args)) {
      return Object.entries(args)
        .map(([key, value]) => `${key}=${formatValue(value)}`)
        .join(", ");
    }
  } catch {
    // not JSON: shown as it came
  }
  return String(text ?? "");
}

/** A detail value, compact: bare words and numbers as they are, other text quoted. */
function formatValue(value) {
  if (typeof value === "string") return /^[\w.:+@/-]+$/.test(value) ? value : JSON.stringify(value);
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : String(Math.round(value * 100) / 100);
  return JSON.stringify(value);
}

/** The record's caller_network: what the network did to the caller's audio on its way from Twilio. */
function networkTable(net) {
  if (!net) return null;
  const delay = net.inbound_delay_ms;
  const ms = (value) => (Number.isFinite(value) ? `${Math.round(value)} ms` : "—");
  const rows = [
    ["Inbound delay beyond the best frame", delay ? `p50 ${ms(delay.p50)} · p99 ${ms(delay.p99)} · max ${ms(delay.max)}` : "—"],
    ["Longest stall", ms(net.longest_stall_ms)],
    ["Stalls of 500 ms or more", String(net.stalls)],
    ["Late bursts", String(net.late_bursts)],
    ["Frames", `${net.frames} · lost ${net.frames_lost} · duplicated ${net.frames_duplicated} · reordered ${net.frames_reordered} · too late ${net.frames_too_late}`],
    ["Waited for set-up", ms(net.setup_backlog_ms)],
    ["Clock", net.clock === "twilio" ? "Twilio's timestamps" : "arrival (the timestamps were not Twilio's clock)"],
  ];
  return el(
    "table",
    { class: "data-table compact network" },
    el("tbody", {}, rows.map(([name, value]) => el("tr", {}, el("th", { scope: "row", text: name }), el("td", { class: "num", text: value })))),
  );
}
