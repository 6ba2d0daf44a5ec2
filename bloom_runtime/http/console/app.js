// The console's shell: sign-in, the hash router, live refresh, dialogs and the
// server's answers to actions.

import { api, ApiError, BASE, keyStore, onUnauthorized } from "./api.js";
import { h, replace } from "./dom.js";
import { duration } from "./format.js";
import audit from "./page-audit.js";
import leases from "./page-leases.js";
import membridge from "./page-membridge.js";
import overview from "./page-overview.js";
import taskDetail from "./page-task.js";
import taskForm from "./page-task-new.js";
import tasks from "./page-tasks.js";
import workers from "./page-workers.js";

const ROUTES = [
  [/^\/$/, overview, "/"],
  [/^\/tasks\/new$/, taskForm, "/tasks"],
  [/^\/tasks\/([^/]+)$/, taskDetail, "/tasks"],
  [/^\/tasks$/, tasks, "/tasks"],
  [/^\/workers$/, workers, "/workers"],
  [/^\/leases$/, leases, "/leases"],
  [/^\/audit$/, audit, "/audit"],
  [/^\/membridge$/, membridge, "/membridge"],
];
const MAX_BACKOFF_MS = 60_000;

const main = document.getElementById("main");
const liveState = document.getElementById("live-state");
const pauseButton = document.getElementById("pause");
const whoBox = document.getElementById("who");
const forgetButton = document.getElementById("forget");

// --- live refresh -----------------------------------------------------------------

/** Runs the page's load now and then every `interval` ms; waits while paused or hidden; backs off on errors. */
class Poller {
  constructor() {
    this.paused = false;
    this.load = null;
    document.addEventListener("visibilitychange", () => (document.hidden ? this.show() : this.tick()));
  }

  set(load, interval) {
    this.stop();
    this.load = load;
    this.interval = interval;
    this.failures = 0;
    this.tick();
  }

  stop() {
    clearTimeout(this.timer);
    this.timer = null;
    if (this.abort) this.abort.abort();
    this.load = null;
    this.running = false;
  }

  /** Load now (e.g. after an action), then carry on at the usual pace. */
  async tick() {
    clearTimeout(this.timer);
    this.timer = null;
    const load = this.load;
    if (!load) return;
    if (this.running) {
      this.again = true; // asked for while a load runs: load once more right after it
      return;
    }
    this.again = false;
    if (document.hidden) return this.show();
    this.running = true;
    const abort = (this.abort = new AbortController());
    try {
      await load(abort.signal);
      this.failures = 0;
      this.okAt = Date.now();
      main.dataset.loads = String(Number(main.dataset.loads || 0) + 1); // how many loads this page has shown
    } catch (error) {
      if (abort.signal.aborted || this.load !== load) return;
      this.failures += 1;
      this.error = error;
    } finally {
      if (this.load === load) this.running = false;
    }
    if (this.load !== load) return;
    this.show();
    if (this.again) {
      this.tick();
      return;
    }
    if (this.interval && !this.paused) {
      const delay = this.failures ? Math.min(MAX_BACKOFF_MS, this.interval * 2 ** this.failures) : this.interval;
      this.nextAt = Date.now() + delay;
      this.timer = setTimeout(() => this.tick(), delay);
    }
  }

  togglePause() {
    this.paused = !this.paused;
    pauseButton.setAttribute("aria-pressed", String(this.paused));
    pauseButton.textContent = this.paused ? "Resume" : "Pause";
    if (this.paused) clearTimeout(this.timer);
    else this.tick();
    this.show();
  }

  show() {
    let text;
    if (!this.interval) text = "";
    else if (this.paused) text = "Paused";
    else if (document.hidden) text = "Waiting while the tab is hidden";
    else if (this.failures) text = `Server error; retrying in ${duration(Math.max(0, this.nextAt - Date.now()))}`;
    else text = `Live, every ${duration(this.interval)}`;
    liveState.textContent = text;
    liveState.classList.toggle("bad", Boolean(this.failures));
  }
}

const poller = new Poller();
pauseButton.addEventListener("click", () => poller.togglePause());

// --- dialogs ----------------------------------------------------------------------

/** Ask before an action: resolves true when the operator confirms. */
function confirmAction(title, message, confirmLabel) {
  return new Promise((resolve) => {
    const yes = h("button", { type: "submit", class: "danger", value: "yes" }, confirmLabel);
    const no = h("button", { type: "button", value: "no" }, "Keep it");
    const dialog = h("dialog", { class: "confirm", "aria-labelledby": "confirm-title" },
      h("form", null, h("h2", { id: "confirm-title" }, title), h("p", null, message), h("div", { class: "buttons" }, no, yes)));
    let answer = false;
    dialog.querySelector("form").addEventListener("submit", (event) => {
      event.preventDefault();
      answer = true;
      dialog.close();
    });
    no.addEventListener("click", () => dialog.close());
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(answer);
    });
    document.body.append(dialog);
    dialog.showModal();
    no.focus();
  });
}

/** The server's answer to an action, above the page until the next action or page. */
function report(request, outcome) {
  const box = document.getElementById("answer");
  if (!box) return;
  const ok = !(outcome instanceof Error);
  const status = ok ? outcome.status : outcome.status || "no answer";
  const body = ok ? outcome.data : outcome.body ?? outcome.message;
  replace(box,
    h("div", { class: ["notice", ok ? "ok" : "error"], role: ok ? "status" : "alert" },
      h("strong", null, `${request} → ${status}`), " ", ok ? "done." : `refused: ${outcome.message}`,
      h("details", null, h("summary", null, "Server answer"), h("pre", null, JSON.stringify(body, null, 2)))));
}

// --- sign-in ----------------------------------------------------------------------

let who = null;
let carried = null; // [request, outcome] to show on the page an action led to

function showWho() {
  if (!who || !who.auth_enabled) {
    replace(whoBox, who ? h("span", { class: "muted", title: "No RUNTIME_API_KEY is set: the API is open on this loopback address" }, "open mode") : "");
    forgetButton.hidden = true;
    return;
  }
  replace(whoBox, h("span", { title: "The name of your key, as the audit log records it" }, who.name), " ",
    who.admin ? h("span", { class: "badge s-admin" }, "admin") : h("span", { class: "badge", title: "Admin-only actions are disabled" }, "not admin"));
  forgetButton.hidden = false;
}

function askForKey(reason) {
  poller.stop();
  who = null;
  showWho();
  replace(main, h("h1", { tabindex: "-1" }, "Sign in"), h("p", { class: "muted" }, "This runtime needs an API key. It stays in this tab only (sessionStorage)."));
  const input = h("input", { id: "key", type: "password", name: "key", autocomplete: "off", required: true, spellcheck: "false" });
  const error = h("p", { class: "field-error", role: "alert" }, reason || "");
  const form = h("form", { class: "login" },
    h("h2", { id: "login-title" }, "API key"),
    h("label", { for: "key" }, "Key (X-Runtime-API-Key)"), input, error,
    h("div", { class: "buttons" }, h("button", { type: "submit", class: "primary" }, "Sign in")));
  const dialog = h("dialog", { class: "login", "aria-labelledby": "login-title" }, form);
  dialog.addEventListener("cancel", (event) => event.preventDefault());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    try {
      const answer = await api(`${BASE}/whoami`, { key });
      keyStore.set(key);
      dialog.close();
      dialog.remove();
      signedIn(answer.data);
    } catch (e) {
      error.textContent = e instanceof ApiError && e.status === 401 ? "That key was refused. Check it and try again." : `Could not check the key: ${e.message}`;
      input.select();
    }
  });
  document.querySelectorAll("dialog.login").forEach((d) => d.remove());
  document.body.append(dialog);
  dialog.showModal();
  input.focus();
}

function signedIn(answer) {
  who = answer;
  showWho();
  route();
}

onUnauthorized(() => {
  keyStore.clear();
  askForKey("The server refused the key (it may have been rotated). Enter a current one.");
});

forgetButton.addEventListener("click", () => {
  keyStore.clear();
  askForKey("");
});

// --- routing ----------------------------------------------------------------------

function currentRoute() {
  const hash = location.hash.startsWith("#/") ? location.hash.slice(1) : "/";
  const [path, search] = hash.split("?", 2);
  return { path, query: new URLSearchParams(search || "") };
}

function route() {
  if (!who) return;
  const { path, query } = currentRoute();
  const found = ROUTES.find(([pattern]) => pattern.test(path));
  document.querySelectorAll("nav a").forEach((a) => a.removeAttribute("aria-current"));
  if (!found) {
    poller.stop();
    replace(main, h("h1", { tabindex: "-1" }, "Not found"), h("p", null, "There is no such page. ", h("a", { href: "#/" }, "Go to the overview.")));
    return;
  }
  const [pattern, make, nav] = found;
  const link = document.querySelector(`nav a[href="#${nav}"]`);
  if (link) link.setAttribute("aria-current", "page");
  const params = pattern.exec(path).slice(1).map(decodeURIComponent);
  const ctx = {
    who,
    query,
    go: (hash, answer) => {
      carried = answer || null;
      location.hash = hash;
    },
    refresh: () => poller.tick(),
    confirm: confirmAction,
    report,
  };
  delete main.dataset.loads;
  const page = make(ctx, ...params);
  document.title = `${page.title} · bloom-runtime`;
  replace(main, h("div", { id: "answer" }), page.view);
  if (carried) report(...carried);
  carried = null;
  const heading = main.querySelector("h1");
  if (heading) {
    heading.setAttribute("tabindex", "-1");
    if (document.activeElement === document.body || !main.contains(document.activeElement)) heading.focus({ preventScroll: true });
  }
  poller.set(page.load, page.interval || 0);
}

window.addEventListener("hashchange", route);

document.querySelector(".skip").addEventListener("click", (event) => {
  event.preventDefault();
  main.focus();
});

// --- start ------------------------------------------------------------------------

async function start() {
  try {
    const answer = await api(`${BASE}/whoami`);
    if (answer.data.auth_enabled && !answer.data.authenticated) askForKey("");
    else signedIn(answer.data);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return; // the 401 handler asks for a key
    replace(main, h("h1", { tabindex: "-1" }, "Cannot reach the runtime"),
      h("p", { class: "notice error", role: "alert" }, `${error.message}. Check that bloom-runtime serve is running, then reload.`));
  }
}

start();
