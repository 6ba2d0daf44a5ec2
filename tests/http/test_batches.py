"""Many at once over HTTP, on both stores: a list of tasks queued in one transaction,
and claims of several tasks."""

from __future__ import annotations

import pytest

from bloom_runtime.engine.models import MAX_CLAIM_TASKS, MAX_COMPLETE_BATCH, MAX_CREATE_BATCH

from .conftest import new_task, snapshot

API = "/api/runtime"


def test_a_list_of_tasks_is_queued_in_order_with_one_answer_each(make_client, db_url):
    c = make_client(database_url=db_url)
    used = c.simulate_post(f"{API}/llm-tasks", json=new_task(idempotency_key="used")).json
    body = [new_task(prompt="a"), new_task(prompt="b", idempotency_key="used"),
            new_task(prompt="c", idempotency_key="twice"), new_task(prompt="d", idempotency_key="twice")]
    r = c.simulate_post(f"{API}/llm-tasks", json=body)
    assert r.status_code == 201, r.text
    answers = r.json
    assert [a["created"] for a in answers] == [True, False, True, False]
    assert answers[0]["task"]["prompt"] == "a" and answers[0]["task"]["status"] == "queued"
    assert answers[1]["task"]["id"] == used["id"]  # a key used before: the task created first
    assert answers[3]["task"]["id"] == answers[2]["task"]["id"]  # the same key twice in one list
    listed = {t["id"] for t in c.simulate_get(f"{API}/llm-tasks").json}
    assert listed == {used["id"], answers[0]["task"]["id"], answers[2]["task"]["id"]}
    created = c.simulate_get(f"{API}/audit", params={"action": "task_created"}).json
    assert len(created) == 3  # replays record nothing


def test_a_list_retried_after_an_unknown_outcome_is_safe_with_keys(make_client, db_url):
    c = make_client(database_url=db_url)
    body = [new_task(prompt=f"p{n}", idempotency_key=f"job-{n}") for n in range(3)]
    first = c.simulate_post(f"{API}/llm-tasks", json=body[:2])  # as if its answer had been lost
    assert first.status_code == 201
    again = c.simulate_post(f"{API}/llm-tasks", json=body)
    assert again.status_code == 201
    assert [a["created"] for a in again.json] == [False, False, True]
    assert [a["task"]["id"] for a in again.json[:2]] == [a["task"]["id"] for a in first.json]
    replay = c.simulate_post(f"{API}/llm-tasks", json=body)
    assert replay.status_code == 200 and not any(a["created"] for a in replay.json)
    assert len(c.simulate_get(f"{API}/llm-tasks").json) == 3


@pytest.mark.parametrize(
    "body, headers, needle",
    [
        ([], {}, "length >= 1"),
        ([new_task()] * (MAX_CREATE_BATCH + 1), {}, f"length <= {MAX_CREATE_BATCH}"),
        ([new_task(), {**new_task(), "prompt": ""}], {}, "$[1].prompt"),
        ([new_task(), {"context_id": "c"}], {}, "$[1]"),
        ([new_task()], {"Idempotency-Key": "k"}, "per task"),
    ],
    ids=["empty", "too-long", "bad-item", "missing-fields", "header-with-list"],
)
def test_a_bad_list_is_refused_whole(client, body, headers, needle):
    before = snapshot(client.engine)
    r = client.simulate_post(f"{API}/llm-tasks", json=body, headers=headers)
    assert r.status_code == 400, r.text
    assert needle in r.json["error"]
    assert snapshot(client.engine) == before


def test_a_claim_of_several_leases_them_together(make_client, db_url):
    c = make_client(database_url=db_url)
    c.simulate_post(f"{API}/workers", json={"name": "puller", "capabilities": {"max_concurrency": 3}})
    assert c.simulate_post(f"{API}/workers/puller/claim", json={"max_tasks": 3}).status_code == 204
    made = c.simulate_post(f"{API}/llm-tasks", json=[new_task(prompt=f"p{n}") for n in range(5)]).json
    r = c.simulate_post(f"{API}/workers/puller/claim", json={"max_tasks": 8, "ttl_seconds": 60})
    assert r.status_code == 200, r.text
    grants = r.json
    assert [g["task"]["id"] for g in grants] == [m["task"]["id"] for m in made[:3]]  # its free capacity, oldest first
    assert all(g["lease"]["worker_id"] == "puller" and g["lease"]["ttl_seconds"] == 60 for g in grants)
    # Every lease comes with its own token, which proves that lease and no other.
    assert all(g["lease_token"] == c.engine.leases.token(g["lease"]["id"]) for g in grants)
    second, third = grants[1], grants[2]
    beat = c.simulate_post(f"{API}/llm-tasks/{second['task']['id']}/heartbeat", json={"lease_token": second["lease_token"]})
    assert beat.status_code == 200, beat.text
    crossed = c.simulate_post(f"{API}/llm-tasks/{third['task']['id']}/heartbeat", json={"lease_token": second["lease_token"]})
    assert crossed.status_code == 409
    assert c.simulate_post(f"{API}/workers/puller/claim", json={"max_tasks": 2}).status_code == 204  # full
    # Without max_tasks the answer keeps its one-task shape.
    done = grants[0]
    c.simulate_post(f"{API}/llm-tasks/{done['task']['id']}/complete", json={"status": "success", "output": "x"})
    one = c.simulate_post(f"{API}/workers/puller/claim", json={})
    assert one.status_code == 200 and set(one.json) >= {"task", "lease", "lease_token"}


@pytest.mark.parametrize("max_tasks", [0, MAX_CLAIM_TASKS + 1, "3", True])
def test_a_claim_of_an_invalid_number_is_refused(client, max_tasks):
    client.simulate_post(f"{API}/workers", json={"name": "puller"})
    client.simulate_post(f"{API}/llm-tasks", json=new_task())
    before = snapshot(client.engine)
    r = client.simulate_post(f"{API}/workers/puller/claim", json={"max_tasks": max_tasks})
    assert r.status_code == 400, r.text
    assert snapshot(client.engine) == before


def test_the_openapi_document_describes_both_shapes(client):
    doc = client.simulate_get(f"{API}/openapi.json").json
    create = doc["paths"][f"{API}/llm-tasks"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert any(s.get("type") == "array" and s["maxItems"] == MAX_CREATE_BATCH for s in body["anyOf"])
    claim = doc["paths"][f"{API}/workers/{{worker_id}}/claim"]["post"]
    assert any(s.get("type") == "array" for s in claim["responses"]["200"]["content"]["application/json"]["schema"]["anyOf"])
    assert "504" in create["responses"] and "504" not in doc["paths"][f"{API}/llm-tasks"]["get"]["responses"]


def _claimed(c, n: int, worker: str = "puller") -> list[dict]:
    c.simulate_post(f"{API}/workers", json={"name": worker, "capabilities": {"max_concurrency": n}})
    c.simulate_post(f"{API}/llm-tasks", json=[new_task(prompt=f"p{k}") for k in range(n)])
    r = c.simulate_post(f"{API}/workers/{worker}/claim", json={"max_tasks": n})
    assert r.status_code == 200, r.text
    return r.json


def test_results_of_several_leases_are_recorded_together_with_one_answer_each(make_client, db_url):
    c = make_client(database_url=db_url)
    grants = _claimed(c, 4)
    ok, failed, stale, forged = grants
    c.simulate_post(f"{API}/llm-tasks/{stale['task']['id']}/cancel")  # its lease ends before the batch
    body = {"worker_id": "puller", "completions": [
        {"task_id": ok["task"]["id"], "lease_id": ok["lease"]["id"], "lease_token": ok["lease_token"],
         "status": "success", "output": "done", "metrics": {"duration_ms": 3}},
        {"task_id": failed["task"]["id"], "lease_id": failed["lease"]["id"], "status": "error",
         "error_message": "boom", "retryable": False},
        {"task_id": stale["task"]["id"], "lease_id": stale["lease"]["id"], "status": "success", "output": "late"},
        {"task_id": forged["task"]["id"], "lease_token": ok["lease_token"], "status": "success", "output": "x"},
    ]}
    r = c.simulate_post(f"{API}/completions", json=body)
    assert r.status_code == 200, r.text
    answers = r.json
    assert [a["task_id"] for a in answers] == [g["task"]["id"] for g in grants]
    assert [(a["ok"], a["status"]) for a in answers] == [(True, 200), (True, 200), (False, 409), (False, 409)]
    assert answers[0]["task"]["status"] == "completed" and answers[0]["result"]["output"] == "done"
    assert answers[0]["artifact"]["task_id"] == ok["task"]["id"]
    assert answers[1]["task"]["status"] == "failed" and answers[1]["result"]["error_message"] == "boom"
    assert "error" in answers[2] and "task" not in answers[2]
    assert ok["lease_token"] not in r.text  # a token is never echoed
    # As four single calls would have left them: the refused ones unchanged, each recorded one audited.
    assert c.simulate_get(f"{API}/llm-tasks/{stale['task']['id']}").json["status"] == "cancelled"
    assert c.simulate_get(f"{API}/llm-tasks/{forged['task']['id']}").json["status"] == "leased"
    audit = c.simulate_get(f"{API}/audit", params={"action": "task_completed"}).json
    assert [(e["entity_id"], e["actor"]) for e in audit] == [(ok["task"]["id"], "puller")]
    assert len(c.simulate_get(f"{API}/audit", params={"action": "task_failed"}).json) == 1


def test_a_result_sent_twice_in_one_batch_is_recorded_once(make_client, db_url):
    c = make_client(database_url=db_url)
    (g,) = _claimed(c, 1)
    item = {"task_id": g["task"]["id"], "lease_id": g["lease"]["id"], "status": "success", "output": "x"}
    r = c.simulate_post(f"{API}/completions", json={"completions": [item, item]})
    assert r.status_code == 200, r.text
    assert [a["ok"] for a in r.json] == [True, False]
    assert len(c.simulate_get(f"{API}/llm-tasks/{g['task']['id']}/result").json) > 0
    assert len(c.simulate_get(f"{API}/audit", params={"action": "task_completed"}).json) == 1


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"completions": []}, "length >= 1"),
        ({}, "completions"),
        ([{"status": "success"}], "object"),
        ({"completions": [{"task_id": "t", "status": "success"}] * (MAX_COMPLETE_BATCH + 1)}, f"length <= {MAX_COMPLETE_BATCH}"),
        ({"completions": [{"task_id": "t", "status": "bogus"}]}, "$.completions[0].status"),
        ({"completions": [{"status": "success"}]}, "task_id"),
    ],
    ids=["empty", "missing", "a-list", "too-long", "bad-status", "no-task"],
)
def test_a_bad_batch_of_results_is_refused_whole(client, body, needle):
    (g,) = _claimed(client, 1)
    if isinstance(body, dict) and body.get("completions") and body["completions"][0].get("task_id") == "t":
        body = {"completions": [{**item, "task_id": g["task"]["id"]} for item in body["completions"]]}
    before = snapshot(client.engine)
    r = client.simulate_post(f"{API}/completions", json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json["error"], r.json
    assert snapshot(client.engine) == before
