// One task: every field, the prompt, its latest push delivery, its results and
// artifacts, every lease it had, its audit trail; cancel, requeue, lease and dispatch,
// each confirmed first.

import { api, BASE, withQuery } from "./api.js";
import { badge, copyable, h, problem, replace, table } from "./dom.js";
import { duration, text, when } from "./format.js";

const TIME_FIELDS = /(_at|not_before|last_heartbeat)$/;
const LONG_FIELDS = new Set(["prompt", "delivery"]);
// What became of a push delivery (the runtime's delivery states), as a reader wants it said.
const DELIVERY = {
  sent: "posted to the agent; waiting for its answer (it answers once the run is over)",
  answered: "the agent answered and its result arrived",
  agent_error: "the agent answered ok: false; its error result is retried while attempts are left",
  callback_missing: "the agent answered, but its result never reached the runtime; the task is retried",
  refused: "the agent refused it (4xx, or 503 without claude): nothing ran",
  unreachable: "never reached the agent; the lease failed and the attempt was given back",
  unknown: "no answer in time: the run may still be going; the lease is left to its TTL",
};
const CONTENT_PREVIEW = 4000; // characters shown before "show all"

function value(name, v, now) {
  if (v !== null && typeof v === "number" && TIME_FIELDS.test(name)) return when(v, now);
  if (name === "id" || name.endsWith("_id")) return v ? copyable(String(v)) : "—";
  return text(v);
}

function fields(record, now, skip = LONG_FIELDS) {
  return h("dl", { class: "facts" }, Object.entries(record).filter(([k]) => !skip.has(k)).map(([k, v]) => [h("dt", null, k), h("dd", null, value(k, v, now))]));
}

function delivery(d, now) {
  if (!d) return h("p", { class: "muted" }, "Never pushed to a worker agent (pulled, leased by hand, or still queued).");
  return h("div", null,
    h("p", null, badge(d.state), " ", DELIVERY[d.state] || "", d.detail ? h("span", { class: "muted" }, ` · ${d.detail}`) : null),
    h("dl", { class: "facts" },
      h("dt", null, "Worker"), h("dd", null, d.worker_id),
      h("dt", null, "URL"), h("dd", null, h("code", { class: "url" }, d.url)),
      h("dt", null, "Lease"), h("dd", null, copyable(d.lease_id)),
      h("dt", null, "Agent answered"), h("dd", null, d.agent_status === null ? "—" : `HTTP ${d.agent_status}`),
      h("dt", null, "Sent"), h("dd", null, when(d.created_at, now)),
      h("dt", null, d.finished_at === null ? "Waits until" : "Ended"), h("dd", null, when(d.finished_at ?? d.deadline_at, now))));
}

function longText(content) {
  if (content === null || content === undefined) return h("p", { class: "muted" }, "(none)");
  const full = String(content);
  if (full.length <= CONTENT_PREVIEW) return h("pre", null, full);
  const pre = h("pre", null, full.slice(0, CONTENT_PREVIEW), "…");
  const more = h("button", { type: "button" }, `Show all ${full.length.toLocaleString()} characters`);
  more.addEventListener("click", () => { pre.textContent = full; more.remove(); });
  return h("div", null, pre, more);
}

export default function taskDetail(ctx, taskId) {
  const path = `${BASE}/llm-tasks/${encodeURIComponent(taskId)}`;
  const head = h("div");
  const actions = h("div", { class: "actions" });
  const body = h("div");
  const view = h("div", null, h("p", null, h("a", { href: "#/tasks" }, "← Tasks")), h("h1", null, "Task"), head, actions, body);
  let actionKey = null;

  async function act(button, label, request, message, confirmLabel, payload) {
    if (!(await ctx.confirm(label, message, confirmLabel))) return;
    button.disabled = true;
    try {
      ctx.report(`POST ${request}`, await api(`${path}/${request}`, { method: "POST", body: payload() }));
    } catch (error) {
      ctx.report(`POST ${request}`, error);
    }
    ctx.refresh();
  }

  function renderActions(task, workers) {
    const key = `${task.status}|${workers.map((w) => w.id).join(",")}`;
    if (key === actionKey) return;
    actionKey = key;
    const cancel = h("button", { type: "button", class: "danger", disabled: !["queued", "leased", "running"].includes(task.status) }, "Cancel…");
    const requeue = h("button", { type: "button", disabled: !["failed", "dead"].includes(task.status) }, "Requeue…");
    cancel.addEventListener("click", () => act(cancel, "Cancel this task?", "cancel",
      "It moves to cancelled; a worker holding it loses its lease. This cannot be undone (requeue takes only failed or dead tasks).", "Cancel the task", () => undefined));
    requeue.addEventListener("click", () => act(requeue, "Requeue this task?", "requeue",
      "It goes back to the queue with its attempts reset to 0.", "Requeue", () => undefined));
    const queued = task.status === "queued";
    const picker = h("select", { id: "worker", name: "worker", disabled: !queued },
      h("option", { value: "" }, "the best worker (the runtime picks)"),
      workers.map((w) => h("option", { value: w.id }, `${w.id} · ${w.status} · ${w.active_leases}/${w.capabilities?.max_concurrency ?? "?"} busy${w.url_verified ? "" : " · no push (URL unverified or none)"}`)));
    const chosen = () => (picker.value ? { worker_id: picker.value } : {});
    const target = () => picker.value || "the best worker";
    const lease = h("button", { type: "button", disabled: !queued }, "Lease…");
    const dispatch = h("button", { type: "button", disabled: !queued }, "Dispatch…");
    lease.addEventListener("click", () => act(lease, "Lease this task?", "lease",
      `A lease is granted to ${target()}; the worker must heartbeat or the lease expires and the task is retried.`, "Lease", chosen));
    dispatch.addEventListener("click", () => act(dispatch, "Dispatch this task?", "dispatch",
      `The task is leased to ${target()} and posted to its agent's /execute-task (only a worker with a verified URL); the delivery shows below as it goes.`, "Dispatch", chosen));
    replace(actions,
      h("div", { class: "buttons" }, cancel, requeue),
      h("div", { class: "buttons" }, h("label", { for: "worker" }, "To"), picker, lease, dispatch),
      queued ? null : h("p", { class: "muted" }, "Lease and dispatch take queued tasks only."));
  }

  async function load(signal) {
    const get = (p) => api(p, { signal }).then((r) => r.data);
    let task, results, artifacts, leases, trail, workers;
    try {
      task = await get(path);
      [results, artifacts, leases, trail, workers] = await Promise.all([
        get(withQuery(`${BASE}/results`, { task_id: taskId, limit: 20 })),
        get(withQuery(`${BASE}/artifacts`, { task_id: taskId, limit: 20 })),
        get(withQuery(`${BASE}/leases`, { task_id: taskId, limit: 100 })),
        get(withQuery(`${BASE}/audit`, { entity_id: taskId, limit: 200 })),
        task.status === "queued" ? get(`${BASE}/workers`) : Promise.resolve([]),
      ]);
    } catch (error) {
      replace(head, problem(error, error.status === 404 ? "find this task (check the id)" : "load the task"));
      throw error;
    }
    const now = Date.now();
    replace(head, h("p", { class: "title-line" }, copyable(task.id), " ", badge(task.status), " ",
      h("span", { class: "muted" }, `${task.agent_slug} in ${task.context_id}, attempt ${task.attempts}/${task.max_attempts}, created `), when(task.created_at, now)));
    renderActions(task, workers);
    replace(body,
      h("section", { "aria-labelledby": "fields" }, h("h2", { id: "fields" }, "Fields"), fields(task, now)),
      h("section", { "aria-labelledby": "prompt" }, h("h2", { id: "prompt" }, "Prompt"), longText(task.prompt)),
      h("section", { "aria-labelledby": "delivery" }, h("h2", { id: "delivery" }, "Push delivery"), delivery(task.delivery, now)),
      h("section", { "aria-labelledby": "results" }, h("h2", { id: "results" }, "Results"),
        results.length ? results.map((r) => h("article", { class: "result" },
          h("p", null, badge(r.status), " by ", r.worker_id || "—", " ", when(r.completed_at, now),
            r.metrics && r.metrics.duration_ms !== undefined ? ` · ran ${duration(r.metrics.duration_ms)}` : ""),
          r.output !== null ? [h("h3", null, "Output"), longText(r.output)] : null,
          r.error_message !== null ? [h("h3", null, "Error"), longText(r.error_message)] : null,
          h("details", null, h("summary", null, "Every field"), fields(r, now, new Set(["output", "error_message"])))))
          : h("p", { class: "muted" }, "No result yet: a worker reports one when it completes the task.")),
      h("section", { "aria-labelledby": "artifacts" }, h("h2", { id: "artifacts" }, "Artifacts"),
        artifacts.length ? artifacts.map((a) => h("article", { class: "result" },
          h("p", null, a.type, " ", when(a.created_at, now), a.tags.length ? ` · tags ${a.tags.join(", ")}` : ""), longText(a.content)))
          : h("p", { class: "muted" }, "No artifacts yet.")),
      h("section", { "aria-labelledby": "leases" }, h("h2", { id: "leases" }, "Leases"),
        table([
          { label: "Lease", cell: (l) => copyable(l.id) },
          { label: "Worker", cell: (l) => l.worker_id },
          { label: "Started", cell: (l) => when(l.started_at, now) },
          { label: "Last heartbeat", cell: (l) => when(l.last_heartbeat, now) },
          { label: "Expires / expired", cell: (l) => when(l.expires_at, now) },
          { label: "TTL", cell: (l) => duration(l.ttl_seconds * 1000) },
          { label: "How it ended", cell: (l) => badge(l.status) },
        ], leases, "Never leased.")),
      h("section", { "aria-labelledby": "trail" }, h("h2", { id: "trail" }, "Audit trail"),
        table([
          { label: "When", cell: (e) => when(e.timestamp, now) },
          { label: "Action", cell: (e) => e.action },
          { label: "Who", cell: (e) => e.actor },
          { label: "Detail", cell: (e) => e.detail || "—" },
        ], trail, "No audit entries.")));
  }

  return { title: `Task ${taskId}`, view, load, interval: 5000 };
}
