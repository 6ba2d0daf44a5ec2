"""procrastinate on the common workloads; runs in a virtual environment that has
procrastinate and psycopg[binary].

Consumers are one worker of concurrency ``-c``; ``--batch`` does not apply.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import AsyncRan, parse, report, steady_async
from procrastinate import App, PsycopgConnector

RAN = AsyncRan()


async def main() -> None:
    args = parse(__doc__ or "")
    app = App(connector=PsycopgConnector(conninfo=args.url, min_size=2, max_size=max(10, 2 * args.c + 4)))

    @app.task(name="noop", queue="bench")
    async def noop(k: str) -> None:
        RAN.ran(k)

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        if args.workload == "drain":
            for start in range(0, args.n, 500):
                await noop.batch_defer_async(*({"k": str(i)} for i in range(start, min(args.n, start + 500))))
        t0 = time.perf_counter()
        worker = asyncio.create_task(app.run_worker_async(queues=["bench"], concurrency=args.c, wait=True,
                                                          install_signal_handlers=False))
        try:
            if args.workload == "drain":
                last = await RAN.wait_count(args.n)
                report(args.n, last - t0)
            else:
                await steady_async(args.n, args.c, lambda p, key: noop.defer_async(k=key), RAN)
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
