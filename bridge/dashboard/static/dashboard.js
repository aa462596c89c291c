// The dashboard's entry point: sign-in, the app shell (top bar, views, the live listener
// panel), hash routing and sign-out.
//
// While signed out the page holds only the sign-in view of index.html; the shell is built after
// the API key is accepted and removed on sign-out, so no data outlives the session in the DOM.
//
// Routes: #/calls (default), #/calls/<call_id>, #/overview, #/agents, #/talk. Each view is a function
// `mount(container, app)` that returns its `destroy()`; `app` gives it the shared call feed and
// the listener panel.

import { ApiError, clearKey, getKey, onUnauthorized, request, setKey } from "./api.js";
import { el } from "./dom.js";
import { CallFeed } from "./feed.js";
import { ListenerPanel } from "./listener-panel.js";
import { mountCalls } from "./calls.js";
import { mountCallPage } from "./call-page.js";
import { mountTalk } from "./talk.js";
import { mountOverview } from "./overview.js";
import { mountAgents } from "./agents.js";

const signinView = document.getElementById("signin");
const signinForm = document.getElementById("signin-form");
const keyInput = document.getElementById("api-key");
const signinError = document.getElementById("signin-error");

/** The signed-in app: null while signed out. */
let app = null;

// --- sign-in -------------------------------------------------------------------------------

signinForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = keyInput.value.trim();
  if (!key) {
    signinError.textContent = "Enter an API key";
    return;
  }
  const button = signinForm.querySelector("button[type=submit]");
  button.disabled = true;
  signinError.textContent = "";
  try {
    // Any cheap authorized request tells whether the key is accepted.
    await request("/v3/list-calls", { method: "POST", json: { limit: 1 }, key });
    setKey(key);
    keyInput.value = "";
    signIn();
  } catch (e) {
    signinError.textContent = e instanceof ApiError && e.status === 401 ? "That API key was refused" : e.message;
  } finally {
    button.disabled = false;
  }
});

onUnauthorized(() => signOut("Your API key was refused: sign in again"));

function signIn() {
  signinView.hidden = true;
  signinError.textContent = "";
  app = new App();
  document.body.append(app.element);
  app.start();
}

function signOut(message = "") {
  clearKey();
  if (app) {
    app.destroy();
    app = null;
  }
  signinView.hidden = false;
  signinError.textContent = message;
  keyInput.value = "";
  keyInput.focus();
}

// --- the app shell -------------------------------------------------------------------------

class App {
  constructor() {
    this.feed = new CallFeed();
    this.listener = new ListenerPanel();
    this.view = el("main", { id: "view", class: "view" });
    this.destroyView = null;

    this.feedStatus = el("span", { id: "feed-status", class: "feed-status", title: "The live call feed" });
    this.navLinks = {
      overview: el("a", { href: "#/overview", text: "Overview" }),
      calls: el("a", { href: "#/calls", text: "Calls" }),
      agents: el("a", { href: "#/agents", text: "Agents" }),
      talk: el("a", { href: "#/talk", text: "Talk" }),
    };
    const header = el(
      "header",
      { class: "topbar" },
      el("a", { class: "brand", href: "#/calls" }, "twilio-audio-bridge", el("span", { class: "brand-sub", text: "calls" })),
      el(
        "nav",
        { class: "nav" },
        this.navLinks.overview,
        this.navLinks.calls,
        this.navLinks.agents,
        this.navLinks.talk,
        el("a", { href: "/docs", target: "_blank", rel: "noopener", text: "API docs" }),
      ),
      el("div", { class: "topbar-end" }, this.feedStatus, el("button", { id: "signout", type: "button", on: { click: () => signOut() } }, "Sign out")),
    );
    this.element = el("div", { id: "app" }, header, this.view, this.listener.element);
    this.onHashChange = () => this.route();
  }

  start() {
    this.unsubscribeFeed = this.feed.subscribe((event) => {
      if (event.type === "state") this.showFeedState(event.state);
    });
    this.showFeedState("connecting");
    this.feed.start();
    window.addEventListener("hashchange", this.onHashChange);
    this.route();
  }

  showFeedState(state) {
    const labels = { connecting: "connecting", live: "live", reconnecting: "reconnecting", unavailable: "no live feed", stopped: "off" };
    this.feedStatus.textContent = labels[state] ?? state;
    this.feedStatus.dataset.state = state;
  }

  /** Shows the view the location's hash names. */
  route() {
    const hash = location.hash || "#/calls";
    let match;
    let mount;
    let section;
    if ((match = /^#\/calls\/([^/]+)$/.exec(hash))) {
      const callId = decodeURIComponent(match[1]);
      mount = (container) => mountCallPage(container, this, callId);
      section = "calls";
    } else if (hash === "#/overview") {
      mount = (container) => mountOverview(container, this);
      section = "overview";
    } else if (hash === "#/agents") {
      mount = (container) => mountAgents(container, this);
      section = "agents";
    } else if (hash === "#/talk") {
      mount = (container) => mountTalk(container, this);
      section = "talk";
    } else {
      if (hash !== "#/calls") history.replaceState(null, "", "#/calls");
      mount = (container) => mountCalls(container, this);
      section = "calls";
    }
    for (const [name, link] of Object.entries(this.navLinks)) {
      link.classList.toggle("active", name === section);
      if (name === section) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    this.destroyView?.();
    this.view.replaceChildren();
    window.scrollTo(0, 0);
    this.destroyView = mount(this.view);
  }

  /** Starts live listening to a call in the listener panel (from a click). */
  listen(callId) {
    this.listener.listen(callId);
  }

  destroy() {
    window.removeEventListener("hashchange", this.onHashChange);
    this.destroyView?.();
    this.destroyView = null;
    this.unsubscribeFeed?.();
    this.feed.stop();
    this.listener.destroy();
    delete window.bridgeTalk;
    this.element.remove();
  }
}

// --- start ---------------------------------------------------------------------------------

if (getKey()) signIn();
else keyInput.focus();
