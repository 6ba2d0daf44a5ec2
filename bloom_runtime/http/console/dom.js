// Building the page: every server string goes in as text (a Text node or an
// attribute value), never as HTML.

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(el, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "on") {
      for (const [event, handler] of Object.entries(value)) el.addEventListener(event, handler);
    } else if (name === "class") {
      el.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    } else if (name.startsWith("on") || name === "style" || name === "srcdoc") {
      throw new Error(`refusing attribute ${name}`);
    } else if (name === "href" && !/^[#/]/.test(String(value))) {
      throw new Error("links stay on this origin");
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

/** Append children: strings and numbers as text, nodes as they are; null and false skipped. */
export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function h(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

export function svg(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Replace everything in `el` with `children`. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/** A table: columns are {label, cell(row) → node or text, class}; `empty` shows when there are no rows. */
export function table(columns, rows, empty, caption) {
  const head = h("tr", null, columns.map((c) => h("th", { scope: "col", class: c.class }, c.label)));
  const body = rows.length
    ? rows.map((row) => h("tr", null, columns.map((c) => h("td", { class: c.class, "data-label": c.label }, c.cell(row)))))
    : [h("tr", null, h("td", { colspan: columns.length, class: "empty" }, empty))];
  return h("div", { class: "scroll" }, h("table", null, caption ? h("caption", null, caption) : null, h("thead", null, head), h("tbody", null, body)));
}

/** A notice saying what went wrong and what to do. */
export function problem(error, what) {
  const status = error && error.status ? ` (HTTP ${error.status})` : "";
  const message = error && error.message ? error.message : String(error);
  return h("p", { class: "notice error", role: "alert" }, `Could not ${what}${status}: ${message}. `,
    error && error.status >= 500 ? "The server or its database may be down; the console retries on its own." : "");
}

/**
 * A full id in monospace (selected whole by one click, or a link when `href` is given),
 * with a copy button where the browser allows it.
 */
export function copyable(id, href) {
  const code = h("code", { class: "id" }, id);
  const shown = href ? h("a", { href }, code) : code;
  if (!navigator.clipboard) return shown;
  const button = h("button", { type: "button", class: "copy", "aria-label": `Copy ${id}`, title: "Copy to the clipboard" }, "Copy");
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(id);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Select it instead";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  return h("span", { class: "idbox" }, shown, button);
}

export function badge(status) {
  return h("span", { class: ["badge", `s-${String(status).replace(/[^a-z-]/g, "")}`] }, status);
}
