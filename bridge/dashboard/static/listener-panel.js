// The small player panel `#listener` for live listening: one LiveListener at a time, started by
// a "Listen" button anywhere in the app, and kept while the person moves between views.

import { LiveListener } from "./listen-client.js";
import { callLink, el, replaceChildren } from "./dom.js";

export class ListenerPanel {
  constructor() {
    this.listener = null;
    this.title = el("div", { class: "listener-title" });
    this.status = el("div", { id: "listen-status", class: "listener-status", role: "status" });
    this.counts = el("div", { class: "listener-counts muted" });
    this.stopButton = el("button", { id: "listen-stop", type: "button", on: { click: () => this.onStopClick() } }, "Stop");
    this.element = el(
      "aside",
      { id: "listener", class: "card listener", hidden: true, "aria-label": "Live listening" },
      el("div", { class: "listener-head" }, this.title, this.stopButton),
      this.status,
      this.counts,
    );
  }

  /** Starts listening to `callId` (from a click: the audio may start at once). */
  listen(callId) {
    this.listener?.stop();
    const listener = new LiveListener();
    this.listener = listener;
    window.bridgeListen = listener.stats; // read by tests; updated in place
    replaceChildren(this.title, "Listening to ", callLink(callId, callId.slice(0, 12) + (callId.length > 12 ? "…" : "")));
    this.counts.textContent = "";
    this.stopButton.textContent = "Stop";
    this.element.hidden = false;
    this.element.dataset.state = "connecting";

    listener.addEventListener("status", ({ detail }) => {
      if (listener !== this.listener) return;
      this.status.textContent = detail.text;
      this.element.dataset.state = detail.state;
      if (!["connecting", "listening"].includes(detail.state)) this.stopButton.textContent = "Close";
    });
    let lastUpdate = 0;
    listener.addEventListener("chunk", () => {
      const now = performance.now();
      if (listener !== this.listener || now - lastUpdate < 250) return;
      lastUpdate = now;
      this.showCounts(listener.stats);
    });
    listener.start(callId);
  }

  showCounts(stats) {
    const seconds = (channel) => (stats.samples[channel] / (stats.sampleRate || 1)).toFixed(1);
    let text = `received: caller ${seconds("caller")} s · agent ${seconds("agent")} s`;
    if (stats.dropped) text += ` · ${stats.dropped} late chunks dropped`;
    this.counts.textContent = text;
  }

  onStopClick() {
    const listener = this.listener;
    if (listener && ["connecting", "listening"].includes(listener.stats.state)) {
      listener.stop();
      return;
    }
    this.element.hidden = true; // already over: "Close"
  }

  destroy() {
    this.listener?.stop();
    this.listener = null;
    delete window.bridgeListen;
    this.element.remove();
  }
}
