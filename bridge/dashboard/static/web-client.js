// A web call from the browser: the bridge's own small client for its "web" protocol.
//
//   POST /v2/create-web-call {"agent_id"}  -> {call_id, access_token, ...}
//   ws(s)://<origin>/web-call/<access_token>/<call_id>?encoding=s16le&sample_rate=24000
//
// Client -> bridge: binary frames of s16le mono PCM at SAMPLE_RATE (the microphone, one frame
// about every 20 ms). Bridge -> client: binary frames of the agent's voice in the same format
// (played in order, gaplessly), the text `clear` (the agent was interrupted: drop what is queued)
// and JSON text frames `{"event_type": "update", "transcript": [...]}` / `"metadata"`.
//
// The microphone is captured by an AudioWorklet (mic-worklet.js) at the AudioContext's own
// rate and resampled here, so the same code works whatever rate the device runs at.

import { requestJson, websocketBase } from "./api.js";

const SAMPLE_RATE = 24000;
const FRAME_MS = 20;
const PLAYBACK_LEAD_S = 0.05; // how far ahead of "now" the first queued chunk starts
const MAX_BUFFERED_BYTES = 256 * 1024; // a socket this far behind drops microphone frames

/**
 * Events (CustomEvent, details in `event.detail`):
 * - `status` {state, text}: state "connecting", "in call" or "ended";
 * - `transcript` {transcript: [{role, content}], turntaking}: the agent's live transcript;
 * - `metadata` {metadata}: the agent's metadata events;
 * - `audio` {source: "mic" | "agent", level}: the RMS level (0..1) of audio sent or received.
 *
 * `stats` is a plain object kept up to date: {state, callId, sentBytes, receivedBytes,
 * sentFrames, receivedFrames, clears, closeCode, closeReason}.
 */
export class WebCallClient extends EventTarget {
  constructor({ sampleRate = SAMPLE_RATE, workletUrl = "static/mic-worklet.js" } = {}) {
    super();
    this.sampleRate = sampleRate;
    this.workletUrl = workletUrl;
    this.ctx = null;
    this.socket = null;
    this.stream = null;
    this.micNode = null;
    this.resampler = null;
    this.playing = new Set(); // agent audio scheduled or playing
    this.playhead = 0; // AudioContext time where the next agent chunk starts
    this.stats = {
      state: "idle",
      callId: null,
      sentBytes: 0,
      receivedBytes: 0,
      sentFrames: 0,
      receivedFrames: 0,
      clears: 0,
      closeCode: null,
      closeReason: null,
    };
  }

  get callId() {
    return this.stats.callId;
  }

  /**
   * Creates a web call to `agentId` and joins it. Call it from a user gesture (a click): it
   * creates the AudioContext and asks for the microphone. Resolves once the socket is opening;
   * failures are reported as the `ended` status, not thrown.
   */
  async start({ agentId }) {
    if (this.stats.state !== "idle") throw new Error("a WebCallClient makes one call; create another");
    this.ctx = new AudioContext(); // before any await: the click's user activation still holds
    this.setStatus("connecting", "connecting");
    try {
      if (!navigator.mediaDevices?.getUserMedia) {
        throw new Error("this browser gives no microphone here (the page must be served over https or from localhost)");
      }
      // The microphone first: its permission prompt must not eat into the call token's life.
      const stream = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true, noiseSuppression: true } });
      if (this.stats.state !== "connecting") {
        for (const track of stream.getTracks()) track.stop(); // stopped meanwhile
        return;
      }
      this.stream = stream;
      await this.ctx.audioWorklet.addModule(this.workletUrl);
      if (this.stats.state !== "connecting") return;
      const call = await requestJson("/v2/create-web-call", { method: "POST", json: { agent_id: agentId } });
      if (this.stats.state !== "connecting") return;
      this.stats.callId = call.call_id;
      this.open(call);
    } catch (e) {
      this.finish(e.name === "NotAllowedError" ? "the microphone was refused" : e.message || String(e));
    }
  }

  /** Hangs up: closes the socket with 1000 and releases the microphone and the audio. */
  stop() {
    if (this.stats.state === "ended" || this.stats.state === "idle") return;
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) {
      this.socket.close(1000, "the caller hung up");
      return; // finished by the close event
    }
    this.finish("stopped");
  }

  // --- the socket --------------------------------------------------------------------------

  open(call) {
    const query = `encoding=s16le&sample_rate=${this.sampleRate}`;
    const url = `${websocketBase()}/web-call/${encodeURIComponent(call.access_token)}/${encodeURIComponent(call.call_id)}?${query}`;
    const socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    socket.addEventListener("open", () => {
      this.setStatus("in call", "in call");
      this.startMicrophone();
    });
    socket.addEventListener("message", (event) => {
      if (typeof event.data === "string") this.onText(event.data);
      else this.onAudio(event.data);
    });
    socket.addEventListener("close", (event) => {
      this.stats.closeCode = event.code;
      this.stats.closeReason = event.reason;
      const reason = event.reason || (event.code === 1000 ? "call ended" : `connection closed (${event.code})`);
      this.finish(reason);
    });
  }

  onText(text) {
    if (text === "clear") {
      this.stats.clears += 1;
      this.clearPlayback();
      return;
    }
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return; // not ours to understand ("pong", future frames)
    }
    if (message.event_type === "update" && Array.isArray(message.transcript)) {
      this.dispatchEvent(new CustomEvent("transcript", { detail: { transcript: message.transcript, turntaking: message.turntaking ?? null } }));
    } else if (message.event_type === "metadata") {
      this.dispatchEvent(new CustomEvent("metadata", { detail: { metadata: message.metadata } }));
    }
  }

  // --- the agent's voice -------------------------------------------------------------------

  onAudio(buffer) {
    this.stats.receivedBytes += buffer.byteLength;
    this.stats.receivedFrames += 1;
    const ctx = this.ctx;
    if (!ctx || ctx.state === "closed") return;
    const view = new DataView(buffer);
    const count = buffer.byteLength >> 1;
    if (count === 0) return;
    const audio = ctx.createBuffer(1, count, this.sampleRate);
    const data = audio.getChannelData(0);
    let energy = 0;
    for (let i = 0; i < count; i++) {
      const s = view.getInt16(2 * i, true) / 32768;
      data[i] = s;
      energy += s * s;
    }
    this.dispatchEvent(new CustomEvent("audio", { detail: { source: "agent", level: Math.sqrt(energy / count) } }));

    // Chunks play back to back; after a gap (the agent was silent) the queue restarts just ahead
    // of now.
    const source = ctx.createBufferSource();
    source.buffer = audio;
    source.connect(ctx.destination);
    this.playhead = Math.max(this.playhead, ctx.currentTime + PLAYBACK_LEAD_S);
    source.start(this.playhead);
    this.playhead += audio.duration;
    this.playing.add(source);
    source.addEventListener("ended", () => this.playing.delete(source));
  }

  /** `clear`: the agent was interrupted; what is queued is never played. */
  clearPlayback() {
    for (const source of this.playing) source.stop();
    this.playing.clear();
    this.playhead = 0;
  }

  // --- the microphone ----------------------------------------------------------------------

  startMicrophone() {
    const ctx = this.ctx;
    if (!ctx || !this.stream) return;
    const blockSize = Math.round((ctx.sampleRate * FRAME_MS) / 1000);
    this.resampler = new StreamResampler(ctx.sampleRate, this.sampleRate);
    const input = ctx.createMediaStreamSource(this.stream);
    const node = new AudioWorkletNode(ctx, "mic-capture", { numberOfInputs: 1, numberOfOutputs: 1, processorOptions: { blockSize } });
    node.port.onmessage = (event) => this.sendMicrophone(event.data);
    // The worklet's output is silent, but a node the destination pulls on is always processed.
    const mute = new GainNode(ctx, { gain: 0 });
    input.connect(node).connect(mute).connect(ctx.destination);
    this.micNode = node;
    ctx.resume();
  }

  /** One block from the worklet: resampled to the call's rate, as s16le, sent as one frame. */
  sendMicrophone(block) {
    const socket = this.socket;
    if (!socket || socket.readyState !== WebSocket.OPEN) return;
    const samples = this.resampler.process(block);
    if (samples.length === 0) return;
    const bytes = new ArrayBuffer(samples.length * 2);
    const view = new DataView(bytes);
    let energy = 0;
    for (let i = 0; i < samples.length; i++) {
      const s = Math.max(-1, Math.min(1, samples[i]));
      energy += s * s;
      view.setInt16(2 * i, Math.round(s * 32767), true);
    }
    this.dispatchEvent(new CustomEvent("audio", { detail: { source: "mic", level: Math.sqrt(energy / samples.length) } }));
    if (socket.bufferedAmount > MAX_BUFFERED_BYTES) return; // the network is behind: drop, keep real time
    socket.send(bytes);
    this.stats.sentBytes += bytes.byteLength;
    this.stats.sentFrames += 1;
  }

  // --- the end -----------------------------------------------------------------------------

  finish(reason) {
    if (this.stats.state === "ended") return;
    this.setStatus("ended", `ended: ${reason}`);
    this.micNode?.port.close();
    this.micNode?.disconnect();
    this.micNode = null;
    for (const track of this.stream?.getTracks() ?? []) track.stop();
    this.stream = null;
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) this.socket.close(1000, "the caller hung up");
    this.socket = null;
    // The agent's last words may still be queued: close the audio once they have played.
    const ctx = this.ctx;
    this.ctx = null;
    if (ctx) {
      const remaining = Math.max(0, this.playhead - ctx.currentTime);
      setTimeout(() => ctx.close().catch(() => {}), remaining * 1000 + 100);
    }
  }

  setStatus(state, text) {
    this.stats.state = state;
    this.dispatchEvent(new CustomEvent("status", { detail: { state, text } }));
  }
}

/**
 * A streaming resampler for mono Float32 audio: windowed-sinc interpolation (Hann window,
 * HALF_TAPS on each side), low-passed at the lower of the two Nyquist frequencies so that
 * downsampling (48 kHz -> 24 kHz) does not alias. Blocks may be of any size; the few samples it
 * needs across block boundaries are carried over.
 */
export class StreamResampler {
  static HALF_TAPS = 16;

  constructor(inRate, outRate) {
    this.step = inRate / outRate; // input samples per output sample
    this.cutoff = Math.min(1, outRate / inRate); // of the input's Nyquist frequency
    this.same = inRate === outRate;
    const half = StreamResampler.HALF_TAPS;
    // history: starts with `half` zeros so the first output sample is the first input sample
    this.buffer = new Float32Array(half);
    this.position = half; // of the next output sample, in `buffer` indices
  }

  /** Resamples one block; returns the output samples it completes (possibly none). */
  process(input) {
    if (this.same) return input;
    const half = StreamResampler.HALF_TAPS;
    const buffer = new Float32Array(this.buffer.length + input.length);
    buffer.set(this.buffer);
    buffer.set(input, this.buffer.length);

    const out = [];
    // An output sample needs `half` input samples after its position.
    while (this.position + half < buffer.length) {
      const center = Math.floor(this.position);
      const frac = this.position - center;
      let sum = 0;
      let weights = 0;
      for (let k = -half + 1; k <= half; k++) {
        const w = this.kernel(k - frac);
        sum += buffer[center + k] * w;
        weights += w;
      }
      out.push(weights !== 0 ? sum / weights : 0); // normalized: unity gain at DC
      this.position += this.step;
    }
    // Keep what the next output samples still need.
    const keepFrom = Math.max(0, Math.floor(this.position) - half);
    this.buffer = buffer.slice(keepFrom);
    this.position -= keepFrom;
    return Float32Array.from(out);
  }

  kernel(x) {
    const half = StreamResampler.HALF_TAPS;
    if (Math.abs(x) >= half) return 0;
    const window = 0.5 + 0.5 * Math.cos((Math.PI * x) / half);
    const arg = Math.PI * this.cutoff * x;
    const sinc = arg === 0 ? 1 : Math.sin(arg) / arg;
    return this.cutoff * sinc * window;
  }
}
