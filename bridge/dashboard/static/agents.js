// The Agents view (#/agents): the agents calls can be made with (GET /v2/list-agents: what each
// gets, its numbers, whether it is the default), with each one's calls of the last 24 hours.

import { requestJson } from "./api.js";
import { filterCalls } from "./calls.js";
import { copyButton, el, formatMs, notice, replaceChildren } from "./dom.js";
import { WINDOWS, recentCalls, summarize } from "./overview.js";

export function mountAgents(container, app) {
  const view = new AgentsView(app);
  container.append(view.element);
  view.start();
  return () => view.destroy();
}

class AgentsView {
  constructor(app) {
    this.app = app;
    this.destroyed = false;
    this.body = el("div", { id: "agents" }, notice("Loading…"));
    this.caption = el("p", { class: "muted caption" });
    this.element = el(
      "div",
      { class: "agents-view" },
      el("div", { class: "page-head" }, el("h1", { text: "Agents" })),
      el("section", { class: "card" }, this.caption, el("div", { class: "table-wrap" }, this.body)),
    );
  }

  async start() {
    let agents;
    let stats = null;
    try {
      const window_ = WINDOWS["24h"];
      const [list, recent] = await Promise.all([requestJson("/v2/list-agents"), recentCalls(window_.ms).catch(() => null)]);
      agents = list;
      if (recent) stats = new Map(summarize(recent.calls, recent.since, window_.bucket).agents.map((a) => [a.agent_id, a]));
      this.caption.textContent =
        "From the agents file (BRIDGE_AGENTS_FILE): edit it and restart to change them. Calls: the last 24 hours" +
        (recent?.capped ? ", of the latest 2000 calls." : ".");
    } catch (e) {
      if (!this.destroyed) replaceChildren(this.body, notice(`The agents could not be read: ${e.message}`, "error"));
      return;
    }
    if (this.destroyed) return;
    if (agents.length === 0) {
      replaceChildren(this.body, notice("No agents."));
      return;
    }
    const headings = ["Agent", "Audio", "Numbers", "Calls (24 h)", "Failed", "Latency p50", ""];
    const rows = agents.map((agent) => {
      const s = stats?.get(agent.agent_id);
      const tags = [
        agent.default ? el("span", { class: "pill tag", text: "default" }) : null,
        agent.embedded ? el("span", { class: "pill tag", text: "embedded echo" }) : null,
        agent.opt_out_sensitive_data_storage ? el("span", { class: "pill tag", text: "private" }) : null,
      ];
      const calls = el("a", { href: "#/calls", text: "Calls", on: { click: () => filterCalls({ agent: agent.agent_id }) } });
      return el(
        "tr",
        { dataset: { agentId: agent.agent_id } },
        el("td", {}, el("span", { class: "mono agent-id", text: agent.agent_id }), copyButton(agent.agent_id, "agent id"), " ", tags),
        el("td", { class: "nowrap", text: `${agent.audio_websocket_protocol} · ${agent.audio_encoding} · ${agent.sample_rate} Hz` }),
        el("td", { class: "mono" }, (agent.numbers ?? []).length ? agent.numbers.join(", ") : agent.default ? "any other number" : "—"),
        el("td", { class: "num", text: s ? String(s.calls) : stats ? "0" : "—" }),
        el("td", { class: "num", text: s ? String(s.failed) : stats ? "0" : "—" }),
        el("td", { class: "num", text: s ? formatMs(s.p50) : "—" }),
        el("td", { class: "actions nowrap" }, calls, " · ", el("a", { href: "#/talk", text: "Talk" })),
      );
    });
    replaceChildren(
      this.body,
      el("table", { id: "agents-table", class: "data-table" }, el("thead", {}, el("tr", {}, headings.map((h) => el("th", { scope: "col", text: h })))), el("tbody", {}, rows)),
    );
  }

  destroy() {
    this.destroyed = true;
  }
}
