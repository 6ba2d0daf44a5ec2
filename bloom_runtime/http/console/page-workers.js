// Workers: status and why, capacity, labels, URL (verified or not), version and OS; remove (admin).

import { api, BASE } from "./api.js";
import { badge, h, problem, replace, table } from "./dom.js";
import { text, when } from "./format.js";

const SHOWN = new Set(["id", "node_id", "url", "url_verified", "status", "capabilities", "last_heartbeat", "registered_at",
  "active_leases", "agent_version", "os_info", "source"]);
const SOURCES = {
  api: "registered through the API: keeps its status unless probes of its verified URL say otherwise",
  pull: "pulls tasks: offline after a silence of WORKER_OFFLINE_AFTER",
  membridge: "synced from membridge: online when heard from, offline after a silence of WORKER_OFFLINE_AFTER",
};
const UNVERIFIED = "Set by a client key: nothing is pushed to it and the agent key is not sent until an admin key sets it, "
  + "the membridge sync reports it, or MEMBRIDGE_ALLOWED_HOSTS lists its host.";

function url(w) {
  if (!w.url) return h("span", { class: "muted" }, "none (pulls)");
  return h("span", { class: "stack" }, h("code", { class: "url" }, w.url),
    w.url_verified ? h("small", null, badge("verified"))
      : h("small", { title: UNVERIFIED }, badge("unverified"), " no pushes, no agent key"));
}
const ADMIN_ONLY = "Needs an admin key (RUNTIME_ADMIN_KEY)";

function why(w, now) {
  const cause = w.status_cause ?? w.status_reason ?? null;
  return h("span", { class: "stack" }, badge(w.status),
    h("small", null, SOURCES[w.source] || `source ${w.source ?? "unknown"}`),
    h("small", null, "last heartbeat ", when(w.last_heartbeat, now)),
    cause ? h("small", null, text(cause)) : null);
}

function capacity(w) {
  const max = w.capabilities?.max_concurrency ?? 0;
  const used = w.active_leases ?? 0;
  return h("span", { class: "stack" },
    h("meter", { min: 0, max: Math.max(max, 1), value: Math.min(used, max), "aria-label": `${w.id}: ${used} of ${max} slots used` }),
    h("small", { "data-capacity": w.id }, `${used} / ${max}`));
}

function more(w, now) {
  const extra = Object.entries(w).filter(([k]) => !SHOWN.has(k));
  if (!extra.length) return "—";
  return h("details", null, h("summary", null, `${extra.length} more`),
    h("dl", { class: "facts" }, extra.map(([k, v]) => [h("dt", null, k), h("dd", null, /_at$/.test(k) && typeof v === "number" ? when(v, now) : text(v))])));
}

export default function workers(ctx) {
  const list = h("div", { "aria-live": "polite" });
  const view = h("div", null, h("h1", null, "Workers"), list);

  async function remove(w, button) {
    const ok = await ctx.confirm(`Remove worker ${w.id}?`,
      `It leaves the registry; its ${w.active_leases} active lease(s) expire normally and their tasks are retried. A pulling worker registers again on its next claim.`,
      "Remove");
    if (!ok) return;
    button.disabled = true;
    const request = `DELETE /workers/${w.id}`;
    try {
      ctx.report(request, await api(`${BASE}/workers/${encodeURIComponent(w.id)}`, { method: "DELETE" }));
    } catch (error) {
      ctx.report(request, error);
    }
    ctx.refresh();
  }

  async function load(signal) {
    let rows;
    try {
      rows = (await api(`${BASE}/workers`, { signal })).data;
    } catch (error) {
      replace(list, problem(error, "load workers"));
      throw error;
    }
    const now = Date.now();
    replace(list, table([
      { label: "Worker", cell: (w) => h("span", { class: "stack" }, h("code", { class: "id" }, w.id), w.node_id !== w.id ? h("small", null, `node ${w.node_id}`) : null) },
      { label: "Status", cell: (w) => why(w, now) },
      { label: "Capacity", cell: capacity },
      { label: "Labels", cell: (w) => (w.capabilities?.labels?.length ? h("span", { class: "chips" }, w.capabilities.labels.map((l) => h("span", { class: "chip" }, l))) : "—") },
      { label: "URL", cell: url },
      { label: "Version / OS", cell: (w) => h("span", { class: "stack" }, w.agent_version || "—", h("small", null, w.os_info || "")) },
      { label: "Registered", cell: (w) => when(w.registered_at, now) },
      { label: "More", cell: (w) => more(w, now) },
      { label: "Actions", cell: (w) => {
        const button = h("button", { type: "button", class: "danger", disabled: !ctx.who.admin, title: ctx.who.admin ? null : ADMIN_ONLY,
          "aria-label": `Remove ${w.id}` }, "Remove…");
        button.addEventListener("click", () => remove(w, button));
        return button;
      } },
    ], rows, h("span", null, "No workers yet. Start one with ", h("code", null, "bloom-runtime worker --exec …"),
      ", register one with POST /api/runtime/workers, or configure membridge to sync its agents.")));
  }

  return { title: "Workers", view, load, interval: 5000 };
}
