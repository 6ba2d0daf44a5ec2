"""The worker loop against a runtime over real HTTP (an in-memory fake for now).

Every wait is on a condition with a deadline (``FakeRuntime.wait_for``,
``wait_until``); nothing sleeps to let time pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bloom_runtime.worker import Backoff, WorkerError, run, run_command, worker_api_key
from bloom_runtime.worker.jobs import STDERR_TAIL_BYTES

from .fake_runtime import FakeRuntime

REPO = Path(__file__).resolve().parents[1]
POLL_WAIT_S = 0.3  # short long polls so a stopped worker ends fast


def upper(task: dict[str, Any]) -> str:
    return task["prompt"].upper()


def fast_backoff() -> Backoff:
    return Backoff(base_s=0.01, cap_s=0.05, jitter=0.0)


def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s")
        time.sleep(0.01)  # polling a process table / file: there is no event to wait on
    return value


def process_gone(pid: int) -> bool:
    """Gone or a zombie (a container's init may not reap orphans promptly)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.fixture
def fake() -> Iterator[FakeRuntime]:
    with FakeRuntime() as rt:
        yield rt


@contextmanager
def running(target: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[threading.Event]:
    """Run a worker loop in a thread; stop it and wait for it on leaving."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def body() -> None:
        try:
            target(*args, stop_event=stop, **kwargs)
        except BaseException as exc:  # surfaced by the test below
            errors.append(exc)

    thread = threading.Thread(target=body, name="test-worker")
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "worker did not stop"
    if errors:
        raise errors[0]


def command_worker(fake: FakeRuntime, command: str, **kwargs: Any):
    kwargs.setdefault("name", "w1")
    kwargs.setdefault("poll_wait_s", POLL_WAIT_S)
    kwargs.setdefault("backoff", fast_backoff)
    return running(run_command, command, runtime_url=fake.url, **kwargs)


def completion(fake: FakeRuntime, task_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
    return fake.wait_for(lambda: (fake.completions.get(task_id) or [None])[0], timeout_s)


# --- running a command ------------------------------------------------------------


def test_command_gets_prompt_on_stdin_and_task_fields_in_env(fake: FakeRuntime, monkeypatch) -> None:
    monkeypatch.setenv("RUNTIME_API_KEY", "must-not-leak-1234")
    task = fake.add_task("write a poem", context_id="ctx-9", agent_slug="poet", context_hints=["a", "b c"])
    script = (
        'printf "%s|" "$(cat)" "$BLOOM_TASK_ID" "$BLOOM_CONTEXT_ID" "$BLOOM_AGENT_SLUG" '
        '"$BLOOM_DESIRED_FORMAT" "$BLOOM_CONTEXT_HINTS" "$BLOOM_ATTEMPT" "${RUNTIME_API_KEY:-unset}"'
    )
    with command_worker(fake, script):
        done = completion(fake, task["id"])
    assert done["status"] == "success", done
    assert done["output"].split("|") == ["write a poem", task["id"], "ctx-9", "poet", "text", '["a", "b c"]', "1", "unset", ""]
    assert done["lease_id"] == fake.tasks[task["id"]]["lease_id"]
    assert done["worker_id"] == "w1"
    assert done["metrics"]["tokens_used"] is None
    assert done["metrics"]["duration_ms"] > 0


def test_registers_with_capabilities_and_names_lease_on_every_call(fake: FakeRuntime) -> None:
    task = fake.add_task("x", policy={"timeout_sec": 5, "budget": 0})
    with command_worker(fake, "cat >/dev/null; echo ok", name="gpu-box", concurrency=3, labels=["gpu", "fast"], ttl_seconds=1):
        completion(fake, task["id"])
    reg = fake.calls_to("/workers")[0].body
    assert reg["name"] == "gpu-box" and reg["status"] == "online"
    assert reg["capabilities"] == {"claude_cli": True, "max_concurrency": 3, "labels": ["gpu", "fast"]}
    assert reg["install_method"] == "bloom-runtime worker" and reg["agent_version"].startswith("bloom-runtime ")
    claim = fake.calls_to("/claim")[0].body
    assert claim == {"wait_seconds": POLL_WAIT_S, "ttl_seconds": 1, "max_tasks": 3}  # one claim for every free slot
    calls = fake.calls_to("/heartbeat") + fake.calls_to("/complete")
    assert calls
    lease_id = fake.tasks[task["id"]]["lease_id"]
    for call in calls:
        assert call.body["lease_id"] == lease_id and call.body["worker_id"] == "gpu-box"
        assert call.body["lease_token"] == "token-of-" + lease_id  # the token from the claim


def test_a_worker_with_free_slots_claims_them_together(fake: FakeRuntime) -> None:
    tasks = [fake.add_task(f"t{n}") for n in range(4)]
    with command_worker(fake, "cat >/dev/null; sleep 0.2; echo ok", concurrency=3):
        for t in tasks:
            completion(fake, t["id"])
    claims = fake.calls_to("/claim")
    assert claims[0].body["max_tasks"] == 3
    # The first claim took three tasks at once, the next the fourth when a slot freed.
    assert len([c for c in claims if c.status == 200]) == 2
    assert all(fake.tasks[t["id"]]["attempts"] == 1 for t in tasks)
    # Each lease of a claim of several is reported with its own token.
    for call in fake.calls_to("/complete"):
        assert call.body["lease_token"] == "token-of-" + call.body["lease_id"]
    assert {c.body["lease_id"] for c in fake.calls_to("/complete")} == {fake.tasks[t["id"]]["lease_id"] for t in tasks}


def test_a_single_slot_worker_claims_one_task_at_a_time(fake: FakeRuntime) -> None:
    task = fake.add_task("x")
    with command_worker(fake, "cat >/dev/null; echo ok", concurrency=1):
        completion(fake, task["id"])
    assert "max_tasks" not in fake.calls_to("/claim")[0].body


def test_success_output_is_stdout(fake: FakeRuntime) -> None:
    task = fake.add_task("one two three")
    with command_worker(fake, "tr a-z A-Z"):
        done = completion(fake, task["id"])
    assert (done["status"], done["output"], done["error_message"]) == ("success", "ONE TWO THREE", None)


def test_nonzero_exit_is_an_error_with_the_tail_of_stderr(fake: FakeRuntime) -> None:
    task = fake.add_task()
    # 10 000 bytes of x, then a last line that must survive the cut to ~4 KiB
    script = "head -c 10000 /dev/zero | tr '\\0' x >&2; echo >&2; echo 'the real reason' >&2; echo partial; exit 3"
    with command_worker(fake, script):
        done = completion(fake, task["id"])
    assert done["status"] == "error"
    assert done["retryable"] is True
    assert done["error_message"].startswith("exit status 3: ")
    assert done["error_message"].endswith("the real reason")
    assert len(done["error_message"]) <= STDERR_TAIL_BYTES + 40


def test_timeout_kills_the_process_group(fake: FakeRuntime, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    task = fake.add_task(policy={"timeout_sec": 1, "budget": 0})
    # the grandchild must die too, not only the shell
    script = f"sleep 30 & echo $! > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; wait"
    started = time.monotonic()
    with command_worker(fake, script):
        done = completion(fake, task["id"], timeout_s=15)
        elapsed = time.monotonic() - started
        pid = int(pidfile.read_text())
        wait_until(lambda: process_gone(pid), 5, "sleep killed")
    assert done["status"] == "error"
    assert done["error_message"] == "timed out after 1 s"
    assert done["retryable"] is True
    assert elapsed < 10


def test_json_format_output_must_be_valid_json(fake: FakeRuntime) -> None:
    bad = fake.add_task("not json", desired_format="json")
    good = fake.add_task('{"answer": 42}', desired_format="json")
    with command_worker(fake, "cat", concurrency=2):
        bad_done = completion(fake, bad["id"])
        good_done = completion(fake, good["id"])
    assert bad_done["status"] == "error" and "not valid JSON" in bad_done["error_message"]
    assert good_done["status"] == "success" and json.loads(good_done["output"]) == {"answer": 42}


def test_output_over_the_body_limit_is_a_final_error_and_utf8_passes_intact(fake: FakeRuntime) -> None:
    big = fake.add_task("big")
    text = fake.add_task("text")
    script = 'if [ "$(cat)" = big ]; then head -c 3000000 /dev/zero | tr "\\0" y; else printf "h\\303\\251llo \\342\\234\\223"; fi'
    with command_worker(fake, script, concurrency=2):
        big_done = completion(fake, big["id"])
        text_done = completion(fake, text["id"])
    assert big_done["status"] == "error" and big_done["retryable"] is False
    assert "exceeds" in big_done["error_message"]
    assert text_done["output"] == "h\u00e9llo \u2713"
    body = [c for c in fake.calls_to("/complete") if c.body["output"] == text_done["output"]]
    assert body, "the UTF-8 output arrived as sent"


def test_stale_heartbeat_kills_the_task_and_drops_its_result(fake: FakeRuntime, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    task = fake.add_task(policy={"timeout_sec": 60, "budget": 0})
    fake.stale_heartbeats.add(task["id"])
    script = f"sleep 30 & echo $! > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; wait; echo finished"
    with command_worker(fake, script, ttl_seconds=1):
        fake.wait_for(lambda: any(c.status == 409 for c in fake.calls_to("/heartbeat")))
        pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip()))
        wait_until(lambda: process_gone(pid), 5, "task killed after 409")
    assert fake.calls_to("/complete") == []
    assert task["id"] not in fake.completions


def test_heartbeats_keep_a_long_task_alive(fake: FakeRuntime, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    task = fake.add_task()
    # runs until the test has seen two heartbeats; TTL 1 s → a heartbeat every ~0.33 s
    with command_worker(fake, f"while [ ! -e {gate} ]; do sleep 0.05; done; echo done", ttl_seconds=1):
        fake.wait_for(lambda: len([c for c in fake.calls if c.path.endswith("/heartbeat") and c.status == 200]) >= 2)
        gate.touch()
        done = completion(fake, task["id"])
    assert done["status"] == "success" and done["output"] == "done\n"
    assert fake.tasks[task["id"]]["status"] == "completed"


def test_concurrency_runs_tasks_side_by_side(fake: FakeRuntime, tmp_path: Path) -> None:
    # each task waits until the other has started: only possible with two slots
    tasks = [fake.add_task(str(i)) for i in range(2)]
    script = f"i=$(cat); touch {tmp_path}/started-$i; while [ ! -e {tmp_path}/started-$((1 - i)) ]; do sleep 0.02; done; echo $i"
    with command_worker(fake, script, concurrency=2):
        outputs = [completion(fake, t["id"])["output"] for t in tasks]
    assert outputs == ["0\n", "1\n"]


# --- the runtime misbehaving ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_retried_with_capped_exponential_backoff() -> None:
    port = free_port()
    delays: list[float] = []
    stop_after = threading.Event()
    late: list[FakeRuntime] = []

    def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 5:
            # the runtime comes up: the worker must find it without being restarted
            late.append(FakeRuntime(port=port).start())
            late[0].add_task("late")

    def handler(task: dict[str, Any]) -> str:
        stop_after.set()
        return task["prompt"].upper()

    def backoff() -> Backoff:
        return Backoff(base_s=0.1, cap_s=0.4, jitter=0.5, rand=lambda: 0.0)

    try:
        with running(run, handler, runtime_url=f"http://127.0.0.1:{port}", name="w1", backoff=backoff, sleep=sleep, poll_wait_s=POLL_WAIT_S):
            wait_until(lambda: late, 10, "runtime started")
            task_id = late[0].order[0]
            done = completion(late[0], task_id)
    finally:
        for rt in late:
            rt.close()
    assert delays == [0.1, 0.2, 0.4, 0.4, 0.4]
    assert done["output"] == "LATE"


def test_backoff_jitter_and_reset() -> None:
    values = iter([0.0, 1.0, 0.5])
    b = Backoff(base_s=1.0, cap_s=3.0, jitter=0.2, rand=lambda: next(values))
    assert [b.next_delay() for _ in range(3)] == [1.0, 2.4, 3.3]
    b.reset()
    assert Backoff(base_s=1.0, jitter=0.0).next_delay() == 1.0
    assert Backoff.CAP_S >= Backoff.BASE_S > 0


def test_503_with_retry_after_is_honoured(fake: FakeRuntime) -> None:
    delays: list[float] = []
    fake.fail_next("/claim", 503, times=2, retry_after=0.05)
    fake.fail_next("/complete", 502, times=1)
    task = fake.add_task("abc")
    with running(run, upper, runtime_url=fake.url, name="w1", backoff=fast_backoff, sleep=delays.append, poll_wait_s=POLL_WAIT_S):
        done = completion(fake, task["id"])
    assert delays[:2] == [0.05, 0.05]
    assert 0.01 in delays  # the 502 on complete was retried with the worker's own backoff
    assert done["output"] == "ABC"
    assert len(fake.completions[task["id"]]) == 1


def test_short_poll_204_with_retry_after_paces_claims(fake: FakeRuntime) -> None:
    delays: list[float] = []
    fake.fail_next("/claim", 204, times=3, retry_after=0.07)  # a runtime short of long-poll threads
    task = fake.add_task("busy")
    with running(run, upper, runtime_url=fake.url, name="w1", backoff=fast_backoff, sleep=delays.append, poll_wait_s=POLL_WAIT_S):
        assert completion(fake, task["id"])["output"] == "BUSY"
    assert delays == [0.07, 0.07, 0.07]


def test_reregisters_when_the_runtime_forgot_it(fake: FakeRuntime) -> None:
    with running(run, upper, runtime_url=fake.url, name="w1", backoff=fast_backoff, poll_wait_s=POLL_WAIT_S):
        fake.wait_for(lambda: fake.workers)
        fake.forget_workers()
        # A claim already waiting when the runtime forgot the worker may still be answered
        # with a task; the worker must meet the 404 before the task arrives.
        fake.wait_for(lambda: any(c.status == 404 for c in fake.calls if c.path.endswith("/claim")))
        task = fake.add_task("again")
        done = completion(fake, task["id"])
    assert done["output"] == "AGAIN"
    assert len(fake.calls_to("/workers")) == 2
    assert any(c.status == 404 for c in fake.calls_to("/claim"))


def test_runtime_restart_on_the_same_port() -> None:
    first = FakeRuntime().start()
    port = first.port
    second: FakeRuntime | None = None
    try:
        with running(run, upper, runtime_url=first.url, name="w1", backoff=fast_backoff, poll_wait_s=POLL_WAIT_S):
            task = first.add_task("before")
            completion(first, task["id"])
            first.close()
            second = FakeRuntime(port=port).start()  # fresh state: no workers
            task = second.add_task("after")
            assert completion(second, task["id"])["output"] == "AFTER"
    finally:
        first.close()
        if second is not None:
            second.close()


def test_api_key_is_sent_and_a_wrong_key_is_fatal() -> None:
    with FakeRuntime(api_key="right-key-123") as rt:
        task = rt.add_task("k")
        with running(run, upper, runtime_url=rt.url, name="w1", api_key="right-key-123", poll_wait_s=POLL_WAIT_S):
            completion(rt, task["id"])
        assert all(c.headers["x-runtime-api-key"] == "right-key-123" for c in rt.calls)
        with pytest.raises(WorkerError, match="API key"):
            with running(run, upper, runtime_url=rt.url, name="w2", api_key="wrong-key-123", poll_wait_s=POLL_WAIT_S):
                rt.wait_for(lambda: any(c.status == 401 for c in rt.calls))


def test_worker_api_key_takes_the_last_of_a_server_list() -> None:
    assert worker_api_key(None) is None
    assert worker_api_key("plainkey123") == "plainkey123"
    assert worker_api_key("old=k1-aaaaaaa, new=k2-bbbbbbb") == "k2-bbbbbbb"


# --- the embeddable loop -------------------------------------------------------------


def test_handler_output_and_exception(fake: FakeRuntime) -> None:
    ok = fake.add_task("fine")
    boom = fake.add_task("boom")
    js = fake.add_task("obj", desired_format="json")

    def handler(task: dict[str, Any]) -> Any:
        if task["prompt"] == "boom":
            raise RuntimeError("model unavailable")
        if task["desired_format"] == "json":
            return {"prompt": task["prompt"], "attempt": task["attempts"]}
        return f"{task['agent_slug']}: {task['prompt']}"

    with running(run, handler, runtime_url=fake.url, name="py", concurrency=2, backoff=fast_backoff, poll_wait_s=POLL_WAIT_S):
        ok_done, boom_done, js_done = (completion(fake, t["id"]) for t in (ok, boom, js))
    assert (ok_done["status"], ok_done["output"]) == ("success", "writer: fine")
    assert boom_done["status"] == "error" and boom_done["retryable"] is True
    assert boom_done["error_message"] == "RuntimeError: model unavailable"
    assert json.loads(js_done["output"]) == {"prompt": "obj", "attempt": 1}


def test_embedded_stop_waits_for_a_running_handler(fake: FakeRuntime) -> None:
    entered, release = threading.Event(), threading.Event()

    def handler(task: dict[str, Any]) -> str:
        entered.set()
        release.wait(10)
        return "finished"

    task = fake.add_task()
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(handler,), kwargs={"runtime_url": fake.url, "name": "py", "stop_event": stop, "poll_wait_s": POLL_WAIT_S})
    thread.start()
    try:
        assert entered.wait(10)
        stop.set()
        release.set()
    finally:
        stop.set()
        release.set()
        thread.join(30)
    assert fake.completions[task["id"]][0]["output"] == "finished"


def test_bad_configuration_is_refused_before_starting() -> None:
    from bloom_runtime.engine.errors import ConfigError

    with pytest.raises(ConfigError, match="worker name"):
        run(upper, runtime_url="http://127.0.0.1:1", name="bad name")
    with pytest.raises(ConfigError, match="concurrency"):
        run(upper, runtime_url="http://127.0.0.1:1", name="w", concurrency=0)
    with pytest.raises(ConfigError, match="runtime URL"):
        run(upper, runtime_url="127.0.0.1:5000", name="w")


# --- the CLI as a process --------------------------------------------------------------


@contextmanager
def worker_process(fake: FakeRuntime, *extra: str) -> Iterator[subprocess.Popen[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNTIME_", "WORKER_"))}
    env["PYTHONPATH"] = str(REPO)
    args = [sys.executable, "-m", "bloom_runtime.worker", "--runtime-url", fake.url, "--name", "cli-1", "--poll-wait", "0.3", *extra]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def test_sigterm_lets_a_running_task_finish_within_the_grace(fake: FakeRuntime, tmp_path: Path) -> None:
    mark, gate = tmp_path / "started", tmp_path / "gate"
    task = fake.add_task()
    script = f"touch {mark}; while [ ! -e {gate} ]; do sleep 0.02; done; echo done"
    with worker_process(fake, "--exec", script, "--grace", "20") as proc:
        wait_until(mark.exists, 15, "task started")
        claims = len(fake.calls_to("/claim"))
        proc.send_signal(signal.SIGTERM)
        gate.touch()  # the task finishes after the signal, inside the grace
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    done = fake.completions[task["id"]][0]
    assert (done["status"], done["output"]) == ("success", "done\n")
    assert len(fake.calls_to("/claim")) == claims  # busy and stopping: no new claim
    assert f"task {task['id']} success" in err


def test_sigterm_kills_tasks_still_running_after_the_grace(fake: FakeRuntime, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    task = fake.add_task()
    script = f"sleep 30 & echo $! > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; wait"
    with worker_process(fake, "--exec", script, "--grace", "0.5") as proc:
        pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 15, "task started"))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    wait_until(lambda: process_gone(pid), 5, "task killed")
    done = fake.completions[task["id"]][0]
    assert done["status"] == "error" and done["retryable"] is True
    assert "shutting down" in done["error_message"]


def test_second_sigterm_skips_the_grace(fake: FakeRuntime, tmp_path: Path) -> None:
    mark = tmp_path / "started"
    task = fake.add_task()
    with worker_process(fake, "--exec", f"touch {mark}; exec sleep 30", "--grace", "25") as proc:
        wait_until(mark.exists, 15, "task started")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    assert time.monotonic() - started < 15, "the second signal must not wait out the 25 s grace"
    done = fake.completions[task["id"]][0]
    assert done["status"] == "error" and done["retryable"] is True


@pytest.mark.parametrize(
    "script",
    [
        "echo $$ > {pids}.tmp; mv {pids}.tmp {pids}; exec sleep 300",  # the shell becomes the command
        "sleep 300 & echo $! > {pids}.tmp; sleep 300 | cat & echo $! >> {pids}.tmp; echo $$ >> {pids}.tmp; mv {pids}.tmp {pids}; wait",
    ],
    ids=["exec", "background-and-pipeline"],
)
def test_sigkilled_worker_takes_its_command_with_it(fake: FakeRuntime, tmp_path: Path, script: str) -> None:
    """Else the command runs on while the runtime leases the task elsewhere: two runs at once."""
    pidfile = tmp_path / "pids"
    fake.add_task()
    pids: list[int] = []
    try:
        with worker_process(fake, "--exec", script.format(pids=pidfile)) as proc:
            pids = [int(p) for p in wait_until(lambda: pidfile.exists() and pidfile.read_text().split(), 15, "command started")]
            assert not any(process_gone(pid) for pid in pids)
            proc.kill()  # SIGKILL: no handler, no finally, no atexit
            proc.wait(timeout=30)
        wait_until(lambda: all(process_gone(pid) for pid in pids), 10, "the command died with its worker")
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_an_interrupt_during_the_drain_still_kills_running_commands(fake: FakeRuntime, tmp_path: Path) -> None:
    """Every way out of ``Worker.run``, not only the end of the grace, takes its commands along.

    Here a second Ctrl-C of an embedding program arrives while the worker drains (the
    clock raises it at the drain's first reading): the 30 s grace is never waited out."""
    from bloom_runtime.worker import build_config, command_factory
    from bloom_runtime.worker.loop import Worker

    pidfile = tmp_path / "pid"
    fake.add_task()
    stop = threading.Event()

    def clock() -> float:
        if stop.is_set() and threading.current_thread().name == "test-worker":
            raise KeyboardInterrupt
        return time.monotonic()

    config = build_config(fake.url, "w1", api_key=None, concurrency=1, labels=(), ttl_seconds=None, grace_s=30,
                          poll_wait_s=POLL_WAIT_S)
    worker = Worker(config, command_factory(f"sleep 300 & echo $! > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; wait"),
                    backoff=fast_backoff, clock=clock)
    raised: list[BaseException] = []

    def body() -> None:
        try:
            worker.run(stop)
        except BaseException as exc:  # asserted below
            raised.append(exc)

    thread = threading.Thread(target=body, name="test-worker")
    thread.start()
    pid = 0
    try:
        pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 15, "command started"))
        stop.set()
        thread.join(30)
        assert not thread.is_alive() and raised and isinstance(raised[0], KeyboardInterrupt)
        wait_until(lambda: process_gone(pid), 10, "the command was killed on the way out")
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        thread.join(60)


def test_cli_reports_missing_exec_as_a_configuration_error(fake: FakeRuntime) -> None:
    with worker_process(fake) as proc:
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "--exec" in err


def test_bloom_runtime_cli_routes_worker_here() -> None:
    from bloom_runtime import cli
    from bloom_runtime.worker import cli as worker_cli

    parser = cli.build_parser()
    args = parser.parse_args(["worker", "--runtime-url", "http://127.0.0.1:5000", "--name", "n", "--exec", "wc -w", "--concurrency", "2"])
    assert args.handler is worker_cli.run
    assert (args.command, args.exec_command, args.concurrency) == ("worker", "wc -w", 2)
