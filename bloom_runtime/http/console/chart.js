// Charts drawn as SVG by hand: lines (gaps where no sample exists) or stacked bars,
// with the values of each bucket on hover and a text summary for screen readers.

import { h, svg } from "./dom.js";
import { num } from "./format.js";

const W = 640;
const H = 170;
const LEFT = 44;
const RIGHT = 8;
const TOP = 10;
const BOTTOM = 22;

function niceMax(value) {
  if (value <= 4) return 4;
  const step = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
  return 10 * step;
}

function clock(ms, withDay) {
  const d = new Date(ms);
  const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return withDay ? `${d.toLocaleDateString([], { month: "short", day: "numeric" })} ${time}` : time;
}

/**
 * points: [{at, …values}]; series: [{key, label, cls}]; kind: "line" | "bars";
 * bucketMs: the width of one point in time.
 */
export function chart({ title, points, series, kind, bucketMs }) {
  const n = points.length;
  const plotW = W - LEFT - RIGHT;
  const plotH = H - TOP - BOTTOM;
  const step = plotW / Math.max(n, 1);
  const totals = points.map((p) =>
    kind === "bars" ? series.reduce((sum, s) => sum + (p[s.key] || 0), 0) : Math.max(0, ...series.map((s) => p[s.key] ?? 0)));
  const top = niceMax(Math.max(0, ...totals));
  const y = (v) => TOP + plotH - (v / top) * plotH;
  const x = (i) => LEFT + i * step + step / 2;

  const parts = [
    svg("line", { x1: LEFT, x2: W - RIGHT, y1: y(0), y2: y(0), class: "axis" }),
    svg("line", { x1: LEFT, x2: W - RIGHT, y1: y(top / 2), y2: y(top / 2), class: "grid" }),
    svg("line", { x1: LEFT, x2: W - RIGHT, y1: y(top), y2: y(top), class: "grid" }),
    svg("text", { x: LEFT - 6, y: y(0) + 4, class: "tick end" }, "0"),
    svg("text", { x: LEFT - 6, y: y(top / 2) + 4, class: "tick end" }, num(top / 2)),
    svg("text", { x: LEFT - 6, y: y(top) + 4, class: "tick end" }, num(top)),
  ];
  if (n) {
    const span = points[n - 1].at - points[0].at;
    const withDay = span >= 12 * 3_600_000;
    parts.push(svg("text", { x: LEFT, y: H - 6, class: "tick" }, clock(points[0].at, withDay)));
    parts.push(svg("text", { x: W - RIGHT, y: H - 6, class: "tick end" }, "now"));
  }
  if (kind === "line") {
    for (const s of series) {
      let d = "";
      let pen = false;
      points.forEach((p, i) => {
        const v = p[s.key];
        if (v === null || v === undefined) {
          pen = false;
          return;
        }
        d += `${pen ? "L" : "M"}${x(i).toFixed(1)} ${y(v).toFixed(1)} `;
        pen = true;
      });
      if (d) parts.push(svg("path", { d: d.trim(), class: ["line", s.cls] }));
      // A lone sample between gaps has no segment: show it as a dot.
      points.forEach((p, i) => {
        const v = p[s.key];
        const alone = v !== null && v !== undefined && (points[i - 1]?.[s.key] ?? null) === null && (points[i + 1]?.[s.key] ?? null) === null;
        if (alone) parts.push(svg("circle", { cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 4, class: ["dot", s.cls] }));
      });
    }
  } else {
    const width = Math.max(1, step - (step > 4 ? 1.5 : 0.3));
    points.forEach((p, i) => {
      let base = 0;
      for (const s of series) {
        const v = p[s.key] || 0;
        if (!v) continue;
        parts.push(svg("rect", { x: (x(i) - width / 2).toFixed(1), y: y(base + v).toFixed(1), width: width.toFixed(1),
          height: Math.max(0.5, y(base) - y(base + v)).toFixed(1), class: ["bar", s.cls] }));
        base += v;
      }
    });
  }
  // One invisible column per bucket carries its values as a tooltip.
  points.forEach((p, i) => {
    const values = series.map((s) => `${s.label} ${p[s.key] === null || p[s.key] === undefined ? "—" : num(p[s.key])}`).join(", ");
    const label = `${clock(p.at, true)}–${clock(p.at + bucketMs, false)}: ${values}`;
    parts.push(svg("rect", { x: (LEFT + i * step).toFixed(1), y: TOP, width: step.toFixed(2), height: plotH, class: "hover" },
      svg("title", null, label)));
  });
  const last = points[n - 1];
  const summary = last ? `${title}; latest: ${series.map((s) => `${s.label} ${last[s.key] ?? "no sample"}`).join(", ")}` : `${title}: no data`;
  return h("figure", { class: "chart" },
    h("figcaption", null, title),
    svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": summary, preserveAspectRatio: "xMidYMid meet" }, parts),
    h("ul", { class: "legend" }, series.map((s) => h("li", null, h("span", { class: ["swatch", s.cls], "aria-hidden": "true" }), s.label))));
}
