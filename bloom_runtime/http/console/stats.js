// Reading /stats: {tasks: {total, by_status: {…}, …}} or the older flat {tasks: {queued: n, …}}.

/** Counts by status of one group, whichever shape the server sends. */
export function byStatus(group) {
  if (!group || typeof group !== "object") return {};
  if (group.by_status && typeof group.by_status === "object") return group.by_status;
  const out = {};
  for (const [key, value] of Object.entries(group)) if (key !== "total" && typeof value === "number") out[key] = value;
  return out;
}

export function total(group) {
  if (group && typeof group.total === "number") return group.total;
  return Object.values(byStatus(group)).reduce((a, b) => a + b, 0);
}
