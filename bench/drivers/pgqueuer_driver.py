"""PgQueuer (asyncpg) on the common workloads; runs in a virtual environment that has
pgqueuer and asyncpg.

Consumers are ``-c`` queue managers, each on its own connection, fetching up to
``--batch`` jobs at a time.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import asyncpg
from common import AsyncRan, parse, report, steady_async
from pgqueuer.db import AsyncpgDriver
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries

RAN = AsyncRan()


async def consumer(url: str, batch: int) -> tuple[QueueManager, asyncpg.Connection]:
    conn = await asyncpg.connect(url)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint("noop")
    async def noop(job):  # type: ignore[no-untyped-def]
        RAN.ran(job.payload.decode())

    return qm, conn


async def main() -> None:
    args = parse(__doc__ or "")
    admin = await asyncpg.connect(args.url)
    queries = Queries(AsyncpgDriver(admin))
    await queries.install()
    consumers = [await consumer(args.url, args.batch) for _ in range(args.c)]
    producers = [Queries(AsyncpgDriver(await asyncpg.connect(args.url))) for _ in range(args.c if args.workload == "steady" else 0)]
    try:
        if args.workload == "drain":
            for start in range(0, args.n, 500):
                keys = [str(i).encode() for i in range(start, min(args.n, start + 500))]
                await queries.enqueue(["noop"] * len(keys), keys, [0] * len(keys))
        t0 = time.perf_counter()
        runs = [asyncio.create_task(qm.run(batch_size=args.batch)) for qm, _ in consumers]
        if args.workload == "drain":
            last = await RAN.wait_count(args.n, runs)
            report(args.n, last - t0)
        else:
            await steady_async(args.n, args.c, lambda p, key: producers[p].enqueue("noop", key.encode()), RAN)
        for qm, _ in consumers:
            qm.shutdown.set()
        for outcome in await asyncio.gather(*runs, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome
    finally:
        for _, conn in consumers:
            await conn.close()
        for q in producers:
            await q.driver._connection.close()  # type: ignore[attr-defined]
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
