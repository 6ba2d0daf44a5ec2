// Times and numbers as people read them: relative, with the exact time on hover.

import { h } from "./dom.js";

const UNITS = [
  ["d", 86_400_000],
  ["h", 3_600_000],
  ["min", 60_000],
  ["s", 1000],
];

/** A duration in ms as "3 h 20 min", "42 s", "850 ms". */
export function duration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "—";
  const abs = Math.abs(ms);
  if (abs < 1000) return `${Math.round(abs)} ms`;
  const parts = [];
  let rest = abs;
  for (const [unit, size] of UNITS) {
    if (rest >= size) {
      const n = Math.floor(rest / size);
      parts.push(`${n} ${unit}`);
      rest -= n * size;
    }
    if (parts.length === 2) break;
  }
  return parts.join(" ");
}

export function exact(ms) {
  const d = new Date(ms);
  return `${d.toLocaleString()} (${d.toISOString()})`;
}

/** `<time>`: "5 min ago" or "in 30 s", the exact local and UTC time on hover. */
export function when(ms, now = Date.now()) {
  if (ms === null || ms === undefined) return h("span", { class: "muted" }, "—");
  const delta = ms - now;
  const text = Math.abs(delta) < 1000 ? "now" : delta < 0 ? `${duration(-delta)} ago` : `in ${duration(delta)}`;
  return h("time", { datetime: new Date(ms).toISOString(), title: exact(ms) }, text);
}

export function num(n) {
  return n === null || n === undefined ? "—" : Number(n).toLocaleString();
}

/** Any JSON value as short text. */
export function text(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}
