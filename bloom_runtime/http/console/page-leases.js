// Leases: the active ones with their time left, and the most recent expiries.

import { api, BASE, withQuery } from "./api.js";
import { copyable, h, problem, replace, table } from "./dom.js";
import { duration, when } from "./format.js";

const ACTIVE_PAGE = 100;
const EXPIRED_PAGE = 25;

function taskLink(id) {
  return h("a", { href: `#/tasks/${encodeURIComponent(id)}` }, h("code", { class: "id" }, id));
}

export default function leases() {
  const active = h("div", { "aria-live": "polite" });
  const expired = h("div");
  const view = h("div", null, h("h1", null, "Leases"),
    h("section", { "aria-labelledby": "active" }, h("h2", { id: "active" }, "Active"), active),
    h("section", { "aria-labelledby": "expired" }, h("h2", { id: "expired" }, "Recent expiries"),
      h("p", { class: "muted" }, "A lease expires when its worker stops heartbeating; its task is retried, or dead after its last attempt."), expired));

  async function load(signal) {
    let live, gone;
    try {
      [live, gone] = await Promise.all([
        api(withQuery(`${BASE}/leases`, { status: "active", limit: ACTIVE_PAGE }), { signal }),
        api(withQuery(`${BASE}/leases/expired`, { limit: EXPIRED_PAGE }), { signal }),
      ]);
    } catch (error) {
      replace(active, problem(error, "load leases"));
      throw error;
    }
    const now = Date.now();
    replace(active, table([
      { label: "Task", cell: (l) => taskLink(l.task_id) },
      { label: "Worker", cell: (l) => l.worker_id },
      { label: "Time left", cell: (l) => h("span", { class: l.expires_at - now < 10_000 ? "warn" : null, title: new Date(l.expires_at).toISOString() },
        l.expires_at > now ? duration(l.expires_at - now) : "due now") },
      { label: "Last heartbeat", cell: (l) => when(l.last_heartbeat, now) },
      { label: "Started", cell: (l) => when(l.started_at, now) },
      { label: "TTL", cell: (l) => duration(l.ttl_seconds * 1000) },
      { label: "Lease", cell: (l) => copyable(l.id) },
    ], live.data, "No active leases: nothing is being worked on."),
    live.next ? h("p", { class: "muted" }, `Showing the ${ACTIVE_PAGE} newest; more are active.`) : null);
    replace(expired, table([
      { label: "Task", cell: (l) => taskLink(l.task_id) },
      { label: "Worker", cell: (l) => l.worker_id },
      { label: "Expired", cell: (l) => when(l.expires_at, now) },
      { label: "Last heartbeat", cell: (l) => when(l.last_heartbeat, now) },
      { label: "Started", cell: (l) => when(l.started_at, now) },
      { label: "TTL", cell: (l) => duration(l.ttl_seconds * 1000) },
    ], gone.data, "No lease has expired."));
  }

  return { title: "Leases", view, load, interval: 5000 };
}
