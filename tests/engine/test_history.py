"""The history sampler and the history read: minutes recorded once closed, filled in
after downtime, bucketed, pruned past the retention; on both stores, on a manual clock."""

from __future__ import annotations

import pytest

from bloom_runtime.actors.history_sampler import BACKFILL_MINUTES, MINUTE_MS
from bloom_runtime.engine.clock import ManualClock
from bloom_runtime.engine.errors import InvalidInput
from bloom_runtime.engine.models import Completion

from .conftest import new_task, worker

START = 1_700_000_040_000  # 40 s into a minute


def _finish(engine, status: str) -> None:
    task, _ = engine.tasks.create(new_task())
    grant = engine.leases.claim("w1")
    assert grant is not None and grant.task.id == task.id
    engine.tasks.complete(task.id, Completion(status=status, output="x", retryable=False))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


def test_each_closed_minute_is_recorded_once_with_depth_and_counts(engine, clock: ManualClock) -> None:
    engine.workers.register(worker("w1", max_concurrency=10))
    minute = START // MINUTE_MS * MINUTE_MS
    # A first sample finds no rows: it fills in the last hour's counts, depth only for the closed minute.
    assert engine.history.sample_now() == BACKFILL_MINUTES
    _finish(engine, "success")
    _finish(engine, "success")
    _finish(engine, "error")
    engine.tasks.create(new_task())
    engine.tasks.create(new_task())
    assert engine.history.sample_now() == 0  # this minute has not closed yet
    clock.advance(MINUTE_MS)
    assert engine.history.sample_now() == 1
    assert engine.history.sample_now() == 0
    [row] = engine.store.history(minute, minute + MINUTE_MS)
    assert (row.queued, row.leased, row.running) == (2, 0, 0)
    assert (row.created, row.completed, row.failed, row.expired) == (5, 2, 1, 0)


def test_minutes_missed_while_down_get_counts_but_no_depth(engine, clock: ManualClock) -> None:
    engine.workers.register(worker("w1", max_concurrency=10))
    engine.history.sample_now()
    minute = START // MINUTE_MS * MINUTE_MS
    _finish(engine, "success")
    clock.advance(10 * MINUTE_MS)  # nine minutes pass without a sample
    assert engine.history.sample_now() == 10
    rows = engine.store.history(minute, minute + 10 * MINUTE_MS)
    assert [r.at for r in rows] == [minute + i * MINUTE_MS for i in range(10)]
    assert rows[0].completed == 1 and rows[0].queued is None
    assert all(r.queued is None for r in rows[:-1]) and rows[-1].queued == 0


def test_a_long_outage_is_filled_in_only_for_the_last_hour(engine, clock: ManualClock) -> None:
    engine.history.sample_now()
    clock.advance(5 * 60 * MINUTE_MS)
    assert engine.history.sample_now() == BACKFILL_MINUTES


def test_window_buckets_and_counts_the_current_minute_live(engine, clock: ManualClock) -> None:
    engine.workers.register(worker("w1", max_concurrency=10))
    engine.history.sample_now()
    for _ in range(3):
        engine.tasks.create(new_task())
    clock.advance(MINUTE_MS)
    engine.history.sample_now()  # the minute with 3 queued
    _finish_queued = engine.leases.claim("w1")
    assert _finish_queued is not None
    engine.tasks.complete(_finish_queued.task.id, Completion(status="success", output="x"))

    w = engine.history.window(minutes=60)
    assert (w.minutes, w.bucket_minutes, len(w.points)) == (60, 1, 60)
    current = clock.now_ms() // MINUTE_MS * MINUTE_MS
    assert w.end == current + MINUTE_MS and w.start == w.end - 60 * MINUTE_MS
    assert [p.at for p in w.points] == [w.start + i * MINUTE_MS for i in range(60)]
    live, closed = w.points[-1], w.points[-2]
    assert (live.queued, live.completed) == (2, 1)  # counted now, not yet recorded
    assert (closed.queued, closed.created) == (3, 3)

    coarse = engine.history.window(minutes=60, bucket_minutes=15)
    assert [p.at for p in coarse.points] == [coarse.start + i * 15 * MINUTE_MS for i in range(4)]
    assert coarse.points[-1].queued == 3  # the largest depth within the bucket
    assert sum(p.created for p in coarse.points) == 3 and sum(p.completed for p in coarse.points) == 1
    # The default bucket keeps a day to a readable number of points.
    day = engine.history.window(minutes=1440)
    assert day.bucket_minutes == 12 and len(day.points) == 120


@pytest.mark.parametrize(("minutes", "bucket"), [(0, None), (7 * 1440 + 1, None), (60, 0), (60, 61), (7 * 1440, 1)])
def test_window_refuses_bad_sizes(engine, minutes: int, bucket: int | None) -> None:
    with pytest.raises(InvalidInput):
        engine.history.window(minutes=minutes, bucket_minutes=bucket)


def test_rows_past_the_retention_are_pruned(make_engine, clock: ManualClock) -> None:
    engine = make_engine(history_retention_days=1.0)
    engine.history.sample_now()
    first = engine.store.history(0, clock.now_ms())
    assert len(first) == BACKFILL_MINUTES
    clock.advance(1440 * MINUTE_MS + 5 * MINUTE_MS)
    engine.history.sample_now()
    kept = engine.store.history(0, clock.now_ms())
    assert kept and min(p.at for p in kept) >= clock.now_ms() - 1440 * MINUTE_MS - MINUTE_MS


def test_queue_state_names_the_oldest_queued_task(engine, clock: ManualClock) -> None:
    assert engine.history.queue().oldest_queued is None
    first, _ = engine.tasks.create(new_task())
    clock.advance(5000)
    engine.tasks.create(new_task())
    state = engine.history.queue()
    assert (state.queued, state.leased, state.running) == (2, 0, 0)
    assert state.oldest_queued is not None
    assert (state.oldest_queued.id, state.oldest_queued.age_ms) == (first.id, 5000)


def test_sampler_health_shows_in_the_jobs(engine) -> None:
    engine.history.sample_now()
    job = engine.health()["jobs"]["history_sample"]
    assert job["runs"] == 1 and job["failures"] == 0 and job["last_success"] is not None


def test_a_failed_sample_is_reported_and_the_next_one_catches_up(engine) -> None:
    from bloom_runtime.engine.errors import StoreUnavailable

    store = engine.store
    real = store.activity

    def down(since: int, until: int) -> dict:
        raise StoreUnavailable("database down")

    store.activity = down
    with pytest.raises(StoreUnavailable):
        engine.history.sample_now()
    job = engine.health()["jobs"]["history_sample"]
    assert job["failures"] == 1 and job["last_error"] == "StoreUnavailable: storage unavailable"  # /health is open: no message
    store.activity = real
    assert engine.history.sample_now() == BACKFILL_MINUTES
    assert engine.health()["jobs"]["history_sample"]["last_error"] is None
