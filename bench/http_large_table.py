"""HTTP read and claim latency with a large task table (default 1 000 000 rows).

Creates a fresh database (a new PostgreSQL database from --pg ADMIN_URL, or a temp
SQLite file with --sqlite), migrates it with ``bloom-runtime migrate``, bulk-loads
the tasks straight with SQL (≈97 % completed, ≈2 % failed/dead, ≈1 % queued spread
over the whole month; created_at over 30 days; many context ids; optionally a
released lease and a result per finished task), runs ANALYZE, starts
``bloom-runtime serve`` against it (rate limit off, an API key), registers a worker
with max_concurrency 32 and measures, after a short warm-up:

  list-first     GET /llm-tasks?limit=100
  list-deep      GET <Link rel=next after --deep-pages pages>
  list-mid       GET /llm-tasks?limit=100&cursor=<sort key of the row in the middle>
  list-queued    GET /llm-tasks?status=queued&limit=100
  stats          GET /stats
  claim          POST /workers/{id}/claim {"wait_seconds": 0}  (each claimed task is
                 completed right after, untimed, so capacity stays free)
  get-task       GET /llm-tasks/{id} for random ids across the table

Prints p50/p95/p99/max per kind and whether each p99 is under 20 ms. The database
(or the SQLite directory) is dropped at the end.

    python bench/http_large_table.py --pg postgresql://bloom@127.0.0.1:5432/postgres
    python bench/http_large_table.py --sqlite
    python bench/http_large_table.py --pg URL --rows 20000 --samples 50   # smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bloom_runtime.sql import cursor as page_cursor  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from http_lifecycle import percentile, rss_kib, start_server, stop_server  # noqa: E402

KEY = "bench-key-large-0001"
WORKER = "bench-large-w1"
TARGET_MS = 20.0
DAY_MS = 86_400_000
SPAN_MS = 30 * DAY_MS


# --------------------------------------------------------------------------- databases


class Database:
    """A fresh database per run (adapted from engine_lifecycle.Database, with cleanup of
    the temp directory): a temp SQLite file, or a new PostgreSQL database."""

    def __init__(self, kind: str, pg_admin_url: str | None) -> None:
        self.kind = kind
        self.pg_admin_url = pg_admin_url
        self.name = f"bloom_bench_{uuid.uuid4().hex[:10]}"
        self.tmp: str | None = None
        self.url = ""

    def __enter__(self) -> str:
        if self.kind == "sqlite":
            self.tmp = tempfile.mkdtemp(prefix="bloom-bench-large-")
            self.url = f"sqlite:///{self.tmp}/bench.db"
            return self.url
        import psycopg

        with psycopg.connect(self.pg_admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = urlunsplit(urlsplit(self.pg_admin_url)._replace(path="/" + self.name))
        return self.url

    def __exit__(self, *exc: object) -> None:
        if self.kind == "postgres":
            import psycopg

            with psycopg.connect(self.pg_admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def task_id(i: int) -> str:
    """Row i's id: a UUID string derived from i (random order across the table, yet
    recomputable here to pick ids for GET /llm-tasks/{id}). Same as md5(i)::uuid in SQL."""
    return str(uuid.UUID(hashlib.md5(str(i).encode()).hexdigest()))


def migrate(url: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "bloom_runtime.cli", "--log-level", "WARNING", "migrate", "--database-url", url],
        check=True, cwd=REPO,
    )


# Status by i % 1000: 0..9 queued (1 %), 10..14 failed, 15..19 dead (2 %), else completed.
PG_LOAD = """
INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, context_hints, policy, desired_format,
                       status, created_at, updated_at, lease_id, worker_id, attempts, max_attempts,
                       labels, not_before, idempotency_key)
SELECT md5(g::text)::uuid::text,
       'ctx-' || (g %% 20000),
       'agent-' || (g %% 7),
       'Summarise document ' || g || ' for the weekly report; keep it under 200 words.',
       '[]'::jsonb,
       '{"timeout_sec": 120, "budget": 0}'::jsonb,
       'text',
       s.status,
       s.created_at,
       s.created_at + CASE WHEN s.status = 'queued' THEN 0 ELSE 30000 END,
       CASE WHEN s.status = 'completed' THEN 'l-' || md5(g::text)::uuid::text END,
       CASE WHEN s.status = 'completed' THEN 'hist-w' || (g %% 16) END,
       CASE s.status WHEN 'queued' THEN 0 WHEN 'dead' THEN 3 ELSE 1 END,
       3,
       '[]'::jsonb,
       NULL,
       CASE WHEN g %% 3 = 0 THEN 'idem-' || g END
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g,
LATERAL (SELECT CASE WHEN g %% 1000 < 10 THEN 'queued'
                     WHEN g %% 1000 < 15 THEN 'failed'
                     WHEN g %% 1000 < 20 THEN 'dead'
                     ELSE 'completed' END AS status,
                %(start)s::bigint + (g * %(step)s)::bigint + abs(hashint4(g::int) %% 1000) AS created_at) s
"""

PG_HISTORY = [
    """
INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status,
                    last_heartbeat, context_id)
SELECT lease_id, id, worker_id, created_at + 50, created_at + 50 + 125000, 125, 'released',
       created_at + 10000, context_id
FROM llm_tasks WHERE status = 'completed'
""",
    """
INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message,
                         metrics, completed_at)
SELECT 'r-' || id, id, worker_id, NULL, 'success', 'A short summary of the document.', NULL,
       '{"duration_ms": 29000, "tokens_used": 812}'::jsonb, updated_at
FROM llm_tasks WHERE status = 'completed'
""",
]


def load_postgres(url: str, rows: int, start: int, step: int, history: bool) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        chunk = 250_000
        for lo in range(0, rows, chunk):
            hi = min(rows, lo + chunk) - 1
            conn.execute(PG_LOAD, {"lo": lo, "hi": hi, "start": start, "step": step})
            print(f"  loaded {hi + 1} tasks", flush=True)
        if history:
            for q in PG_HISTORY:
                conn.execute(q)
            print("  loaded leases and results of completed tasks", flush=True)
        conn.execute("VACUUM ANALYZE")


def sqlite_status(g: int) -> str:
    m = g % 1000
    return "queued" if m < 10 else "failed" if m < 15 else "dead" if m < 20 else "completed"


def load_sqlite(url: str, rows: int, start: int, step: int, history: bool) -> None:
    path = url[len("sqlite:///"):]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    rnd = random.Random(1)
    chunk = 200_000
    try:
        for lo in range(0, rows, chunk):
            tasks, leases, results = [], [], []
            for g in range(lo, min(rows, lo + chunk)):
                status = sqlite_status(g)
                tid = task_id(g)
                created = start + g * step + rnd.randrange(1000)
                done = status == "completed"
                lease_id = "l-" + tid if done else None
                worker = f"hist-w{g % 16}" if done else None
                tasks.append((
                    tid, f"ctx-{g % 20000}", f"agent-{g % 7}",
                    f"Summarise document {g} for the weekly report; keep it under 200 words.",
                    status, created, created + (0 if status == "queued" else 30000), lease_id, worker,
                    {"queued": 0, "dead": 3}.get(status, 1), f"idem-{g}" if g % 3 == 0 else None,
                ))
                if done and history:
                    leases.append((lease_id, tid, worker, created + 50, created + 125050, created + 10000, f"ctx-{g % 20000}"))
                    results.append(("r-" + tid, tid, worker, created + 30000))
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, context_hints, policy, desired_format,"
                " status, created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,"
                " not_before, idempotency_key) VALUES (?, ?, ?, ?, '[]', '{\"timeout_sec\": 120, \"budget\": 0}',"
                " 'text', ?, ?, ?, ?, ?, ?, 3, '[]', NULL, ?)",
                tasks,
            )
            if history:
                conn.executemany(
                    "INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status,"
                    " last_heartbeat, context_id) VALUES (?, ?, ?, ?, ?, 125, 'released', ?, ?)",
                    leases,
                )
                conn.executemany(
                    "INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message,"
                    " metrics, completed_at) VALUES (?, ?, ?, NULL, 'success', 'A short summary of the document.',"
                    " NULL, '{\"duration_ms\": 29000, \"tokens_used\": 812}', ?)",
                    results,
                )
            conn.execute("COMMIT")
            print(f"  loaded {min(rows, lo + chunk)} tasks", flush=True)
        conn.execute("ANALYZE")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def explain_stats(url: str) -> None:
    import psycopg

    from bloom_runtime.sql.queries import load

    sql = load("postgres")["stats"]
    with psycopg.connect(url) as conn:
        for _ in range(2):  # the second run has a warm cache
            plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql).fetchall()
        print("  EXPLAIN ANALYZE stats (warm):")
        for (line,) in plan:
            print("    " + line)


# --------------------------------------------------------------------------- measuring


def timed_get(s: requests.Session, url: str) -> tuple[float, requests.Response]:
    t0 = time.perf_counter()
    r = s.get(url)
    r.content  # noqa: B018 - the whole body is part of the latency
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise SystemExit(f"GET {url}: {r.status_code} {r.text[:200]}")
    return dt, r


def measure_get(s: requests.Session, url: str | list[str], samples: int, warmup: int) -> list[float]:
    urls = url if isinstance(url, list) else [url]
    for i in range(warmup):
        timed_get(s, urls[i % len(urls)])
    return [timed_get(s, urls[i % len(urls)])[0] for i in range(samples)]


def measure_claims(s: requests.Session, base: str, samples: int, warmup: int) -> tuple[list[float], int]:
    out: list[float] = []
    empty = 0
    for i in range(warmup + samples):
        t0 = time.perf_counter()
        r = s.post(f"{base}/workers/{WORKER}/claim", json={"wait_seconds": 0})
        r.content  # noqa: B018
        dt = time.perf_counter() - t0
        if r.status_code == 204:
            empty += 1
            continue
        if r.status_code != 200:
            raise SystemExit(f"claim: {r.status_code} {r.text[:200]}")
        if i >= warmup:
            out.append(dt)
        body = r.json()
        tid, lease_id = body["task"]["id"], body["lease"]["id"]
        with s.post(f"{base}/llm-tasks/{tid}/complete", json={
            "status": "success", "output": "ok", "metrics": {"tokens_used": None},
            "lease_id": lease_id, "worker_id": WORKER,
        }) as c:
            if c.status_code != 200:
                raise SystemExit(f"complete: {c.status_code} {c.text[:200]}")
    return out, empty


def next_link(r: requests.Response, base: str) -> str:
    nxt = r.links.get("next", {}).get("url")
    if not nxt:
        raise SystemExit("no Link rel=next")
    if nxt.startswith("/"):
        root = urlunsplit(urlsplit(base)._replace(path="", query="", fragment=""))
        nxt = root + nxt
    return nxt


def run(args: argparse.Namespace, kind: str) -> bool:
    now = int(time.time() * 1000)
    start = now - SPAN_MS
    step = max(1, SPAN_MS // args.rows)
    with Database(kind, args.pg) as db_url:
        print(f"{kind}: {args.rows} tasks into {db_url}", flush=True)
        migrate(db_url)
        t0 = time.perf_counter()
        (load_sqlite if kind == "sqlite" else load_postgres)(db_url, args.rows, start, step, not args.no_history)
        print(f"  load + analyze: {time.perf_counter() - t0:.1f} s", flush=True)
        if args.explain and kind == "postgres":
            explain_stats(db_url)

        proc, base = start_server(db_url, args.threads, KEY)
        results: dict[str, list[float]] = {}
        notes: list[str] = []
        try:
            print(f"  server pid {proc.pid}, RSS {(rss_kib(proc.pid) or 0) / 1024:.1f} MiB", flush=True)
            with requests.Session() as s:
                s.headers["X-Runtime-API-Key"] = KEY
                with s.post(base + "/workers", json={"name": WORKER, "capabilities": {"max_concurrency": 32}}) as r:
                    if r.status_code not in (200, 201):
                        raise SystemExit(f"register: {r.status_code} {r.text[:200]}")

                first = base + "/llm-tasks?limit=100"
                results["list-first"] = measure_get(s, first, args.samples, args.warmup)

                url = first
                for _ in range(args.deep_pages):
                    _, r = timed_get(s, url)
                    url = next_link(r, base)
                results[f"list-deep (page {args.deep_pages + 1})"] = measure_get(s, url, args.samples, args.warmup)

                # The row in the middle of the newest-first order: i = rows // 2 (created_at ascends with i
                # up to a jitter < step, so neighbouring rows may swap; any valid key is a valid cursor).
                mid = args.rows // 2
                mid_at = start + mid * step + 999
                mid_url = base + "/llm-tasks?" + f"limit=100&cursor={page_cursor.encode(mid_at, 'ffffffff')}"
                results["list-mid (row ~N/2)"] = measure_get(s, mid_url, args.samples, args.warmup)

                results["list-queued"] = measure_get(s, base + "/llm-tasks?status=queued&limit=100", args.samples, args.warmup)
                # Spread over several snapshot refreshes (MAX_AGE_S = 2 s), so a refresh in the
                # background overlaps some of the samples.
                stats: list[float] = []
                measure_get(s, base + "/stats", args.warmup, 0)
                for _ in range(args.samples):
                    stats.extend(measure_get(s, base + "/stats", 1, 0))
                    time.sleep(args.stats_gap_ms / 1000)
                results["stats"] = stats

                claims, empty = measure_claims(s, base, args.samples, args.warmup)
                results["claim"] = claims
                if empty:
                    notes.append(f"{empty} claims answered 204 (queue empty?)")

                rnd = random.Random(7)
                ids = [task_id(rnd.randrange(args.rows)) for _ in range(args.samples + args.warmup)]
                results["get-task"] = measure_get(s, [f"{base}/llm-tasks/{i}" for i in ids], args.samples, args.warmup)
            print(f"  server RSS at the end: {(rss_kib(proc.pid) or 0) / 1024:.1f} MiB", flush=True)
        finally:
            stop_server(proc)

    ok_all = True
    print(f"\n{kind}, {args.rows} tasks, {args.samples} samples per kind (after {args.warmup} warm-up), {os.cpu_count()} cores")
    print(f"{'request':<26} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}  p99 < {TARGET_MS:.0f} ms")
    for name, values in results.items():
        v = sorted(values)
        p99 = percentile(v, 99) * 1000
        ok = p99 < TARGET_MS
        ok_all &= ok
        print(f"{name:<26} {len(v):>5} {percentile(v, 50) * 1000:>8.2f} {percentile(v, 95) * 1000:>8.2f} "
              f"{p99:>8.2f} {(v[-1] if v else float('nan')) * 1000:>8.2f}  {'yes' if ok else 'NO'}")
    for n in notes:
        print("  note:", n)
    return ok_all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg", help="PostgreSQL admin URL (a database is created and dropped)")
    ap.add_argument("--sqlite", action="store_true", help="run on a temp SQLite file (as well as --pg if given)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--deep-pages", type=int, default=50, help="Link rel=next hops before the deep page")
    ap.add_argument("--threads", type=int, default=64, help="server threads")
    ap.add_argument("--stats-gap-ms", type=float, default=20.0, help="pause between /stats samples")
    ap.add_argument("--explain", action="store_true", help="PostgreSQL: EXPLAIN ANALYZE the stats query after loading")
    ap.add_argument("--no-history", action="store_true", help="no lease/result rows for completed tasks")
    args = ap.parse_args(argv)
    kinds = (["postgres"] if args.pg else []) + (["sqlite"] if args.sqlite else [])
    if not kinds:
        ap.error("give --pg ADMIN_URL and/or --sqlite")
    ok = True
    for kind in kinds:
        ok &= run(args, kind)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
