"""HTTP lifecycle benchmark: create → lease → heartbeat → complete, N times, C clients.

Starts ``bloom-runtime serve`` itself (rate limit off) unless ``--url`` names a
running one. Prints lifecycles/s, p50/p95/p99 per endpoint and the server's RSS
before and after (read from /proc, only when this script started the server).

    python bench/http_lifecycle.py -n 2000 -c 8 --database-url sqlite:///tmp/bench.db
    python bench/http_lifecycle.py -n 100000 -c 8 --pg postgresql://bloom@127.0.0.1:5432/postgres --rss-every 10000

``--pg ADMIN_URL`` runs against a fresh PostgreSQL database (created from the admin
URL, dropped at the end); ``--rss-every K`` prints the server's RSS each K lifecycles.
Clients are threads of this process, each with one keep-alive connection; ``--client
stdlib`` uses ``http.client`` instead of the minimal socket client (see ``Client``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

ENDPOINTS = ("create", "lease", "heartbeat", "complete")
KEY = "bench-key-000001"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def start_server(
    database_url: str, threads: int, key: str | None = None, *, port: int | None = None, env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``bloom-runtime serve`` (rate limit off, one API key, ``env`` on top) and wait until it is healthy."""
    port = port or free_port()
    full_env = {k: v for k, v in os.environ.items() if k not in ("RUNTIME_API_KEY", "RUNTIME_ADMIN_KEY", "DATABASE_URL")}
    full_env.update(RUNTIME_API_KEY=f"bench={key or KEY}", RATE_LIMIT_PER_S="0", **(env or {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "bloom_runtime.cli", "--log-level", "WARNING", "serve", "--port", str(port),
         "--database-url", database_url, "--threads", str(threads)],
        cwd=REPO, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api/runtime"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("server exited during start")
        try:
            with requests.get(url + "/health", timeout=1) as r:
                if r.status_code == 200:
                    return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise SystemExit("server did not become healthy within 60 s")


def server_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_requests(url: str) -> int:
    """Requests the server has answered, from its metrics (the metrics request itself not counted)."""
    with requests.get(url + "/metrics", headers={"X-Runtime-API-Key": KEY}, timeout=10) as r:
        r.raise_for_status()
        text = r.text
    return int(sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith("bloom_http_requests_total{") and 'route="/api/runtime/metrics"' not in line
    ))


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not exited within 60 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Progress:
    """Completed lifecycles, counted across the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = 0

    def add(self) -> None:
        with self.lock:
            self.done += 1


PROGRESS = Progress()


def rss_sampler(pid: int, every: int, total: int, t_start: float, stop: threading.Event,
                marks: list[tuple[int, float, int | None]]) -> None:
    """Record (lifecycles, seconds, VmRSS KiB) each time another ``every`` lifecycles are done."""
    next_mark = every
    while next_mark <= total and not stop.is_set():
        if PROGRESS.done >= next_mark:
            marks.append((PROGRESS.done, time.perf_counter() - t_start, rss_kib(pid)))
            kib = marks[-1][2]
            print(f"  after {marks[-1][0]:>7} lifecycles ({marks[-1][1]:7.1f} s): server RSS "
                  f"{(kib or 0) / 1024:.1f} MiB", flush=True)
            next_mark += every
        else:
            time.sleep(0.05)


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


class Client:
    """One keep-alive HTTP/1.1 connection on a plain socket.

    The client shares the machine with the server, so it must cost little: this one
    writes each request in one send and reads the response by its Content-Length,
    about a fifth of the CPU ``http.client`` spends per request (which parses headers
    with the email package) and a fifteenth of ``requests``. The figures then measure
    the server, not the client library."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.prefix = parts.path.rstrip("/")
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.head = (
            f"Host: {parts.hostname}:{parts.port}\r\nX-Runtime-API-Key: {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self.buf = b""

    def post(self, path: str, body: Any) -> tuple[int, bytes]:
        data = json.dumps(body).encode()
        self.sock.sendall(b"POST " + (self.prefix + path).encode() + b" HTTP/1.1\r\n" + self.head
                          + str(len(data)).encode() + b"\r\n\r\n" + data)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head, self.buf = self.buf[:end], self.buf[end + 4:]
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = next((int(v) for k, _, v in (line.partition(b":") for line in lines[1:])
                       if k.strip().lower() == b"content-length"), None)
        if length is None:
            raise RuntimeError(f"response {status} without Content-Length")
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, body

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


class StdlibClient:
    """The same over ``http.client`` (``--client stdlib``), for comparison."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.prefix = parts.path.rstrip("/")
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        self.headers = {"X-Runtime-API-Key": KEY, "Content-Type": "application/json"}

    def post(self, path: str, body: Any) -> tuple[int, bytes]:
        self.conn.request("POST", self.prefix + path, body=json.dumps(body), headers=self.headers)
        resp = self.conn.getresponse()
        return resp.status, resp.read()

    def close(self) -> None:
        self.conn.close()


class RequestsClient:
    """The same over ``requests.Session`` (``--client requests``), as the first version was measured."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers.update({"X-Runtime-API-Key": KEY})

    def post(self, path: str, body: Any) -> tuple[int, bytes]:
        r = self.session.post(self.url + path, json=body, timeout=60)
        return r.status_code, r.content

    def close(self) -> None:
        self.session.close()


CLIENTS = {"raw": Client, "stdlib": StdlibClient, "requests": RequestsClient}


def client(url: str, worker: str | None, count: int, timings: dict[str, list[float]], errors: list[str],
           kind: str = "raw") -> None:
    """``count`` lifecycles; the lease names ``worker`` (registered here), or with None
    is ``{}`` and the runtime picks one of the fleet registered before."""
    c = CLIENTS[kind](url)
    try:
        if worker is not None:
            status, _ = c.post("/workers", {"name": worker, "capabilities": {"max_concurrency": 32}})
            if status >= 300:
                raise SystemExit(f"registering {worker} failed: {status}")
        local: dict[str, list[float]] = {e: [] for e in ENDPOINTS}
        for i in range(count):
            t0 = time.perf_counter()
            status, body = c.post("/llm-tasks", {"context_id": worker or f"ctx-{i % 50}", "agent_slug": "bench", "prompt": f"task {i}"})
            local["create"].append(time.perf_counter() - t0)
            if status != 201:
                errors.append(f"create {status}")
                continue
            task_id = json.loads(body)["id"]
            t0 = time.perf_counter()
            status, body = c.post(f"/llm-tasks/{task_id}/lease", {"worker_id": worker} if worker else {})
            local["lease"].append(time.perf_counter() - t0)
            if status >= 300:
                errors.append(f"lease {status}")
                continue
            fence = {"lease_id": json.loads(body)["lease"]["id"]}
            for name, path, payload in (
                ("heartbeat", f"/llm-tasks/{task_id}/heartbeat", fence),
                ("complete", f"/llm-tasks/{task_id}/complete",
                 {"status": "success", "output": "ok", "metrics": {"tokens_used": None}, **fence}),
            ):
                t0 = time.perf_counter()
                status, _ = c.post(path, payload)
                local[name].append(time.perf_counter() - t0)
                if status >= 300:
                    errors.append(f"{name} {status}")
                    break
            else:
                PROGRESS.add()
        for e in ENDPOINTS:
            timings[e].extend(local[e])
    finally:
        c.close()


# The first version's lifecycles/s with this workload (lease {} over 8 workers × 8 slots,
# requests.Session clients): bloom was ×1.66 / ×1.22 / ×1.59 of it at 68.8 / 119.6 / 143.9.
FIRST_VERSION = {1: 68.8 / 1.66, 8: 119.6 / 1.22, 32: 143.9 / 1.59}


def run_once(url: str, proc: subprocess.Popen[bytes] | None, n: int, c: int, kind: str, fleet: bool,
             rss_every: int = 0) -> dict[str, Any]:
    """``n`` lifecycles with ``c`` clients against a running server; its CPU per request if it is ours."""
    timings: dict[str, list[float]] = {e: [] for e in ENDPOINTS}
    errors: list[str] = []
    per_client = [n // c + (1 if i < n % c else 0) for i in range(c)]
    tag = f"bench-{os.getpid()}-{int(time.time() * 1000)}"
    if fleet:  # 8 workers × 8 slots, leased by the runtime's pick
        reg = CLIENTS["raw"](url)
        for w in range(8):
            reg.post("/workers", {"name": f"{tag}-w{w}", "capabilities": {"max_concurrency": 8}})
        reg.close()
    threads = [
        threading.Thread(target=client, args=(url, None if fleet else f"{tag}-{i}", per_client[i], timings, errors, kind))
        for i in range(c)
    ]
    marks: list[tuple[int, float, int | None]] = []
    stop = threading.Event()
    PROGRESS.done = 0
    cpu0 = server_cpu_s(proc.pid) if proc else None
    req0 = server_requests(url) if proc else 0
    t0 = time.perf_counter()
    sampler = None
    if proc is not None and rss_every > 0:
        sampler = threading.Thread(target=rss_sampler, args=(proc.pid, rss_every, n, t0, stop, marks), daemon=True)
        sampler.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if sampler is not None:
        sampler.join(timeout=1)
        stop.set()
    out: dict[str, Any] = {"done": len(timings["complete"]), "elapsed": elapsed, "timings": timings, "errors": errors, "marks": marks}
    out["rate"] = out["done"] / elapsed
    if proc is not None and cpu0 is not None:
        requests_done = server_requests(url) - req0
        out["cpu_ms"] = (server_cpu_s(proc.pid) - cpu0) / max(requests_done, 1) * 1000
    return out


def report(out: dict[str, Any], c: int, kind: str) -> None:
    cpu = f"; server {out['cpu_ms']:.3f} ms CPU per request" if "cpu_ms" in out else ""
    print(f"{out['done']} lifecycles in {out['elapsed']:.2f} s with {c} clients ({kind}): {out['rate']:.1f} lifecycles/s{cpu}")
    print(f"{'endpoint':<10} {'n':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for e in ENDPOINTS:
        v = sorted(out["timings"][e])
        print(f"{e:<10} {len(v):>7} {percentile(v, 50) * 1000:>8.2f} {percentile(v, 95) * 1000:>8.2f} {percentile(v, 99) * 1000:>8.2f}")
    marks = out["marks"]
    if len(marks) >= 2 and marks[0][2] and marks[-1][2]:
        growth = marks[-1][2] / marks[0][2]
        print(f"server RSS growth {marks[0][0]} → {marks[-1][0]} lifecycles: ×{growth:.3f} "
              f"({'flat' if growth <= 1.2 else 'GROWS'})")
    if out["errors"]:
        print(f"{len(out['errors'])} errors, e.g. {statistics.mode(out['errors'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="lifecycles in total, per run")
    parser.add_argument("-c", default="1", help="concurrent clients; a comma-separated list runs each")
    parser.add_argument("--runs", type=int, default=1,
                        help="interleaved rounds over the -c values, each on a fresh server and database; medians printed")
    parser.add_argument("--fleet", action="store_true",
                        help="lease {} over 8 workers × 8 slots the runtime picks from (the first version's measure)")
    parser.add_argument("--database-url", help="default: a fresh SQLite file")
    parser.add_argument("--pg", metavar="ADMIN_URL",
                        help="PostgreSQL admin URL: run against a fresh database, dropped at the end")
    parser.add_argument("--rss-every", type=int, default=0, metavar="K",
                        help="print the server's RSS every K lifecycles (server started here only)")
    parser.add_argument("--url", help="base URL of a running server (…/api/runtime); key from BENCH_API_KEY")
    parser.add_argument("--threads", type=int, default=64, help="server threads when started here")
    parser.add_argument("--client", choices=sorted(CLIENTS), default="raw",
                        help="raw: a minimal keep-alive client on a socket (default); stdlib: http.client; "
                             "requests: requests.Session")
    args = parser.parse_args(argv)
    cs = [int(c) for c in args.c.split(",")]
    global KEY
    if args.url:
        KEY = os.environ.get("BENCH_API_KEY", KEY)
    results: dict[int, list[dict[str, Any]]] = {}
    failed = False
    for rnd in range(args.runs):
        for c in cs:
            with ExitStack() as cleanup:
                proc = None
                if args.url:
                    url = args.url.rstrip("/")
                else:
                    db = _database(args, cleanup)
                    proc, url = start_server(db, args.threads)
                    cleanup.callback(stop_server, proc)
                rss_before = rss_kib(proc.pid) if proc else None
                out = run_once(url, proc, args.n, c, args.client, args.fleet, args.rss_every)
                if args.runs > 1:
                    print(f"round {rnd + 1}, ", end="")
                report(out, c, args.client)
                if rss_before is not None and proc is not None:
                    print(f"server RSS: {rss_before / 1024:.1f} MiB before, {(rss_kib(proc.pid) or 0) / 1024:.1f} MiB after")
                failed = failed or bool(out["errors"])
                results.setdefault(c, []).append(out)
    if args.runs > 1 or len(cs) > 1:
        print(f"\nmedians of {args.runs} run(s), {args.client} client{', lease {} over a fleet' if args.fleet else ''}:")
        for c in cs:
            rate = statistics.median(o["rate"] for o in results[c])
            cpu = [o["cpu_ms"] for o in results[c] if "cpu_ms" in o]
            first = f", ×{rate / FIRST_VERSION[c]:.2f} the first version's {FIRST_VERSION[c]:.1f}/s" if c in FIRST_VERSION else ""
            cpu_text = f", server {statistics.median(cpu):.3f} ms CPU per request" if cpu else ""
            print(f"  C={c}: {rate:.1f} lifecycles/s{cpu_text}{first}")
    return 1 if failed else 0


def _database(args: argparse.Namespace, cleanup: ExitStack) -> str:
    """A fresh database for one run (a new PostgreSQL database, or a new SQLite file), or the one named."""
    if args.pg:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from engine_lifecycle import Database

        database = Database("postgres", args.pg)
        cleanup.callback(shutil.rmtree, database.tmp, True)
        return cleanup.enter_context(database)
    if args.database_url:
        return args.database_url
    tmp = tempfile.mkdtemp(prefix="bloom-bench-")
    cleanup.callback(shutil.rmtree, tmp, True)
    return "sqlite:///" + os.path.join(tmp, "bench.db")


if __name__ == "__main__":
    sys.exit(main())
