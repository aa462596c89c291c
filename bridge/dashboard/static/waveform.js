// A call's recording: the WAV parsed here (not with decodeAudioData, which resamples to the
// AudioContext's rate), its two channels drawn as waveforms (caller left, agent right), an
// <audio> element to play it and a play cursor over both waveforms that follows it and seeks on
// click.

import { el } from "./dom.js";

const WAVE_HEIGHT = 72; // CSS pixels
const TRACKS = [
  { id: "wave-caller", label: "caller", channel: 0 },
  { id: "wave-agent", label: "agent", channel: 1 },
];

/**
 * Parses a RIFF/WAVE file of 16-bit PCM: the `fmt ` and `data` chunks are found wherever they
 * are (other chunks, such as LIST, are skipped). Returns {sampleRate, channelCount, frames,
 * channels: Int16Array[] (one per channel)}. Throws an Error saying what is wrong otherwise.
 */
export function parseWav(buffer) {
  const view = new DataView(buffer);
  const tag = (offset) => String.fromCharCode(...new Uint8Array(buffer, offset, 4));
  if (buffer.byteLength < 12 || tag(0) !== "RIFF" || tag(8) !== "WAVE") throw new Error("not a WAV file");

  let format = null;
  let data = null;
  for (let offset = 12; offset + 8 <= buffer.byteLength; ) {
    const id = tag(offset);
    const size = view.getUint32(offset + 4, true);
    const body = offset + 8;
    if (id === "fmt ") {
      if (size < 16) throw new Error("the WAV fmt chunk is too short");
      format = {
        audioFormat: view.getUint16(body, true), // 1: PCM; 0xFFFE: extensible (PCM inside here)
        channelCount: view.getUint16(body + 2, true),
        sampleRate: view.getUint32(body + 4, true),
        blockAlign: view.getUint16(body + 12, true),
        bitsPerSample: view.getUint16(body + 14, true),
      };
    } else if (id === "data") {
      // A file still being written may announce more (or 0xFFFFFFFF) than it holds.
      data = { offset: body, size: Math.min(size, buffer.byteLength - body) };
      break;
    }
    offset = body + size + (size % 2); // chunks are padded to an even size
  }
  if (!format) throw new Error("the WAV file has no fmt chunk");
  if (!data) throw new Error("the WAV file has no data chunk");
  if (![1, 0xfffe].includes(format.audioFormat) || format.bitsPerSample !== 16) {
    throw new Error(`unsupported WAV encoding (format ${format.audioFormat}, ${format.bitsPerSample} bits): 16-bit PCM expected`);
  }
  const { channelCount, blockAlign } = format;
  if (channelCount < 1 || blockAlign < 2 * channelCount) throw new Error("the WAV header is inconsistent");

  const frames = Math.floor(data.size / blockAlign);
  const channels = Array.from({ length: channelCount }, () => new Int16Array(frames));
  for (let f = 0, p = data.offset; f < frames; f++, p += blockAlign) {
    for (let c = 0; c < channelCount; c++) channels[c][f] = view.getInt16(p + 2 * c, true);
  }
  return { sampleRate: format.sampleRate, channelCount, frames, channels };
}

/**
 * The recording player. `element` holds the <audio id="recording">, the two labelled canvases
 * (#wave-caller, #wave-agent, `data-drawn="1"` once drawn) and the play cursor. Call
 * `destroy()` when the page goes away (it stops the cursor and frees the object URL).
 */
export class RecordingPlayer {
  constructor(buffer) {
    this.wav = parseWav(buffer);
    this.duration = this.wav.frames / this.wav.sampleRate;
    this.url = URL.createObjectURL(new Blob([buffer], { type: "audio/wav" }));
    this.audio = el("audio", { id: "recording", controls: true, preload: "metadata", src: this.url });
    this.cursor = el("div", { class: "play-cursor", "aria-hidden": "true" });
    this.canvases = TRACKS.map((track) =>
      el("canvas", { id: track.id, class: `wave wave-${track.label}`, height: WAVE_HEIGHT, "aria-label": `${track.label} waveform`, on: { click: (e) => this.seekFromClick(e) } }),
    );
    // Labels in one column, the canvases in the other: the cursor is positioned over the
    // canvases' column only, in percent of its width (= of the recording's duration).
    const tracks = el(
      "div",
      { class: "wave-tracks" },
      el("div", { class: "wave-labels" }, TRACKS.map((track) => el("span", { class: `wave-label wave-${track.label}`, text: track.label }))),
      el("div", { class: "wave-canvases" }, this.canvases, this.cursor),
    );
    this.tracks = tracks;
    const rate = this.wav.sampleRate;
    const info = `${this.duration.toFixed(2)} s · ${rate % 1000 === 0 ? rate / 1000 : (rate / 1000).toFixed(2)} kHz · ${this.wav.channelCount === 2 ? "stereo" : `${this.wav.channelCount} channels`}`;
    this.element = el("div", { class: "recording" }, el("div", { class: "recording-bar" }, this.audio, el("span", { class: "recording-info muted", text: info })), tracks);

    this.frame = null;
    const follow = () => {
      this.moveCursor();
      this.frame = this.audio.paused ? null : requestAnimationFrame(follow);
    };
    this.audio.addEventListener("play", () => {
      if (this.frame === null) this.frame = requestAnimationFrame(follow);
    });
    for (const event of ["pause", "ended", "seeked", "timeupdate"]) this.audio.addEventListener(event, () => this.moveCursor());
    // Redrawn whenever the width changes (window resize, layout): drawn at device resolution.
    this.resizeObserver = new ResizeObserver(() => this.draw());
  }

  /** Draws once the element is in the document (canvases need their laid-out width). */
  attached() {
    this.resizeObserver.observe(this.tracks);
    this.draw();
    this.moveCursor();
  }

  draw() {
    this.canvases.forEach((canvas, i) => {
      const samples = this.wav.channels[Math.min(TRACKS[i].channel, this.wav.channelCount - 1)];
      drawWave(canvas, samples);
    });
  }

  moveCursor() {
    const fraction = this.duration > 0 ? Math.min(1, this.audio.currentTime / this.duration) : 0;
    this.cursor.style.left = `${(fraction * 100).toFixed(3)}%`;
  }

  seekFromClick(event) {
    const rect = event.currentTarget.getBoundingClientRect();
    const fraction = Math.min(1, Math.max(0, (event.clientX - rect.left) / rect.width));
    this.audio.currentTime = fraction * this.duration;
    this.moveCursor();
  }

  destroy() {
    if (this.frame !== null) cancelAnimationFrame(this.frame);
    this.resizeObserver.disconnect();
    this.audio.pause();
    this.audio.removeAttribute("src");
    URL.revokeObjectURL(this.url);
  }
}

/** One channel's waveform: the min and max of the samples under each pixel column. */
function drawWave(canvas, samples) {
  const ratio = window.devicePixelRatio || 1;
  const cssWidth = canvas.clientWidth;
  if (cssWidth === 0) return; // not laid out (hidden): drawn by the next resize
  const width = Math.round(cssWidth * ratio);
  const height = Math.round((canvas.clientHeight || WAVE_HEIGHT) * ratio);
  canvas.width = width;
  canvas.height = height;
  const g = canvas.getContext("2d");
  const style = getComputedStyle(canvas);
  g.clearRect(0, 0, width, height);
  g.fillStyle = style.getPropertyValue("--wave-axis").trim() || "#ccd";
  g.fillRect(0, Math.floor(height / 2), width, Math.max(1, Math.round(ratio)));
  g.fillStyle = style.color;

  const mid = height / 2;
  const scale = (height / 2 - ratio) / 32768;
  const perColumn = samples.length / width;
  for (let x = 0; x < width; x++) {
    const from = Math.floor(x * perColumn);
    const to = Math.max(from + 1, Math.floor((x + 1) * perColumn));
    if (from >= samples.length) break;
    let min = 32767;
    let max = -32768;
    for (let i = from; i < to && i < samples.length; i++) {
      const s = samples[i];
      if (s < min) min = s;
      if (s > max) max = s;
    }
    const top = mid - max * scale;
    const bottom = mid - min * scale;
    g.fillRect(x, top, 1, Math.max(ratio, bottom - top));
  }
  canvas.dataset.drawn = "1";
}
