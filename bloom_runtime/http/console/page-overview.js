// Overview: counts by status, the queue, fleet capacity, history charts,
// membridge and the periodic jobs.

import { api, BASE, withQuery } from "./api.js";
import { chart } from "./chart.js";
import { badge, h, problem, replace, table } from "./dom.js";
import { duration, num, when } from "./format.js";
import { byStatus, total } from "./stats.js";

const WINDOWS = { hour: { minutes: 60, label: "Last hour" }, day: { minutes: 1440, label: "Last 24 h" } };
const DEPTH = [
  { key: "queued", label: "Queued", cls: "c-queued" },
  { key: "leased", label: "Leased", cls: "c-leased" },
  { key: "running", label: "Running", cls: "c-running" },
];
const OUTCOMES = [
  { key: "completed", label: "Completed", cls: "c-completed" },
  { key: "failed", label: "Failed", cls: "c-failed" },
  { key: "expired", label: "Expired", cls: "c-expired" },
];
const LINKED = { tasks: "#/tasks", leases: "#/leases", workers: "#/workers" };

function countsCard(name, group) {
  const counts = byStatus(group);
  const link = (status) => (name === "tasks" ? `#/tasks?status=${status}` : LINKED[name]);
  return h("section", { class: "card", "aria-labelledby": `count-${name}` },
    h("h2", { id: `count-${name}` }, h("a", { href: LINKED[name] }, name[0].toUpperCase() + name.slice(1)),
      " ", h("span", { class: "total", "data-stat": `${name}.total` }, num(total(group)))),
    h("dl", { class: "counts" }, Object.entries(counts).map(([status, n]) => [
      h("dt", null, h("a", { href: link(status) }, badge(status))),
      h("dd", { "data-stat": `${name}.${status}`, class: n ? null : "zero" }, num(n)),
    ])));
}

function capacityCard(workers) {
  const online = workers.filter((w) => w.status === "online");
  const slots = online.reduce((sum, w) => sum + (w.capabilities?.max_concurrency || 0), 0);
  const used = online.reduce((sum, w) => sum + (w.active_leases || 0), 0);
  return h("section", { class: "card", "aria-labelledby": "capacity" },
    h("h2", { id: "capacity" }, h("a", { href: "#/workers" }, "Fleet capacity")),
    slots
      ? [h("meter", { min: 0, max: slots, value: Math.min(used, slots), "aria-labelledby": "capacity", title: `${used} of ${slots} slots used` }),
        h("p", { "data-stat": "capacity" }, `${num(used)} used, ${num(Math.max(0, slots - used))} free of ${num(slots)} slots`),
        h("p", { class: "muted" }, `${online.length} of ${workers.length} workers online`)]
      : h("p", { class: "muted" }, workers.length ? "No worker is online: tasks wait in the queue." :
        "No workers yet. Start one with bloom-runtime worker, register one with POST /api/runtime/workers, or sync them from membridge."));
}

function queueCard(queue) {
  const oldest = queue.oldest_queued;
  return h("section", { class: "card", "aria-labelledby": "queue" },
    h("h2", { id: "queue" }, h("a", { href: "#/tasks?status=queued" }, "Queue")),
    h("dl", { class: "counts" },
      h("dt", null, "Queued"), h("dd", null, num(queue.queued)),
      h("dt", null, "Leased"), h("dd", null, num(queue.leased)),
      h("dt", null, "Running"), h("dd", null, num(queue.running))),
    oldest
      ? h("p", null, "Oldest queued task has waited ", h("strong", { "data-stat": "oldest-age" }, duration(oldest.age_ms)), " — ",
        h("a", { href: `#/tasks/${encodeURIComponent(oldest.id)}` }, "open it"), ".")
      : h("p", { class: "muted" }, "Nothing is waiting to be leased."));
}

function membridgeCard(state) {
  const rows = [];
  if (!state || !state.configured) {
    rows.push(h("p", { class: "muted" }, "Not configured: set MEMBRIDGE_SERVER_URL, or set the URL on the ", h("a", { href: "#/membridge" }, "Membridge page"), "."));
  } else {
    const sync = state.sync || {};
    rows.push(h("dl", { class: "facts" },
      h("dt", null, "Connection"), h("dd", null, badge(state.connected ? "connected" : "disconnected")),
      h("dt", null, "Breaker"), h("dd", null, badge(state.breaker_state || state.breaker || "unknown")),
      h("dt", null, "Last sync"), h("dd", null, when(sync.last_success)),
      h("dt", null, "Failures in a row"), h("dd", null, num(state.consecutiveFailures)),
      state.lastError ? [h("dt", null, "Last error"), h("dd", null, state.lastError)] : null));
  }
  return h("section", { class: "card", "aria-labelledby": "mb" }, h("h2", { id: "mb" }, h("a", { href: "#/membridge" }, "Membridge")), rows);
}

function jobState(job, now) {
  if (job.last_error && job.failures) return "failing";
  if (!job.last_success) return job.runs ? "failing" : "waiting";
  return now - job.last_success > 3 * job.interval_s * 1000 + 1000 ? "late" : "ok";
}

function jobsTable(health) {
  const now = Date.now();
  const jobs = Object.entries(health.jobs || {}).map(([name, job]) => ({ name, ...job }));
  return h("section", { class: "wide", "aria-labelledby": "jobs" },
    h("h2", { id: "jobs" }, "Periodic jobs"),
    h("p", { class: "muted" }, `Storage ${health.storage} `, badge(health.storage_ok ? "ok" : "down"), ` · version ${health.version} · up ${duration(health.uptime * 1000)}`),
    table([
      { label: "Job", cell: (j) => j.name },
      { label: "State", cell: (j) => badge(jobState(j, now)) },
      { label: "Every", cell: (j) => duration(j.interval_s * 1000) },
      { label: "Last success", cell: (j) => when(j.last_success, now) },
      { label: "Runs", cell: (j) => num(j.runs), class: "num" },
      { label: "Failures", cell: (j) => num(j.failures), class: "num" },
      { label: "Last error", cell: (j) => j.last_error || "—" },
    ], jobs, "The server reports no periodic jobs."));
}

export default function overview(ctx) {
  let windowName = ctx.query.get("window") === "day" ? "day" : "hour";
  const counts = h("div", { class: "cards" });
  const charts = h("div");
  const side = h("div", { class: "cards" });
  const jobs = h("div");
  const switcher = h("div", { class: "switch", role: "group", "aria-label": "Chart window" },
    Object.entries(WINDOWS).map(([name, w]) => h("button", { type: "button", "aria-pressed": String(name === windowName), "data-window": name }, w.label)));
  switcher.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    windowName = button.dataset.window;
    switcher.querySelectorAll("button").forEach((b) => b.setAttribute("aria-pressed", String(b === button)));
    ctx.refresh();
  });
  const view = h("div", null,
    h("h1", null, "Overview"), counts,
    h("section", { class: "wide", "aria-labelledby": "history" }, h("div", { class: "row" }, h("h2", { id: "history" }, "History"), switcher), charts),
    side, jobs);

  async function load(signal) {
    const get = (path) => api(path, { signal }).then((r) => r.data);
    let stats, health, workers, history, queue;
    try {
      [stats, health, workers, history, queue] = await Promise.all([
        get(`${BASE}/stats`), get(`${BASE}/health`).catch((e) => (e.status === 503 ? e.body : Promise.reject(e))),
        get(`${BASE}/workers`), get(withQuery(`${BASE}/history`, { minutes: WINDOWS[windowName].minutes })), get(`${BASE}/queue`),
      ]);
    } catch (error) {
      replace(counts, problem(error, "load the overview"));
      throw error;
    }
    replace(counts, ["tasks", "leases", "workers"].map((name) => countsCard(name, stats[name])));
    const per = history.bucket_minutes === 1 ? "per minute" : `per ${history.bucket_minutes} min`;
    const sums = Object.fromEntries(["created", ...OUTCOMES.map((s) => s.key)].map((k) => [k, history.points.reduce((a, p) => a + (p[k] || 0), 0)]));
    replace(charts,
      h("div", { class: "charts" },
        chart({ title: `Queue depth (largest ${per})`, points: history.points, series: DEPTH, kind: "line", bucketMs: history.bucket_minutes * 60_000 }),
        chart({ title: `Finished ${per}`, points: history.points, series: OUTCOMES, kind: "bars", bucketMs: history.bucket_minutes * 60_000 })),
      h("p", { class: "muted" }, `${WINDOWS[windowName].label}: ${num(sums.created)} created, ${num(sums.completed)} completed, `,
        `${num(sums.failed)} failed, ${num(sums.expired)} leases expired. Depth is sampled once a minute; gaps are minutes no runtime was running.`));
    replace(side, queueCard(queue), capacityCard(workers), membridgeCard(health.membridge));
    replace(jobs, jobsTable(health));
  }

  return { title: "Overview", view, load, interval: 5000 };
}
