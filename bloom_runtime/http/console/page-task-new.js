// A form for every field of a new task (POST /llm-tasks), the idempotency key included.

import { api, BASE } from "./api.js";
import { h } from "./dom.js";

function field(id, label, input, help) {
  return h("div", { class: "field" }, h("label", { for: id }, label), input, help ? h("small", { id: `${id}-help` }, help) : null);
}

function lines(value) {
  return value.split("\n").map((s) => s.trim()).filter(Boolean);
}

export default function taskForm(ctx) {
  const error = h("p", { class: "field-error", role: "alert" });
  const submit = h("button", { type: "submit", class: "primary" }, "Queue the task");
  const form = h("form", { class: "task-form", novalidate: false },
    field("context_id", "Context id", h("input", { id: "context_id", name: "context_id", required: true, maxlength: 128, autocomplete: "off" }),
      "Tasks of one context go to the worker already holding one, when it can."),
    field("agent_slug", "Agent slug", h("input", { id: "agent_slug", name: "agent_slug", required: true, maxlength: 128, autocomplete: "off" })),
    field("prompt", "Prompt", h("textarea", { id: "prompt", name: "prompt", required: true, rows: 6 })),
    field("context_hints", "Context hints", h("textarea", { id: "context_hints", name: "context_hints", rows: 3, "aria-describedby": "context_hints-help" }), "One per line."),
    h("fieldset", null, h("legend", null, "Policy"),
      field("timeout_sec", "Timeout (s)", h("input", { id: "timeout_sec", name: "timeout_sec", type: "number", min: 1, max: 3600, value: 120, required: true })),
      field("budget", "Budget", h("input", { id: "budget", name: "budget", type: "number", min: 0, step: "any", value: 0, required: true }))),
    field("desired_format", "Desired format", h("select", { id: "desired_format", name: "desired_format" },
      h("option", { value: "text", selected: true }, "text"), h("option", { value: "json" }, "json"))),
    field("max_attempts", "Max attempts", h("input", { id: "max_attempts", name: "max_attempts", type: "number", min: 1, max: 10, value: 3, required: true })),
    field("labels", "Labels", h("input", { id: "labels", name: "labels", autocomplete: "off", "aria-describedby": "labels-help" }),
      "Comma-separated; only workers with every label take the task."),
    field("idempotency_key", "Idempotency key", h("input", { id: "idempotency_key", name: "idempotency_key", maxlength: 255, autocomplete: "off", "aria-describedby": "idempotency_key-help" }),
      "Optional: sending the same key again returns the task created first instead of a new one."),
    error, h("div", { class: "buttons" }, h("a", { href: "#/tasks", class: "button" }, "Back"), submit));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!form.reportValidity()) return;
    const data = new FormData(form);
    const body = {
      context_id: String(data.get("context_id")).trim(),
      agent_slug: String(data.get("agent_slug")).trim(),
      prompt: String(data.get("prompt")),
      context_hints: lines(String(data.get("context_hints"))),
      policy: { timeout_sec: Number(data.get("timeout_sec")), budget: Number(data.get("budget")) },
      desired_format: data.get("desired_format"),
      max_attempts: Number(data.get("max_attempts")),
      labels: String(data.get("labels")).split(",").map((s) => s.trim()).filter(Boolean),
    };
    const key = String(data.get("idempotency_key")).trim();
    error.textContent = "";
    submit.disabled = true;
    try {
      const answer = await api(`${BASE}/llm-tasks`, { method: "POST", body, headers: key ? { "Idempotency-Key": key } : {} });
      const request = `POST /llm-tasks${answer.status === 200 ? " (idempotent retry: the task created first)" : ""}`;
      ctx.go(`#/tasks/${encodeURIComponent(answer.data.id)}`, [request, answer]);
    } catch (e) {
      error.textContent = `The server refused the task: ${e.message}`;
      ctx.report("POST /llm-tasks", e);
    } finally {
      submit.disabled = false;
    }
  });

  return { title: "New task", view: h("div", null, h("h1", null, "New task"), form), load: async () => {}, interval: 0 };
}
