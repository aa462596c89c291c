// The "Talk to an agent" view (#/talk): pick an agent, call it from the browser with
// WebCallClient, hear it and see the live transcript. Leaving the view hangs up.
//
// `window.bridgeTalk` mirrors the client's counters ({callId, sentBytes, receivedBytes, state},
// ...) for scripts and tests.

import { ApiError, requestJson } from "./api.js";
import { callLink, el, notice, replaceChildren } from "./dom.js";
import { WebCallClient } from "./web-client.js";

const COUNTER_REFRESH_MS = 250;

export function mountTalk(container, app) {
  const view = new TalkView(app);
  container.append(view.element);
  view.start();
  return () => view.destroy();
}

class TalkView {
  constructor(app) {
    this.app = app;
    this.client = null;
    this.agentPicker = el("select", { id: "talk-agent", disabled: true }, el("option", { value: "", text: "loading agents…" }));
    this.agentField = el("div", { class: "field" }, el("label", { for: "talk-agent", text: "Agent" }), this.agentPicker);
    this.startButton = el("button", { id: "talk-start", type: "button", class: "primary", disabled: true, on: { click: () => this.startCall() } }, "Start call");
    this.stopButton = el("button", { id: "talk-stop", type: "button", class: "danger", disabled: true, on: { click: () => this.client?.stop() } }, "Hang up");
    this.status = el("span", { id: "talk-status", class: "talk-status", role: "status", text: "idle" });
    this.counters = el("span", { class: "muted talk-counters" });
    this.callLink = el("div", { id: "talk-call-link", class: "talk-call-link" });
    this.problem = el("div", { role: "alert" });
    this.meters = { mic: meter("you"), agent: meter("agent") };
    this.transcript = el("div", { id: "talk-transcript", class: "transcript talk-transcript", "aria-live": "polite" }, notice("The conversation shows here once the call starts."));

    this.element = el(
      "div",
      { id: "talk-page", class: "talk-page" },
      el(
        "section",
        { class: "card" },
        el("div", { class: "card-head" }, el("h2", { text: "Talk to an agent" })),
        el("p", { class: "muted", text: "Call an agent from this browser, through the bridge, with your microphone. The call is recorded like any other (a web call)." }),
        el("div", { class: "talk-controls" }, this.agentField, this.startButton, this.stopButton),
        this.problem,
        el("div", { class: "talk-state" }, el("span", { class: "label", text: "Status" }), this.status, this.meters.mic.element, this.meters.agent.element, this.counters),
        this.callLink,
      ),
      el("section", { class: "card" }, el("div", { class: "card-head" }, el("h2", { text: "Live transcript" })), this.transcript),
    );
    window.bridgeTalk = { callId: null, sentBytes: 0, receivedBytes: 0, state: "idle" };
  }

  async start() {
    try {
      const agents = await requestJson("/list-agents");
      if (!this.element.isConnected) return;
      this.showAgents(agents);
    } catch (e) {
      if (!this.element.isConnected) return;
      // Without the agent list, the agent id can still be typed.
      const input = el("input", { id: "talk-agent", type: "text", placeholder: "agent id", spellcheck: "false", value: "" });
      this.agentPicker.replaceWith(input);
      this.agentPicker = input;
      this.startButton.disabled = false;
      const what = e instanceof ApiError && e.status === 404 ? "This bridge does not list its agents" : `The agents could not be listed (${e.message})`;
      this.problem.replaceChildren(notice(`${what}: type the agent id.`, "info"));
    }
  }

  showAgents(agents) {
    if (!Array.isArray(agents) || agents.length === 0) {
      replaceChildren(this.agentPicker, el("option", { value: "", text: "no agents" }));
      this.problem.replaceChildren(notice("The bridge has no agents to call.", "error"));
      return;
    }
    replaceChildren(
      this.agentPicker,
      agents.map((agent) => el("option", { value: agent.agent_id, text: agent.agent_name && agent.agent_name !== agent.agent_id ? `${agent.agent_name} (${agent.agent_id})` : agent.agent_id })),
    );
    this.agentPicker.disabled = false;
    this.startButton.disabled = false;
  }

  startCall() {
    const agentId = this.agentPicker.value.trim();
    if (!agentId) {
      this.problem.replaceChildren(notice("Choose an agent first.", "error"));
      return;
    }
    this.problem.replaceChildren();
    this.callLink.replaceChildren();
    replaceChildren(this.transcript, notice("Waiting for the agent…"));

    const client = new WebCallClient();
    this.client = client;
    window.bridgeTalk = client.stats; // the same object, updated in place
    client.addEventListener("status", ({ detail }) => this.onStatus(client, detail));
    client.addEventListener("transcript", ({ detail }) => this.showTranscript(detail.transcript));
    client.addEventListener("audio", ({ detail }) => this.meters[detail.source].set(detail.level));
    this.startButton.disabled = true;
    this.agentPicker.disabled = true;
    this.stopButton.disabled = false;
    this.counterTimer = setInterval(() => this.showCounters(client.stats), COUNTER_REFRESH_MS);
    client.start({ agentId }); // reports its failures as the "ended" status
  }

  onStatus(client, { state, text }) {
    if (client !== this.client) return;
    this.status.textContent = text;
    this.status.dataset.state = state;
    if (client.callId && !this.callLink.firstChild) {
      this.callLink.append("Call ", callLink(client.callId), " — its page has the recording and log once it ends.");
    }
    if (state === "ended") {
      clearInterval(this.counterTimer);
      this.showCounters(client.stats);
      this.meters.mic.set(0);
      this.meters.agent.set(0);
      this.stopButton.disabled = true;
      this.startButton.disabled = false;
      this.agentPicker.disabled = false;
      if (!client.callId) this.problem.replaceChildren(notice(`The call could not start: ${text.replace(/^ended: /, "")}`, "error"));
    }
  }

  showCounters(stats) {
    const kB = (bytes) => (bytes / 1024).toFixed(1);
    this.counters.textContent = `sent ${kB(stats.sentBytes)} kB · received ${kB(stats.receivedBytes)} kB`;
  }

  showTranscript(transcript) {
    if (transcript.length === 0) return;
    const atBottom = this.transcript.scrollHeight - this.transcript.scrollTop - this.transcript.clientHeight < 24;
    replaceChildren(
      this.transcript,
      transcript.map((u) =>
        el("div", { class: `turn turn-${u.role === "user" ? "user" : "agent"}` }, el("span", { class: "speaker", text: u.role === "user" ? "you" : "agent" }), el("p", { class: "bubble", text: u.content })),
      ),
    );
    if (atBottom) this.transcript.scrollTop = this.transcript.scrollHeight;
  }

  destroy() {
    clearInterval(this.counterTimer);
    this.client?.stop();
  }
}

/** A small level meter: a bar whose width follows the audio's level. */
function meter(label) {
  const bar = el("span", { class: "meter-bar" });
  const element = el("span", { class: `meter meter-${label}`, title: `${label}: audio level` }, el("span", { class: "meter-label", text: label }), el("span", { class: "meter-track" }, bar));
  let shown = 0;
  return {
    element,
    set(level) {
      // fast attack, slow release; speech RMS rarely passes 0.3, so that is full scale
      const target = Math.min(1, level / 0.3);
      shown = target > shown ? target : shown * 0.85 + target * 0.15;
      bar.style.width = `${(shown * 100).toFixed(1)}%`;
    },
  };
}
