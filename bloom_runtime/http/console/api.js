// The one way the console reaches the server: the public JSON API of this origin,
// with the API key from sessionStorage in X-Runtime-API-Key (never in a URL).

const KEY_ITEM = "bloom-runtime.api-key";
const HEADER = "X-Runtime-API-Key";

export class ApiError extends Error {
  constructor(status, body, retryAfter) {
    const message = body && typeof body === "object" && typeof body.error === "string" ? body.error : `HTTP ${status}`;
    super(message);
    this.status = status;
    this.body = body;
    this.retryAfter = retryAfter;
  }
}

export const keyStore = {
  get: () => sessionStorage.getItem(KEY_ITEM),
  set: (key) => sessionStorage.setItem(KEY_ITEM, key),
  clear: () => sessionStorage.removeItem(KEY_ITEM),
};

let unauthorized = () => {};

/** Called with the error whenever the server answers 401 (the key is missing or wrong). */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

/** The cursor of the next page, from `Link: <…?cursor=…>; rel="next"`. */
function nextCursor(link) {
  const match = link && /<([^>]*)>\s*;\s*rel="next"/.exec(link);
  return match ? new URL(match[1], location.origin).searchParams.get("cursor") : null;
}

/** `path` with the query parameters that have a value. */
export function withQuery(path, params) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") query.set(name, String(value));
  }
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

/**
 * One request. Resolves to {status, data, next}; rejects with ApiError for any
 * non-2xx answer (after telling the 401 handler), or with the fetch error.
 */
export async function api(path, { method = "GET", body, signal, key, headers = {} } = {}) {
  const sent = { Accept: "application/json", ...headers };
  const useKey = key !== undefined ? key : keyStore.get();
  if (useKey) sent[HEADER] = useKey;
  if (body !== undefined) sent["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers: sent,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
    credentials: "omit",
    redirect: "error",
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = text;
  }
  if (!response.ok) {
    const error = new ApiError(response.status, data, response.headers.get("Retry-After"));
    if (response.status === 401 && key === undefined) unauthorized(error);
    throw error;
  }
  return { status: response.status, data, next: nextCursor(response.headers.get("Link")) };
}

export const BASE = "/api/runtime";
