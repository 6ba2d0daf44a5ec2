"""Engine start/stop, audit draining, periodic job failures and actor restarts."""

from __future__ import annotations

import time

import pytest

from bloom_runtime.actors.base import Record, audit
from bloom_runtime.engine.errors import EngineStopped
from bloom_runtime.engine.models import new_id

from .conftest import new_task, worker


def wait_for(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_stop_writes_10000_pending_audit_entries(make_engine, raw_sql):
    engine = make_engine()
    for _ in range(100):
        engine.record([audit(1, "probe", "test", new_id(), "test") for _ in range(100)], wait=False)
    engine.stop()
    assert raw_sql("SELECT COUNT(*) FROM audit_logs WHERE action = 'probe'") == [(10000,)]


def test_stopped_engine_refuses_work(engine):
    engine.stop()
    with pytest.raises(EngineStopped):
        engine.tasks.create(new_task())
    engine.stop()  # idempotent


def test_context_manager(make_engine):
    engine = make_engine()
    with engine as e:
        e.tasks.create(new_task())
    assert not engine.running


def test_sweep_survives_an_injected_failure(make_engine, clock):
    engine = make_engine(lease_sweep_interval_s=0.05)
    engine.workers.register(worker("w1"))
    task, _ = engine.tasks.create(new_task(max_attempts=3))
    engine.leases.acquire(task.id, ttl_seconds=1)
    calls = {"n": 0}

    def fail_once() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")

    engine.sweep_fault = fail_once
    clock.advance(2_000)
    wait_for(lambda: engine.jobs["lease_sweep"].failures >= 1)
    wait_for(lambda: engine.tasks.get(task.id).status == "queued")
    wait_for(lambda: engine.jobs["lease_sweep"].last_error is None)  # recorded just after the sweep commits
    assert engine.health()["actors"]["lease-supervisor-0"]["alive"]


def test_health_unhealthy_when_sweep_keeps_failing(make_engine, clock):
    engine = make_engine(lease_sweep_interval_s=0.05)
    assert engine.health()["status"] == "ok"

    def always() -> None:
        raise RuntimeError("injected")

    engine.sweep_fault = always
    wait_for(lambda: engine.jobs["lease_sweep"].failures >= 1)
    # The sweep health uses the engine clock: three intervals without success → unhealthy.
    clock.advance(10_000)
    assert engine.health()["status"] == "unhealthy"
    engine.sweep_fault = None
    wait_for(lambda: engine.health()["status"] == "ok")


def test_dead_actor_is_restarted(engine):
    old = engine._slots["queue"].ref
    old.stop()
    wait_for(lambda: engine._slots["queue"].ref is not old and engine._slots["queue"].ref.is_alive())
    _task, created = engine.tasks.create(new_task())
    assert created
    assert engine._slots["queue"].restarts == 1


def test_audit_group_commit_off(make_engine, raw_sql):
    engine = make_engine(audit_group_commit=False)
    engine.workers.register(worker("w1"))
    for _ in range(20):
        engine.tasks.create(new_task())
    assert raw_sql("SELECT COUNT(*) FROM audit_logs WHERE action = 'task_created'") == [(20,)]


def test_record_entries(engine):
    engine.record([audit(5, "config_changed", "settings", "membridge", "ops")])
    assert engine.audit.list().items[0].action == "config_changed"
    _ = Record
