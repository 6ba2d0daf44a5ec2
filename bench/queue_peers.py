"""bloom-runtime beside the peer queues (oban, PgQueuer, procrastinate) on one PostgreSQL.

Every run of every system gets a fresh database and a process of its own (the
drivers in ``bench/drivers/``, our code; see ``drivers/common.py`` for the
workloads). Runs are interleaved: round 1 runs every (workload, system) once,
then round 2, and so on; the table shows medians. bloom runs embedded (the
engine facade) and over HTTP (its own worker loop against ``bloom-runtime
serve``, whose CPU per request is printed as well), each with batch claims and,
for the drains, one task per claim.

The peers are not dependencies of the project: ``--install`` makes a throwaway
virtual environment for each under ``--venvs`` (Python 3.12, which oban needs)
and pip-installs it there; without it, missing ones are skipped.

    python bench/queue_peers.py --pg postgresql://bloom@127.0.0.1:5432/postgres --install
    python bench/queue_peers.py --pg URL --quick --runs 1        # a small smoke run
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from http_lifecycle import server_cpu_s, server_requests, start_server, stop_server  # noqa: E402

PEERS = {  # system -> what its virtual environment installs
    "oban": ["oban==0.7.0"],
    "pgqueuer": ["pgqueuer==1.6.0", "asyncpg"],
    "procrastinate": ["procrastinate==3.10.0", "psycopg[binary]"],
}
SYSTEMS = ["bloom-embedded", "bloom-http", *PEERS]


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # drain | steady
    c: int
    batch: int  # jobs a consumer fetches at once (drains); 1: one per fetch
    systems: tuple[str, ...]


def workloads(quick: bool) -> list[tuple[Workload, int]]:
    """(workload, jobs) in table order."""
    drain_n, steady_n = (400, 200) if quick else (5000, 3000)
    everyone = tuple(SYSTEMS)
    bloom = ("bloom-embedded", "bloom-http")
    return [
        (Workload("drain, 1 consumer", "drain", 1, 10, everyone), drain_n),
        (Workload("drain, 1 consumer, one task per claim", "drain", 1, 1, bloom), drain_n),
        (Workload("drain, 32 consumers", "drain", 32, 10, everyone), drain_n),
        (Workload("drain, 32 consumers, one task per claim", "drain", 32, 1, bloom), drain_n),
        (Workload("steady lifecycle, C=1", "steady", 1, 1, everyone), steady_n // 3),
        (Workload("steady lifecycle, C=8", "steady", 8, 1, everyone), steady_n),
        (Workload("steady lifecycle, C=32", "steady", 32, 1, everyone), steady_n),
    ]


def python312() -> str | None:
    found = shutil.which("python3.12") or next(iter(sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python")))), None)
    return found


def ensure_venv(venvs: Path, system: str, install: bool) -> str | None:
    """The peer's interpreter, making its virtual environment first if asked; None if absent."""
    python = venvs / system / "bin" / "python"
    if python.exists():
        return str(python)
    if not install:
        return None
    base = python312()
    if base is None:
        raise SystemExit("--install needs a Python 3.12 (oban needs it): none on PATH or under ~/.pyenv")
    subprocess.run([base, "-m", "venv", str(venvs / system)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEERS[system]], check=True)
    return str(python)


class Database:
    """A fresh PostgreSQL database for one run, dropped afterwards."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.name = f"bloom_peers_{uuid.uuid4().hex[:10]}"
        self.url = urlunsplit(urlsplit(admin_url)._replace(path="/" + self.name))

    def _sql(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(statement)  # the name is ours, not input

    def __enter__(self) -> str:
        self._sql(f'CREATE DATABASE "{self.name}"')
        return self.url

    def __exit__(self, *exc: object) -> None:
        self._sql(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def run_once(system: str, work: Workload, n: int, admin_url: str, pythons: dict[str, str]) -> dict:
    args = ["--workload", work.kind, "-n", str(n), "-c", str(work.c), "--batch", str(work.batch)]
    with Database(admin_url) as url:
        if system.startswith("bloom"):
            subprocess.run([sys.executable, "-m", "bloom_runtime.cli", "--log-level", "WARNING", "migrate",
                            "--database-url", url], check=True, cwd=HERE.parent, stdout=subprocess.DEVNULL)
        if system == "bloom-http":
            proc, base = start_server(url, 64)
            try:
                cpu0, req0 = server_cpu_s(proc.pid), server_requests(base)
                out = _driver([sys.executable, str(HERE / "drivers" / "bloom_http.py"), "--url", url, "--runtime-url", base, *args])
                requests = server_requests(base) - req0
                out["server_ms_per_request"] = round((server_cpu_s(proc.pid) - cpu0) / max(requests, 1) * 1000, 3)
                out["requests"] = requests
            finally:
                stop_server(proc)
            return out
        driver = "bloom_embedded.py" if system == "bloom-embedded" else f"{system}_driver.py"
        return _driver([pythons.get(system, sys.executable), str(HERE / "drivers" / driver), "--url", url, *args])


def _driver(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=HERE.parent)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{Path(cmd[1]).name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg", required=True, help="PostgreSQL admin URL (a database is created and dropped per run)")
    ap.add_argument("--runs", type=int, default=3, help="interleaved rounds; the table shows medians")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--only", help="run only workloads whose name contains this")
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the bench itself")
    ap.add_argument("--venvs", default=os.path.expanduser("~/.cache/bloom-runtime-bench/peers"))
    ap.add_argument("--install", action="store_true", help="make the peers' virtual environments when missing")
    args = ap.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    pythons: dict[str, str] = {}
    for peer in [s for s in systems if s in PEERS]:
        python = ensure_venv(Path(args.venvs), peer, args.install)
        if python is None:
            print(f"{peer}: no virtual environment under {args.venvs} (use --install); skipped", flush=True)
            systems.remove(peer)
        else:
            pythons[peer] = python
    plan = [(w, n) for w, n in workloads(args.quick) if args.only is None or args.only in w.name]
    results: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(args.runs):
        for work, n in plan:
            for system in [s for s in systems if s in work.systems]:
                t = time.perf_counter()
                out = run_once(system, work, n, args.pg, pythons)
                results.setdefault((work.name, system), []).append(out)
                extra = f", p50 {out['p50_ms']} ms" if "p50_ms" in out else ""
                cpu = f", server {out['server_ms_per_request']} ms CPU/request" if "server_ms_per_request" in out else ""
                print(f"round {rnd + 1}: {work.name:42} {system:15} {out['rate']:>8.1f}/s{extra}{cpu}"
                      f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    print_table(plan, systems, results, args.runs)
    return 0


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def print_table(plan: list[tuple[Workload, int]], systems: list[str], results: dict, runs: int) -> None:
    print(f"\nmedians of {runs} interleaved run(s), jobs/s (p50 latency for steady lifecycles), {os.cpu_count()} cores")
    print("| workload | " + " | ".join(systems) + " |")
    print("|---|" + "---|" * len(systems))
    for work, n in plan:
        cells = []
        for system in systems:
            got = results.get((work.name, system))
            if not got:
                cells.append("—")
                continue
            rate, p50 = median_of(got, "rate"), median_of(got, "p50_ms")
            cells.append(f"{rate:.0f}/s" + (f", p50 {p50:.1f} ms" if p50 is not None else ""))
        print(f"| {work.name} (n={n}) | " + " | ".join(cells) + " |")
    print("\nratios (medians):")
    for work, _ in plan:
        emb = results.get((work.name, "bloom-embedded"))
        if not emb:
            continue
        base = median_of(emb, "rate") or 0.0
        parts = []
        http = results.get((work.name, "bloom-http"))
        if http:
            parts.append(f"bloom HTTP / embedded ×{(median_of(http, 'rate') or 0) / base:.2f}")
            cpu = median_of(http, "server_ms_per_request")
            if cpu is not None:
                parts.append(f"server {cpu:.3f} ms CPU per HTTP request")
        for peer in PEERS:
            got = results.get((work.name, peer))
            if got:
                parts.append(f"embedded / {peer} ×{base / (median_of(got, 'rate') or 1):.2f}")
        print(f"  {work.name}: " + "; ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
