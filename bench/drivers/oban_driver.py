"""Oban (Python) on the common workloads; runs in a virtual environment that has oban.

Consumers are one Oban queue whose limit is ``-c`` (its producer fetches up to the
free limit at once); ``--batch`` does not apply.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import AsyncRan, parse, report, steady_async
from oban import Oban, worker
from oban.schema import install

RAN = AsyncRan()


@worker(queue="bench")
class Noop:
    async def process(self, job):  # type: ignore[no-untyped-def]
        RAN.ran(job.args["k"])


async def main() -> None:
    args = parse(__doc__ or "")
    pool = await Oban.create_pool(args.url, min_size=2, max_size=max(10, args.c + 4))
    try:
        await install(pool)
        if args.workload == "drain":
            client = Oban(pool=pool, name="client")
            for start in range(0, args.n, 500):
                await client.enqueue_many([Noop.new({"k": str(i)}) for i in range(start, min(args.n, start + 500))])
            t0 = time.perf_counter()
            async with Oban(pool=pool, queues={"bench": args.c}):
                last = await RAN.wait_count(args.n)
            report(args.n, last - t0)
            return
        async with Oban(pool=pool, queues={"bench": args.c}) as oban:
            await steady_async(args.n, args.c, lambda p, key: oban.enqueue(Noop.new({"k": key})), RAN)
    finally:
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
