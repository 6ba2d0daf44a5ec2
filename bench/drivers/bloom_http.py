"""bloom-runtime over HTTP: its own worker loop (``bloom_runtime.worker.run``) against
a running server (``--runtime-url``), producers posting tasks over keep-alive.

A drain has ``-c`` workers of concurrency ``--batch``, as the embedded driver's
consumers: each claims its free slots at once (one task at a time with ``--batch 1``),
and the results finishing together go back in one request. A steady lifecycle has one
worker of concurrency ``-c``. Every completion is committed before the worker hears back.
"""

from __future__ import annotations

import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from common import Ran, parse, report, steady_threads
from http_lifecycle import KEY, Client

from bloom_runtime.worker import run


def main() -> None:
    args = parse(__doc__ or "")
    base = args.runtime_url.rstrip("/")
    root = base.rsplit("/api/runtime", 1)[0]
    ran, stop = Ran(), threading.Event()

    def handler(task: dict) -> str:
        ran.ran(task["prompt"])
        return "ok"

    if args.workload == "drain":
        workers = [(f"w{i}", args.batch) for i in range(args.c)]
    else:
        workers = [("w0", args.c)]
    loops = [
        threading.Thread(target=run, args=(handler,), kwargs={
            "runtime_url": root, "name": name, "api_key": KEY, "concurrency": conc, "stop_event": stop,
            "poll_wait_s": 1.0, "grace_s": 5.0,
        })
        for name, conc in workers
    ]
    try:
        if args.workload == "drain":
            c = Client(base)
            for start in range(0, args.n, 500):
                status, _ = c.post("/llm-tasks", [{"context_id": "bench", "agent_slug": "noop", "prompt": str(i)}
                                                  for i in range(start, min(args.n, start + 500))])
                assert status == 201, status
            c.close()
            t0 = time.perf_counter()
            for t in loops:
                t.start()
            last = ran.wait_count(args.n)
            report(args.n, last - t0)
            return
        for t in loops:
            t.start()

        class Producer:
            """One keep-alive connection posting tasks."""

            def __init__(self) -> None:
                self.client = Client(base)

            def __call__(self, key: str) -> None:
                status, _ = self.client.post("/llm-tasks", {"context_id": "bench", "agent_slug": "noop", "prompt": key})
                assert status == 201, status

            def close(self) -> None:
                self.client.close()

        steady_threads(args.n, args.c, Producer, ran)
    finally:
        stop.set()
        for t in loops:
            if t.is_alive():
                t.join()


if __name__ == "__main__":
    main()
