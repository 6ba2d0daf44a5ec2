// Membridge: the configuration (key masked), test connection, sync state, and the
// control plane's projects, leadership and nodes through the runtime's pass-through.
// Shapes are membridge's: projects {name, canonical_id}, leadership {canonical_id,
// preferred_primary, node_count, nodes}, nodes {node_id, role, last_seen (s), ip_addrs},
// select {primary_node_id}.

import { api, BASE } from "./api.js";
import { badge, h, problem, replace, table } from "./dom.js";
import { duration, num, text, when } from "./format.js";

const MB = "/api/membridge";
const ADMIN_ONLY = "Needs an admin key (RUNTIME_ADMIN_KEY)";

function projectId(p) {
  return p && typeof p === "object" ? p.canonical_id ?? p.name : p;
}

export default function membridge(ctx) {
  let selected = null;
  const current = h("div");
  const sync = h("div");
  const projects = h("div");
  const project = h("div");

  const url = h("input", { id: "mb-url", name: "membridge_server_url", type: "url", autocomplete: "off", spellcheck: "false", placeholder: "http://control-plane:8000" });
  const key = h("input", { id: "mb-key", name: "admin_key", type: "password", autocomplete: "off", placeholder: "unchanged" });
  const save = h("button", { type: "submit", class: "primary", disabled: !ctx.who.admin, title: ctx.who.admin ? null : ADMIN_ONLY }, "Save");
  const form = h("form", { class: "task-form" },
    h("div", { class: "field" }, h("label", { for: "mb-url" }, "Control plane URL"), url),
    h("div", { class: "field" }, h("label", { for: "mb-key" }, "Admin key (X-MEMBRIDGE-ADMIN)"), key, h("small", null, "Leave empty to keep the current key.")),
    h("div", { class: "buttons" }, save));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { membridge_server_url: url.value.trim() };
    if (key.value) body.admin_key = key.value;
    try {
      ctx.report("POST /config", await api(`${BASE}/config`, { method: "POST", body }));
      key.value = "";
    } catch (error) {
      ctx.report("POST /config", error);
    }
    ctx.refresh();
  });
  const test = h("button", { type: "button" }, "Test connection");
  test.addEventListener("click", async () => {
    test.disabled = true;
    try {
      ctx.report("POST /test-connection", await api(`${BASE}/test-connection`, { method: "POST", body: {} }));
    } catch (error) {
      ctx.report("POST /test-connection", error);
    }
    test.disabled = false;
    ctx.refresh();
  });
  const view = h("div", null, h("h1", null, "Membridge"),
    h("section", { "aria-labelledby": "mb-config" }, h("h2", { id: "mb-config" }, "Configuration"), current, form, h("p", null, test)),
    h("section", { "aria-labelledby": "mb-sync" }, h("h2", { id: "mb-sync" }, "Client and sync"), sync),
    h("section", { "aria-labelledby": "mb-projects" }, h("h2", { id: "mb-projects" }, "Projects"), projects, project));
  let filled = false;

  async function select(cid, node) {
    if (!(await ctx.confirm(`Make ${node} the leader of ${cid}?`, "Membridge moves the project's leadership to this node.", "Select leader"))) return;
    const path = `${MB}/projects/${encodeURIComponent(cid)}/leadership/select`;
    try {
      ctx.report(`POST ${path}`, await api(path, { method: "POST", body: { primary_node_id: node } }));
    } catch (error) {
      ctx.report(`POST ${path}`, error);
    }
    ctx.refresh();
  }

  async function loadProject(cid, signal) {
    const base = `${MB}/projects/${encodeURIComponent(cid)}`;
    const [leadership, nodes] = await Promise.all([api(`${base}/leadership`, { signal }), api(`${base}/nodes`, { signal })]);
    const list = Array.isArray(nodes.data) ? nodes.data : [];
    const facts = Object.entries(leadership.data || {}).filter(([, v]) => v === null || typeof v !== "object");
    const primary = leadership.data?.preferred_primary ?? null;
    const leads = (n) => n.role === "primary" || (primary !== null && n.node_id === primary);
    replace(project, h("h3", null, `Project ${cid}`),
      h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", null, k), h("dd", null, text(v))])),
      table([
        { label: "Node", cell: (n) => text(n.node_id) },
        { label: "Role", cell: (n) => (leads(n) ? badge("leader") : text(n.role)) },
        { label: "Last seen", cell: (n) => when(typeof n.last_seen === "number" ? n.last_seen * 1000 : null) },
        { label: "Addresses", cell: (n) => (Array.isArray(n.ip_addrs) ? n.ip_addrs.join(", ") : "—") },
        { label: "", cell: (n) => {
          const b = h("button", { type: "button", disabled: !ctx.who.admin || leads(n) || !n.node_id, title: ctx.who.admin ? null : ADMIN_ONLY }, "Make leader…");
          b.addEventListener("click", () => select(cid, n.node_id));
          return b;
        } },
      ], list, "Membridge lists no nodes for this project."));
  }

  async function load(signal) {
    let config, health;
    try {
      [config, health] = await Promise.all([
        api(`${BASE}/config`, { signal }).then((r) => r.data),
        api(`${BASE}/health`, { signal }).then((r) => r.data, (e) => (e.status === 503 ? e.body : Promise.reject(e))),
      ]);
    } catch (error) {
      replace(current, problem(error, "load the membridge configuration"));
      throw error;
    }
    if (!filled) {
      url.value = config.membridge_server_url || "";
      filled = true;
    }
    replace(current, h("dl", { class: "facts" },
      h("dt", null, "URL"), h("dd", null, config.membridge_server_url || "not set"),
      h("dt", null, "Admin key"), h("dd", null, config.admin_key || "not set"),
      h("dt", null, "Configured"), h("dd", null, badge(config.configured ? "yes" : "no"))));
    test.disabled = !config.configured;
    test.title = config.configured ? "" : "Set a URL first";
    const state = health.membridge || {};
    if (!state.configured) {
      replace(sync, h("p", { class: "muted" }, "No control plane configured: workers come only from the API and from pulling workers. Set MEMBRIDGE_SERVER_URL or save a URL above."));
      replace(projects, h("p", { class: "muted" }, "Projects appear here once membridge is configured."));
      replace(project);
      return;
    }
    const job = state.sync || {};
    replace(sync, h("dl", { class: "facts" },
      h("dt", null, "Connection"), h("dd", null, badge(state.connected ? "connected" : "disconnected")),
      h("dt", null, "Breaker"), h("dd", null, badge(state.breaker_state || state.breaker || "unknown")),
      h("dt", null, "Failures in a row"), h("dd", null, num(state.consecutiveFailures)),
      h("dt", null, "Last success"), h("dd", null, when(state.lastSuccess)),
      h("dt", null, "Last error"), h("dd", null, state.lastError || "—"),
      h("dt", null, "Last test"), h("dd", null, state.last_test ? text(state.last_test) : "never"),
      h("dt", null, "Sync"), h("dd", null, `every ${duration((job.interval_s || 0) * 1000)}, last `, when(job.last_success),
        `, ${num(job.successes)} ok, ${num(job.failures)} failed, ${num(job.agents_seen)} agents seen`)));
    let list;
    try {
      const answer = await api(`${MB}/projects`, { signal });
      list = Array.isArray(answer.data) ? answer.data : answer.data?.projects ?? [];
    } catch (error) {
      replace(projects, problem(error, "list membridge projects"));
      replace(project);
      throw error;
    }
    replace(projects, table([
      { label: "Project", cell: (p) => text(projectId(p)) },
      { label: "Name", cell: (p) => text(p?.name ?? "") },
      { label: "", cell: (p) => {
        const b = h("button", { type: "button", "aria-pressed": String(projectId(p) === selected) }, "Leadership and nodes");
        b.addEventListener("click", () => { selected = projectId(p); ctx.refresh(); });
        return b;
      } },
    ], list, "Membridge has no projects."));
    if (selected !== null) await loadProject(selected, signal);
    else replace(project);
  }

  return { title: "Membridge", view, load, interval: 15000 };
}
