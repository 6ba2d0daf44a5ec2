"""What one open console costs: the page weight of a cold load of the overview, and the
requests per minute the open overview sends to the server.

Starts ``bloom-runtime serve`` on a fresh SQLite file (or a new PostgreSQL database from
--pg ADMIN_URL) with an API key, adds --tasks tasks and a few workers, opens the console
in headless Chromium (Debian's, through Playwright), signs in, and reports:

  page weight   bytes on the wire (headers and bodies, as Chromium's network log counts
                them) for a cold load of the overview: the page, its scripts, styles and
                icon, and its first data requests; and the same without the data
  requests/min  requests the open overview sent during --seconds of real time, scaled
                to one minute, in total and by path

    python bench/console_page.py
    python bench/console_page.py --tasks 100000 --seconds 60
    python bench/console_page.py --pg postgresql://bloom@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

REPO = Path(__file__).resolve().parents[1]
KEY = "bench-console-key-01"
CHROMIUM = os.environ.get("BLOOM_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_tasks(url: str, n: int) -> None:
    """Bulk-load ``n`` tasks straight with SQL (mostly completed, some queued and failed)."""
    now = int(time.time() * 1000)
    rows = [
        (str(uuid.uuid4()), f"ctx-{i % 500}", f"agent-{i % 5}", "bench prompt",
         "queued" if i % 100 == 0 else "failed" if i % 50 == 1 else "completed", now - (n - i) * 10, now - (n - i) * 10)
        for i in range(n)
    ]  # fmt: skip
    sql = ("INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, status, created_at, updated_at, attempts, max_attempts) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, 1, 3)")
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        with conn:
            conn.executemany(sql, rows)
        conn.close()
        return
    import psycopg

    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.executemany(sql.replace("?", "%s"), rows)
        cur.execute("ANALYZE")


def measure(origin: str, seconds: float) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # Sign in once, then measure a cold load in a fresh context with the key already in the tab.
        context = browser.new_context()
        context.add_init_script(f"sessionStorage.setItem('bloom-runtime.api-key', {KEY!r})")
        page = context.new_page()
        cdp = context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.setCacheDisabled", {"cacheDisabled": True})
        sizes: dict[str, int] = {}
        urls: dict[str, str] = {}
        cdp.on("Network.requestWillBeSent", lambda e: urls.__setitem__(e["requestId"], e["request"]["url"]))
        cdp.on("Network.loadingFinished", lambda e: sizes.__setitem__(e["requestId"], int(e["encodedDataLength"])))
        page.goto(f"{origin}/")
        page.locator("main[data-loads]").wait_for(state="attached")
        page.wait_for_load_state("networkidle")
        cold = [(urls.get(rid, "?"), size) for rid, size in sizes.items()]
        cdp.send("Network.setCacheDisabled", {"cacheDisabled": False})

        sent: list[tuple[float, str]] = []
        page.on("request", lambda r: sent.append((time.monotonic(), urlsplit(r.url).path)))
        started = time.monotonic()
        page.wait_for_timeout(seconds * 1000)  # real time: this is the measurement
        elapsed = time.monotonic() - started
        browser.close()
    static = sum(size for url, size in cold if "/api/" not in url)
    return {
        "cold_bytes": sum(size for _, size in cold),
        "cold_static_bytes": static,
        "cold_requests": len(cold),
        "per_minute": len(sent) * 60 / elapsed,
        "by_path": collections.Counter(path for _, path in sent),
        "elapsed": elapsed,
        "files": sorted(cold, key=lambda x: -x[1]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks loaded before measuring (default 10000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the overview stays open (default 60)")
    parser.add_argument("--pg", metavar="ADMIN_URL", help="PostgreSQL server to create a scratch database on (default: SQLite)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        db_name = None
        if args.pg:
            import psycopg

            db_name = f"bloom_bench_console_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(args.pg, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{db_name}"')  # our own name, not input
            url = urlunsplit(urlsplit(args.pg)._replace(path="/" + db_name))
        else:
            url = f"sqlite:///{tmp}/bench.db"
        try:
            subprocess.run([sys.executable, "-m", "bloom_runtime.cli", "migrate", "--database-url", url], check=True, cwd=REPO,
                           stdout=subprocess.DEVNULL)
            load_tasks(url, args.tasks)
            port = free_port()
            env = {**os.environ, "RUNTIME_API_KEY": f"bench={KEY}"}
            server = subprocess.Popen([sys.executable, "-m", "bloom_runtime.cli", "serve", "--port", str(port), "--database-url", url],
                                      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            origin = f"http://127.0.0.1:{port}"
            try:
                with requests.Session() as s:
                    s.headers["X-Runtime-API-Key"] = KEY
                    for _ in range(200):
                        try:
                            if s.get(f"{origin}/api/runtime/health", timeout=1).ok:
                                break
                        except requests.ConnectionError:
                            pass
                        time.sleep(0.1)  # waiting for the server to listen
                    for i in range(5):
                        s.post(f"{origin}/api/runtime/workers", json={"name": f"bench-w{i}", "capabilities": {"max_concurrency": 4}}).raise_for_status()
                result = measure(origin, args.seconds)
            finally:
                server.terminate()
                server.wait(timeout=30)
        finally:
            if db_name:
                import psycopg

                with psycopg.connect(args.pg, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')

    store = "PostgreSQL" if args.pg else "SQLite"
    print(f"console overview, {store}, {args.tasks} tasks, 5 workers")
    print(f"  cold load: {result['cold_bytes']:,} bytes in {result['cold_requests']} requests "
          f"({result['cold_static_bytes']:,} bytes of page, scripts, styles and icon; the rest is the first data)")
    for url, size in result["files"]:
        print(f"    {size:>8,}  {urlsplit(url).path}")
    print(f"  open for {result['elapsed']:.0f} s: {result['per_minute']:.1f} requests per minute")
    for path, n in sorted(result["by_path"].items()):
        print(f"    {n * 60 / result['elapsed']:>5.1f}/min  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
