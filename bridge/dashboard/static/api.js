// The call API as the dashboard sees it: the API key (kept in this tab's sessionStorage, never in
// a URL, localStorage or the console), authorized requests, error answers turned into ApiError,
// and a reader for server-sent events over fetch (EventSource cannot send the Authorization
// header).

const KEY_NAME = "bridge.apiKey";

/** The API key this tab signed in with, or null. */
export function getKey() {
  return sessionStorage.getItem(KEY_NAME);
}

export function setKey(key) {
  sessionStorage.setItem(KEY_NAME, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY_NAME);
}

/** An error answer of the API (`{"status": "error", "message": ...}`), or a network failure
 *  (status 0). `message` is always text that can be shown as is. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

// Called once whenever the API refuses the key (401): the app signs out.
let unauthorizedHandler = () => {};

export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

/** The headers of an authorized request, with `extra` merged in. */
function authHeaders(extra = {}, key = getKey()) {
  return { ...extra, Authorization: "Bearer " + key };
}

/** The message of an error answer, whatever its shape. */
async function errorMessage(response) {
  let text = "";
  try {
    text = await response.text();
    const body = JSON.parse(text);
    if (body && typeof body.message === "string") return body.message;
    if (body && typeof body.detail === "string") return body.detail;
  } catch {
    // not JSON: fall through to the text or the status line
  }
  return text.trim().slice(0, 300) || `${response.status} ${response.statusText}`.trim();
}

/**
 * An authorized request. Resolves to the Response when it is 2xx; otherwise throws ApiError with
 * the API's message. A 401 also signs the tab out (unless `key` was given: the sign-in check).
 *
 * @param {string} path  e.g. "/v2/get-call/abc"
 * @param {{method?: string, json?: any, key?: string, signal?: AbortSignal, headers?: object}} options
 */
export async function request(path, { method = "GET", json, key, signal, headers = {} } = {}) {
  const init = { method, signal, headers: authHeaders(headers, key ?? getKey()), cache: "no-store" };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "The bridge does not answer (network error)");
  }
  if (response.ok) return response;
  const message = await errorMessage(response);
  if (response.status === 401 && key === undefined) unauthorizedHandler();
  throw new ApiError(response.status, message);
}

/** An authorized request answering JSON. */
export async function requestJson(path, options) {
  const response = await request(path, options);
  return response.json();
}

/**
 * Reads a `text/event-stream` answer of `path` and calls `onEvent(name, data)` for each event
 * (name defaults to "message"; data is the raw text, its `data:` lines joined with "\n").
 * Resolves when the stream ends; rejects with ApiError if the request is refused, or with the
 * AbortError when `signal` aborts it. `onOpen()` is called once the stream is accepted.
 */
export async function readEventStream(path, { onEvent, onOpen = () => {}, signal }) {
  const response = await request(path, { signal, headers: { Accept: "text/event-stream" } });
  onOpen();
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new EventStreamParser(onEvent);
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(value);
    }
  } finally {
    reader.releaseLock();
  }
}

/**
 * The server-sent events format, parsed incrementally (WHATWG HTML, "event stream
 * interpretation"): lines end with \n, \r\n or \r, in chunks split anywhere; `event:` names the
 * event, `data:` lines accumulate, a line starting with ":" is a comment, a blank line dispatches.
 */
export class EventStreamParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.eventName = "";
    this.dataLines = [];
  }

  push(text) {
    this.buffer += text;
    // A trailing "\r" may be the first half of "\r\n": keep it until the next chunk.
    const lineBreak = /\r\n|\r(?!$)|\n/g;
    let start = 0;
    let match;
    while ((match = lineBreak.exec(this.buffer)) !== null) {
      this.line(this.buffer.slice(start, match.index));
      start = match.index + match[0].length;
    }
    this.buffer = this.buffer.slice(start);
  }

  line(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) return; // a comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.eventName = value;
    else if (field === "data") this.dataLines.push(value);
    // "id" and "retry" are not used by the call-events feed
  }

  dispatch() {
    if (this.dataLines.length > 0) {
      this.onEvent(this.eventName || "message", this.dataLines.join("\n"));
    }
    this.eventName = "";
    this.dataLines = [];
  }
}

/** The websocket base of this page's origin: http -> ws, https -> wss. */
export function websocketBase() {
  return location.origin.replace(/^http/, "ws");
}
