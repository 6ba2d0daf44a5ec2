"""Push dispatch: request latency against run length, automatic dispatch throughput, an idle fleet's audit rows.

Runs ``bloom-runtime serve`` and membridge agent stand-ins from the tests (real
HTTP on loopback; their /execute-task answers only after the run, as the real
agent's does) and prints, from one run:

1. ``POST /dispatch`` latency p50/p99 with 32 agents busy, for a short and a long
   run length side by side (it should not grow with the run length: the request
   no longer waits for the run);
2. tasks/s automatic dispatch pushes through 8 agents answering in 10 ms, from the
   first task created to the last completed, with no /dispatch call;
3. audit rows an idle 20-agent fleet writes per hour (synced from a control-plane
   stand-in and probed), measured over a run with intervals scaled down and
   extrapolated to the default intervals.

    python bench/dispatch.py                       # full size (SQLite)
    python bench/dispatch.py --pg postgresql://bloom@127.0.0.1:5432/postgres
    python bench/dispatch.py --quick               # small sizes, to check it runs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from http_lifecycle import KEY, free_port, percentile, start_server, stop_server  # noqa: E402

from tests.agent_standin import AgentStandIn, Run  # noqa: E402
from tests.membridge_server import MembridgeServer  # noqa: E402

DEFAULT_PROBE_S = 10.0  # the defaults the idle figure is extrapolated to
DEFAULT_SYNC_S = 10.0


class Runtime:
    """``bloom-runtime serve`` with push dispatch settings; ``api`` calls it with the bench key."""

    def __init__(self, database_url: str, **env: str) -> None:
        port = free_port()
        self.public = f"http://127.0.0.1:{port}"
        env = {"RUNTIME_PUBLIC_URL": self.public, "AGENT_PROBE_INTERVAL": "0", "AUTO_DISPATCH": "off", **env}
        self.proc, self.base = start_server(database_url, 64, port=port, env=env)
        self.http = requests.Session()
        self.http.trust_env = False
        self.http.headers["X-Runtime-API-Key"] = KEY

    def api(self, method: str, path: str, **kw: Any) -> requests.Response:
        return self.http.request(method, self.base + path, timeout=60, **kw)

    def create(self, prompt: str) -> str:
        r = self.api("POST", "/llm-tasks", json={"context_id": prompt, "agent_slug": "bench", "prompt": prompt})
        r.raise_for_status()
        return str(r.json()["id"])

    def completed(self) -> int:
        return int(self.api("GET", "/stats").json()["tasks"]["completed"])

    def vouch(self, agent: AgentStandIn, max_concurrency: int) -> None:
        body = {**agent.registration(), "capabilities": {"max_concurrency": max_concurrency}}
        self.api("POST", "/workers", json=body).raise_for_status()  # the bench key is an admin key

    def close(self) -> None:
        self.http.close()
        stop_server(self.proc)


class Databases:
    """A fresh database per measurement: SQLite files in ``tmp``, or databases created on the
    PostgreSQL server ``server_url`` names (dropped at the end)."""

    def __init__(self, server_url: str | None, tmp: Path) -> None:
        self.server_url = server_url
        self.tmp = tmp
        self.created: list[str] = []

    def fresh(self, name: str) -> str:
        if not self.server_url:
            return f"sqlite:///{self.tmp / (name + '.db')}"
        import psycopg

        db = f"bloom_bench_{name.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db}"')  # the name is ours, not input
        self.created.append(db)
        return urlunsplit(urlsplit(self.server_url)._replace(path="/" + db))

    def drop(self) -> None:
        if not self.server_url:
            return
        import psycopg

        with psycopg.connect(self.server_url, autocommit=True) as conn:
            for db in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.05)


def start_agents(n: int, run: Run, prefix: str) -> list[AgentStandIn]:
    return [AgentStandIn(f"{prefix}-{i}", run=run).start() for i in range(n)]


def dispatch_latency(database_url: str, agents: int, rounds: int, run_s: float) -> list[float]:
    """Latencies (ms) of POST /dispatch while the fleet runs: each round fills every agent's
    first slot, then dispatches into the second slots with all ``agents`` busy."""
    rt = Runtime(database_url, DISPATCH_GRACE="30")
    fleet = start_agents(agents, Run(seconds=run_s), "lat")
    samples: list[float] = []
    try:
        for agent in fleet:
            rt.vouch(agent, max_concurrency=2)
        done = rt.completed()
        for _ in range(rounds):
            ids = [rt.create(f"r{i}") for i in range(2 * agents)]
            for i, task_id in enumerate(ids):
                started = time.perf_counter()
                r = rt.api("POST", f"/llm-tasks/{task_id}/dispatch")
                elapsed = (time.perf_counter() - started) * 1000
                if r.status_code != 202:
                    raise SystemExit(f"dispatch answered {r.status_code}: {r.text[:200]}")
                if i >= agents:  # the first slot of every agent is taken: all of them are busy
                    samples.append(elapsed)
            done += len(ids)
            wait_until(lambda d=done: rt.completed() >= d, run_s * 4 + 30, "the round's tasks completed")
    finally:
        for agent in fleet:
            agent.close()
        rt.close()
    return sorted(samples)


def auto_dispatch_rate(database_url: str, agents: int, tasks: int, run_s: float) -> tuple[float, float]:
    """(tasks/s, seconds) from the first create to the last completion, automatic dispatch only."""
    rt = Runtime(database_url, AUTO_DISPATCH="on")
    fleet = start_agents(agents, Run(seconds=run_s), "auto")
    try:
        for agent in fleet:
            rt.vouch(agent, max_concurrency=2)  # as the agents register themselves
        started = time.perf_counter()
        per_thread = tasks // 4
        threads = [threading.Thread(target=lambda t=t: [rt.create(f"t{t}-{i}") for i in range(per_thread)]) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wait_until(lambda: rt.completed() >= 4 * per_thread, 600, "all tasks completed")
        seconds = time.perf_counter() - started
        executions = sum(len(a.executions()) for a in fleet)
        if executions != 4 * per_thread:
            raise SystemExit(f"{executions} executions for {4 * per_thread} tasks")
        return 4 * per_thread / seconds, seconds
    finally:
        for agent in fleet:
            agent.close()
        rt.close()


def audit_count(rt: Runtime) -> int:
    n, params = 0, {"limit": "1000"}
    while True:
        r = rt.api("GET", "/audit", params=params)
        n += len(r.json())
        link = r.headers.get("Link")
        if not link:
            return n
        params = dict(p.split("=", 1) for p in link.split("?", 1)[1].split(">", 1)[0].split("&"))


def idle_fleet_rows(database_url: str, agents: int, seconds: float, probe_s: float, sync_s: float) -> tuple[int, int, float]:
    """(rows while settling, rows during ``seconds`` of idleness, rows per hour at the default intervals)."""
    with MembridgeServer() as cp:
        fleet = start_agents(agents, Run(), "idle")
        rt = Runtime(database_url, MEMBRIDGE_SERVER_URL=cp.url, MEMBRIDGE_SYNC_INTERVAL=str(sync_s),
                     AGENT_PROBE_INTERVAL=str(probe_s), WORKER_OFFLINE_AFTER=str(max(1.0, probe_s * 6)))
        try:
            for agent in fleet:
                cp.add_agent(agent.node_id, agent.url)  # never contacted by the control plane: unknown
                agent.heartbeat_to(cp.url)
            wait_until(lambda: sum(w["status"] == "online" for w in rt.api("GET", "/workers").json()) == agents,
                       60, "the fleet online")
            settled = audit_count(rt)
            time.sleep(seconds)  # the measurement: idle time, nothing to wait for
            during = audit_count(rt) - settled
        finally:
            rt.close()
            for agent in fleet:
                agent.close()
    # Probes and syncs scale with their intervals: per hour at the defaults, from the rows per tick.
    ticks = seconds / min(probe_s, sync_s)
    default_ticks_per_hour = 3600 / min(DEFAULT_PROBE_S, DEFAULT_SYNC_S)
    return settled, during, during / ticks * default_ticks_per_hour if ticks else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", metavar="URL", help="a PostgreSQL server (postgresql://…/postgres): each measurement gets a database "
                        "of its own there; default: temporary SQLite files")
    parser.add_argument("--agents", type=int, default=32, help="agents for the latency figure (default 32)")
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds per run length (default 5)")
    parser.add_argument("--short-run", type=float, default=0.5, help="short run length, s (default 0.5)")
    parser.add_argument("--long-run", type=float, default=8.0, help="long run length, s (default 8)")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks for the throughput figure (default 2000)")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle measurement, s (default 60)")
    parser.add_argument("--quick", action="store_true", help="small sizes: check the bench runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.agents, args.rounds, args.short_run, args.long_run, args.tasks, args.idle_seconds = 4, 1, 0.2, 1.0, 40, 3.0

    with tempfile.TemporaryDirectory(prefix="bloom-dispatch-bench-") as tmp_dir:
        dbs = Databases(args.pg, Path(tmp_dir))
        try:
            run(args, dbs)
        finally:
            dbs.drop()
    return 0


def run(args: argparse.Namespace, dbs: Databases) -> None:
    print(f"1. POST /dispatch latency with {args.agents} agents busy ({args.rounds} rounds, {args.agents} samples each)")
    figures = {}
    for label, run_s in (("short", args.short_run), ("long", args.long_run)):
        samples = dispatch_latency(dbs.fresh(f"lat-{label}"), args.agents, args.rounds, run_s)
        figures[label] = (percentile(samples, 50), percentile(samples, 99))
        print(f"   runs of {run_s:g} s: p50 {figures[label][0]:.1f} ms, p99 {figures[label][1]:.1f} ms")
    ratio50 = figures["long"][0] / figures["short"][0]
    ratio99 = figures["long"][1] / figures["short"][1]
    print(f"   long/short: p50 x{ratio50:.2f}, p99 x{ratio99:.2f} (run length x{args.long_run / args.short_run:g})")

    rate, seconds = auto_dispatch_rate(dbs.fresh("auto"), 8, args.tasks, 0.01)
    print(f"2. automatic dispatch, 8 agents answering in 10 ms (2 slots each): {rate:.1f} tasks/s "
          f"({args.tasks // 4 * 4} tasks in {seconds:.1f} s)")

    probe_s, sync_s = 0.5, 0.5
    settled, during, per_hour = idle_fleet_rows(dbs.fresh("idle"), 20, args.idle_seconds, probe_s, sync_s)
    print(f"3. idle fleet of 20 agents: {settled} audit rows while coming online, then "
          f"{during} in {args.idle_seconds:g} s of probes every {probe_s:g} s and syncs every {sync_s:g} s "
          f"= {per_hour:.1f} rows/hour at the defaults (probes every {DEFAULT_PROBE_S:g} s, syncs every {DEFAULT_SYNC_S:g} s)")


if __name__ == "__main__":
    sys.exit(main())
