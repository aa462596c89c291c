// The live call feed: `GET /v2/call-events`, server-sent events read over fetch, reconnected
// after RECONNECT_MS whenever the stream ends or fails. One feed runs while the tab is signed in;
// views subscribe to it and unsubscribe when they are torn down.
//
// Events: `snapshot` {"calls": [...]} (the live calls, first on every connection) and `call`
// (one call's summary, whenever a call is created, changes status or ends). A summary holds
// call_id, agent_id, call_type, call_status, direction, from_number, to_number,
// start_timestamp, end_timestamp, disconnection_reason, opt_out_sensitive_data_storage and
// e2e_latency (a call's page reads the whole call object from get-call).

import { ApiError, readEventStream } from "./api.js";

const RECONNECT_MS = 2000;
// An endpoint this bridge does not have (404): ask again now and then, not every 2 s.
const MISSING_RETRY_MS = 30000;

export class CallFeed {
  constructor() {
    this.listeners = new Set();
    this.state = "connecting"; // "connecting" | "live" | "reconnecting" | "unavailable" | "stopped"
    this.controller = null;
    this.timer = null;
    // The latest snapshot, with later `call` events applied: call_id -> call (live calls only).
    this.live = new Map();
  }

  /**
   * `listener` receives {type: "snapshot", calls}, {type: "call", call} and
   * {type: "state", state}. Returns the function that unsubscribes it.
   */
  subscribe(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  emit(event) {
    for (const listener of this.listeners) {
      try {
        listener(event);
      } catch (e) {
        console.error("call feed listener failed:", e);
      }
    }
  }

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.emit({ type: "state", state });
  }

  start() {
    if (this.controller) return;
    this.connect();
  }

  stop() {
    clearTimeout(this.timer);
    this.timer = null;
    this.controller?.abort();
    this.controller = null;
    this.setState("stopped");
  }

  async connect() {
    const controller = new AbortController();
    this.controller = controller;
    let retryMs = RECONNECT_MS;
    try {
      await readEventStream("/v2/call-events", {
        signal: controller.signal,
        onOpen: () => this.setState("live"),
        onEvent: (name, data) => this.handle(name, data),
      });
    } catch (e) {
      if (controller.signal.aborted) return; // stopped (signed out)
      if (e instanceof ApiError && e.status === 401) return; // the app is signing out
      if (e instanceof ApiError && e.status === 404) retryMs = MISSING_RETRY_MS;
    }
    if (controller.signal.aborted) return;
    this.setState(retryMs === MISSING_RETRY_MS ? "unavailable" : "reconnecting");
    this.timer = setTimeout(() => {
      if (this.controller === controller) this.connect();
    }, retryMs);
  }

  handle(name, data) {
    let body;
    try {
      body = JSON.parse(data);
    } catch {
      console.warn(`call feed: ignoring a ${name} event that is not JSON`);
      return;
    }
    if (name === "snapshot" && Array.isArray(body.calls)) {
      this.live = new Map(body.calls.map((call) => [call.call_id, call]));
      this.emit({ type: "snapshot", calls: body.calls });
    } else if (name === "call" && body && typeof body.call_id === "string") {
      // (in_view false: still live, but past one of the view's caps)
      if (["registered", "ongoing"].includes(body.call_status) && body.in_view !== false) this.live.set(body.call_id, body);
      else this.live.delete(body.call_id);
      this.emit({ type: "call", call: body });
    }
  }
}
