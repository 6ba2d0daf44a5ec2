"""End to end with real processes: one ``bloom-runtime serve`` and two ``bloom-runtime worker``.

Each worker runs ``--exec`` of a small Python script (``JOB_SCRIPT``) written to
the test's directory. Every wait is a deadline loop on a condition read from the
API, the database or the process table; nothing sleeps to let time pass.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import requests

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
HEADER = "X-Runtime-API-Key"
CLIENT_KEY = "e2e-client-key-01"
WORKER_KEY = "e2e-worker-key-02"
TTL_S = 2  # the workers' lease TTL: a SIGKILLed worker's task is back in the queue after this
SWEEP_S = "0.2"  # LEASE_SWEEP_INTERVAL of the server
POLL_WAIT_S = "1"  # short long polls, so a stopped worker ends fast
WAIT_S = 30.0  # upper bound of any single wait; the happy path takes a fraction of it

# The job every worker runs. Plain prompts: sha256 of the prompt + the prompt upper-cased.
# "sleep:N": sleep N seconds (the timeout test). "block:PATH": on the first run, write
# our process group id to PATH and wait there until our worker dies (our parent
# changes) or 30 s pass; on any later run (PATH exists), answer like a plain prompt.
JOB_SCRIPT = r'''
import hashlib, os, sys, time
prompt = sys.stdin.read()
if prompt.startswith("sleep:"):
    time.sleep(float(prompt[6:]))
elif prompt.startswith("block:"):
    marker = prompt[6:]
    if not os.path.exists(marker):
        parent = os.getppid()
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpgid(0)))
        os.replace(marker + ".tmp", marker)
        deadline = time.monotonic() + 30
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(0.05)
        sys.exit(3)
sys.stdout.write(hashlib.sha256(prompt.encode()).hexdigest()[:12] + " " + prompt.upper())
'''


def expected_output(prompt: str) -> str:
    """What ``JOB_SCRIPT`` answers for a plain prompt."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:12] + " " + prompt.upper()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], what: str, timeout_s: float = WAIT_S, interval_s: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(interval_s)  # polling another process: there is no event to wait on
    return value


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without anything that would configure the server or worker behind our back."""
    drop = ("RUNTIME_API_KEY", "RUNTIME_ADMIN_KEY", "DATABASE_URL", "RUNTIME_URL", "WORKER_NAME", "WORKER_EXEC",
            "WORKER_LABELS", "WORKER_CONCURRENCY", "WORKER_TTL", "WORKER_GRACE", "WORKER_POLL_WAIT", "PORT", "HOST",
            "MEMBRIDGE_SERVER_URL", "LEASE_SWEEP_INTERVAL", "LEASE_FENCING")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


class Process:
    """A child process logging to a file; ``stop`` always reaps it."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        try:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT)
        except BaseException:
            self._log.close()
            raise

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return f"--- {self.name} (last {lines} lines of {self.log_path})\n" + "\n".join(text[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crashed node would die."""
        self.proc.kill()
        self.proc.wait(timeout=WAIT_S)

    def terminate(self) -> None:
        """Send SIGTERM (``stop`` waits for the end)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it has not ended within ``timeout_s``; returns the exit status."""
        try:
            self.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=WAIT_S)
            return self.proc.returncode
        finally:
            self._log.close()


class Cluster:
    """A server on a loopback port and its workers; the API and the database for assertions."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.db = tmp_path / "e2e.db"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/api/runtime"
        self.script = tmp_path / "job.py"
        self.script.write_text(JOB_SCRIPT)
        self.server: Process | None = None
        self.restarts = 0
        self.workers: dict[str, Process] = {}
        self.session = requests.Session()
        self.session.headers[HEADER] = CLIENT_KEY

    # --- processes -------------------------------------------------------------

    def start_server(self) -> None:
        argv = [sys.executable, "-m", "bloom_runtime.cli", "serve", "--port", str(self.port),
                "--database-url", f"sqlite:///{self.db}", "--threads", "16",
                # every process here shares one loopback address and the test drives
                # hundreds of requests a second: throttling is not what is tested
                "--rate-limit-per-s", "0"]
        env = clean_env(RUNTIME_API_KEY=f"client={CLIENT_KEY},workers={WORKER_KEY}", LEASE_SWEEP_INTERVAL=SWEEP_S)
        if self.server is not None:
            self.server.stop()  # a restart: same port, same database
            self.restarts += 1
        log_name = f"server-{self.restarts}.log" if self.restarts else "server.log"
        self.server = Process("server", argv, env, self.tmp / log_name)

        def up() -> bool:
            if not self.server.alive():
                raise AssertionError("server exited\n" + self.server.log_tail())
            try:
                with self.session.get(self.url + "/health", timeout=1) as r:
                    return r.status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(up, "server answers /health", interval_s=0.02)

    def start_worker(self, name: str, *extra: str, concurrency: int = 2, ttl_s: int = TTL_S) -> Process:
        argv = [sys.executable, "-m", "bloom_runtime.cli", "worker", "--runtime-url", self.base,
                "--api-key", WORKER_KEY, "--name", name,
                # exec: the script is the worker's own child, so it notices when the worker dies;
                # -I -S: no site-packages to scan, a quarter off each of the 200+ interpreter starts
                "--exec", f"exec {shlex.quote(sys.executable)} -I -S {shlex.quote(str(self.script))}",
                "--concurrency", str(concurrency), "--ttl", str(ttl_s), "--poll-wait", POLL_WAIT_S,
                "--grace", "2", *extra]
        proc = Process(name, argv, clean_env(), self.tmp / f"{name}.log")
        self.workers[name] = proc
        return proc

    def wait_workers_registered(self) -> None:
        def registered() -> bool:
            for proc in self.workers.values():
                if not proc.alive():
                    raise AssertionError(f"worker {proc.name} exited\n" + proc.log_tail())
            with self.session.get(self.url + "/workers") as r:
                r.raise_for_status()
                names = {w["id"] for w in items(r.json())}
            return set(self.workers) <= names

        wait_until(registered, "workers registered")

    def close(self) -> None:
        try:
            # workers first (all at once: each may wait out its claim in flight), then the server
            for proc in self.workers.values():
                proc.terminate()
            for proc in self.workers.values():
                proc.stop()
        finally:
            try:
                if self.server is not None:
                    self.server.stop()
            finally:
                self.session.close()

    def logs(self) -> str:
        procs = [p for p in (self.server, *self.workers.values()) if p is not None]
        return "\n".join(p.log_tail() for p in procs)

    # --- API -------------------------------------------------------------------

    def create_task(self, prompt: str, **fields: Any) -> dict[str, Any]:
        body = {"context_id": fields.pop("context_id", "ctx-e2e"), "agent_slug": "echo", "prompt": prompt, **fields}
        with self.session.post(self.url + "/llm-tasks", json=body) as r:
            assert r.status_code == 201, r.text
            return r.json()

    def task(self, task_id: str) -> dict[str, Any]:
        with self.session.get(self.url + f"/llm-tasks/{task_id}") as r:
            assert r.status_code == 200, r.text
            return r.json()

    def wait_task(self, task_id: str, statuses: set[str], what: str, timeout_s: float = WAIT_S) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            task = self.task(task_id)
            return task if task["status"] in statuses else None

        try:
            return wait_until(reached, what, timeout_s)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; task is {self.task(task_id)}\n{self.logs()}") from None

    # --- database (the source of truth) ---------------------------------------

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()

    def results(self, task_id: str) -> list[tuple[str, str, str | None, str | None]]:
        """(worker_id, status, output, error_message) of each result of the task, oldest first."""
        return self.query(
            "SELECT worker_id, status, output, error_message FROM llm_results WHERE task_id = ? ORDER BY completed_at, id",
            task_id,
        )

    def leases(self, task_id: str) -> list[tuple[str, str]]:
        """(worker_id, status) of each lease of the task, oldest first."""
        return self.query("SELECT worker_id, status FROM leases WHERE task_id = ? ORDER BY started_at, id", task_id)


def items(body: Any) -> list[dict[str, Any]]:
    """A list answer, bare or wrapped in a page object."""
    if isinstance(body, dict):
        for key in ("items", "data", "results"):
            if isinstance(body.get(key), list):
                return body[key]
    assert isinstance(body, list), body
    return body


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A server and two workers: ``w-cpu`` (no labels) and ``w-gpu`` (``--labels gpu``)."""
    c = Cluster(tmp_path)
    try:
        c.start_server()
        c.start_worker("w-cpu")
        c.start_worker("w-gpu", "--labels", "gpu")
        c.wait_workers_registered()
        yield c
    finally:
        c.close()


def test_200_tasks_complete_exactly_once(cluster: Cluster) -> None:
    prompts = {}
    for i in range(200):
        prompt = f"task {i}: héllo wörld {i * 7919 % 1000}"
        # several contexts, so sticky routing has no single favourite
        prompts[cluster.create_task(prompt, context_id=f"ctx-{i % 8}")["id"]] = prompt

    def all_done() -> bool:
        (done,) = cluster.query("SELECT count(*) FROM llm_tasks WHERE status = 'completed'")[0]
        for proc in cluster.workers.values():
            assert proc.alive(), proc.log_tail()
        return done == len(prompts)

    try:
        wait_until(all_done, "200 tasks completed", timeout_s=60, interval_s=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {cluster.query('SELECT status, count(*) FROM llm_tasks GROUP BY status')}\n{cluster.logs()}") from None

    rows = cluster.query("SELECT task_id, worker_id, status, output FROM llm_results")
    assert len(rows) == 200  # exactly one result per task, no duplicates, no errors
    by_task = {task_id: (worker, status, output) for task_id, worker, status, output in rows}
    assert set(by_task) == set(prompts)
    for task_id, (_worker, status, output) in by_task.items():
        assert status == "success"
        assert output == expected_output(prompts[task_id])
    # each task was leased once and that lease was released by its completion
    leases = cluster.query("SELECT task_id, worker_id, status FROM leases")
    assert len(leases) == 200 and {s for _, _, s in leases} == {"released"}
    assert {t: w for t, w, _ in leases} == {t: w for t, (w, _, _) in by_task.items()}
    # both workers took part (both long-poll from the start)
    assert {w for w, _, _ in by_task.values()} == {"w-cpu", "w-gpu"}

    # the API agrees with the database
    with cluster.session.get(cluster.url + f"/llm-tasks/{next(iter(prompts))}") as r:
        task = r.json()
    assert task["status"] == "completed" and task["attempts"] == 1
    with cluster.session.get(cluster.url + f"/llm-tasks/{task['id']}/result") as r:
        assert r.json()["output"] == expected_output(prompts[task["id"]])


def test_sigkilled_worker_task_is_retried_by_the_other(cluster: Cluster) -> None:
    marker = cluster.tmp / "blocking-run"
    task = cluster.create_task(f"block:{marker}", max_attempts=3)
    # running = the first heartbeat arrived (every TTL/3), and the script has started
    running = cluster.wait_task(task["id"], {"running"}, "blocking task running")
    wait_until(marker.exists, "blocking script started")
    victim_name = running["worker_id"]
    survivor_name = ({"w-cpu", "w-gpu"} - {victim_name}).pop()
    victim = cluster.workers[victim_name]
    pgid = int(marker.read_text())
    killed_at = time.monotonic()
    victim.kill()
    try:
        done = cluster.wait_task(task["id"], {"completed", "failed", "dead"}, "retried task finished", timeout_s=TTL_S + 20)
    finally:
        # the orphaned script leaves on its own when its parent dies; make sure of it
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    elapsed = time.monotonic() - killed_at

    assert done["status"] == "completed", (done, cluster.logs())
    assert done["worker_id"] == survivor_name and done["attempts"] == 2
    assert cluster.results(task["id"]) == [(survivor_name, "success", expected_output(f"block:{marker}"), None)]
    assert cluster.leases(task["id"]) == [(victim_name, "expired"), (survivor_name, "released")]
    # the lease outlived its worker by up to one TTL (from the last heartbeat), not by the default timeout + 30 s
    assert elapsed < TTL_S + 10, elapsed
    assert cluster.workers[survivor_name].alive()


def test_timed_out_command_is_an_error_retried_per_max_attempts(cluster: Cluster) -> None:
    task = cluster.create_task("sleep:20", policy={"timeout_sec": 1}, max_attempts=2)
    started = time.monotonic()
    done = cluster.wait_task(task["id"], {"failed", "dead", "completed"}, "timed-out task finished")
    elapsed = time.monotonic() - started

    assert done["status"] == "failed" and done["attempts"] == 2, done
    results = cluster.results(task["id"])
    assert len(results) == 2, results
    for worker, status, _output, error in results:
        assert worker in cluster.workers and status == "error"
        assert error is not None and "timed out after 1 s" in error, error
    assert [s for _, s in cluster.leases(task["id"])] == ["released", "released"]
    # two 1 s attempts (plus the runtime's retry backoff), nowhere near the 20 s sleep
    assert elapsed < 15, elapsed


def test_labelled_task_goes_only_to_the_worker_with_the_label(cluster: Cluster) -> None:
    gpu = [cluster.create_task(f"gpu job {i}", labels=["gpu"], context_id=f"ctx-gpu-{i}")["id"] for i in range(6)]
    # the gpu tasks arrive while both workers are idle and long-polling: only routing keeps w-cpu off them
    plain = [cluster.create_task(f"plain job {i}", context_id=f"ctx-plain-{i}")["id"] for i in range(6)]
    for task_id in gpu + plain:
        cluster.wait_task(task_id, {"completed", "failed", "dead"}, "task finished")

    for i, task_id in enumerate(gpu):
        task = cluster.task(task_id)
        assert task["status"] == "completed" and task["worker_id"] == "w-gpu", task
        assert cluster.results(task_id) == [("w-gpu", "success", expected_output(f"gpu job {i}"), None)]
        assert cluster.leases(task_id) == [("w-gpu", "released")]
    with cluster.session.get(cluster.url + "/results", params={"limit": 100}) as r:
        runs = {run["task_id"]: run for run in items(r.json())}
    assert {runs[t]["worker_id"] for t in gpu} == {"w-gpu"}
    assert all(runs[t]["status"] == "success" for t in gpu + plain)


def test_worker_rides_out_a_server_restart(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    try:
        c.start_server()
        # a TTL longer than the restart takes, so the lease outlives the outage; a second
        # slot keeps a long poll open, so the worker sees the runtime go away
        c.start_worker("w-only", concurrency=2, ttl_s=15)
        c.wait_workers_registered()
        task = c.create_task("sleep:3")
        # leased, not running: with a 15 s TTL the first heartbeat comes after 5 s
        c.wait_task(task["id"], {"leased", "running"}, "task leased before the restart")
        c.start_server()  # SIGTERM, wait, start again on the same port and database

        done = c.wait_task(task["id"], {"completed", "failed", "dead"}, "task finished after the restart")
        assert done["status"] == "completed" and done["attempts"] == 1, (done, c.logs())
        assert c.results(task["id"]) == [("w-only", "success", expected_output("sleep:3"), None)]
        # and the worker still claims: a new task after the restart is done too
        after = c.create_task("after the restart")
        assert c.wait_task(after["id"], {"completed", "failed", "dead"}, "new task finished")["status"] == "completed"
        assert c.workers["w-only"].alive()
        assert "claim failed" in c.workers["w-only"].log_path.read_text()  # the outage was seen, and retried
    finally:
        c.close()
