// Tasks: newest first, by status, searched by task id, context id or agent slug;
// one page at a time (cursor paging), with the lease expiry of the tasks shown.

import { api, ApiError, BASE, withQuery } from "./api.js";
import { badge, copyable, h, problem, replace, table } from "./dom.js";
import { when } from "./format.js";

export const TASK_STATUSES = ["queued", "leased", "running", "completed", "failed", "dead", "cancelled"];
const FIELDS = { id: "Task id", context_id: "Context id", agent_slug: "Agent slug" };
const PAGE_SIZE = 50;

function hashFor(params) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v));
  const text = query.toString();
  return `#/tasks${text ? `?${text}` : ""}`;
}

function select(id, label, options, value) {
  return [h("label", { for: id }, label),
    h("select", { id, name: id }, options.map(([v, text]) => h("option", { value: v, selected: v === value }, text)))];
}

export default function tasks(ctx) {
  const status = TASK_STATUSES.includes(ctx.query.get("status")) ? ctx.query.get("status") : "";
  const field = FIELDS[ctx.query.get("field")] ? ctx.query.get("field") : "id";
  const q = (ctx.query.get("q") || "").trim();
  const cursors = [null]; // cursors of the pages seen, to go back
  let next = null;

  const search = h("input", { id: "q", name: "q", type: "search", value: q, placeholder: "exact value", autocomplete: "off", spellcheck: "false" });
  const form = h("form", { class: "filters", role: "search" },
    select("status", "Status", [["", "any"], ...TASK_STATUSES.map((s) => [s, s])], status),
    select("field", "Search in", Object.entries(FIELDS), field),
    h("label", { for: "q" }, "Value"), search,
    h("button", { type: "submit" }, "Search"),
    q || status ? h("a", { href: "#/tasks", class: "button" }, "Clear") : null);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const value = String(data.get("q") || "").trim();
    ctx.go(hashFor({ status: data.get("status"), field: value ? data.get("field") : "", q: value }));
  });
  const results = h("div", { "aria-live": "polite" });
  const pager = h("div", { class: "pager" });
  const view = h("div", null,
    h("div", { class: "row" }, h("h1", null, "Tasks"), h("a", { href: "#/tasks/new", class: "button primary" }, "New task")),
    form, results, pager);

  function showPager() {
    const back = h("button", { type: "button", disabled: cursors.length < 2 }, "← Newer");
    const fwd = h("button", { type: "button", disabled: !next }, "Older →");
    back.addEventListener("click", () => { cursors.pop(); ctx.refresh(); });
    fwd.addEventListener("click", () => { cursors.push(next); ctx.refresh(); });
    replace(pager, cursors.length > 1 || next ? [back, h("span", { class: "muted" }, `page ${cursors.length}`), fwd] : null);
  }

  async function load(signal) {
    let rows;
    try {
      if (q && field === "id") {
        try {
          rows = [(await api(`${BASE}/llm-tasks/${encodeURIComponent(q)}`, { signal })).data];
        } catch (error) {
          if (!(error instanceof ApiError) || (error.status !== 404 && error.status !== 400)) throw error;
          rows = [];
        }
        next = null;
        if (status) rows = rows.filter((t) => t.status === status);
      } else {
        const params = { status, limit: PAGE_SIZE, cursor: cursors[cursors.length - 1] };
        if (q) params[field] = q;
        const answer = await api(withQuery(`${BASE}/llm-tasks`, params), { signal });
        rows = answer.data;
        next = answer.next;
      }
      const holding = rows.filter((t) => t.lease_id && (t.status === "leased" || t.status === "running"));
      const expiry = {};
      if (holding.length) {
        const leases = await api(withQuery(`${BASE}/leases`, { status: "active", limit: 100, task_id: holding.map((t) => t.id).join(",") }), { signal });
        for (const lease of leases.data) expiry[lease.task_id] = lease.expires_at;
      }
      const now = Date.now();
      const empty = q ? `No task matches ${FIELDS[field].toLowerCase()} “${q}”${status ? ` with status ${status}` : ""}. Values match exactly.`
        : status ? `No ${status} tasks.` : h("span", null, "No tasks yet. ", h("a", { href: "#/tasks/new" }, "Create one"), " or POST /api/runtime/llm-tasks.");
      replace(results, table([
        { label: "Task", cell: (t) => copyable(t.id, `#/tasks/${encodeURIComponent(t.id)}`) },
        { label: "Status", cell: (t) => badge(t.status) },
        { label: "Agent", cell: (t) => t.agent_slug },
        { label: "Context", cell: (t) => t.context_id },
        { label: "Age", cell: (t) => when(t.created_at, now) },
        { label: "Attempts", cell: (t) => `${t.attempts}/${t.max_attempts}`, class: "num" },
        { label: "Worker", cell: (t) => t.worker_id || "—" },
        { label: "Lease expires", cell: (t) => (expiry[t.id] ? when(expiry[t.id], now) : "—") },
      ], rows, empty));
      showPager();
    } catch (error) {
      replace(results, problem(error, "load tasks"));
      throw error;
    }
  }

  return { title: "Tasks", view, load, interval: 5000 };
}
