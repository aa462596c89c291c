// The Calls view (#/calls): the "Live now" panel, fed by the call-events feed, and the call
// table, a filtered page of POST /v3/list-calls at a time, kept current by the same feed.

import { ApiError, requestJson } from "./api.js";
import {
  callDuration, callIdCell, el, formatDuration, formatMs, formatTime, isLive, notice, replaceChildren, statusPill, timeZoneName,
} from "./dom.js";

const PAGE_SIZE = 25;
// A search by number lists this many of the latest matches (from or to), on one page.
const NUMBER_MATCHES = 100;
// While the bridge has no call-events feed, the live panel asks list-calls this often instead.
const LIVE_POLL_MS = 5000;

// The filters survive a visit to a call's page and back (they are not data, only the query).
let rememberedFilters = null;

/** Opens the Calls view on these filters next (e.g. {agent: "main"}). */
export function filterCalls(values) {
  rememberedFilters = values;
}

export function mountCalls(container, app) {
  const view = new CallsView(app);
  container.append(view.element);
  view.start();
  return () => view.destroy();
}

class CallsView {
  constructor(app) {
    this.app = app;
    this.liveCalls = new Map(); // call_id -> call, the live panel's rows
    this.cursors = []; // pagination keys of the pages before the current one ([] on page 1)
    this.cursor = null; // pagination key of the current page (null: the first)
    this.nextCursor = null;
    this.loadToken = 0; // only the latest list-calls answer is shown

    this.livePanel = el("div", { id: "live-calls", class: "live-calls" });
    this.liveCount = el("span", { class: "count" });
    this.filters = new FilterBar(rememberedFilters, () => this.applyFilters());
    this.tableError = el("div", { class: "table-error", role: "alert" });
    this.tbody = el("tbody");
    this.prevButton = el("button", { id: "page-prev", type: "button", on: { click: () => this.previousPage() } }, "← Previous");
    this.nextButton = el("button", { id: "page-next", type: "button", on: { click: () => this.nextPage() } }, "Next →");
    this.pageLabel = el("span", { id: "page-number", class: "page-number" });

    const headings = [`Started (${timeZoneName()})`, "Call", "Agent", "Type", "Direction", "From", "To", "Status", "Disconnection reason", "Duration", "p50 latency"];
    this.element = el(
      "div",
      { class: "calls-view" },
      el("section", { class: "card" }, el("div", { class: "card-head" }, el("h2", { text: "Live now" }), this.liveCount), this.livePanel),
      el(
        "section",
        { class: "card" },
        el("div", { class: "card-head" }, el("h2", { text: "Calls" })),
        this.filters.element,
        this.tableError,
        el(
          "div",
          { class: "table-wrap" },
          el("table", { id: "calls-table", class: "data-table" }, el("thead", {}, el("tr", {}, headings.map((h) => el("th", { scope: "col", text: h })))), this.tbody),
        ),
        el("div", { class: "pager" }, this.prevButton, this.pageLabel, this.nextButton),
      ),
    );
  }

  start() {
    this.unsubscribe = this.app.feed.subscribe((event) => this.onFeed(event));
    // the feed runs app-wide: start from what it last said (a snapshot comes on each reconnect)
    if (this.app.feed.state === "unavailable") this.pollLive();
    else this.showLive([...this.app.feed.live.values()]);
    this.ticker = setInterval(() => this.tickDurations(), 1000);
    this.loadPage();
  }

  destroy() {
    this.unsubscribe?.();
    clearInterval(this.ticker);
    clearTimeout(this.livePoll);
    this.loadToken += 1; // ignore answers still on their way
  }

  // --- the live panel ----------------------------------------------------------------------

  onFeed(event) {
    if (event.type === "snapshot") {
      clearTimeout(this.livePoll);
      this.showLive(event.calls);
    } else if (event.type === "call") {
      const call = event.call;
      if (isLive(call) && call.in_view !== false) this.liveCalls.set(call.call_id, call);
      else this.liveCalls.delete(call.call_id);
      this.renderLive();
      this.updateTableRow(call);
    } else if (event.type === "state" && event.state === "unavailable") {
      this.pollLive();
    }
  }

  /** Without the feed: the live calls from list-calls, every LIVE_POLL_MS. */
  async pollLive() {
    clearTimeout(this.livePoll);
    const token = this.loadToken;
    try {
      const criteria = { call_status: { op: "in", type: "enum", value: ["registered", "ongoing"] } };
      const page = await requestJson("/v3/list-calls", { method: "POST", json: { limit: 100, sort_order: "descending", filter_criteria: criteria } });
      if (token !== this.loadToken) return;
      this.showLive(page.items);
    } catch (e) {
      if (token !== this.loadToken) return;
      replaceChildren(this.livePanel, notice(`Live calls could not be read: ${e.message}`, "error"));
    }
    if (this.app.feed.state === "unavailable" && token === this.loadToken) {
      this.livePoll = setTimeout(() => this.pollLive(), LIVE_POLL_MS);
    }
  }

  showLive(calls) {
    this.liveCalls = new Map(calls.filter(isLive).map((call) => [call.call_id, call]));
    this.renderLive();
  }

  renderLive() {
    const calls = [...this.liveCalls.values()].sort((a, b) => (b.start_timestamp ?? Infinity) - (a.start_timestamp ?? Infinity));
    this.liveCount.textContent = calls.length ? String(calls.length) : "";
    if (calls.length === 0) {
      const waiting = this.app.feed.state === "connecting";
      replaceChildren(this.livePanel, notice(waiting ? "Connecting to the live feed…" : "No live calls right now."));
      return;
    }
    const rows = calls.map((call) => this.liveRow(call));
    const headings = ["Call", "Agent", "Type", "From → To", "Status", "Duration", ""];
    replaceChildren(
      this.livePanel,
      el("table", { class: "data-table live-table" }, el("thead", {}, el("tr", {}, headings.map((h) => el("th", { scope: "col", text: h })))), el("tbody", {}, rows)),
    );
  }

  liveRow(call) {
    const listen =
      call.call_status === "ongoing"
        ? el("button", { type: "button", class: "listen small", on: { click: () => this.app.listen(call.call_id) } }, "Listen")
        : null;
    return el(
      "tr",
      { dataset: { callId: call.call_id } },
      el("td", { class: "nowrap" }, callIdCell(call.call_id)),
      el("td", { text: call.agent_id ?? "—" }),
      el("td", { text: call.call_type ?? "—" }),
      el("td", { class: "mono", text: `${call.from_number ?? "—"} → ${call.to_number ?? "—"}` }),
      el("td", { class: "status" }, statusPill(call.call_status)),
      el("td", { class: "duration num", text: liveDuration(call) }),
      el("td", { class: "actions" }, listen),
    );
  }

  tickDurations() {
    for (const row of this.livePanel.querySelectorAll("tr[data-call-id]")) {
      const call = this.liveCalls.get(row.dataset.callId);
      const cell = row.querySelector(".duration");
      if (call && cell) cell.textContent = liveDuration(call);
    }
  }

  // --- the call table ----------------------------------------------------------------------

  applyFilters() {
    rememberedFilters = this.filters.values();
    this.cursors = [];
    this.cursor = null;
    this.loadPage();
  }

  nextPage() {
    if (!this.nextCursor) return;
    this.cursors.push(this.cursor);
    this.cursor = this.nextCursor;
    this.loadPage();
  }

  previousPage() {
    if (this.cursors.length === 0) return;
    this.cursor = this.cursors.pop();
    this.loadPage();
  }

  async loadPage() {
    const token = ++this.loadToken;
    this.tableError.replaceChildren();
    let criteria;
    try {
      criteria = this.filters.criteria();
    } catch (e) {
      this.tableError.append(notice(e.message, "error"));
      return;
    }
    const body = { limit: PAGE_SIZE, sort_order: "descending" };
    if (criteria) body.filter_criteria = criteria;
    if (this.cursor) body.pagination_key = this.cursor;
    this.element.classList.add("loading");
    this.prevButton.disabled = this.nextButton.disabled = true;
    try {
      const number = this.filters.number();
      if (number) {
        // from OR to: two lists (the API ANDs its filters), merged, the latest NUMBER_MATCHES
        const ask = (side) =>
          requestJson("/v3/list-calls", {
            method: "POST",
            json: { limit: NUMBER_MATCHES, sort_order: "descending", filter_criteria: { ...criteria, [side]: { op: "co", type: "string", value: number } } },
          });
        const [from, to] = await Promise.all([ask("from_number"), ask("to_number")]);
        if (token !== this.loadToken) return;
        const merged = new Map([...from.items, ...to.items].map((call) => [call.call_id, call]));
        const calls = [...merged.values()].sort((a, b) => (b.start_timestamp ?? 0) - (a.start_timestamp ?? 0)).slice(0, NUMBER_MATCHES);
        this.nextCursor = null;
        this.renderTable(calls);
        if (from.has_more || to.has_more) this.tableError.append(notice(`The ${NUMBER_MATCHES} latest calls from or to a number containing “${number}”.`));
        return;
      }
      const page = await requestJson("/v3/list-calls", { method: "POST", json: body });
      if (token !== this.loadToken) return;
      this.nextCursor = page.has_more ? page.pagination_key : null;
      this.renderTable(page.items);
    } catch (e) {
      if (token !== this.loadToken) return;
      const message = e instanceof ApiError && e.status === 422 ? `The filters were refused: ${e.message}` : `Calls could not be listed: ${e.message}`;
      this.tableError.append(notice(message, "error"));
      this.nextCursor = null;
      this.renderTable([]);
    } finally {
      if (token === this.loadToken) {
        this.element.classList.remove("loading");
        this.prevButton.disabled = this.cursors.length === 0;
        this.nextButton.disabled = !this.nextCursor;
        this.pageLabel.textContent = `Page ${this.cursors.length + 1}`;
      }
    }
  }

  renderTable(calls) {
    if (calls.length === 0) {
      const text = this.filters.isEmpty() ? "No calls yet." : "No calls match these filters.";
      replaceChildren(this.tbody, el("tr", { class: "empty" }, el("td", { colspan: 11, text })));
      return;
    }
    replaceChildren(this.tbody, calls.map(tableRow));
  }

  /** A call changed: update its row, or add it on top of an unfiltered first page. */
  updateTableRow(call) {
    const row = this.tbody.querySelector(`tr[data-call-id="${CSS.escape(call.call_id)}"]`);
    if (row) {
      row.replaceWith(tableRow(call));
      return;
    }
    if (this.cursor === null && this.filters.isEmpty()) {
      this.tbody.querySelector("tr.empty")?.remove();
      const added = tableRow(call);
      added.classList.add("new");
      this.tbody.prepend(added);
      // A page left open grows with every new call: past a few pages' worth, the first page is
      // read again (so the table stays small and its Next cursor right)
      if (this.tbody.rows.length > 4 * PAGE_SIZE) this.loadPage();
    }
  }
}

function tableRow(call) {
  const latency = call.e2e_latency?.p50;
  return el(
    "tr",
    { dataset: { callId: call.call_id } },
    el("td", { class: "nowrap", text: formatTime(call.start_timestamp, false) }),
    el("td", { class: "nowrap" }, callIdCell(call.call_id)),
    el("td", { text: call.agent_id ?? "—" }),
    el("td", { text: call.call_type ?? "—" }),
    el("td", { text: call.direction ?? "—" }),
    el("td", { class: "mono nowrap", text: call.from_number ?? "—" }),
    el("td", { class: "mono nowrap", text: call.to_number ?? "—" }),
    // The pill's text is exactly the status (tests and scripts read `.status`).
    el("td", { class: "status" }, statusPill(call.call_status)),
    el("td", { class: "reason", text: reasonText(call) }),
    el("td", { class: "num duration", text: tableDuration(call) }),
    el("td", { class: "num", text: formatMs(latency) }),
  );
}

/** How the call ended; a transfer says where to. */
function reasonText(call) {
  if (!call.disconnection_reason) return "—";
  return call.transfer_destination ? `${call.disconnection_reason} → ${call.transfer_destination}` : call.disconnection_reason;
}

function liveDuration(call) {
  return call.start_timestamp && call.call_status !== "registered" ? formatDuration(callDuration(call)) : "waiting";
}

/** An ended call's length; "live" while it is under way; "waiting" while it is registered (no
 *  audio yet: its agent or its caller has not connected). */
function tableDuration(call) {
  if (call.end_timestamp) return formatDuration(callDuration(call));
  if (call.call_status === "ongoing") return "live";
  return call.call_status === "registered" ? "waiting" : "—";
}

// --- the filter bar ------------------------------------------------------------------------

class FilterBar {
  constructor(initial, onApply) {
    const select = (id, label, options) =>
      field(id, label, el("select", { id, name: id }, options.map(([value, text]) => el("option", { value, text }))));
    const text = (id, label, placeholder) =>
      field(id, label, el("input", { id, type: "search", placeholder, spellcheck: "false", autocomplete: "off" }));
    this.callId = text("filter-call-id", "Call id", "starts with…");
    this.numberField = text("filter-number", "Number", "from or to, contains…");
    this.agent = field("filter-agent", "Agent id", el("input", { id: "filter-agent", type: "text", placeholder: "any", spellcheck: "false", autocomplete: "off" }));
    this.status = select("filter-status", "Status", [["", "any"], ["registered", "registered"], ["ongoing", "ongoing"], ["ended", "ended"], ["error", "error"]]);
    this.direction = select("filter-direction", "Direction", [["", "any"], ["inbound", "inbound"], ["outbound", "outbound"]]);
    this.type = select("filter-type", "Call type", [["", "any"], ["phone_call", "phone_call"], ["web_call", "web_call"]]);
    this.from = field("filter-from", "Started from", el("input", { id: "filter-from", type: "datetime-local" }));
    this.to = field("filter-to", "Started to", el("input", { id: "filter-to", type: "datetime-local" }));
    this.inputs = { callId: this.callId.input, number: this.numberField.input, agent: this.agent.input, status: this.status.input, direction: this.direction.input, type: this.type.input, from: this.from.input, to: this.to.input };
    if (initial) for (const [name, value] of Object.entries(initial)) if (this.inputs[name]) this.inputs[name].value = value;

    const reset = el("button", { type: "button", on: { click: () => this.reset(onApply) } }, "Reset");
    this.element = el(
      "form",
      { id: "call-filters", class: "filters", on: { submit: (e) => { e.preventDefault(); onApply(); } } },
      [this.callId, this.numberField, this.agent, this.status, this.direction, this.type, this.from, this.to].map((f) => f.element),
      el("div", { class: "filter-actions" }, el("button", { type: "submit", class: "primary" }, "Apply"), reset),
    );
    // Choices apply at once; the agent id when Enter is pressed or the field is left.
    for (const input of Object.values(this.inputs)) input.addEventListener("change", () => onApply());
  }

  reset(onApply) {
    for (const input of Object.values(this.inputs)) input.value = "";
    onApply();
  }

  /** Whether nothing is filtered (every field empty). */
  isEmpty() {
    return Object.values(this.inputs).every((input) => input.value.trim() === "");
  }

  values() {
    return Object.fromEntries(Object.entries(this.inputs).map(([name, input]) => [name, input.value]));
  }

  /** The number searched for (in from or to), or "". */
  number() {
    return this.inputs.number.value.trim();
  }

  /** The list-calls `filter_criteria` of the bar, or null when nothing is filtered. Throws an
   *  Error with a readable message when the bar's values make no sense. */
  criteria() {
    const v = this.values();
    const criteria = {};
    const enumFilter = (value) => ({ op: "in", type: "enum", value: [value] });
    if (v.callId.trim()) criteria.call_id = { op: "sw", type: "string", value: v.callId.trim() };
    if (v.agent.trim()) criteria.agent = [{ agent_id: v.agent.trim() }];
    if (v.status) criteria.call_status = enumFilter(v.status);
    if (v.direction) criteria.direction = enumFilter(v.direction);
    if (v.type) criteria.call_type = enumFilter(v.type);
    // datetime-local values are local times, as `new Date` reads them
    const from = v.from ? new Date(v.from).getTime() : null;
    const to = v.to ? new Date(v.to).getTime() : null;
    if (from !== null && to !== null) {
      if (from > to) throw new Error("“Started from” is after “Started to”.");
      criteria.start_timestamp = { op: "bt", type: "range", value: [from, to] };
    } else if (from !== null) {
      criteria.start_timestamp = { op: "ge", type: "number", value: from };
    } else if (to !== null) {
      criteria.start_timestamp = { op: "le", type: "number", value: to };
    }
    return Object.keys(criteria).length ? criteria : null;
  }
}

/** A labelled form field: {element, input}. */
function field(id, label, input) {
  return { input, element: el("div", { class: "field" }, el("label", { for: id, text: label }), input) };
}
