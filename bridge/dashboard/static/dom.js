// Small DOM and formatting helpers. Everything the API returns is put in the page as text
// (textContent), never parsed as HTML.

/**
 * Creates an element. `props`: `class`, `text`, `dataset` (object), `on` (event -> handler),
 * any other key is set as an attribute (`false`/null/undefined ones are skipped). Children are
 * nodes or strings (strings become text nodes); null/false children are skipped.
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "on") for (const [event, handler] of Object.entries(value)) node.addEventListener(event, handler);
    else node.setAttribute(name, value === true ? "" : value);
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
}

/** Replaces all children of `node`. */
export function replaceChildren(node, ...children) {
  node.replaceChildren();
  append(node, children);
}

const SVG_NS = "http://www.w3.org/2000/svg";

/** Creates an SVG element with attributes (and an optional text content). */
export function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// --- formatting ---------------------------------------------------------------------------

/** A local date and time ("2024-05-01 14:03:07"), or "—". */
export function formatTime(ms) {
  if (ms === null || ms === undefined) return "—";
  const d = new Date(ms);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** A duration as "m:ss" (or "h:mm:ss"), or "—". */
export function formatDuration(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms) || ms < 0) return "—";
  const total = Math.floor(ms / 1000);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = String(total % 60).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${s}` : `${m}:${s}`;
}

/** Milliseconds as "123 ms" (rounded), or "—". */
export function formatMs(value) {
  return value === null || value === undefined || !Number.isFinite(value) ? "—" : `${Math.round(value)} ms`;
}

/** A call's duration: end - start when it ended, else the time since it started (live). */
export function callDuration(call, now = Date.now()) {
  if (!call.start_timestamp) return null;
  return (call.end_timestamp ?? now) - call.start_timestamp;
}

export const LIVE_STATUSES = new Set(["registered", "ongoing"]);

export function isLive(call) {
  return LIVE_STATUSES.has(call.call_status);
}

/** A status pill: its colour comes from its class (`status-ongoing`, `status-error`, ...). */
export function statusPill(status) {
  const known = ["registered", "ongoing", "ended", "error"].includes(status) ? status : "other";
  return el("span", { class: `pill status-${known}`, text: status ?? "unknown" });
}

/** A link to a call's page. */
export function callLink(callId, text = callId) {
  return el("a", { href: `#/calls/${encodeURIComponent(callId)}`, class: "mono", text });
}

/** A `<p class="notice">` holding a message (kind: "error", "muted" or "info"). */
export function notice(message, kind = "muted") {
  return el("p", { class: `notice ${kind}`, text: message });
}
