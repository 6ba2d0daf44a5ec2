"""Database fault drill: what clients see while PostgreSQL hangs, and after its sessions are killed.

Runs ``bloom-runtime serve`` on a throwaway PostgreSQL database reached through the
tests' fault proxy, then:

1. drives a mix of requests (create with an idempotency key, list, read, claim by a
   fresh worker, /health) from several clients while the proxy hangs for
   ``--hang-seconds`` (nothing forwarded, nothing closed), and prints the worst
   request latency (and the p50) per kind;
2. once the database answers again, counts the requests answered 503 whose write
   was in fact applied (there must be none), and apart from them those answered 504
   or not at all (outcome unknown: either way is true): creates whose idempotency
   key exists, claims whose worker holds a lease. Read from the database directly;
3. terminates every session of the runtime (``pg_terminate_backend``), sends
   ``--after-requests`` requests one by one and counts the errors.

    python bench/fault_drill.py --hang-seconds 60
    python bench/fault_drill.py --hang-seconds 5 --clients 4   # a quick look

PostgreSQL comes from ``--server-url`` (default the benchmark cluster on 5432); the
drill creates its own database there and drops it at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fault_proxy import FaultProxy  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from http_lifecycle import stop_server  # noqa: E402
from membridge_outage import free_port, pct  # noqa: E402

API = "/api/runtime"
KINDS = ("create", "list", "get", "claim", "health")
UNANSWERED = 0  # the status recorded for a request that got no HTTP answer


def with_dbname(url: str, dbname: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + dbname))


@dataclass
class Sample:
    kind: str
    status: int
    seconds: float
    key: str = ""  # the idempotency key of a create, the worker of a claim


@dataclass
class Drill:
    base: str
    workers: list[str]
    timeout_s: float
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    task_id: str = ""

    def request(self, session: requests.Session, kind: str, method: str, path: str, key: str = "", **kw: object) -> Sample:
        started = time.perf_counter()
        try:
            with session.request(method, self.base + path, timeout=self.timeout_s, **kw) as r:
                status = r.status_code
        except requests.RequestException:
            status = UNANSWERED
        sample = Sample(kind, status, time.perf_counter() - started, key)
        with self.lock:
            self.samples.append(sample)
        return sample

    def next_worker(self) -> str | None:
        with self.lock:
            return self.workers.pop() if self.workers else None

    def one_of_each(self, session: requests.Session, n: int) -> None:
        kind = KINDS[n % len(KINDS)]
        if kind == "create":
            key = f"drill-{uuid.uuid4().hex}"
            self.request(session, kind, "POST", f"{API}/llm-tasks", key,
                         json={"context_id": "drill", "agent_slug": "drill", "prompt": "hi"}, headers={"Idempotency-Key": key})
        elif kind == "list":
            self.request(session, kind, "GET", f"{API}/llm-tasks?limit=20")
        elif kind == "get":
            self.request(session, kind, "GET", f"{API}/llm-tasks/{self.task_id}")
        elif kind == "claim":
            worker = self.next_worker()
            if worker is not None:
                self.request(session, kind, "POST", f"{API}/workers/{worker}/claim", worker, json={"wait_seconds": 0})
        else:
            self.request(session, kind, "GET", f"{API}/health")

    def load(self, clients: int, stop: threading.Event) -> None:
        def client(c: int) -> None:
            with requests.Session() as s:
                s.trust_env = False
                n = c
                while not stop.is_set():
                    self.one_of_each(s, n)
                    n += 1

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        stop.wait()
        for t in threads:
            t.join()


def wait_healthy(base: str, timeout_s: float) -> float:
    started = time.monotonic()
    while True:
        try:
            if requests.get(base + f"{API}/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        if time.monotonic() - started > timeout_s:
            raise SystemExit(f"the server was not healthy within {timeout_s:g} s")
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-url", default=os.environ.get("BLOOM_BENCH_DATABASE_URL", "postgresql://bloom@127.0.0.1:5432/postgres"))
    parser.add_argument("--hang-seconds", type=float, default=60.0, help="how long the database hangs (default 60)")
    parser.add_argument("--clients", type=int, default=8, help="client threads during the hang (default 8)")
    parser.add_argument("--after-requests", type=int, default=100, help="requests after pg_terminate_backend (default 100)")
    args = parser.parse_args()

    dbname = f"bloom_drill_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(args.server_url, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f'CREATE DATABASE "{dbname}"')  # our own name, not input
    direct_url = with_dbname(args.server_url, dbname)
    parts = urlsplit(direct_url)
    proxy = FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    tmp = Path(tempfile.mkdtemp(prefix="bloom-drill-"))
    log_path = tmp / "server.log"
    env = {**os.environ, "DATABASE_URL": proxy.url_for(direct_url), "RATE_LIMIT_PER_S": "0", "PYTHONPATH": str(REPO)}
    for name in ("RUNTIME_API_KEY", "RUNTIME_ADMIN_KEY"):
        env.pop(name, None)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "bloom_runtime.cli", "serve", "--port", str(port), "--threads", "64"],
                                cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_healthy(base, 60)
        with requests.Session() as s:
            s.trust_env = False
            task = s.post(base + f"{API}/llm-tasks", json={"context_id": "drill", "agent_slug": "drill", "prompt": "seed"}, timeout=10)
            workers = [f"drill-w{i}" for i in range(2000)]
            for w in workers:
                s.post(base + f"{API}/workers", json={"name": w, "capabilities": {"max_concurrency": 1}}, timeout=10).raise_for_status()
        drill = Drill(base, list(reversed(workers)), timeout_s=args.hang_seconds + 60, task_id=task.json()["id"])

        # 1. the hang
        stop = threading.Event()
        loader = threading.Thread(target=drill.load, args=(args.clients, stop))
        proxy.hang()
        hang_started = time.monotonic()
        loader.start()
        time.sleep(args.hang_seconds)  # the drill's own clock: how long the database hangs
        proxy.forward()
        stop.set()
        loader.join()
        recovered_s = wait_healthy(base, 120)
        during = drill.samples
        print(f"database hang of {args.hang_seconds:g} s, {args.clients} clients: {len(during)} requests "
              f"(healthy again {recovered_s:.2f} s after it ended, {time.monotonic() - hang_started:.1f} s in all)")
        for kind in KINDS:
            took = [x.seconds for x in during if x.kind == kind]
            statuses = sorted({x.status for x in during if x.kind == kind})
            print(f"  {kind:<7} n={len(took):>5}  p50={pct(took, .5):7.3f} s  worst={max(took, default=float('nan')):7.3f} s  statuses={statuses}")
        print(f"  worst request latency during the hang: {max((x.seconds for x in during), default=float('nan')):.3f} s")

        # 2. refused, yet applied? Never after a 503 (not applied); a 504 or no answer may have been.
        with psycopg.connect(direct_url, autocommit=True) as db:
            for label, statuses in (("503", {503}), ("504 or not at all", {504, UNANSWERED})):
                answered = [x for x in during if x.status in statuses]
                creates = [x.key for x in answered if x.kind == "create"]
                claims = [x.key for x in answered if x.kind == "claim"]
                applied_creates = db.execute("SELECT COUNT(*) FROM llm_tasks WHERE idempotency_key = ANY(%s)", (creates,)).fetchone()[0]
                applied_claims = db.execute("SELECT COUNT(DISTINCT worker_id) FROM leases WHERE worker_id = ANY(%s)", (claims,)).fetchone()[0]
                print(f"answered {label}, yet applied: {applied_creates + applied_claims} "
                      f"(creates {applied_creates} of {len(creates)}, claims {applied_claims} of {len(claims)})")

        # 3. every session of the runtime terminated
        with psycopg.connect(direct_url, autocommit=True) as db:
            killed = db.execute(
                "SELECT COUNT(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = 'bloom-runtime'", (dbname,),
            ).fetchone()[0]
        drill.samples = []
        with requests.Session() as s:
            s.trust_env = False
            for n in range(args.after_requests):
                drill.one_of_each(s, n)
        after = drill.samples
        errors = [x for x in after if not 200 <= x.status < 300 and not (x.kind == "claim" and x.status == 204)]
        print(f"after pg_terminate_backend of {killed} sessions: {len(errors)} errors in {len(after)} requests"
              + (f" ({sorted((x.kind, x.status) for x in errors)})" if errors else ""))
    finally:
        stop_server(proc)
        proxy.close()
        with psycopg.connect(args.server_url, autocommit=True, connect_timeout=10) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        print(f"server log: {log_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
