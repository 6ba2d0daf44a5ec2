"""bloom-runtime embedded: the engine facade, consumers that claim and complete.

Each consumer is a pulling worker of its own (capacity ``--batch``) that claims up
to ``--batch`` tasks at once (one at a time when 1), runs the no-op jobs side by
side and completes each; a completion is committed, with its audit entry, before
it answers.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from common import Ran, parse, report, steady_threads

from bloom_runtime.engine.engine import Engine
from bloom_runtime.engine.models import Capabilities, Completion, Fence, LeaseGrant, NewTask, WorkerUpsert
from bloom_runtime.engine.settings import Settings

DONE = Completion(status="success", output="ok")


def consume(engine: Engine, worker_id: str, batch: int, ran: Ran, stop: threading.Event) -> None:
    """A worker of capacity ``batch``: it claims its free slots at once and runs what it
    got side by side, as the worker loop does (its completions then share a transaction)."""

    def run(grant: LeaseGrant) -> None:
        ran.ran(grant.task.prompt)  # the no-op job
        engine.tasks.complete(grant.task.id, DONE, Fence(lease_id=grant.lease.id))

    with ThreadPoolExecutor(batch) as slots:
        while not stop.is_set():
            if batch == 1:
                grant = engine.leases.claim(worker_id, wait_seconds=0.5)
                if grant is not None:
                    run(grant)
                continue
            list(slots.map(run, engine.leases.claim(worker_id, wait_seconds=0.5, max_tasks=batch)))


def main() -> None:
    args = parse(__doc__ or "")
    consumers = args.c
    engine = Engine.start(Settings(database_url=args.url, pool_max=max(16, 2 * consumers + 8), lease_sweep_interval_s=2.0))
    ran, stop = Ran(), threading.Event()
    try:
        for i in range(consumers):
            engine.workers.register(WorkerUpsert(id=f"w{i}", status="online", capabilities=Capabilities(max_concurrency=args.batch)))
        threads = [threading.Thread(target=consume, args=(engine, f"w{i}", args.batch, ran, stop)) for i in range(consumers)]
        if args.workload == "drain":
            for start in range(0, args.n, 500):
                engine.tasks.create_many([NewTask(context_id="bench", agent_slug="noop", prompt=str(i))
                                          for i in range(start, min(args.n, start + 500))])
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            last = ran.wait_count(args.n)
            report(args.n, last - t0)
            return
        for t in threads:
            t.start()
        steady_threads(args.n, args.c, lambda: lambda key: engine.tasks.create(
            NewTask(context_id="bench", agent_slug="noop", prompt=key)), ran)
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join()
        engine.stop()


if __name__ == "__main__":
    main()
