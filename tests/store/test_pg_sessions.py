"""PostgreSQL sessions the store reuses: what a rolled-back or killed session leaves behind.

Each test pins the store to one pooled connection, so the write under test runs on
the very session the previous fault touched.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bloom_runtime.engine.models import new_id
from bloom_runtime.sql.postgres import PostgresStore
from bloom_runtime.sql.store import CreateOp

from ..conftest import truncate_pg
from .test_contract import T0, add_task, new_task

pytestmark = pytest.mark.postgres


@pytest.fixture
def one_conn_store(pg_url: str) -> Iterator[PostgresStore]:
    truncate_pg(pg_url)
    store = PostgresStore(pg_url, pool_min=1, pool_max=1)
    store.open(wait_s=10)
    try:
        yield store
    finally:
        store.close()


def create_batch(store: PostgresStore, n: int = 1) -> list[str]:
    ops = [CreateOp(new_task(), new_id()) for _ in range(n)]
    with store.transaction() as tx:
        out = tx.apply(ops, T0, commit=True)
    return [task.id for task, _created in out]


class Boom(Exception):
    pass


def test_a_write_after_a_rolled_back_one_on_the_same_connection_succeeds(one_conn_store: PostgresStore) -> None:
    store = one_conn_store
    task = add_task(store)
    for _ in range(8):  # often enough for the driver to prepare the read itself
        store.get_task(task.id)
    create_batch(store)  # the session now holds the batch statements
    for _ in range(3):
        with pytest.raises(Boom), store.transaction() as tx:
            tx.create_task(new_task(), new_id(), T0)
            raise Boom
        made = create_batch(store, 2)
        assert [store.get_task(i).status for i in made] == ["queued", "queued"]
