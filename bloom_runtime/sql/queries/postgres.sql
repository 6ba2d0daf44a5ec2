-- PostgreSQL statements of bloom-runtime, by name (see bloom_runtime/sql/queries.py).
--
-- Column orders are fixed: Python builds records by position.
--   task   (17): id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
--                created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
--                not_before, idempotency_key
--   lease   (9): id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
--   worker (15): id, node_id, url, status, capabilities, last_heartbeat, ip_addrs, obs_count, db_sha,
--                registered_at, agent_version, os_info, install_method, source, active_leases (computed)
-- Lock order (see pg_transaction.py): task rows (by id) -> worker rows (by id) -> lease rows.

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

-- ---------------------------------------------------------------- tasks (reads)

-- name: get_task
SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
       not_before, idempotency_key
FROM llm_tasks WHERE id = %(id)s

-- name: get_task_by_idempotency_key
SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
       not_before, idempotency_key
FROM llm_tasks WHERE idempotency_key = %(key)s

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

-- ---------------------------------------------------------------- state changes
--
-- The one write path of tasks and leases (Transaction.apply): each kind of change is
-- one statement over a JSON array of rows, one row per operation, so a single
-- operation is a batch of one. A batch goes out as one message: lock_tasks (ascending
-- id), lock_workers (ascending id), the set statements, the audit entries, NOTIFY,
-- COMMIT. Each statement takes its own snapshot, so it sees everything committed
-- before the locks were granted and what the statements before it wrote.
--
-- Each statement decides, row by row, whether its operation may run and answers one
-- row per operation: its position (ord), a verdict ('ok', or why not: see
-- refusals.py) and what it wrote. These statements are where PostgreSQL states the
-- rules; a refused row writes nothing.
--
-- Rows naming an actor get their audit entry in the same statement, one per change,
-- worded as in audit_trail.py.

-- name: lock_tasks
-- Every task a batch changes, by id or through its lease, locked in id order.
SELECT id FROM llm_tasks
WHERE id = ANY(%(ids)s::text[] || ARRAY(SELECT task_id FROM leases WHERE id = ANY(%(leases)s::text[])))
ORDER BY id
FOR UPDATE

-- name: lock_workers
-- The workers the batch grants leases to, in id order: two batches never wait on each other in a cycle.
SELECT id FROM workers WHERE id = ANY(%(ids)s::text[]) ORDER BY id FOR UPDATE

-- name: insert_audit
-- Audit entries written apart from a change, as a JSON array of objects named like the columns.
INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
SELECT * FROM json_to_recordset(%(rows)s::json)
    AS a(id text, timestamp bigint, action text, entity_type text, entity_id text, actor text,
         detail text)

-- name: create_tasks
-- A used idempotency key or task id inserts nothing: tasks_by_keys, later in the
-- message, finds the task a key names; a row found by neither was refused (id taken).
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

-- name: tasks_by_keys
-- The tasks the batch's idempotency keys name, as the batch left them.
SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
       not_before, idempotency_key
FROM llm_tasks WHERE idempotency_key = ANY(%(keys)s::text[])

-- name: grant_leases
-- Acquires, each naming one worker held by lock_workers. A task must be queued, past
-- its backoff, with attempts left; a worker takes the batch's acquires in order while
-- active + rank <= max_concurrency (counted under its row lock, so exact across processes).
WITH i AS (
    SELECT * FROM json_to_recordset(%(rows)s::json)
                  AS i(ord int, task_id text, lease_id text, worker_id text, ttl int, actor text,
                       audit_id text)
), cur AS MATERIALIZED (
    -- The batch's tasks by primary key; materialised so their status is not looked up
    -- through a status index, whose scan grows with the table.
    SELECT id, status, not_before, attempts, max_attempts, policy FROM llm_tasks
    WHERE id = ANY(ARRAY(SELECT task_id FROM i))
), v AS (
    SELECT i.*, t.status, t.not_before,
           CASE WHEN t.id IS NULL THEN 'task_not_found'
                WHEN t.status <> 'queued' THEN 'not_queued'
                WHEN t.not_before IS NOT NULL AND t.not_before > %(now)s THEN 'backoff'
                WHEN t.attempts >= t.max_attempts THEN 'no_attempts'
                ELSE 'ok' END AS verdict,
           COALESCE(i.ttl, COALESCE((t.policy ->> 'timeout_sec')::int, %(default_timeout)s::int)
                           + %(grace)s::int) AS lease_ttl
    FROM i LEFT JOIN cur t ON t.id = i.task_id
), w AS (
    SELECT w.id, w.node_id, w.url, w.status, w.capabilities, w.last_heartbeat, w.ip_addrs,
           w.obs_count, w.db_sha, w.registered_at, w.agent_version, w.os_info, w.install_method,
           w.source,
           (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active') AS active,
           COALESCE((w.capabilities ->> 'max_concurrency')::int, 1) AS cap
    FROM workers w WHERE w.id IN (SELECT worker_id FROM i)
), g AS (
    SELECT r.ord, r.task_id, r.lease_id, r.worker_id, r.actor, r.audit_id, r.lease_ttl,
           w.active + r.rank AS load
    FROM (SELECT v.*, row_number() OVER (PARTITION BY v.worker_id ORDER BY v.ord) AS rank
          FROM v WHERE v.verdict = 'ok') r
    JOIN w ON w.id = r.worker_id
    WHERE w.active + r.rank <= w.cap
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
    SELECT g.lease_id, t.id, g.worker_id, %(now)s, %(now)s::bigint + g.lease_ttl::bigint * 1000,
           g.lease_ttl, 'active', %(now)s, t.context_id
    FROM g JOIN t ON t.id = g.task_id
    RETURNING id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat,
              context_id
), aud AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT g.audit_id, %(now)s, 'task_leased', 'task', t.id, g.actor,
           'lease=' || l.id || ' worker=' || l.worker_id || ' ttl=' || l.ttl_seconds
           || 's attempt=' || t.attempts
    FROM t JOIN l ON l.task_id = t.id JOIN g ON g.task_id = t.id
    WHERE g.actor IS NOT NULL
)
SELECT v.ord,
       CASE WHEN v.verdict <> 'ok' THEN v.verdict WHEN w.id IS NULL THEN 'worker_not_found'
            WHEN g.ord IS NULL THEN 'no_capacity' ELSE 'ok' END,
       v.status, v.not_before,
       t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key,
       l.id, l.task_id, l.worker_id, l.started_at, l.expires_at, l.ttl_seconds, l.status,
       l.last_heartbeat, l.context_id,
       w.id, w.node_id, w.url, w.status, w.capabilities, w.last_heartbeat, w.ip_addrs, w.obs_count,
       w.db_sha, w.registered_at, w.agent_version, w.os_info, w.install_method, w.source,
       g.load
FROM v LEFT JOIN w ON w.id = v.worker_id LEFT JOIN g ON g.ord = v.ord
       LEFT JOIN t ON t.id = g.task_id LEFT JOIN l ON l.task_id = g.task_id

-- name: claim_tasks
-- One worker's claim, its row held by lock_workers: the oldest queued tasks it can take
-- (past their backoff, attempts left, labels among its own), up to want and its free
-- capacity. Tasks other transactions hold are skipped: a claim never waits for a task
-- lock, so taking the worker before the tasks cannot close a cycle. A claim is the
-- worker's heartbeat; its row is written only when that changes something (a heartbeat
-- older than 5 s, not online, not a pull worker). One row per grant, or one without a
-- task when there is none.
WITH w AS (
    SELECT w.id, w.node_id, w.url, w.status, w.capabilities, w.last_heartbeat, w.ip_addrs,
           w.obs_count, w.db_sha, w.registered_at, w.agent_version, w.os_info, w.install_method,
           w.source,
           (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active') AS active,
           COALESCE((w.capabilities ->> 'max_concurrency')::int, 1) AS cap,
           COALESCE(w.capabilities -> 'labels', '[]'::jsonb) AS labels,
           (w.last_heartbeat IS NULL OR w.last_heartbeat < %(now)s::bigint - 5000
            OR w.status <> 'online' OR w.source <> 'pull') AS stale
    FROM workers w WHERE w.id = %(worker_id)s
), touch AS (
    UPDATE workers SET last_heartbeat = %(now)s, status = 'online', source = 'pull'
    FROM w
    WHERE workers.id = w.id AND w.stale
    RETURNING workers.id
), pick AS (
    SELECT t.id, t.created_at
    FROM llm_tasks t, w
    WHERE t.status = 'queued'
      AND (t.not_before IS NULL OR t.not_before <= %(now)s)
      AND t.attempts < t.max_attempts
      AND t.labels <@ w.labels
    ORDER BY t.created_at, t.id
    LIMIT (SELECT GREATEST(LEAST(%(want)s::int, cap - active), 0) FROM w)
    FOR UPDATE OF t SKIP LOCKED
), n AS (
    SELECT id, row_number() OVER (ORDER BY created_at, id) AS n FROM pick
), t AS (
    UPDATE llm_tasks
    SET status = 'leased', attempts = attempts + 1, lease_id = %(lease_ids)s::jsonb ->> (n.n::int - 1),
        worker_id = %(worker_id)s, updated_at = %(now)s
    FROM n
    WHERE llm_tasks.id = n.id
    RETURNING llm_tasks.id, llm_tasks.context_id, llm_tasks.agent_slug, llm_tasks.prompt,
              llm_tasks.context_hints, llm_tasks.policy, llm_tasks.desired_format, llm_tasks.status,
              llm_tasks.created_at, llm_tasks.updated_at, llm_tasks.lease_id, llm_tasks.worker_id,
              llm_tasks.attempts, llm_tasks.max_attempts, llm_tasks.labels, llm_tasks.not_before,
              llm_tasks.idempotency_key, n.n
), l AS (
    INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status,
                        last_heartbeat, context_id)
    SELECT t.lease_id, t.id, t.worker_id, %(now)s,
           %(now)s::bigint + 1000::bigint * COALESCE(%(ttl)s::int, (t.policy ->> 'timeout_sec')::int + %(grace)s::int),
           COALESCE(%(ttl)s::int, (t.policy ->> 'timeout_sec')::int + %(grace)s::int),
           'active', %(now)s, t.context_id
    FROM t
    RETURNING id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat,
              context_id
), aud AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT %(audit_ids)s::jsonb ->> (t.n::int - 1), %(now)s, 'task_leased', 'task', t.id, %(actor)s,
           'lease=' || l.id || ' worker=' || l.worker_id || ' ttl=' || l.ttl_seconds
           || 's attempt=' || t.attempts || ' claimed'
    FROM t JOIN l ON l.task_id = t.id
    WHERE %(actor)s::text IS NOT NULL
)
SELECT CASE WHEN w.id IS NULL THEN 'worker_not_found' ELSE 'ok' END,
       w.id, w.node_id, w.url, CASE WHEN w.stale THEN 'online' ELSE w.status END, w.capabilities,
       CASE WHEN w.stale THEN %(now)s ELSE w.last_heartbeat END, w.ip_addrs, w.obs_count, w.db_sha,
       w.registered_at, w.agent_version, w.os_info, w.install_method,
       CASE WHEN w.stale THEN 'pull' ELSE w.source END,
       w.active + t.n,
       t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key,
       l.id, l.task_id, l.worker_id, l.started_at, l.expires_at, l.ttl_seconds, l.status,
       l.last_heartbeat, l.context_id
FROM (SELECT 1) one LEFT JOIN w ON true LEFT JOIN t ON true LEFT JOIN l ON l.task_id = t.id
ORDER BY t.n

-- name: fenced_writes
-- Heartbeats and completions, which act under the task's active lease. The fence rule
-- (refusals.fence_verdict says the same): the task must hold a lease; a named lease
-- must be the one it holds, a named worker the one holding it. A heartbeat renews the
-- lease (expires_at = now + ttl) and moves the task to running; its worker's row is
-- refreshed at most every 5 s (finer grain buys nothing and would queue a busy
-- worker's heartbeats on its row), locked in id order, last. A completion releases
-- the lease, stores the artifact and the result, and moves the task: success ->
-- completed (keeping who ran it); a retryable error with attempts left -> queued after
-- delays[attempts] ms; else failed.
WITH i AS (
    SELECT * FROM json_to_recordset(%(rows)s::json)
         AS i(ord int, finish boolean, task_id text, fence_lease_id text, fence_worker_id text,
              retryable boolean, delays jsonb, artifact_id text, artifact_type text, tags jsonb,
              content text, result_id text, result_status text, output text, error_message text,
              metrics jsonb, actor text, audit_id text)
), cur AS MATERIALIZED (
    -- by primary key, not through a status index (see grant_leases)
    SELECT id, status, lease_id, worker_id, attempts, max_attempts FROM llm_tasks
    WHERE id = ANY(ARRAY(SELECT task_id FROM i))
), v AS (
    SELECT i.*, t.status, t.lease_id AS held_lease_id, t.worker_id AS held_worker_id, t.attempts,
           CASE WHEN t.id IS NULL THEN 'task_not_found'
                WHEN t.status NOT IN ('leased', 'running') THEN
                     CASE WHEN i.fence_lease_id IS NULL THEN 'no_lease' ELSE 'lease_gone' END
                WHEN i.fence_lease_id IS NOT NULL AND i.fence_lease_id IS DISTINCT FROM t.lease_id
                     THEN 'stale_lease'
                WHEN i.fence_worker_id IS NOT NULL AND i.fence_worker_id IS DISTINCT FROM t.worker_id
                     THEN 'stale_worker'
                ELSE 'ok' END AS verdict,
           CASE WHEN NOT i.finish THEN 'running'
                WHEN i.result_status = 'success' THEN 'completed'
                WHEN i.retryable AND t.attempts < t.max_attempts THEN 'queued'
                ELSE 'failed' END AS next_status
    FROM i LEFT JOIN cur t ON t.id = i.task_id
), l AS (
    UPDATE leases
    SET status = CASE WHEN v.finish THEN 'released' ELSE leases.status END,
        expires_at = CASE WHEN v.finish THEN leases.expires_at
                          ELSE %(now)s::bigint + leases.ttl_seconds::bigint * 1000 END,
        last_heartbeat = CASE WHEN v.finish THEN leases.last_heartbeat ELSE %(now)s END
    FROM v
    WHERE leases.id = v.held_lease_id AND v.verdict = 'ok' AND leases.status = 'active'
    RETURNING leases.id, leases.task_id, leases.worker_id, leases.started_at, leases.expires_at,
              leases.ttl_seconds, leases.status, leases.last_heartbeat, leases.context_id, v.ord
), t AS (
    UPDATE llm_tasks
    SET status = v.next_status,
        not_before = CASE WHEN v.next_status = 'queued'
                          THEN %(now)s::bigint + (v.delays ->> v.attempts)::bigint
                          ELSE llm_tasks.not_before END,
        lease_id = CASE WHEN v.next_status IN ('running', 'completed') THEN llm_tasks.lease_id END,
        worker_id = CASE WHEN v.next_status IN ('running', 'completed') THEN llm_tasks.worker_id END,
        updated_at = %(now)s
    FROM v JOIN l ON l.ord = v.ord
    WHERE llm_tasks.id = v.task_id
    RETURNING llm_tasks.id, llm_tasks.context_id, llm_tasks.agent_slug, llm_tasks.prompt,
              llm_tasks.context_hints, llm_tasks.policy, llm_tasks.desired_format, llm_tasks.status,
              llm_tasks.created_at, llm_tasks.updated_at, llm_tasks.lease_id, llm_tasks.worker_id,
              llm_tasks.attempts, llm_tasks.max_attempts, llm_tasks.labels, llm_tasks.not_before,
              llm_tasks.idempotency_key, v.ord
), a AS (
    INSERT INTO runtime_artifacts (id, task_id, job_id, type, created_at, finalized, url,
                                   entity_refs, tags, content)
    SELECT v.artifact_id, v.task_id, NULL, v.artifact_type, %(now)s, true, NULL, '[]'::jsonb,
           v.tags, v.content
    FROM v JOIN l ON l.ord = v.ord
    WHERE v.finish
    RETURNING id, task_id, job_id, type, created_at, finalized, url, entity_refs, tags, content
), r AS (
    INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message,
                             metrics, completed_at)
    SELECT v.result_id, v.task_id, v.held_worker_id, v.artifact_id, v.result_status, v.output,
           v.error_message, v.metrics, %(now)s
    FROM v JOIN l ON l.ord = v.ord
    WHERE v.finish
    RETURNING id, task_id, worker_id, artifact_id, status, output, error_message, metrics,
              completed_at
), stale AS (
    SELECT workers.id FROM workers
    WHERE workers.id IN (SELECT l.worker_id FROM l WHERE l.status = 'active')
      AND (workers.last_heartbeat IS NULL OR workers.last_heartbeat < %(now)s::bigint - 5000)
    ORDER BY workers.id
    FOR UPDATE
), w AS (
    UPDATE workers SET last_heartbeat = %(now)s
    FROM stale
    WHERE workers.id = stale.id
    RETURNING 1
), aud AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT v.audit_id, %(now)s,
           CASE WHEN NOT v.finish THEN 'lease_renewed' WHEN t.status = 'completed' THEN 'task_completed'
                WHEN t.status = 'queued' THEN 'task_retry' ELSE 'task_failed' END,
           CASE WHEN v.finish THEN 'task' ELSE 'lease' END,
           CASE WHEN v.finish THEN t.id ELSE l.id END,
           v.actor,
           CASE WHEN NOT v.finish THEN 'task=' || t.id || ' expires_at=' || l.expires_at
                ELSE 'result=' || v.result_status || ' attempts=' || t.attempts || '/' || t.max_attempts
                     || CASE WHEN t.status = 'queued' THEN ' not_before=' || t.not_before ELSE '' END
                     || ' lease=' || l.id END
    FROM v JOIN l ON l.ord = v.ord JOIN t ON t.ord = v.ord
    WHERE v.actor IS NOT NULL
)
SELECT v.ord,
       CASE WHEN v.verdict <> 'ok' THEN v.verdict WHEN l.id IS NULL THEN 'lease_inactive' ELSE 'ok' END,
       v.status,
       t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key,
       l.id, l.task_id, l.worker_id, l.started_at, l.expires_at, l.ttl_seconds, l.status,
       l.last_heartbeat, l.context_id,
       a.id, a.task_id, a.job_id, a.type, a.created_at, a.finalized, a.url, a.entity_refs, a.tags,
       a.content,
       r.id, r.task_id, r.worker_id, r.artifact_id, r.status, r.output, r.error_message, r.metrics,
       r.completed_at
FROM v LEFT JOIN l ON l.ord = v.ord LEFT JOIN t ON t.ord = v.ord
       LEFT JOIN a ON a.id = v.artifact_id LEFT JOIN r ON r.id = v.result_id

-- name: cancel_tasks
-- queued/leased/running -> cancelled; an active lease the task holds is released.
WITH i AS (
    SELECT * FROM json_to_recordset(%(rows)s::json) AS i(ord int, task_id text, actor text, audit_id text)
), cur AS MATERIALIZED (
    SELECT id, status, lease_id FROM llm_tasks WHERE id = ANY(ARRAY(SELECT task_id FROM i))
), v AS (
    SELECT i.*, t.status, t.lease_id AS held_lease_id,
           CASE WHEN t.id IS NULL THEN 'task_not_found'
                WHEN t.status NOT IN ('queued', 'leased', 'running') THEN 'not_cancellable'
                ELSE 'ok' END AS verdict
    FROM i LEFT JOIN cur t ON t.id = i.task_id
), l AS (
    UPDATE leases SET status = 'released'
    FROM v
    WHERE leases.id = v.held_lease_id AND v.verdict = 'ok' AND leases.status = 'active'
    RETURNING leases.id, leases.task_id, leases.worker_id, leases.started_at, leases.expires_at,
              leases.ttl_seconds, leases.status, leases.last_heartbeat, leases.context_id, v.ord
), t AS (
    UPDATE llm_tasks SET status = 'cancelled', lease_id = NULL, worker_id = NULL, updated_at = %(now)s
    FROM v
    WHERE llm_tasks.id = v.task_id AND v.verdict = 'ok'
    RETURNING llm_tasks.id, llm_tasks.context_id, llm_tasks.agent_slug, llm_tasks.prompt,
              llm_tasks.context_hints, llm_tasks.policy, llm_tasks.desired_format, llm_tasks.status,
              llm_tasks.created_at, llm_tasks.updated_at, llm_tasks.lease_id, llm_tasks.worker_id,
              llm_tasks.attempts, llm_tasks.max_attempts, llm_tasks.labels, llm_tasks.not_before,
              llm_tasks.idempotency_key, v.ord
), aud AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT v.audit_id, %(now)s, 'task_cancelled', 'task', t.id, v.actor,
           CASE WHEN l.id IS NOT NULL THEN 'lease=' || l.id || ' released' END
    FROM v JOIN t ON t.ord = v.ord LEFT JOIN l ON l.ord = v.ord
    WHERE v.actor IS NOT NULL
)
SELECT v.ord, v.verdict, v.status,
       t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key,
       l.id, l.task_id, l.worker_id, l.started_at, l.expires_at, l.ttl_seconds, l.status,
       l.last_heartbeat, l.context_id
FROM v LEFT JOIN t ON t.ord = v.ord LEFT JOIN l ON l.ord = v.ord

-- name: requeue_tasks
-- failed/dead -> queued, attempts reset, no backoff.
WITH i AS (
    SELECT * FROM json_to_recordset(%(rows)s::json) AS i(ord int, task_id text, actor text, audit_id text)
), cur AS MATERIALIZED (
    SELECT id, status FROM llm_tasks WHERE id = ANY(ARRAY(SELECT task_id FROM i))
), v AS (
    SELECT i.*, t.status,
           CASE WHEN t.id IS NULL THEN 'task_not_found'
                WHEN t.status NOT IN ('failed', 'dead') THEN 'not_requeueable'
                ELSE 'ok' END AS verdict
    FROM i LEFT JOIN cur t ON t.id = i.task_id
), t AS (
    UPDATE llm_tasks
    SET status = 'queued', attempts = 0, not_before = NULL, lease_id = NULL, worker_id = NULL,
        updated_at = %(now)s
    FROM v
    WHERE llm_tasks.id = v.task_id AND v.verdict = 'ok'
    RETURNING llm_tasks.id, llm_tasks.context_id, llm_tasks.agent_slug, llm_tasks.prompt,
              llm_tasks.context_hints, llm_tasks.policy, llm_tasks.desired_format, llm_tasks.status,
              llm_tasks.created_at, llm_tasks.updated_at, llm_tasks.lease_id, llm_tasks.worker_id,
              llm_tasks.attempts, llm_tasks.max_attempts, llm_tasks.labels, llm_tasks.not_before,
              llm_tasks.idempotency_key, v.ord
), aud AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT v.audit_id, %(now)s, 'task_requeued', 'task', t.id, v.actor, 'attempts reset'
    FROM v JOIN t ON t.ord = v.ord
    WHERE v.actor IS NOT NULL
)
SELECT v.ord, v.verdict, v.status,
       t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key
FROM v LEFT JOIN t ON t.ord = v.ord

-- name: fail_leases
-- Leases whose worker could not be reached: the lease must be active and its task's;
-- it becomes failed and the task goes back to queued after delays[attempts] ms while
-- it has attempts left, else to failed. A refund (the dispatch provably never reached
-- the worker) gives the attempt back and always queues the task.
WITH i AS (
    SELECT * FROM json_to_recordset(%(rows)s::json)
        AS i(ord int, lease_id text, delays jsonb, reason text, refund boolean, actor text, audit_id text)
), cur AS MATERIALIZED (
    SELECT l.id, l.status AS lease_status, l.task_id, t.status, t.lease_id AS held_lease_id,
           t.attempts, t.max_attempts
    FROM leases l LEFT JOIN llm_tasks t ON t.id = l.task_id
    WHERE l.id = ANY(ARRAY(SELECT lease_id FROM i))
), v AS (
    SELECT i.*, c.task_id,
           CASE WHEN i.refund THEN GREATEST(c.attempts - 1, 0) ELSE c.attempts END AS attempts,
           CASE WHEN c.id IS NULL THEN 'lease_not_found'
                WHEN c.lease_status <> 'active' OR c.held_lease_id IS DISTINCT FROM c.id
                     OR c.status NOT IN ('leased', 'running') THEN 'lease_not_active'
                ELSE 'ok' END AS verdict,
           CASE WHEN i.refund OR c.attempts < c.max_attempts THEN 'queued' ELSE 'failed' END AS next_status
    FROM i LEFT JOIN cur c ON c.id = i.lease_id
), l AS (
    UPDATE leases SET status = 'failed'
    FROM v
    WHERE leases.id = v.lease_id AND v.verdict = 'ok' AND leases.status = 'active'
    RETURNING leases.id, leases.task_id, leases.worker_id, leases.started_at, leases.expires_at,
              leases.ttl_seconds, leases.status, leases.last_heartbeat, leases.context_id, v.ord
), t AS (
    UPDATE llm_tasks
    SET status = v.next_status, attempts = v.attempts,
        not_before = CASE WHEN v.next_status = 'queued'
                          THEN %(now)s::bigint + (v.delays ->> CASE WHEN v.refund THEN GREATEST(v.attempts, 1)
                                                                    ELSE v.attempts END)::bigint
                          ELSE llm_tasks.not_before END,
        lease_id = NULL, worker_id = NULL, updated_at = %(now)s
    FROM v JOIN l ON l.ord = v.ord
    WHERE llm_tasks.id = v.task_id
    RETURNING llm_tasks.id, llm_tasks.context_id, llm_tasks.agent_slug, llm_tasks.prompt,
              llm_tasks.context_hints, llm_tasks.policy, llm_tasks.desired_format, llm_tasks.status,
              llm_tasks.created_at, llm_tasks.updated_at, llm_tasks.lease_id, llm_tasks.worker_id,
              llm_tasks.attempts, llm_tasks.max_attempts, llm_tasks.labels, llm_tasks.not_before,
              llm_tasks.idempotency_key, v.ord
), aud AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT v.audit_id, %(now)s, 'lease_failed', 'task', t.id, v.actor,
           left('lease=' || l.id || ' ' || t.status || ' attempts=' || t.attempts || '/'
                || t.max_attempts || CASE WHEN v.refund THEN ' (attempt given back)' ELSE '' END
                || ': ' || v.reason, 1000)
    FROM v JOIN l ON l.ord = v.ord JOIN t ON t.ord = v.ord
    WHERE v.actor IS NOT NULL
)
SELECT v.ord, CASE WHEN v.verdict <> 'ok' THEN v.verdict WHEN l.id IS NULL THEN 'lease_not_active' ELSE 'ok' END,
       t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
       t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
       t.labels, t.not_before, t.idempotency_key,
       l.id, l.task_id, l.worker_id, l.started_at, l.expires_at, l.ttl_seconds, l.status,
       l.last_heartbeat, l.context_id
FROM v LEFT JOIN l ON l.ord = v.ord LEFT JOIN t ON t.ord = v.ord

-- name: expire_leases
-- The sweep: lock the tasks of due leases first (SKIP LOCKED: a task busy elsewhere is
-- taken next sweep), then expire the leases and move the tasks: queued while attempts
-- are left, else dead. Conditions are repeated in the updates so a lease renewed or
-- released meanwhile is left alone. An active lease its task does not point at
-- (should not exist) is expired and reported with its task as it is.
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
), x AS (
    SELECT el.id AS l_id, el.task_id AS l_task_id, el.worker_id AS l_worker_id,
           el.started_at AS l_started_at, el.expires_at AS l_expires_at, el.ttl_seconds AS l_ttl,
           el.status AS l_status, el.last_heartbeat AS l_last_heartbeat, el.context_id AS l_context_id,
           et.*
    FROM el JOIN et ON et.id = el.task_id
    UNION ALL
    SELECT el.id, el.task_id, el.worker_id, el.started_at, el.expires_at, el.ttl_seconds, el.status,
           el.last_heartbeat, el.context_id,
           t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints, t.policy, t.desired_format,
           t.status, t.created_at, t.updated_at, t.lease_id, t.worker_id, t.attempts, t.max_attempts,
           t.labels, t.not_before, t.idempotency_key
    FROM el JOIN llm_tasks t ON t.id = el.task_id
    WHERE NOT EXISTS (SELECT 1 FROM et WHERE et.id = el.task_id)
), aud AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT gen_random_uuid()::text, %(now)s, 'lease_expired', 'task', x.id, %(actor)s,
           'lease=' || x.l_id || ' worker=' || x.l_worker_id || ' ' || x.status || ' attempts='
           || x.attempts || '/' || x.max_attempts
    FROM x
    WHERE %(actor)s::text IS NOT NULL
)
SELECT l_id, l_task_id, l_worker_id, l_started_at, l_expires_at, l_ttl, l_status, l_last_heartbeat,
       l_context_id, id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels, not_before,
       idempotency_key
FROM x

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
