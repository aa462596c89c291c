// Listening to a live call: `POST /v2/listen-live-call/{call_id}` gives a short-lived token and
// the URL of the call's listen socket, which sends (server to client only):
//
//   text   {"event":"start","call_id":...,"encoding":"s16le","sample_rate":R,"channels":["caller","agent"],
//           "position":P}  P: the call's position now (samples at R)
//   binary [channel: u8 (0 caller, 1 agent)] [position: u32 LE, in samples at R since the call's
//          stream started: when the audio is heard on the call] [s16le mono PCM at R]
//   text   {"event":"clear","position":N}  agent audio at positions >= N will not be heard
//   text   {"event":"end","reason":...}    then a close 1000; a listener that falls behind is
//                                          dropped (the connection is cut: 1006 here)
//
// Both channels are played through one AudioContext, the caller panned left and the agent
// right, each chunk scheduled at t0 + position / R, where t0 puts the call's position at
// `start` JITTER_S from now: the positions keep both channels in step with the call. (Not the
// first chunk: the agent's audio comes ahead of when it is heard.) When the caller's chunks keep
// arriving late (the network's delay grew), t0 is moved on to the latest of them.

import { request, websocketBase } from "./api.js";

const JITTER_S = 0.25; // the jitter buffer: how far ahead of the first chunk playback starts
const MAX_LATE_S = 0.5; // a chunk later than this is dropped, a less late one plays at once
const LATE_RUN = 10; // this many caller chunks late in a row: playback is re-anchored on the latest
const CHANNELS = ["caller", "agent"];
const PAN = { caller: -0.6, agent: 0.6 };
// What `received` keeps for inspection (tests, debugging): about 17 minutes of both channels
// at 8 kHz. Past it, chunks are still played but no longer kept.
const MAX_KEPT_SAMPLES = 16_000_000;

/**
 * Events (CustomEvent, details in `event.detail`):
 * - `status` {state, text}: state is "connecting", "listening", "ended", "stopped" or "error";
 * - `chunk` {channel, position, samples}: audio as it arrives.
 *
 * `stats` is a plain object kept up to date: {state, sampleRate, received: {caller: [], agent: []},
 * ended, closeCode, closeReason, chunks, samples: {caller, agent}, dropped} (received entries:
 * {position, samples}, samples an Int16Array).
 */
export class LiveListener extends EventTarget {
  constructor() {
    super();
    this.ctx = null;
    this.socket = null;
    this.callId = null;
    this.sampleRate = null;
    this.t0 = null; // AudioContext time of position 0
    this.lateRun = 0; // caller chunks late in a row
    this.agentSources = new Set(); // scheduled agent buffers: {source, start, end} in positions
    this.outputs = {}; // channel -> its StereoPannerNode
    this.keptSamples = 0;
    this.stats = {
      state: "idle",
      sampleRate: null,
      received: { caller: [], agent: [] },
      ended: null,
      closeCode: null,
      closeReason: null,
      chunks: 0,
      samples: { caller: 0, agent: 0 }, // received, per channel
      dropped: 0,
    };
  }

  /** Starts listening to `callId`. Call it from a user gesture (it creates the AudioContext). */
  async start(callId) {
    if (this.stats.state !== "idle") throw new Error("a LiveListener listens once; create another");
    this.callId = callId;
    // Created before any await, while the click's user activation holds: it may play at once.
    this.ctx = new AudioContext();
    this.setStatus("connecting", "connecting…");
    let grant;
    try {
      const response = await request(`/v2/listen-live-call/${encodeURIComponent(callId)}`, { method: "POST", json: {} });
      grant = await response.json();
    } catch (e) {
      this.fail(e.message || String(e));
      return;
    }
    if (this.stats.state !== "connecting") return; // stopped meanwhile
    this.open(grant);
  }

  /** Stops listening: closes the socket (1000) and the audio. */
  stop() {
    if (["stopped", "ended", "error"].includes(this.stats.state)) return;
    this.setStatus("stopped", "stopped");
    this.closeSocket();
    this.closeAudio(0);
  }

  // --- internals ---------------------------------------------------------------------------

  open({ url, access_token: token }) {
    // The path the bridge named, on this page's own origin: the page reached the bridge here
    // (its public URL may be another name, or http behind a page served over https)
    const path = new URL(url).pathname;
    const socket = new WebSocket(`${websocketBase()}${path}?access_token=${encodeURIComponent(token)}`);
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    socket.addEventListener("message", (event) => {
      if (typeof event.data === "string") this.onText(event.data);
      else this.onAudio(event.data);
    });
    socket.addEventListener("close", (event) => this.onClose(event));
    // A failed socket also fires `close` (code 1006), which reports it.
  }

  onText(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      console.warn("listen socket: a text frame that is not JSON was ignored");
      return;
    }
    switch (message.event) {
      case "start":
        this.sampleRate = message.sample_rate;
        this.stats.sampleRate = message.sample_rate;
        if (this.ctx && Number.isFinite(message.position)) {
          this.t0 = this.ctx.currentTime + JITTER_S - message.position / message.sample_rate;
        }
        this.setStatus("listening", `listening (${message.sample_rate} Hz)`);
        break;
      case "clear":
        this.clearAgent(message.position);
        break;
      case "end":
        this.stats.ended = { reason: message.reason ?? null };
        this.setStatus("ended", `call ended${message.reason ? ": " + message.reason : ""}`);
        break;
      default:
        break; // future events: nothing to do
    }
  }

  onAudio(buffer) {
    if (!this.sampleRate || buffer.byteLength < 5) return; // audio before "start": not ours to guess
    const view = new DataView(buffer);
    const channel = CHANNELS[view.getUint8(0)];
    if (!channel) return;
    const position = view.getUint32(1, true);
    const count = (buffer.byteLength - 5) >> 1;
    const samples = new Int16Array(count);
    for (let i = 0; i < count; i++) samples[i] = view.getInt16(5 + 2 * i, true);

    this.stats.chunks += 1;
    this.stats.samples[channel] += count;
    if (this.keptSamples + count <= MAX_KEPT_SAMPLES) {
      this.stats.received[channel].push({ position, samples });
      this.keptSamples += count;
    }
    this.dispatchEvent(new CustomEvent("chunk", { detail: { channel, position, samples } }));
    this.schedule(channel, position, samples);
  }

  /** Plays one chunk at the call time it was heard (plus the jitter buffer). */
  schedule(channel, position, samples) {
    const ctx = this.ctx;
    if (!ctx || ctx.state === "closed" || samples.length === 0) return;
    const rate = this.sampleRate;
    if (this.t0 === null) this.t0 = ctx.currentTime + JITTER_S - position / rate;
    let when = this.t0 + position / rate;
    let late = ctx.currentTime - when;
    if (channel === "caller") {
      this.lateRun = late > 0 ? this.lateRun + 1 : 0;
      if (this.lateRun >= LATE_RUN) { // the delay grew for good: play from here on, JITTER_S behind
        this.t0 += late + JITTER_S;
        when = this.t0 + position / rate;
        late = ctx.currentTime - when;
        this.lateRun = 0;
      }
    }
    if (late > MAX_LATE_S) {
      this.stats.dropped += 1;
      return;
    }
    if (late > 0) when = ctx.currentTime;

    const buffer = ctx.createBuffer(1, samples.length, rate);
    const data = buffer.getChannelData(0);
    for (let i = 0; i < samples.length; i++) data[i] = samples[i] / 32768;
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this.output(channel));
    source.start(when);

    if (channel === "agent") {
      const entry = { source, start: position, end: position + samples.length };
      this.agentSources.add(entry);
      source.addEventListener("ended", () => this.agentSources.delete(entry));
    }
  }

  /** The agent was interrupted: what was to be heard from `position` on never will be. */
  clearAgent(position) {
    if (this.t0 === null || !Number.isFinite(position)) return;
    const cutAt = this.t0 + position / this.sampleRate;
    for (const entry of this.agentSources) {
      if (entry.start >= position) {
        entry.source.stop(); // not started yet: it never plays
        this.agentSources.delete(entry);
      } else if (entry.end > position) {
        entry.source.stop(Math.max(cutAt, this.ctx.currentTime)); // the one playing: cut it there
      }
    }
  }

  /** The panner each channel goes through, made on first use. */
  output(channel) {
    if (!this.outputs[channel]) {
      const panner = new StereoPannerNode(this.ctx, { pan: PAN[channel] });
      panner.connect(this.ctx.destination);
      this.outputs[channel] = panner;
    }
    return this.outputs[channel];
  }

  onClose(event) {
    this.stats.closeCode = event.code;
    this.stats.closeReason = event.reason;
    this.socket = null;
    if (this.stats.state === "stopped") return;
    if (event.code === 1000 || this.stats.ended) {
      const reason = this.stats.ended?.reason;
      this.setStatus("ended", `call ended${reason ? ": " + reason : ""}`);
    } else if (event.code === 1008) { // refused after opening (the call filled up or ended)
      this.setStatus("error", `disconnected by the bridge: ${event.reason || "policy violation"}`);
    } else {
      this.setStatus("error", `connection lost (${event.code}${event.reason ? ": " + event.reason : ""})`);
    }
    // Let what is already scheduled play out before the audio is closed.
    this.closeAudio(JITTER_S + 0.25);
  }

  fail(text) {
    this.setStatus("error", text);
    this.closeSocket();
    this.closeAudio(0);
  }

  closeSocket() {
    const socket = this.socket;
    this.socket = null;
    if (socket && socket.readyState <= WebSocket.OPEN) socket.close(1000, "listener stopped");
  }

  closeAudio(afterS) {
    const ctx = this.ctx;
    this.ctx = null;
    if (!ctx) return;
    const close = () => ctx.close().catch(() => {});
    if (afterS > 0) setTimeout(close, afterS * 1000);
    else close();
  }

  setStatus(state, text) {
    this.stats.state = state;
    this.dispatchEvent(new CustomEvent("status", { detail: { state, text } }));
  }
}
