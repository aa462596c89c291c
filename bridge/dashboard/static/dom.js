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

/** The browser's time zone as the page names it ("UTC", "CET", "GMT+5:30"...). */
export function timeZoneName(ms = Date.now()) {
  const part = new Intl.DateTimeFormat(undefined, { timeZoneName: "short" }).formatToParts(new Date(ms)).find((p) => p.type === "timeZoneName");
  return part ? part.value : "local time";
}

/** A local date and time with its zone ("2024-05-01 14:03:07 CEST"), or "—" (`withZone`
 *  false: without, where a heading names the zone). */
export function formatTime(ms, withZone = true) {
  if (ms === null || ms === undefined) return "—";
  const d = new Date(ms);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}${withZone ? " " + timeZoneName(ms) : ""}`;
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
  return el("a", { href: `#/calls/${encodeURIComponent(callId)}`, class: "mono", text, title: callId });
}

/** Puts `text` on the clipboard: the Clipboard API where the page may use it (https, localhost),
 *  else a selected text area and the copy command (a bridge on plain http elsewhere). */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = el("textarea", { class: "offscreen", readonly: true });
  area.value = text;
  document.body.append(area);
  area.select();
  const copied = document.execCommand("copy");
  area.remove();
  if (!copied) throw new Error("the browser refused to copy");
}

/** A small button copying `text` (a call id, a number); it says when it did. */
export function copyButton(text, what = "call id") {
  const button = el("button", { type: "button", class: "copy small", title: `Copy the ${what}`, "aria-label": `Copy the ${what}`, dataset: { copy: text } }, "Copy");
  button.addEventListener("click", async (event) => {
    event.preventDefault();
    event.stopPropagation();
    try {
      await copyText(text);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Not copied";
    }
    setTimeout(() => (button.textContent = "Copy"), 1500);
  });
  return button;
}

/** A call id as its short link and a copy button (the full id in the link's title). */
export function callIdCell(callId) {
  const short = callId.length > 12 ? callId.slice(0, 10) + "…" : callId;
  return el("span", { class: "call-id-cell" }, callLink(callId, short), copyButton(callId));
}

/** A `<p class="notice">` holding a message (kind: "error", "muted" or "info"). */
export function notice(message, kind = "muted") {
  return el("p", { class: `notice ${kind}`, text: message });
}
