// The audit log: newest first, one page at a time, by entity id and by action.

import { api, BASE, withQuery } from "./api.js";
import { h, problem, replace, table } from "./dom.js";
import { when } from "./format.js";

const PAGE_SIZE = 50;
// The actions the runtime writes (task_dead only when a first version's database is adopted).
const ACTIONS = ["task_created", "task_leased", "task_dispatched", "task_completed", "task_retry", "task_failed", "task_dead",
  "task_cancelled", "task_requeued", "lease_renewed", "lease_expired", "lease_failed",
  "dispatch_answered", "dispatch_agent_error", "dispatch_callback_missing", "dispatch_refused", "dispatch_unreachable",
  "dispatch_unknown", "worker_registered", "worker_updated", "worker_online", "worker_offline", "worker_refreshed",
  "worker_removed", "agent_updated", "agent_restarted", "agent_uninstalled", "config_updated", "leadership_selected",
  "leadership_select_refused", "leadership_select_failed"];

function entityLink(e) {
  if (e.entity_type === "task") return h("a", { href: `#/tasks/${encodeURIComponent(e.entity_id)}` }, h("code", { class: "id" }, e.entity_id));
  return h("code", { class: "id" }, e.entity_id);
}

export default function audit(ctx) {
  const entity = (ctx.query.get("entity_id") || "").trim();
  const action = (ctx.query.get("action") || "").trim();
  const cursors = [null];
  let next = null;

  const form = h("form", { class: "filters", role: "search" },
    h("label", { for: "entity_id" }, "Entity id"),
    h("input", { id: "entity_id", name: "entity_id", value: entity, autocomplete: "off", spellcheck: "false", placeholder: "task, lease or worker id" }),
    h("label", { for: "action" }, "Action"),
    h("input", { id: "action", name: "action", value: action, list: "actions", autocomplete: "off", spellcheck: "false" }),
    h("datalist", { id: "actions" }, ACTIONS.map((a) => h("option", { value: a }))),
    h("button", { type: "submit" }, "Filter"),
    entity || action ? h("a", { href: "#/audit", class: "button" }, "Clear") : null);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const query = new URLSearchParams();
    for (const name of ["entity_id", "action"]) {
      const value = String(data.get(name) || "").trim();
      if (value) query.set(name, value);
    }
    ctx.go(`#/audit${query.toString() ? `?${query}` : ""}`);
  });
  const list = h("div", { "aria-live": "polite" });
  const pager = h("div", { class: "pager" });
  const view = h("div", null, h("h1", null, "Audit"), form, list, pager);

  async function load(signal) {
    let answer;
    try {
      answer = await api(withQuery(`${BASE}/audit`, { entity_id: entity, action, limit: PAGE_SIZE, cursor: cursors[cursors.length - 1] }), { signal });
    } catch (error) {
      replace(list, problem(error, "load the audit log"));
      throw error;
    }
    next = answer.next;
    const now = Date.now();
    replace(list, table([
      { label: "When", cell: (e) => when(e.timestamp, now) },
      { label: "Action", cell: (e) => e.action },
      { label: "Entity", cell: (e) => h("span", { class: "stack" }, h("small", null, e.entity_type), entityLink(e)) },
      { label: "Who", cell: (e) => e.actor },
      { label: "Detail", cell: (e) => e.detail || "—" },
    ], answer.data, entity || action ? "No entries match. Entity ids and actions match exactly." : "The audit log is empty."));
    const back = h("button", { type: "button", disabled: cursors.length < 2 }, "← Newer");
    const fwd = h("button", { type: "button", disabled: !next }, "Older →");
    back.addEventListener("click", () => { cursors.pop(); ctx.refresh(); });
    fwd.addEventListener("click", () => { cursors.push(next); ctx.refresh(); });
    replace(pager, cursors.length > 1 || next ? [back, h("span", { class: "muted" }, `page ${cursors.length}`), fwd] : null);
  }

  return { title: "Audit", view, load, interval: 5000 };
}
