"""What a client hears while the database does not answer: 504 for the write under
way (outcome unknown), 503 for those that never started (nothing changed), and a
retry with the same Idempotency-Key that is safe either way."""

from __future__ import annotations

from ..engine.test_deadlines import Hold, in_thread
from .conftest import new_task, wait_for


def test_create_answers_504_for_the_write_under_way_and_503_for_those_behind_it(make_client, db_url):
    client = make_client(database_url=db_url, ask_timeout_s=0.5)
    engine = client.engine
    hold = Hold(engine.store, db_url if db_url.startswith("postgresql") else None)

    def post(key: str):
        return client.simulate_post("/api/runtime/llm-tasks", json=new_task(), headers={"Idempotency-Key": key})

    with hold:
        first = in_thread(lambda: post("k0"))
        wait_for(hold.writer_waiting)
        queued = [in_thread(lambda k=k: post(k)) for k in ("k1", "k2")]
        unknown, *refused = [first(), *(join() for join in queued)]
    assert unknown.status_code == 504
    assert "may or may not have been applied" in unknown.json["error"]
    for resp in refused:
        assert resp.status_code == 503 and resp.headers["Retry-After"]
        assert "nothing was changed" in resp.json["error"]
    assert post("k0").status_code == 200  # it went through once the database answered
    assert [post(k).status_code for k in ("k1", "k2")] == [201, 201]
    assert len(client.simulate_get("/api/runtime/llm-tasks").json) == 3
