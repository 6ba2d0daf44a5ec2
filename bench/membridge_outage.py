"""Membridge outage: does the runtime keep serving, log quietly and recover by itself?

Runs ``bloom-runtime serve`` (SQLite) against the fake membridge from the tests
(sync every second), measures p50/p99 of non-membridge routes with membridge up,
then with it stopped (connections refused) for ``--down-seconds``, counts the
server's log lines about failed syncs (one per failed sync expected, no stack
traces), then restarts membridge and measures the time until a sync succeeds.

    python bench/membridge_outage.py --down-seconds 60
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.membridge_server import MembridgeServer  # noqa: E402

API = "/api/runtime"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Load:
    """Clients doing the non-membridge work: create, list, lease, heartbeat, complete."""

    def __init__(self, base: str, threads: int) -> None:
        self.base = base
        self.threads = threads
        self.samples: dict[str, list[float]] = {}
        self.errors = 0
        self._lock = threading.Lock()

    def _timed(self, name: str, session: requests.Session, method: str, path: str, **kw: object) -> requests.Response | None:
        started = time.perf_counter()
        try:
            r = session.request(method, self.base + path, timeout=10, **kw)
        except requests.RequestException:
            with self._lock:
                self.errors += 1
            return None
        elapsed = time.perf_counter() - started
        with self._lock:
            self.samples.setdefault(name, []).append(elapsed)
            if r.status_code >= 500:
                self.errors += 1
        return r

    def _worker(self, n: int, stop: threading.Event) -> None:
        worker = f"bench-w{n}"
        with requests.Session() as s:
            s.trust_env = False
            s.post(self.base + f"{API}/workers", json={"name": worker, "url": "http://127.0.0.1:9",
                                                        "capabilities": {"max_concurrency": 32}}, timeout=10)
            while not stop.is_set():
                r = self._timed("create", s, "POST", f"{API}/llm-tasks",
                                json={"context_id": f"ctx-{n}", "agent_slug": "bench", "prompt": "hi"})
                self._timed("list", s, "GET", f"{API}/llm-tasks?limit=20")
                if r is None or r.status_code != 201:
                    continue
                tid = r.json()["id"]
                lease = self._timed("lease", s, "POST", f"{API}/llm-tasks/{tid}/lease", json={"worker_id": worker})
                if lease is None or lease.status_code != 201:
                    continue
                self._timed("heartbeat", s, "POST", f"{API}/llm-tasks/{tid}/heartbeat")
                self._timed("complete", s, "POST", f"{API}/llm-tasks/{tid}/complete",
                            json={"status": "success", "output": "ok", "metrics": {"tokens_used": None}})

    def run(self, seconds: float) -> dict[str, list[float]]:
        self.samples = {}
        self.errors = 0
        stop = threading.Event()
        threads = [threading.Thread(target=self._worker, args=(i, stop)) for i in range(self.threads)]
        for t in threads:
            t.start()
        stop.wait(seconds)
        stop.set()
        for t in threads:
            t.join()
        return self.samples


def report(label: str, samples: dict[str, list[float]], errors: int) -> dict[str, float]:
    every = [v for vs in samples.values() for v in vs]
    print(f"{label}: {len(every)} requests, 5xx/errors {errors}")
    for name in ("create", "list", "lease", "heartbeat", "complete"):
        vs = samples.get(name, [])
        print(f"  {name:<10} n={len(vs):>6}  p50={pct(vs, .5) * 1000:7.2f} ms  p99={pct(vs, .99) * 1000:7.2f} ms")
    summary = {"p50": pct(every, .5) * 1000, "p99": pct(every, .99) * 1000, "n": len(every)}
    print(f"  {'all':<10} n={len(every):>6}  p50={summary['p50']:7.2f} ms  p99={summary['p99']:7.2f} ms")
    return summary


def health(base: str) -> dict:
    return requests.get(base + f"{API}/health", timeout=5).json()["membridge"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--down-seconds", type=float, default=300.0, help="how long membridge stays stopped (default 300)")
    parser.add_argument("--up-seconds", type=float, default=20.0, help="baseline measurement with membridge up")
    parser.add_argument("--sync-interval", type=float, default=1.0, help="MEMBRIDGE_SYNC_INTERVAL for the server")
    parser.add_argument("--threads", type=int, default=4, help="client threads")
    args = parser.parse_args()

    membridge = MembridgeServer().start()
    for i in (1, 2):  # agents the sync keeps finding; their URLs are never called here
        membridge.add_agent(f"node-{i}", f"http://10.0.0.{10 + i}:8001")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    tmp = Path(tempfile.mkdtemp(prefix="bloom-outage-"))
    log_path = tmp / "server.log"
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp / 'bench.db'}", "MEMBRIDGE_SERVER_URL": membridge.url,
           "MEMBRIDGE_ADMIN_KEY": "sk-bench-admin-key-0001", "MEMBRIDGE_SYNC_INTERVAL": str(args.sync_interval),
           "RATE_LIMIT_PER_S": "0", "PYTHONPATH": str(REPO)}
    for name in ("RUNTIME_API_KEY", "RUNTIME_ADMIN_KEY"):
        env.pop(name, None)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "bloom_runtime.cli", "serve", "--port", str(port)],
                                cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(base + f"{API}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                print(log_path.read_text())
                raise SystemExit("server did not start")
            time.sleep(0.1)
        load = Load(base, args.threads)
        load.run(3.0)  # warm-up: first connections, SQLite page cache, code paths
        up = report(f"membridge up ({args.up_seconds:g} s)", load.run(args.up_seconds), load.errors)
        h = health(base)
        print(f"  sync: successes={h['sync']['successes']} failures={h['sync']['failures']} breaker={h['breaker']}")

        log_before = log_path.read_text().splitlines()
        before_failures = health(base)["sync"]["failures"]
        membridge.refuse()
        down_started = time.monotonic()
        down = report(f"membridge stopped ({args.down_seconds:g} s)", load.run(args.down_seconds), load.errors)
        h = health(base)
        failed_syncs = h["sync"]["failures"] - before_failures
        new_lines = log_path.read_text().splitlines()[len(log_before):]
        sync_lines = [line for line in new_lines if "membridge sync failed" in line]
        traceback_lines = [line for line in new_lines if line.startswith(("Traceback", "  File "))]
        membridge_lines = [line for line in new_lines if "membridge" in line.lower()]
        print(f"  outage {time.monotonic() - down_started:.1f} s: failed syncs counted {failed_syncs}, skipped ticks {h['sync']['skipped']}")
        print(f"  log lines 'membridge sync failed': {len(sync_lines)}; other membridge lines: "
              f"{len(membridge_lines) - len(sync_lines)}; traceback lines: {len(traceback_lines)}")
        print(f"  breaker={h['breaker']} consecutiveFailures={h['consecutiveFailures']} lastError={h['lastError']!r}")
        if sync_lines:
            print(f"  e.g. {sync_lines[-1][:160]}")

        resumed_ms = time.time() * 1000
        membridge.resume()
        resumed = time.monotonic()
        while True:
            h = health(base)
            if (h["sync"]["last_success"] or 0) >= resumed_ms:
                break
            if time.monotonic() - resumed > 120:
                raise SystemExit("no successful sync within 120 s of membridge coming back")
            time.sleep(0.05)
        print(f"recovery: first successful sync {time.monotonic() - resumed:.2f} s after membridge came back "
              f"(breaker={h['breaker']})")
        ratio50, ratio99 = down["p50"] / up["p50"], down["p99"] / up["p99"]
        print(f"slowdown while down: p50 x{ratio50:.2f}, p99 x{ratio99:.2f}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        membridge.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
