-- Push dispatch: what became of each lease sent to a worker agent, and which worker
-- URLs were vouched for. Both tables belong to the dispatcher and the registry; no
-- hot-path statement touches them.

-- One row per lease POSTed to a worker agent's /execute-task.
CREATE TABLE dispatch_deliveries (
    id              text PRIMARY KEY,
    task_id         text NOT NULL,
    lease_id        text NOT NULL UNIQUE,
    worker_id       text NOT NULL,
    url             text NOT NULL,
    state           text NOT NULL
                    CHECK (state IN ('sent', 'answered', 'agent_error', 'callback_missing', 'refused',
                                     'unreachable', 'unknown')),
    agent_status    integer,
    detail          text,
    actor           text NOT NULL,
    created_at      integer NOT NULL,
    deadline_at     integer NOT NULL,
    finished_at     integer
);
-- A task's deliveries, newest first (GET /llm-tasks/{id} shows the latest).
CREATE INDEX dispatch_deliveries_task_idx ON dispatch_deliveries (task_id, created_at DESC, id DESC);
-- Deliveries still waiting for an answer, by deadline (left by a stopped process).
CREATE INDEX dispatch_deliveries_sent_idx ON dispatch_deliveries (deadline_at) WHERE state = 'sent';

-- A worker's URL receives pushed tasks and the agent key only while it equals the
-- URL vouched for here: by an admin key or by the membridge sync.
CREATE TABLE worker_trust (
    worker_id       text PRIMARY KEY,
    url             text NOT NULL,
    vouched_by      text NOT NULL,
    updated_at      integer NOT NULL
);
-- Workers synced from membridge before this version got their URL from it.
INSERT INTO worker_trust (worker_id, url, vouched_by, updated_at)
SELECT id, url, 'membridge-sync', registered_at FROM workers
WHERE source = 'membridge' AND url IS NOT NULL AND url <> '';
