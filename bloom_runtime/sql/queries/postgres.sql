-- PostgreSQL statements of bloom-runtime, by name (see bloom_runtime/sql/queries.py).
--
-- Column orders are fixed: Python builds records by position.
--   task   (17): id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
--                created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
--                not_before, idempotency_key
--   lease   (9): id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
--   worker (15): id, node_id, url, status, capabilities, last_heartbeat, ip_addrs, obs_count, db_sha,
--                registered_at, agent_version, os_info, install_method, source, active_leases (computed)
-- Lock order (see postgres.py): task row -> worker rows (by id) -> lease rows.

-- ---------------------------------------------------------------- migrations

-- name: migrations_lock
-- Serialise migrators across processes; released at commit.
SELECT pg_advisory_xact_lock(7406113301)

-- name: create_schema_migrations
CREATE TABLE IF NOT EXISTS schema_migrations (version text PRIMARY KEY, applied_at bigint NOT NULL)

-- name: schema_migrations_exists
SELECT to_regclass('schema_migrations') IS NOT NULL

-- name: applied_migrations
SELECT version FROM schema_migrations

-- name: record_migration
INSERT INTO schema_migrations (version, applied_at) VALUES (%(version)s, %(now)s)

-- name: ping
SELECT 1

-- name: set_statement_timeout
-- Bound every statement of this session (milliseconds, as text; '0': no bound).
SELECT set_config('statement_timeout', %(ms)s, false)

-- name: no_statement_timeout
-- A migration may run long (an index on a large table): no bound for this transaction.
SELECT set_config('statement_timeout', '0', true)

-- ---------------------------------------------------------------- notifications

-- name: notify_tasks
-- Wake claimers in every process; delivered at commit, once per transaction.
SELECT pg_notify('bloom_tasks', '')

-- name: listen_tasks
LISTEN bloom_tasks

-- ---------------------------------------------------------------- tasks

-- name: create_task
-- A used idempotency key (or task id) inserts nothing; the caller then finds out which.
INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, context_hints, policy, desired_format,
                       status, created_at, updated_at, attempts, max_attempts, labels, idempotency_key)
VALUES (%(id)s, %(context_id)s, %(agent_slug)s, %(prompt)s, %(context_hints)s::jsonb, %(policy)s::jsonb,
        %(desired_format)s, 'queued', %(now)s, %(now)s, 0, %(max_attempts)s, %(labels)s::jsonb,
        %(idempotency_key)s)
ON CONFLICT DO NOTHING
RETURNING id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
          created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
          not_before, idempotency_key

-- name: get_task
SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
       not_before, idempotency_key
FROM llm_tasks WHERE id = %(id)s

-- name: lock_task
-- First step of every task transition: later statements run in a fresh snapshot
-- taken after this lock, so they see everything its previous holder committed.
SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
       not_before, idempotency_key
FROM llm_tasks WHERE id = %(id)s
FOR UPDATE

-- name: get_task_by_idempotency_key
SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
       not_before, idempotency_key
FROM llm_tasks WHERE idempotency_key = %(key)s

-- name: task_status
SELECT status FROM llm_tasks WHERE id = %(id)s

-- name: list_tasks
-- Keyset page, newest first; the first page passes the largest bigint as the bound.
SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
       not_before, idempotency_key
FROM llm_tasks
WHERE (created_at, id) < (%(after_at)s, %(after_id)s)
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s

-- name: list_tasks_by_status
SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
       not_before, idempotency_key
FROM llm_tasks
WHERE status = %(status)s AND (created_at, id) < (%(after_at)s, %(after_id)s)
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s

-- name: requeue_task
UPDATE llm_tasks
SET status = 'queued', attempts = 0, not_before = NULL, lease_id = NULL, worker_id = NULL,
    updated_at = %(now)s
WHERE id = %(id)s AND status IN ('failed', 'dead')
RETURNING id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
          created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
          not_before, idempotency_key

-- ---------------------------------------------------------------- leasing

-- name: lock_workers
-- Lock the candidate workers in id order: two acquirers never wait on each other in a cycle.
SELECT id FROM workers WHERE id = ANY(%(ids)s::text[]) ORDER BY id FOR UPDATE

-- name: grant_lease
-- Runs after lock_task and lock_workers, so the active-lease counts are exact: every
-- lease insert for a worker happens under that worker's row lock.
WITH cand AS (
    SELECT w.id, w.node_id, w.url, w.status, w.capabilities, w.last_heartbeat, w.ip_addrs,
           w.obs_count, w.db_sha, w.registered_at, w.agent_version, w.os_info,
           w.install_method, w.source,
           (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active') AS active,
           array_position(%(ids)s::text[], w.id) AS pos
    FROM workers w
    WHERE w.id = ANY(%(ids)s::text[])
), chosen AS (
    SELECT * FROM cand
    WHERE active < COALESCE((capabilities ->> 'max_concurrency')::int, 1)
    ORDER BY pos
    LIMIT 1
), t AS (
    UPDATE llm_tasks
    SET status = 'leased', attempts = attempts + 1, lease_id = %(lease_id)s,
        worker_id = chosen.id, updated_at = %(now)s
    FROM chosen
    WHERE llm_tasks.id = %(task_id)s
    RETURNING llm_tasks.id, llm_tasks.context_id, llm_tasks.agent_slug, llm_tasks.prompt,
              llm_tasks.context_hints, llm_tasks.policy, llm_tasks.desired_format, llm_tasks.status,
              llm_tasks.created_at, llm_tasks.updated_at, llm_tasks.lease_id, llm_tasks.worker_id,
              llm_tasks.attempts, llm_tasks.max_attempts, llm_tasks.labels, llm_tasks.not_before,
              llm_tasks.idempotency_key
), l AS (
    INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status,
                        last_heartbeat, context_id)
    SELECT %(lease_id)s, t.id, t.worker_id, %(now)s, %(now)s::bigint + %(ttl)s::bigint * 1000,
           %(ttl)s, 'active', %(now)s, t.context_id
    FROM t
    RETURNING id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat,
              context_id
)
SELECT t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key,
       l.id, l.task_id, l.worker_id, l.started_at, l.expires_at, l.ttl_seconds, l.status,
       l.last_heartbeat, l.context_id,
       c.id, c.node_id, c.url, c.status, c.capabilities, c.last_heartbeat, c.ip_addrs, c.obs_count,
       c.db_sha, c.registered_at, c.agent_version, c.os_info, c.install_method, c.source,
       c.active + 1
FROM t, l, chosen c

-- name: claim_touch_worker
-- Lock the claiming worker (first lock of claim_next) and record the claim as its heartbeat.
UPDATE workers SET last_heartbeat = %(now)s, status = 'online', source = 'pull'
WHERE id = %(worker_id)s
RETURNING id, node_id, url, status, capabilities, last_heartbeat, ip_addrs, obs_count, db_sha,
          registered_at, agent_version, os_info, install_method, source

-- name: claim_task
-- Runs after claim_touch_worker holds the worker row, so the count is exact. Task rows
-- are taken with SKIP LOCKED: claim_next never waits for a task lock.
WITH w AS (
    SELECT (SELECT count(*) FROM leases l
            WHERE l.worker_id = %(worker_id)s AND l.status = 'active') AS active,
           COALESCE((capabilities ->> 'max_concurrency')::int, 1) AS cap,
           COALESCE(capabilities -> 'labels', '[]'::jsonb) AS labels
    FROM workers WHERE id = %(worker_id)s
), pick AS (
    SELECT t.id
    FROM llm_tasks t, w
    WHERE t.status = 'queued'
      AND w.active < w.cap
      AND (t.not_before IS NULL OR t.not_before <= %(now)s)
      AND t.attempts < t.max_attempts
      AND t.labels <@ w.labels
    ORDER BY t.created_at, t.id
    LIMIT 1
    FOR UPDATE OF t SKIP LOCKED
), t AS (
    UPDATE llm_tasks
    SET status = 'leased', attempts = attempts + 1, lease_id = %(lease_id)s,
        worker_id = %(worker_id)s, updated_at = %(now)s
    FROM pick
    WHERE llm_tasks.id = pick.id
    RETURNING llm_tasks.id, llm_tasks.context_id, llm_tasks.agent_slug, llm_tasks.prompt,
              llm_tasks.context_hints, llm_tasks.policy, llm_tasks.desired_format, llm_tasks.status,
              llm_tasks.created_at, llm_tasks.updated_at, llm_tasks.lease_id, llm_tasks.worker_id,
              llm_tasks.attempts, llm_tasks.max_attempts, llm_tasks.labels, llm_tasks.not_before,
              llm_tasks.idempotency_key
), l AS (
    INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status,
                        last_heartbeat, context_id)
    SELECT %(lease_id)s, t.id, t.worker_id, %(now)s,
           %(now)s::bigint + 1000::bigint * COALESCE(%(ttl)s::int, (t.policy ->> 'timeout_sec')::int + %(grace)s::int),
           COALESCE(%(ttl)s::int, (t.policy ->> 'timeout_sec')::int + %(grace)s::int),
           'active', %(now)s, t.context_id
    FROM t
    RETURNING id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat,
              context_id
)
SELECT t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key,
       l.id, l.task_id, l.worker_id, l.started_at, l.expires_at, l.ttl_seconds, l.status,
       l.last_heartbeat, l.context_id,
       w.active + 1
FROM t, l, w

-- name: heartbeat_fenced
-- Heartbeat in one statement: lock the task only if it holds a lease the fence
-- accepts, renew that lease, move the task to running. No row: refused (the caller
-- reads the task to say why); nothing was written.
WITH h AS (
    SELECT id, lease_id, worker_id FROM llm_tasks
    WHERE id = %(task_id)s AND status IN ('leased', 'running')
      AND (%(fence_lease_id)s::text IS NULL OR lease_id = %(fence_lease_id)s::text)
      AND (%(fence_worker_id)s::text IS NULL OR worker_id = %(fence_worker_id)s::text)
    FOR UPDATE
), l AS (
    UPDATE leases
    SET expires_at = %(now)s::bigint + ttl_seconds::bigint * 1000, last_heartbeat = %(now)s
    FROM h
    WHERE leases.id = h.lease_id AND leases.status = 'active'
    RETURNING leases.id, leases.task_id, leases.worker_id, leases.started_at, leases.expires_at,
              leases.ttl_seconds, leases.status, leases.last_heartbeat, leases.context_id
), t AS (
    UPDATE llm_tasks SET status = 'running', updated_at = %(now)s
    FROM l
    WHERE llm_tasks.id = l.task_id AND llm_tasks.lease_id = l.id
    RETURNING llm_tasks.id, llm_tasks.context_id, llm_tasks.agent_slug, llm_tasks.prompt,
              llm_tasks.context_hints, llm_tasks.policy, llm_tasks.desired_format, llm_tasks.status,
              llm_tasks.created_at, llm_tasks.updated_at, llm_tasks.lease_id, llm_tasks.worker_id,
              llm_tasks.attempts, llm_tasks.max_attempts, llm_tasks.labels, llm_tasks.not_before,
              llm_tasks.idempotency_key
), w AS (
    -- See renew_lease: the worker row is refreshed at most every 5 s.
    UPDATE workers SET last_heartbeat = %(now)s
    FROM l
    WHERE workers.id = l.worker_id
      AND (workers.last_heartbeat IS NULL OR workers.last_heartbeat < %(now)s::bigint - 5000)
    RETURNING 1
)
SELECT t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key,
       l.id, l.task_id, l.worker_id, l.started_at, l.expires_at, l.ttl_seconds, l.status,
       l.last_heartbeat, l.context_id
FROM t, l;

-- name: renew_lease
-- Heartbeat after lock_task and the fence check. The worker row is updated last
-- (an unreferenced data-modifying CTE runs after the main query): task -> lease -> worker.
WITH l AS (
    UPDATE leases
    SET expires_at = %(now)s::bigint + ttl_seconds::bigint * 1000, last_heartbeat = %(now)s
    WHERE id = %(lease_id)s AND status = 'active'
    RETURNING id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat,
              context_id
), t AS (
    UPDATE llm_tasks SET status = 'running', updated_at = %(now)s
    WHERE id = %(task_id)s AND lease_id = %(lease_id)s AND EXISTS (SELECT 1 FROM l)
    RETURNING id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
              created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
              not_before, idempotency_key
), w AS (
    -- Liveness needs no finer grain than WORKER_TOUCH_MS; skipping fresher rows keeps
    -- heartbeats of one worker from queueing on its row lock.
    UPDATE workers SET last_heartbeat = %(now)s
    WHERE id = %(worker_id)s AND EXISTS (SELECT 1 FROM l)
      AND (last_heartbeat IS NULL OR last_heartbeat < %(now)s::bigint - 5000)
    RETURNING 1
)
SELECT t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key,
       l.id, l.task_id, l.worker_id, l.started_at, l.expires_at, l.ttl_seconds, l.status,
       l.last_heartbeat, l.context_id
FROM t, l

-- name: finish_task
-- complete() after lock_task and the fence check: release the lease, move the task,
-- insert the artifact and the result, all in one statement.
WITH l AS (
    UPDATE leases SET status = 'released'
    WHERE id = %(lease_id)s AND status = 'active'
    RETURNING id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat,
              context_id
), t AS (
    UPDATE llm_tasks
    SET status = %(status)s, not_before = COALESCE(%(not_before)s::bigint, not_before),
        lease_id = %(keep_lease_id)s, worker_id = %(keep_worker_id)s, updated_at = %(now)s
    WHERE id = %(task_id)s
    RETURNING id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
              created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
              not_before, idempotency_key
), a AS (
    INSERT INTO runtime_artifacts (id, task_id, job_id, type, created_at, finalized, url,
                                   entity_refs, tags, content)
    VALUES (%(artifact_id)s, %(task_id)s, NULL, %(artifact_type)s, %(now)s, true, NULL,
            '[]'::jsonb, %(tags)s::jsonb, %(content)s)
    RETURNING id, task_id, job_id, type, created_at, finalized, url, entity_refs, tags, content
), r AS (
    INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message,
                             metrics, completed_at)
    VALUES (%(result_id)s, %(task_id)s, %(worker_id)s, %(artifact_id)s, %(result_status)s,
            %(output)s, %(error_message)s, %(metrics)s::jsonb, %(now)s)
    RETURNING id, task_id, worker_id, artifact_id, status, output, error_message, metrics,
              completed_at
)
SELECT t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key,
       a.id, a.task_id, a.job_id, a.type, a.created_at, a.finalized, a.url, a.entity_refs, a.tags,
       a.content,
       r.id, r.task_id, r.worker_id, r.artifact_id, r.status, r.output, r.error_message, r.metrics,
       r.completed_at,
       l.id, l.task_id, l.worker_id, l.started_at, l.expires_at, l.ttl_seconds, l.status,
       l.last_heartbeat, l.context_id
FROM t CROSS JOIN a CROSS JOIN r LEFT JOIN l ON true

-- ---------------------------------------------------------------- many at once
--
-- Transaction.apply sends a batch's hot-path writes in one round trip, each kind as one
-- statement over a JSON array of rows (one parameter: cheap to quote and to parse): lock_tasks first (ascending id), then lock_workers,
-- then the set statements. Each statement of a multi-statement message takes its own
-- snapshot, so the set statements see everything committed before the locks were
-- granted, and decide in SQL, row by row, what the one-at-a-time paths decide in Python.

-- name: insert_audit
-- The audit entries of a batch, as a JSON array of objects named like the columns.
INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
SELECT * FROM json_to_recordset(%(rows)s::json)
    AS a(id text, timestamp bigint, action text, entity_type text, entity_id text, actor text,
         detail text)

-- name: lock_tasks
-- What a refusal is explained from (see _TaskState); the rows stay locked to commit.
SELECT id, status, lease_id, worker_id, not_before, attempts, max_attempts
FROM llm_tasks WHERE id = ANY(%(ids)s::text[])
ORDER BY id
FOR UPDATE

-- name: create_tasks
-- A used idempotency key or task id inserts nothing; the caller sorts those out one by one.
-- Rows naming an actor get their task_created entry here (worded as in task_queue.py).
WITH i AS (
    SELECT * FROM json_to_recordset(%(rows)s::json)
        AS i(id text, context_id text, agent_slug text, prompt text, context_hints jsonb,
             policy jsonb, desired_format text, max_attempts int, labels jsonb,
             idempotency_key text, actor text, audit_id text)
), ins AS (
    INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, context_hints, policy, desired_format,
                           status, created_at, updated_at, attempts, max_attempts, labels,
                           idempotency_key)
    SELECT i.id, i.context_id, i.agent_slug, i.prompt, i.context_hints, i.policy, i.desired_format,
           'queued', %(now)s, %(now)s, 0, i.max_attempts, i.labels, i.idempotency_key
    FROM i
    ON CONFLICT DO NOTHING
    RETURNING id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
              created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
              not_before, idempotency_key
), aud AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT i.audit_id, %(now)s, 'task_created', 'task', ins.id, i.actor,
           'agent=' || ins.agent_slug || ' context=' || ins.context_id
    FROM ins JOIN i ON i.id = ins.id
    WHERE i.actor IS NOT NULL
)
SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
       not_before, idempotency_key
FROM ins

-- name: grant_leases
-- Acquires of tasks held by lock_tasks, each naming one worker held by lock_workers. A
-- worker takes the batch's requests in order while active + rank <= max_concurrency.
WITH i AS (
    SELECT * FROM json_to_recordset(%(rows)s::json)
                  AS i(ord int, task_id text, lease_id text, worker_id text, ttl int, actor text,
                       audit_id text)
), cur AS MATERIALIZED (
    -- The batch's tasks by primary key; materialised so their status is not looked up
    -- through a status index, whose scan grows with the table.
    SELECT id, status, not_before, attempts, max_attempts, policy FROM llm_tasks
    WHERE id = ANY(ARRAY(SELECT task_id FROM i))
), ok AS (
    SELECT i.task_id, i.lease_id, i.worker_id, i.actor, i.audit_id,
           COALESCE(i.ttl, COALESCE((t.policy ->> 'timeout_sec')::int, %(default_timeout)s::int)
                           + %(grace)s::int) AS ttl,
           row_number() OVER (PARTITION BY i.worker_id ORDER BY i.ord) AS rank
    FROM i JOIN cur t ON t.id = i.task_id
    WHERE t.status = 'queued' AND (t.not_before IS NULL OR t.not_before <= %(now)s)
      AND t.attempts < t.max_attempts
), w AS (
    SELECT w.id, w.node_id, w.url, w.status, w.capabilities, w.last_heartbeat, w.ip_addrs,
           w.obs_count, w.db_sha, w.registered_at, w.agent_version, w.os_info, w.install_method,
           w.source,
           (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active') AS active,
           COALESCE((w.capabilities ->> 'max_concurrency')::int, 1) AS cap
    FROM workers w WHERE w.id IN (SELECT worker_id FROM ok)
), g AS (
    SELECT ok.*, w.active + ok.rank AS load FROM ok JOIN w ON w.id = ok.worker_id
    WHERE w.active + ok.rank <= w.cap
), t AS (
    UPDATE llm_tasks
    SET status = 'leased', attempts = attempts + 1, lease_id = g.lease_id, worker_id = g.worker_id,
        updated_at = %(now)s
    FROM g
    WHERE llm_tasks.id = g.task_id
    RETURNING llm_tasks.id, llm_tasks.context_id, llm_tasks.agent_slug, llm_tasks.prompt,
              llm_tasks.context_hints, llm_tasks.policy, llm_tasks.desired_format, llm_tasks.status,
              llm_tasks.created_at, llm_tasks.updated_at, llm_tasks.lease_id, llm_tasks.worker_id,
              llm_tasks.attempts, llm_tasks.max_attempts, llm_tasks.labels, llm_tasks.not_before,
              llm_tasks.idempotency_key
), l AS (
    INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status,
                        last_heartbeat, context_id)
    SELECT g.lease_id, t.id, g.worker_id, %(now)s, %(now)s::bigint + g.ttl::bigint * 1000, g.ttl,
           'active', %(now)s, t.context_id
    FROM g JOIN t ON t.id = g.task_id
    RETURNING id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat,
              context_id
), aud AS (
    -- task_leased, worded as in lease_supervisor.py
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT g.audit_id, %(now)s, 'task_leased', 'task', t.id, g.actor,
           'lease=' || l.id || ' worker=' || l.worker_id || ' ttl=' || l.ttl_seconds
           || 's attempt=' || t.attempts
    FROM t JOIN l ON l.task_id = t.id JOIN g ON g.task_id = t.id
    WHERE g.actor IS NOT NULL
)
SELECT t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key,
       l.id, l.task_id, l.worker_id, l.started_at, l.expires_at, l.ttl_seconds, l.status,
       l.last_heartbeat, l.context_id,
       w.id, w.node_id, w.url, w.status, w.capabilities, w.last_heartbeat, w.ip_addrs, w.obs_count,
       w.db_sha, w.registered_at, w.agent_version, w.os_info, w.install_method, w.source,
       g.load
FROM t JOIN l ON l.task_id = t.id JOIN g ON g.task_id = t.id JOIN w ON w.id = g.worker_id

-- name: renew_leases
-- Heartbeats of tasks held by lock_tasks whose fence accepts them. Worker rows are
-- refreshed at most every 5 s (see renew_lease), locked in id order, last.
WITH i AS (
    SELECT * FROM json_to_recordset(%(rows)s::json)
                  AS i(task_id text, fence_lease_id text, fence_worker_id text, actor text,
                       audit_id text)
), cur AS MATERIALIZED (
    -- by primary key, not through a status index (see grant_leases)
    SELECT id, status, lease_id, worker_id FROM llm_tasks WHERE id = ANY(ARRAY(SELECT task_id FROM i))
), h AS (
    SELECT t.id, t.lease_id FROM cur t JOIN i ON t.id = i.task_id
    WHERE t.status IN ('leased', 'running')
      AND (i.fence_lease_id IS NULL OR t.lease_id = i.fence_lease_id)
      AND (i.fence_worker_id IS NULL OR t.worker_id = i.fence_worker_id)
), l AS (
    UPDATE leases
    SET expires_at = %(now)s::bigint + ttl_seconds::bigint * 1000, last_heartbeat = %(now)s
    FROM h
    WHERE leases.id = h.lease_id AND leases.status = 'active'
    RETURNING leases.id, leases.task_id, leases.worker_id, leases.started_at, leases.expires_at,
              leases.ttl_seconds, leases.status, leases.last_heartbeat, leases.context_id
), t AS (
    UPDATE llm_tasks SET status = 'running', updated_at = %(now)s
    FROM l
    WHERE llm_tasks.id = l.task_id AND llm_tasks.lease_id = l.id
    RETURNING llm_tasks.id, llm_tasks.context_id, llm_tasks.agent_slug, llm_tasks.prompt,
              llm_tasks.context_hints, llm_tasks.policy, llm_tasks.desired_format, llm_tasks.status,
              llm_tasks.created_at, llm_tasks.updated_at, llm_tasks.lease_id, llm_tasks.worker_id,
              llm_tasks.attempts, llm_tasks.max_attempts, llm_tasks.labels, llm_tasks.not_before,
              llm_tasks.idempotency_key
), stale AS (
    SELECT workers.id FROM workers
    WHERE workers.id IN (SELECT worker_id FROM l)
      AND (workers.last_heartbeat IS NULL OR workers.last_heartbeat < %(now)s::bigint - 5000)
    ORDER BY workers.id
    FOR UPDATE
), w AS (
    UPDATE workers SET last_heartbeat = %(now)s
    FROM stale
    WHERE workers.id = stale.id
    RETURNING 1
), aud AS (
    -- lease_renewed, worded as in lease_supervisor.py
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT i.audit_id, %(now)s, 'lease_renewed', 'lease', l.id, i.actor,
           'task=' || t.id || ' expires_at=' || l.expires_at
    FROM t JOIN l ON l.task_id = t.id JOIN i ON i.task_id = t.id
    WHERE i.actor IS NOT NULL
)
SELECT t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key,
       l.id, l.task_id, l.worker_id, l.started_at, l.expires_at, l.ttl_seconds, l.status,
       l.last_heartbeat, l.context_id
FROM t JOIN l ON l.task_id = t.id

-- name: finish_tasks
-- Completions of tasks held by lock_tasks whose fence accepts them: release each lease,
-- move each task (success -> completed; a retryable error with attempts left -> queued
-- after delays[attempts] ms; else failed), insert each artifact and result.
WITH i AS (
    SELECT * FROM json_to_recordset(%(rows)s::json)
         AS i(task_id text, fence_lease_id text, fence_worker_id text, retryable boolean, delays jsonb,
              artifact_id text, artifact_type text, tags jsonb, content text, result_id text,
              result_status text, output text, error_message text, metrics jsonb, actor text,
              audit_id text, audit_id2 text)
), cur AS MATERIALIZED (
    -- by primary key, not through a status index (see grant_leases)
    SELECT id, status, lease_id, worker_id, attempts, max_attempts FROM llm_tasks
    WHERE id = ANY(ARRAY(SELECT task_id FROM i))
), h AS (
    SELECT i.*, t.lease_id AS held_lease_id, t.worker_id AS held_worker_id, t.attempts,
           CASE WHEN i.result_status = 'success' THEN 'completed'
                WHEN i.retryable AND t.attempts < t.max_attempts THEN 'queued'
                ELSE 'failed' END AS next_status
    FROM i JOIN cur t ON t.id = i.task_id
    WHERE t.status IN ('leased', 'running')
      AND (i.fence_lease_id IS NULL OR t.lease_id = i.fence_lease_id)
      AND (i.fence_worker_id IS NULL OR t.worker_id = i.fence_worker_id)
), l AS (
    UPDATE leases SET status = 'released'
    FROM h
    WHERE leases.id = h.held_lease_id AND leases.status = 'active'
    RETURNING leases.id, leases.task_id, leases.worker_id, leases.started_at, leases.expires_at,
              leases.ttl_seconds, leases.status, leases.last_heartbeat, leases.context_id
), t AS (
    UPDATE llm_tasks
    SET status = h.next_status,
        not_before = CASE WHEN h.next_status = 'queued'
                          THEN %(now)s::bigint + (h.delays ->> h.attempts)::bigint
                          ELSE llm_tasks.not_before END,
        lease_id = CASE WHEN h.next_status = 'completed' THEN h.held_lease_id END,
        worker_id = CASE WHEN h.next_status = 'completed' THEN h.held_worker_id END,
        updated_at = %(now)s
    FROM h
    WHERE llm_tasks.id = h.task_id
    RETURNING llm_tasks.id, llm_tasks.context_id, llm_tasks.agent_slug, llm_tasks.prompt,
              llm_tasks.context_hints, llm_tasks.policy, llm_tasks.desired_format, llm_tasks.status,
              llm_tasks.created_at, llm_tasks.updated_at, llm_tasks.lease_id, llm_tasks.worker_id,
              llm_tasks.attempts, llm_tasks.max_attempts, llm_tasks.labels, llm_tasks.not_before,
              llm_tasks.idempotency_key
), a AS (
    INSERT INTO runtime_artifacts (id, task_id, job_id, type, created_at, finalized, url,
                                   entity_refs, tags, content)
    SELECT h.artifact_id, h.task_id, NULL, h.artifact_type, %(now)s, true, NULL, '[]'::jsonb,
           h.tags, h.content
    FROM h
    RETURNING id, task_id, job_id, type, created_at, finalized, url, entity_refs, tags, content
), r AS (
    INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message,
                             metrics, completed_at)
    SELECT h.result_id, h.task_id, h.held_worker_id, h.artifact_id, h.result_status, h.output,
           h.error_message, h.metrics, %(now)s
    FROM h
    RETURNING id, task_id, worker_id, artifact_id, status, output, error_message, metrics,
              completed_at
), aud AS (
    -- task_completed / task_retry / task_failed and lease_released, worded as in task_queue.py
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT h.audit_id, %(now)s,
           CASE t.status WHEN 'completed' THEN 'task_completed' WHEN 'queued' THEN 'task_retry'
                         ELSE 'task_failed' END,
           'task', t.id, h.actor,
           'result=' || h.result_status || ' attempts=' || t.attempts || '/' || t.max_attempts
           || CASE WHEN t.status = 'queued' THEN ' not_before=' || t.not_before ELSE '' END
    FROM t JOIN h ON h.task_id = t.id
    WHERE h.actor IS NOT NULL
    UNION ALL
    SELECT h.audit_id2, %(now)s, 'lease_released', 'lease', l.id, h.actor, 'task=' || l.task_id
    FROM l JOIN h ON h.task_id = l.task_id
    WHERE h.actor IS NOT NULL
)
SELECT t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key,
       a.id, a.task_id, a.job_id, a.type, a.created_at, a.finalized, a.url, a.entity_refs, a.tags,
       a.content,
       r.id, r.task_id, r.worker_id, r.artifact_id, r.status, r.output, r.error_message, r.metrics,
       r.completed_at,
       l.id, l.task_id, l.worker_id, l.started_at, l.expires_at, l.ttl_seconds, l.status,
       l.last_heartbeat, l.context_id
FROM t JOIN a ON a.task_id = t.id JOIN r ON r.task_id = t.id LEFT JOIN l ON l.task_id = t.id

-- name: lease_task_id
SELECT task_id FROM leases WHERE id = %(id)s

-- name: end_lease
-- fail_lease() and cancel() after lock_task: end the task's lease (if any) and move the task.
WITH l AS (
    UPDATE leases SET status = %(lease_status)s
    WHERE id = %(lease_id)s AND status = 'active'
    RETURNING id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat,
              context_id
), t AS (
    UPDATE llm_tasks
    SET status = %(status)s, not_before = COALESCE(%(not_before)s::bigint, not_before),
        lease_id = NULL, worker_id = NULL, updated_at = %(now)s
    WHERE id = %(task_id)s
    RETURNING id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
              created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
              not_before, idempotency_key
)
SELECT t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key,
       l.id, l.task_id, l.worker_id, l.started_at, l.expires_at, l.ttl_seconds, l.status,
       l.last_heartbeat, l.context_id
FROM t LEFT JOIN l ON true

-- name: expire_due
-- Sweep: lock the tasks of due leases first (SKIP LOCKED: a task busy elsewhere is
-- taken next sweep), then expire the leases and move the tasks. Conditions are repeated
-- in the updates so a lease renewed or released meanwhile is left alone. An active lease
-- its task does not point at (should not exist) is expired and reported with its task as is.
WITH due AS (
    SELECT l.id AS lease_id, t.id AS task_id
    FROM leases l JOIN llm_tasks t ON t.id = l.task_id
    WHERE l.status = 'active' AND l.expires_at <= %(now)s
    ORDER BY l.expires_at
    LIMIT %(limit)s
    FOR UPDATE OF t SKIP LOCKED
), el AS (
    UPDATE leases SET status = 'expired'
    FROM due
    WHERE leases.id = due.lease_id AND leases.status = 'active' AND leases.expires_at <= %(now)s
    RETURNING leases.id, leases.task_id, leases.worker_id, leases.started_at, leases.expires_at,
              leases.ttl_seconds, leases.status, leases.last_heartbeat, leases.context_id
), et AS (
    UPDATE llm_tasks
    SET status = CASE WHEN llm_tasks.attempts < llm_tasks.max_attempts THEN 'queued' ELSE 'dead' END,
        lease_id = NULL, worker_id = NULL, updated_at = %(now)s
    FROM el
    WHERE llm_tasks.id = el.task_id AND llm_tasks.lease_id = el.id
      AND llm_tasks.status IN ('leased', 'running')
    RETURNING llm_tasks.id, llm_tasks.context_id, llm_tasks.agent_slug, llm_tasks.prompt,
              llm_tasks.context_hints, llm_tasks.policy, llm_tasks.desired_format, llm_tasks.status,
              llm_tasks.created_at, llm_tasks.updated_at, llm_tasks.lease_id, llm_tasks.worker_id,
              llm_tasks.attempts, llm_tasks.max_attempts, llm_tasks.labels, llm_tasks.not_before,
              llm_tasks.idempotency_key
)
SELECT el.id, el.task_id, el.worker_id, el.started_at, el.expires_at, el.ttl_seconds, el.status,
       el.last_heartbeat, el.context_id,
       et.id, et.context_id, et.agent_slug, et.prompt, et.context_hints, et.policy, et.desired_format,
       et.status, et.created_at, et.updated_at, et.lease_id, et.worker_id, et.attempts,
       et.max_attempts, et.labels, et.not_before, et.idempotency_key
FROM el JOIN et ON et.id = el.task_id
UNION ALL
SELECT el.id, el.task_id, el.worker_id, el.started_at, el.expires_at, el.ttl_seconds, el.status,
       el.last_heartbeat, el.context_id,
       t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key
FROM el JOIN llm_tasks t ON t.id = el.task_id
WHERE NOT EXISTS (SELECT 1 FROM et WHERE et.id = el.task_id)

-- ---------------------------------------------------------------- leases (reads)

-- name: get_lease
SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
FROM leases WHERE id = %(id)s

-- name: list_leases
SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
FROM leases
WHERE (started_at, id) < (%(after_at)s, %(after_id)s)
ORDER BY started_at DESC, id DESC
LIMIT %(limit)s

-- name: list_leases_by_status
SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
FROM leases
WHERE status = %(status)s AND (started_at, id) < (%(after_at)s, %(after_id)s)
ORDER BY started_at DESC, id DESC
LIMIT %(limit)s

-- name: worker_leases
-- By leases_worker_active_idx.
SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
FROM leases
WHERE worker_id = %(worker_id)s AND status = 'active'
ORDER BY started_at DESC, id DESC
LIMIT %(limit)s

-- name: active_lease_owners
SELECT context_id, worker_id FROM leases WHERE status = 'active';

-- name: sticky_workers
SELECT DISTINCT worker_id FROM leases WHERE context_id = %(context_id)s AND status = 'active'

-- ---------------------------------------------------------------- workers

-- name: upsert_worker
-- Insert the new_* values (the given fields with their defaults), or update only the
-- fields given (NULL keeps the stored value). xmax = 0 only on a freshly inserted row version.
INSERT INTO workers AS w (id, node_id, url, status, capabilities, last_heartbeat, ip_addrs,
                          obs_count, db_sha, registered_at, agent_version, os_info,
                          install_method, source)
VALUES (%(id)s, %(new_node_id)s, %(new_url)s, %(new_status)s, %(new_capabilities)s::jsonb,
        %(new_last_heartbeat)s, %(new_ip_addrs)s::jsonb, %(new_obs_count)s, %(new_db_sha)s, %(now)s,
        %(new_agent_version)s, %(new_os_info)s, %(new_install_method)s, %(new_source)s)
ON CONFLICT (id) DO UPDATE SET
    node_id = COALESCE(%(node_id)s, w.node_id),
    url = COALESCE(%(url)s, w.url),
    status = COALESCE(%(status)s, w.status),
    capabilities = COALESCE(%(capabilities)s::jsonb, w.capabilities),
    last_heartbeat = COALESCE(%(last_heartbeat)s::bigint, w.last_heartbeat),
    ip_addrs = COALESCE(%(ip_addrs)s::jsonb, w.ip_addrs),
    obs_count = COALESCE(%(obs_count)s::int, w.obs_count),
    db_sha = COALESCE(%(db_sha)s, w.db_sha),
    agent_version = COALESCE(%(agent_version)s, w.agent_version),
    os_info = COALESCE(%(os_info)s, w.os_info),
    install_method = COALESCE(%(install_method)s, w.install_method),
    source = COALESCE(%(source)s, w.source)
RETURNING w.id, w.node_id, w.url, w.status, w.capabilities, w.last_heartbeat, w.ip_addrs,
          w.obs_count, w.db_sha, w.registered_at, w.agent_version, w.os_info, w.install_method,
          w.source,
          (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active'),
          (w.xmax = 0)

-- name: delete_worker
DELETE FROM workers w WHERE w.id = %(id)s
RETURNING w.id, w.node_id, w.url, w.status, w.capabilities, w.last_heartbeat, w.ip_addrs,
          w.obs_count, w.db_sha, w.registered_at, w.agent_version, w.os_info, w.install_method,
          w.source,
          (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active')

-- name: touch_worker
UPDATE workers
SET last_heartbeat = %(now)s,
    status = CASE WHEN status = 'offline' AND source IN ('pull', 'membridge') THEN 'online' ELSE status END
WHERE id = %(id)s
RETURNING id

-- name: mark_stale_workers_offline
-- Workers something keeps fresh (pull claims, the membridge sync, and with
-- :vouched the runtime's own probes of vouched-for URLs) that went silent. One never
-- heard from keeps 'unknown' (not offline); silence counts from the last heartbeat, or
-- from registration for a row without one (written before registration counted as one).
-- Lock the stale workers in id order (same order as lock_workers).
UPDATE workers w SET status = 'offline'
FROM (
    SELECT id FROM workers
    WHERE status NOT IN ('offline', 'unknown')
      AND (source IN ('pull', 'membridge')
           OR (%(vouched)s AND EXISTS (SELECT 1 FROM worker_trust t
                                       WHERE t.worker_id = workers.id AND t.url = workers.url)))
      AND COALESCE(last_heartbeat, registered_at) < %(seen_before)s
    ORDER BY id
    FOR UPDATE
) s
WHERE w.id = s.id
RETURNING w.id, w.node_id, w.url, w.status, w.capabilities, w.last_heartbeat, w.ip_addrs,
          w.obs_count, w.db_sha, w.registered_at, w.agent_version, w.os_info, w.install_method,
          w.source,
          (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active')

-- name: get_worker
SELECT w.id, w.node_id, w.url, w.status, w.capabilities, w.last_heartbeat, w.ip_addrs,
       w.obs_count, w.db_sha, w.registered_at, w.agent_version, w.os_info, w.install_method,
       w.source,
       (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active')
FROM workers w WHERE w.id = %(id)s

-- name: list_workers
SELECT w.id, w.node_id, w.url, w.status, w.capabilities, w.last_heartbeat, w.ip_addrs,
       w.obs_count, w.db_sha, w.registered_at, w.agent_version, w.os_info, w.install_method,
       w.source,
       (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active')
FROM workers w ORDER BY w.id

-- name: list_workers_by_status
SELECT w.id, w.node_id, w.url, w.status, w.capabilities, w.last_heartbeat, w.ip_addrs,
       w.obs_count, w.db_sha, w.registered_at, w.agent_version, w.os_info, w.install_method,
       w.source,
       (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active')
FROM workers w WHERE w.status = %(status)s ORDER BY w.id

-- name: worker_candidates
SELECT * FROM (
    SELECT w.id, w.node_id, w.url, w.status, w.capabilities, w.last_heartbeat, w.ip_addrs,
           w.obs_count, w.db_sha, w.registered_at, w.agent_version, w.os_info, w.install_method,
           w.source,
           (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active') AS active
    FROM workers w
    WHERE w.status = 'online'
      AND COALESCE((w.capabilities ->> 'claude_cli')::boolean, true)
      AND COALESCE(w.capabilities -> 'labels', '[]'::jsonb) @> %(labels)s::jsonb
) c
WHERE c.active < COALESCE((c.capabilities ->> 'max_concurrency')::int, 1)

-- ---------------------------------------------------------------- artifacts and results

-- name: list_artifacts
SELECT id, task_id, job_id, type, created_at, finalized, url, entity_refs, tags, content
FROM runtime_artifacts
WHERE (created_at, id) < (%(after_at)s, %(after_id)s)
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s

-- name: list_artifacts_by_task
SELECT id, task_id, job_id, type, created_at, finalized, url, entity_refs, tags, content
FROM runtime_artifacts
WHERE task_id = %(task_id)s AND (created_at, id) < (%(after_at)s, %(after_id)s)
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s

-- name: list_results
SELECT id, task_id, worker_id, artifact_id, status, output, error_message, metrics, completed_at
FROM llm_results
WHERE (completed_at, id) < (%(after_at)s, %(after_id)s)
ORDER BY completed_at DESC, id DESC
LIMIT %(limit)s

-- name: list_results_by_task
SELECT id, task_id, worker_id, artifact_id, status, output, error_message, metrics, completed_at
FROM llm_results
WHERE task_id = %(task_id)s AND (completed_at, id) < (%(after_at)s, %(after_id)s)
ORDER BY completed_at DESC, id DESC
LIMIT %(limit)s

-- name: latest_result
SELECT id, task_id, worker_id, artifact_id, status, output, error_message, metrics, completed_at
FROM llm_results
WHERE task_id = %(task_id)s
ORDER BY completed_at DESC, id DESC
LIMIT 1

-- ---------------------------------------------------------------- audit and settings

-- name: list_audit
SELECT id, timestamp, action, entity_type, entity_id, actor, detail
FROM audit_logs
WHERE (timestamp, id) < (%(after_at)s, %(after_id)s)
ORDER BY timestamp DESC, id DESC
LIMIT %(limit)s

-- name: list_audit_by_entity
SELECT id, timestamp, action, entity_type, entity_id, actor, detail
FROM audit_logs
WHERE entity_id = %(entity_id)s AND (timestamp, id) < (%(after_at)s, %(after_id)s)
ORDER BY timestamp DESC, id DESC
LIMIT %(limit)s

-- name: set_settings
-- Keys in sorted order, so two writers lock them in the same order.
INSERT INTO runtime_settings (key, value, updated_at)
SELECT k, v, %(now)s FROM unnest(%(keys)s::text[], %(values)s::text[]) AS s(k, v) ORDER BY k
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at

-- name: get_settings
SELECT key, value FROM runtime_settings

-- name: stats
SELECT 'tasks', status, count(*) FROM llm_tasks GROUP BY status
UNION ALL
SELECT 'leases', status, count(*) FROM leases GROUP BY status
UNION ALL
SELECT 'workers', status, count(*) FROM workers GROUP BY status

-- ---------------------------------------------------------------- push dispatch

-- name: refund_attempt
-- A dispatch that provably never reached the agent gives its attempt back.
UPDATE llm_tasks SET attempts = attempts - 1
WHERE id = %(id)s AND attempts > 0
RETURNING id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
          created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
          not_before, idempotency_key

-- name: due_tasks
-- Queued tasks that may be leased now, oldest first (llm_tasks_queue_idx): what
-- automatic dispatch offers to push workers.
SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
       not_before, idempotency_key
FROM llm_tasks
WHERE status = 'queued' AND (not_before IS NULL OR not_before <= %(now)s) AND attempts < max_attempts
ORDER BY created_at, id
LIMIT %(limit)s

-- name: insert_delivery
INSERT INTO dispatch_deliveries (id, task_id, lease_id, worker_id, url, state, agent_status, detail,
                                 actor, created_at, deadline_at, finished_at)
VALUES (%(id)s, %(task_id)s, %(lease_id)s, %(worker_id)s, %(url)s, %(state)s, %(agent_status)s,
        %(detail)s, %(actor)s, %(created_at)s, %(deadline_at)s, %(finished_at)s)

-- name: finish_delivery
-- sent → its outcome, once: a second answer for the same delivery changes nothing.
UPDATE dispatch_deliveries
SET state = %(state)s, agent_status = %(agent_status)s, detail = %(detail)s, finished_at = %(now)s
WHERE id = %(id)s AND state = 'sent'
RETURNING id, task_id, lease_id, worker_id, url, state, agent_status, detail, actor, created_at,
          deadline_at, finished_at

-- name: expire_deliveries
-- Deliveries past their deadline with no outcome recorded (the process that sent
-- them stopped): their outcome is unknown.
UPDATE dispatch_deliveries d
SET state = 'unknown', detail = %(detail)s, finished_at = %(now)s
FROM (
    SELECT id FROM dispatch_deliveries
    WHERE state = 'sent' AND deadline_at < %(now)s
    ORDER BY deadline_at LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
) due
WHERE d.id = due.id
RETURNING d.id, d.task_id, d.lease_id, d.worker_id, d.url, d.state, d.agent_status, d.detail,
          d.actor, d.created_at, d.deadline_at, d.finished_at

-- name: latest_delivery
SELECT id, task_id, lease_id, worker_id, url, state, agent_status, detail, actor, created_at,
       deadline_at, finished_at
FROM dispatch_deliveries WHERE task_id = %(task_id)s
ORDER BY created_at DESC, id DESC LIMIT 1

-- name: vouch_worker_url
INSERT INTO worker_trust (worker_id, url, vouched_by, updated_at)
VALUES (%(worker_id)s, %(url)s, %(by)s, %(now)s)
ON CONFLICT (worker_id) DO UPDATE SET url = EXCLUDED.url, vouched_by = EXCLUDED.vouched_by,
                                      updated_at = EXCLUDED.updated_at

-- name: forget_worker_url
DELETE FROM worker_trust WHERE worker_id = %(worker_id)s RETURNING url

-- name: worker_trust
SELECT worker_id, url FROM worker_trust

-- name: worker_liveness
-- A sign of life (alive) or of death from the runtime's own probe or delivery:
-- online with the freshest heartbeat, or offline. Returns the status before and after.
WITH old AS (SELECT id, status FROM workers WHERE id = %(id)s FOR UPDATE)
UPDATE workers w
SET status = CASE WHEN %(alive)s THEN 'online' ELSE 'offline' END,
    last_heartbeat = CASE WHEN %(alive)s THEN GREATEST(COALESCE(w.last_heartbeat, 0), %(at)s::bigint)
                          ELSE w.last_heartbeat END
FROM old
WHERE w.id = old.id
RETURNING old.status, w.status

-- name: add_settings_if_absent
-- Keys already set keep their value (a secret every engine process must agree on).
INSERT INTO runtime_settings (key, value, updated_at)
SELECT k, v, %(now)s FROM unnest(%(keys)s::text[], %(values)s::text[]) AS s(k, v) ORDER BY k
ON CONFLICT (key) DO NOTHING

-- ---------------------------------------------------------------- read side: search, lease history, activity

-- name: search_tasks_by_context
-- Newest first among the tasks of one context: one range of llm_tasks_context_idx per
-- status asked for, each cut at the page size, then merged.
SELECT t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key
FROM unnest(%(statuses)s::text[]) AS s(status)
CROSS JOIN LATERAL (
    SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
           created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
           not_before, idempotency_key
    FROM llm_tasks
    WHERE context_id = %(value)s AND status = s.status AND (created_at, id) < (%(after_at)s, %(after_id)s)
    ORDER BY created_at DESC, id DESC
    LIMIT %(limit)s
) t
ORDER BY t.created_at DESC, t.id DESC
LIMIT %(limit)s

-- name: search_tasks_by_agent
-- As search_tasks_by_context, on llm_tasks_agent_idx.
SELECT t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key
FROM unnest(%(statuses)s::text[]) AS s(status)
CROSS JOIN LATERAL (
    SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
           created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
           not_before, idempotency_key
    FROM llm_tasks
    WHERE agent_slug = %(value)s AND status = s.status AND (created_at, id) < (%(after_at)s, %(after_id)s)
    ORDER BY created_at DESC, id DESC
    LIMIT %(limit)s
) t
ORDER BY t.created_at DESC, t.id DESC
LIMIT %(limit)s

-- name: leases_of_tasks
-- Every lease of the given tasks, newest first: active ones by leases_one_active_per_task,
-- ended ones by leases_task_ended_idx.
SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
FROM (
    SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
    FROM leases WHERE task_id = ANY(%(task_ids)s::text[]) AND status = 'active'
    UNION ALL
    SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
    FROM leases WHERE task_id = ANY(%(task_ids)s::text[]) AND status <> 'active'
) l
WHERE (%(status)s::text IS NULL OR l.status = %(status)s::text)
  AND (l.started_at, l.id) < (%(after_at)s, %(after_id)s)
ORDER BY l.started_at DESC, l.id DESC
LIMIT %(limit)s

-- name: list_expired_leases
-- Most recent expiry first (leases_expired_idx).
SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
FROM leases
WHERE status = 'expired' AND (expires_at, id) < (%(after_at)s, %(after_id)s)
ORDER BY expires_at DESC, id DESC
LIMIT %(limit)s

-- name: list_audit_by_action
SELECT id, timestamp, action, entity_type, entity_id, actor, detail
FROM audit_logs
WHERE action = %(action)s AND (timestamp, id) < (%(after_at)s, %(after_id)s)
ORDER BY timestamp DESC, id DESC
LIMIT %(limit)s

-- name: list_audit_by_entity_action
-- One entity's entries are few: its index range, filtered by action.
SELECT id, timestamp, action, entity_type, entity_id, actor, detail
FROM audit_logs
WHERE entity_id = %(entity_id)s AND action = %(action)s AND (timestamp, id) < (%(after_at)s, %(after_id)s)
ORDER BY timestamp DESC, id DESC
LIMIT %(limit)s

-- name: live_depth
-- The unfinished tasks by status, counted on llm_tasks_status_created_idx.
SELECT status, count(*) FROM llm_tasks WHERE status IN ('queued', 'leased', 'running') GROUP BY status

-- name: oldest_queued
SELECT id, created_at FROM llm_tasks WHERE status = 'queued' ORDER BY created_at, id LIMIT 1

-- name: activity
-- Per minute in [since, until): tasks created, results by outcome, leases expired, each
-- counted on an index ordered by its time column.
SELECT 'created', created_at / 60000 * 60000, count(*)
FROM llm_tasks WHERE created_at >= %(since)s AND created_at < %(until)s
GROUP BY 2
UNION ALL
SELECT CASE status WHEN 'success' THEN 'completed' ELSE 'failed' END, completed_at / 60000 * 60000, count(*)
FROM llm_results WHERE completed_at >= %(since)s AND completed_at < %(until)s
GROUP BY 1, 2
UNION ALL
SELECT 'expired', expires_at / 60000 * 60000, count(*)
FROM leases WHERE status = 'expired' AND expires_at >= %(since)s AND expires_at < %(until)s
GROUP BY 2

-- ---------------------------------------------------------------- history (runtime_history)

-- name: last_history_minute
SELECT max(minute) FROM runtime_history

-- name: history
SELECT minute, queued, leased, running, created, completed, failed, expired
FROM runtime_history
WHERE minute >= %(since)s AND minute < %(until)s
ORDER BY minute

-- name: record_history
-- Several processes may sample the same minute: the first row stands.
INSERT INTO runtime_history (minute, queued, leased, running, created, completed, failed, expired, sampled_at)
VALUES (%(minute)s, %(queued)s, %(leased)s, %(running)s, %(created)s, %(completed)s, %(failed)s, %(expired)s, %(now)s)
ON CONFLICT (minute) DO NOTHING
RETURNING minute

-- name: prune_history
DELETE FROM runtime_history WHERE minute < %(before)s
