-- Named statements of the SQLite store (bloom_runtime/sql/sqlite.py).
-- Parameters are named (:name). Column lists are spelled out so the Python row
-- decoders read them by position; keep the orders in step with sqlite.py:
--   task:     id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
--             created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
--             not_before, idempotency_key
--   lease:    id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
--   worker:   id, node_id, url, status, capabilities, last_heartbeat, ip_addrs, obs_count, db_sha,
--             registered_at, active_leases, agent_version, os_info, install_method, source
--   artifact: id, task_id, job_id, type, created_at, finalized, url, entity_refs, tags, content
--   result:   id, task_id, worker_id, artifact_id, status, output, error_message, metrics, completed_at
--   audit:    id, timestamp, action, entity_type, entity_id, actor, detail
-- Lists page by keyset: rows strictly after the cursor (sort value, id) in
-- descending order; without a cursor the caller passes the largest integer.

-- ---------------------------------------------------------------------------
-- connection and transaction control

-- name: pragma_wal
-- Readers never wait for the writer in WAL mode; also fails on a file that is not a database.
PRAGMA journal_mode = WAL;

-- name: pragma_synchronous
-- NORMAL is durable across application crashes in WAL mode and much faster than FULL.
PRAGMA synchronous = NORMAL;

-- name: pragma_query_only
PRAGMA query_only = ON;

-- name: pragma_optimize
-- Run at close, as SQLite recommends: refreshes statistics the planner uses.
PRAGMA optimize;

-- name: ping
SELECT 1;

-- name: begin_immediate
-- Take the write lock at BEGIN so no statement in the transaction can hit SQLITE_BUSY.
BEGIN IMMEDIATE;

-- name: commit
COMMIT;

-- name: rollback
ROLLBACK;

-- name: savepoint
SAVEPOINT bloom_sp;

-- name: release_savepoint
RELEASE SAVEPOINT bloom_sp;

-- name: rollback_to_savepoint
ROLLBACK TO SAVEPOINT bloom_sp;

-- ---------------------------------------------------------------------------
-- migrations

-- name: create_schema_migrations
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    applied_at integer
);

-- name: schema_migrations_exists
SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations';

-- name: applied_migrations
SELECT version FROM schema_migrations;

-- name: record_migration
INSERT INTO schema_migrations (version, applied_at) VALUES (:version, :applied_at);

-- ---------------------------------------------------------------------------
-- tasks

-- name: task_by_id
SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
       not_before, idempotency_key
FROM llm_tasks WHERE id = :id;

-- name: task_by_idempotency_key
SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
       not_before, idempotency_key
FROM llm_tasks WHERE idempotency_key = :key;

-- name: insert_task
-- DO NOTHING on any unique clash (id or idempotency key): no row back means a conflict.
INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, context_hints, policy, desired_format,
                       status, created_at, updated_at, attempts, max_attempts, labels, idempotency_key)
VALUES (:id, :context_id, :agent_slug, :prompt, :context_hints, :policy, :desired_format,
        'queued', :now, :now, 0, :max_attempts, :labels, :idempotency_key)
ON CONFLICT DO NOTHING
RETURNING id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
          created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
          not_before, idempotency_key;

-- name: task_state
-- What the conditional writes need to explain a refusal: the task's state and its lease's.
SELECT t.status, t.not_before, t.lease_id, t.worker_id, t.attempts, t.max_attempts, l.status
FROM llm_tasks t LEFT JOIN leases l ON l.id = t.lease_id
WHERE t.id = :id;

-- name: lease_task
-- queued → leased, only if still leasable (the conditional write behind acquire_lease).
UPDATE llm_tasks
SET status = 'leased', attempts = attempts + 1, lease_id = :lease_id, worker_id = :worker_id, updated_at = :now
WHERE id = :id AND status = 'queued' AND (not_before IS NULL OR not_before <= :now) AND attempts < max_attempts
RETURNING id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
          created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
          not_before, idempotency_key;

-- name: claim_task
-- Lease the oldest leasable queued task whose labels are all among :worker_labels (a JSON array).
-- Walks llm_tasks_queue_idx in claim order and stops at the first match.
UPDATE llm_tasks
SET status = 'leased', attempts = attempts + 1, lease_id = :lease_id, worker_id = :worker_id, updated_at = :now
WHERE status = 'queued' AND id = (
    SELECT t.id FROM llm_tasks t
    WHERE t.status = 'queued'
      AND (t.not_before IS NULL OR t.not_before <= :now)
      AND t.attempts < t.max_attempts
      AND NOT EXISTS (
          SELECT 1 FROM json_each(t.labels) j
          WHERE j.value NOT IN (SELECT value FROM json_each(:worker_labels))
      )
    ORDER BY t.created_at, t.id
    LIMIT 1
)
RETURNING id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
          created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
          not_before, idempotency_key;

-- name: run_task
-- Heartbeat: leased|running → running, only while the task still holds :lease_id.
UPDATE llm_tasks SET status = 'running', updated_at = :now
WHERE id = :id AND lease_id = :lease_id AND status IN ('leased', 'running')
RETURNING id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
          created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
          not_before, idempotency_key;

-- name: finish_task
-- Complete / fail a lease: leased|running → :status, only while the task still holds :lease_id.
-- :keep_lease keeps lease_id/worker_id for the record (completed tasks).
UPDATE llm_tasks
SET status = :status,
    not_before = :not_before,
    lease_id = CASE WHEN :keep_lease THEN lease_id END,
    worker_id = CASE WHEN :keep_lease THEN worker_id END,
    updated_at = :now
WHERE id = :id AND lease_id = :lease_id AND status IN ('leased', 'running')
RETURNING id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
          created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
          not_before, idempotency_key;

-- name: expire_task
-- The sweep: a task still under the expired lease goes back to the queue or dies.
UPDATE llm_tasks
SET status = CASE WHEN attempts < max_attempts THEN 'queued' ELSE 'dead' END,
    lease_id = NULL, worker_id = NULL, updated_at = :now
WHERE id = :id AND lease_id = :lease_id AND status IN ('leased', 'running')
RETURNING id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
          created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
          not_before, idempotency_key;

-- name: refund_attempt
-- A dispatch that provably never reached the agent gives its attempt back.
UPDATE llm_tasks SET attempts = attempts - 1 WHERE id = :id AND attempts > 0;

-- name: requeue_task
UPDATE llm_tasks
SET status = 'queued', attempts = 0, not_before = NULL, lease_id = NULL, worker_id = NULL, updated_at = :now
WHERE id = :id AND status IN ('failed', 'dead')
RETURNING id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
          created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
          not_before, idempotency_key;

-- name: cancel_task
UPDATE llm_tasks
SET status = 'cancelled', lease_id = NULL, worker_id = NULL, updated_at = :now
WHERE id = :id AND status IN ('queued', 'leased', 'running')
RETURNING id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
          created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
          not_before, idempotency_key;

-- name: list_tasks
SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
       not_before, idempotency_key
FROM llm_tasks
WHERE (created_at, id) < (:after_ts, :after_id)
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: list_tasks_by_status
SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
       not_before, idempotency_key
FROM llm_tasks
WHERE status = :status AND (created_at, id) < (:after_ts, :after_id)
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- ---------------------------------------------------------------------------
-- leases

-- name: lease_by_id
SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
FROM leases WHERE id = :id;

-- name: insert_lease
INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id)
VALUES (:id, :task_id, :worker_id, :now, :now + :ttl_seconds * 1000, :ttl_seconds, 'active', :now, :context_id)
RETURNING id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id;

-- name: renew_lease
UPDATE leases SET expires_at = :now + ttl_seconds * 1000, last_heartbeat = :now
WHERE id = :id AND status = 'active'
RETURNING id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id;

-- name: end_lease
-- active → :status (released | failed).
UPDATE leases SET status = :status
WHERE id = :id AND status = 'active'
RETURNING id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id;

-- name: release_task_lease
-- The task's active lease, if any (leases_one_active_per_task makes it at most one).
UPDATE leases SET status = 'released'
WHERE task_id = :task_id AND status = 'active'
RETURNING id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id;

-- name: expire_due_leases
-- Up to :limit active leases past their expiry, oldest expiry first (leases_expiry_idx).
UPDATE leases SET status = 'expired'
WHERE id IN (
    SELECT id FROM leases
    WHERE status = 'active' AND expires_at <= :now
    ORDER BY expires_at, id
    LIMIT :limit
)
RETURNING id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id;

-- name: worker_leases
-- By leases_worker_active_idx.
SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
FROM leases
WHERE worker_id = :worker_id AND status = 'active'
ORDER BY started_at DESC, id DESC
LIMIT :limit;

-- name: list_leases
SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
FROM leases
WHERE (started_at, id) < (:after_ts, :after_id)
ORDER BY started_at DESC, id DESC
LIMIT :limit;

-- name: list_leases_by_status
SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
FROM leases
WHERE status = :status AND (started_at, id) < (:after_ts, :after_id)
ORDER BY started_at DESC, id DESC
LIMIT :limit;

-- name: active_lease_owners
SELECT context_id, worker_id FROM leases WHERE status = 'active';

-- name: sticky_workers
SELECT DISTINCT worker_id FROM leases WHERE context_id = :context_id AND status = 'active';

-- ---------------------------------------------------------------------------
-- workers (active_leases is always counted, never stored: leases_worker_active_idx)

-- name: worker_by_id
SELECT w.id, w.node_id, w.url, w.status, w.capabilities, w.last_heartbeat, w.ip_addrs, w.obs_count,
       w.db_sha, w.registered_at,
       (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active'),
       w.agent_version, w.os_info, w.install_method, w.source
FROM workers w WHERE w.id = :id;

-- name: worker_capacity
-- For lease acquisition: the worker's max_concurrency, labels and active lease count.
SELECT coalesce(json_extract(w.capabilities, '$.max_concurrency'), 1),
       coalesce(json_extract(w.capabilities, '$.labels'), '[]'),
       (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active')
FROM workers w WHERE w.id = :id;

-- name: list_workers
SELECT w.id, w.node_id, w.url, w.status, w.capabilities, w.last_heartbeat, w.ip_addrs, w.obs_count,
       w.db_sha, w.registered_at,
       (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active'),
       w.agent_version, w.os_info, w.install_method, w.source
FROM workers w ORDER BY w.id;

-- name: list_workers_by_status
SELECT w.id, w.node_id, w.url, w.status, w.capabilities, w.last_heartbeat, w.ip_addrs, w.obs_count,
       w.db_sha, w.registered_at,
       (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active'),
       w.agent_version, w.os_info, w.install_method, w.source
FROM workers w WHERE w.status = :status ORDER BY w.id;

-- name: worker_candidates
-- Online, claude_cli, room left, and every label in :labels (a JSON array) among the worker's.
SELECT * FROM (
    SELECT w.id, w.node_id, w.url, w.status, w.capabilities, w.last_heartbeat, w.ip_addrs, w.obs_count,
           w.db_sha, w.registered_at,
           (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active') AS active_leases,
           w.agent_version, w.os_info, w.install_method, w.source
    FROM workers w
    WHERE w.status = 'online'
      AND coalesce(json_extract(w.capabilities, '$.claude_cli'), 1)
      AND NOT EXISTS (
          SELECT 1 FROM json_each(:labels) j
          WHERE j.value NOT IN (SELECT value FROM json_each(w.capabilities, '$.labels'))
      )
) c
WHERE c.active_leases < coalesce(json_extract(c.capabilities, '$.max_concurrency'), 1);

-- name: insert_worker
INSERT INTO workers (id, node_id, url, status, capabilities, last_heartbeat, ip_addrs, obs_count, db_sha,
                     registered_at, agent_version, os_info, install_method, source)
VALUES (:id, :node_id, :url, :status, :capabilities, :last_heartbeat, :ip_addrs, :obs_count, :db_sha,
        :now, :agent_version, :os_info, :install_method, :source);

-- name: update_worker
-- Only the fields given (non-NULL) change.
UPDATE workers SET
    node_id = coalesce(:node_id, node_id),
    url = coalesce(:url, url),
    status = coalesce(:status, status),
    capabilities = coalesce(:capabilities, capabilities),
    last_heartbeat = coalesce(:last_heartbeat, last_heartbeat),
    ip_addrs = coalesce(:ip_addrs, ip_addrs),
    obs_count = coalesce(:obs_count, obs_count),
    db_sha = coalesce(:db_sha, db_sha),
    agent_version = coalesce(:agent_version, agent_version),
    os_info = coalesce(:os_info, os_info),
    install_method = coalesce(:install_method, install_method),
    source = coalesce(:source, source)
WHERE id = :id;

-- name: delete_worker
DELETE FROM workers WHERE id = :id;

-- name: claim_touch_worker
-- A claim is contact from a pull worker; its row is written only when that changes
-- something worth keeping (a heartbeat older than 5 s, not online, not a pull worker).
UPDATE workers SET last_heartbeat = :now, status = 'online', source = 'pull'
WHERE id = :id
  AND (last_heartbeat IS NULL OR last_heartbeat < :now - 5000 OR status <> 'online' OR source <> 'pull');

-- name: heartbeat_worker
-- Refreshed at most every 5 s, as on PostgreSQL (see Transaction.heartbeat).
UPDATE workers SET last_heartbeat = :now
WHERE id = :id AND (last_heartbeat IS NULL OR last_heartbeat < :now - 5000);

-- name: touch_worker
-- Contact; a pull/membridge worker marked offline for silence comes back online.
UPDATE workers
SET last_heartbeat = :now,
    status = CASE WHEN status = 'offline' AND source IN ('pull', 'membridge') THEN 'online' ELSE status END
WHERE id = :id
RETURNING id;

-- name: mark_stale_workers_offline
-- Workers something keeps fresh (pull claims, the membridge sync, and with
-- :vouched the runtime's own probes of vouched-for URLs) that went silent. One never
-- heard from keeps 'unknown' (not offline); silence counts from the last heartbeat, or
-- from registration for a row without one (written before registration counted as one).
UPDATE workers SET status = 'offline'
WHERE status NOT IN ('offline', 'unknown')
  AND (source IN ('pull', 'membridge')
       OR (:vouched AND EXISTS (SELECT 1 FROM worker_trust t
                                WHERE t.worker_id = workers.id AND t.url = workers.url)))
  AND coalesce(last_heartbeat, registered_at) < :seen_before
RETURNING id, node_id, url, status, capabilities, last_heartbeat, ip_addrs, obs_count,
          db_sha, registered_at,
          (SELECT count(*) FROM leases l WHERE l.worker_id = workers.id AND l.status = 'active'),
          agent_version, os_info, install_method, source;

-- ---------------------------------------------------------------------------
-- artifacts and results

-- name: insert_artifact
INSERT INTO runtime_artifacts (id, task_id, job_id, type, created_at, finalized, url, entity_refs, tags, content)
VALUES (:id, :task_id, NULL, :type, :now, 1, NULL, '[]', :tags, :content)
RETURNING id, task_id, job_id, type, created_at, finalized, url, entity_refs, tags, content;

-- name: insert_result
INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message, metrics, completed_at)
VALUES (:id, :task_id, :worker_id, :artifact_id, :status, :output, :error_message, :metrics, :now)
RETURNING id, task_id, worker_id, artifact_id, status, output, error_message, metrics, completed_at;

-- name: list_artifacts
SELECT id, task_id, job_id, type, created_at, finalized, url, entity_refs, tags, content
FROM runtime_artifacts
WHERE (created_at, id) < (:after_ts, :after_id)
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: list_artifacts_by_task
SELECT id, task_id, job_id, type, created_at, finalized, url, entity_refs, tags, content
FROM runtime_artifacts
WHERE task_id = :task_id AND (created_at, id) < (:after_ts, :after_id)
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: list_results
SELECT id, task_id, worker_id, artifact_id, status, output, error_message, metrics, completed_at
FROM llm_results
WHERE (completed_at, id) < (:after_ts, :after_id)
ORDER BY completed_at DESC, id DESC
LIMIT :limit;

-- name: list_results_by_task
SELECT id, task_id, worker_id, artifact_id, status, output, error_message, metrics, completed_at
FROM llm_results
WHERE task_id = :task_id AND (completed_at, id) < (:after_ts, :after_id)
ORDER BY completed_at DESC, id DESC
LIMIT :limit;

-- name: latest_result
SELECT id, task_id, worker_id, artifact_id, status, output, error_message, metrics, completed_at
FROM llm_results WHERE task_id = :task_id
ORDER BY completed_at DESC, id DESC
LIMIT 1;

-- ---------------------------------------------------------------------------
-- audit and settings

-- name: insert_audit
-- One statement for a whole batch: :entries is a JSON array of audit entries.
INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
SELECT json_extract(e.value, '$.id'), json_extract(e.value, '$.timestamp'), json_extract(e.value, '$.action'),
       json_extract(e.value, '$.entity_type'), json_extract(e.value, '$.entity_id'),
       json_extract(e.value, '$.actor'), json_extract(e.value, '$.detail')
FROM json_each(:entries) e;

-- name: list_audit
SELECT id, timestamp, action, entity_type, entity_id, actor, detail
FROM audit_logs
WHERE (timestamp, id) < (:after_ts, :after_id)
ORDER BY timestamp DESC, id DESC
LIMIT :limit;

-- name: list_audit_by_entity
SELECT id, timestamp, action, entity_type, entity_id, actor, detail
FROM audit_logs
WHERE entity_id = :entity_id AND (timestamp, id) < (:after_ts, :after_id)
ORDER BY timestamp DESC, id DESC
LIMIT :limit;

-- name: upsert_settings
-- :values is a JSON object {key: value}. "WHERE true" keeps the parser from reading ON CONFLICT as a join.
INSERT INTO runtime_settings (key, value, updated_at)
SELECT s.key, s.value, :now FROM json_each(:values) s WHERE true
ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at;

-- name: get_settings
SELECT key, value FROM runtime_settings;

-- ---------------------------------------------------------------------------
-- stats

-- name: stats
SELECT 'tasks', status, count(*) FROM llm_tasks GROUP BY status
UNION ALL
SELECT 'leases', status, count(*) FROM leases GROUP BY status
UNION ALL
SELECT 'workers', status, count(*) FROM workers GROUP BY status;

-- ---------------------------------------------------------------------------
-- push dispatch

-- name: due_tasks
-- Queued tasks that may be leased now, oldest first (llm_tasks_queue_idx): what
-- automatic dispatch offers to push workers.
SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
       not_before, idempotency_key
FROM llm_tasks
WHERE status = 'queued' AND (not_before IS NULL OR not_before <= :now) AND attempts < max_attempts
ORDER BY created_at, id
LIMIT :limit;

-- name: insert_delivery
INSERT INTO dispatch_deliveries (id, task_id, lease_id, worker_id, url, state, agent_status, detail,
                                 actor, created_at, deadline_at, finished_at)
VALUES (:id, :task_id, :lease_id, :worker_id, :url, :state, :agent_status, :detail, :actor,
        :created_at, :deadline_at, :finished_at);

-- name: finish_delivery
-- sent → its outcome, once: a second answer for the same delivery changes nothing.
UPDATE dispatch_deliveries
SET state = :state, agent_status = :agent_status, detail = :detail, finished_at = :now
WHERE id = :id AND state = 'sent'
RETURNING id, task_id, lease_id, worker_id, url, state, agent_status, detail, actor, created_at,
          deadline_at, finished_at;

-- name: expire_deliveries
-- Deliveries past their deadline with no outcome recorded (the process that sent
-- them stopped): their outcome is unknown.
UPDATE dispatch_deliveries
SET state = 'unknown', detail = :detail, finished_at = :now
WHERE id IN (
    SELECT id FROM dispatch_deliveries
    WHERE state = 'sent' AND deadline_at < :now
    ORDER BY deadline_at LIMIT :limit
)
RETURNING id, task_id, lease_id, worker_id, url, state, agent_status, detail, actor, created_at,
          deadline_at, finished_at;

-- name: latest_delivery
SELECT id, task_id, lease_id, worker_id, url, state, agent_status, detail, actor, created_at,
       deadline_at, finished_at
FROM dispatch_deliveries WHERE task_id = :task_id
ORDER BY created_at DESC, id DESC LIMIT 1;

-- name: vouch_worker_url
INSERT INTO worker_trust (worker_id, url, vouched_by, updated_at)
VALUES (:worker_id, :url, :by, :now)
ON CONFLICT (worker_id) DO UPDATE SET url = excluded.url, vouched_by = excluded.vouched_by,
                                      updated_at = excluded.updated_at;

-- name: forget_worker_url
DELETE FROM worker_trust WHERE worker_id = :worker_id RETURNING url;

-- name: worker_trust
SELECT worker_id, url FROM worker_trust;

-- name: worker_status
SELECT status FROM workers WHERE id = :id;

-- name: worker_liveness
-- A sign of life (alive) or of death from the runtime's own probe or delivery:
-- online with the freshest heartbeat, or offline.
UPDATE workers
SET status = CASE WHEN :alive THEN 'online' ELSE 'offline' END,
    last_heartbeat = CASE WHEN :alive THEN max(coalesce(last_heartbeat, 0), :at) ELSE last_heartbeat END
WHERE id = :id
RETURNING status;

-- name: add_settings_if_absent
-- Keys already set keep their value (a secret every engine process must agree on).
INSERT INTO runtime_settings (key, value, updated_at)
SELECT s.key, s.value, :now FROM json_each(:values) s WHERE true
ON CONFLICT (key) DO NOTHING;

-- ---------------------------------------------------------------------------
-- read side: search, lease history, activity

-- name: search_tasks_by_context
-- One status of one context, newest first (llm_tasks_context_idx); the store merges statuses.
SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
       not_before, idempotency_key
FROM llm_tasks
WHERE context_id = :value AND status = :status AND (created_at, id) < (:after_ts, :after_id)
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: search_tasks_by_agent
-- As search_tasks_by_context, on llm_tasks_agent_idx.
SELECT id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
       created_at, updated_at, lease_id, worker_id, attempts, max_attempts, labels,
       not_before, idempotency_key
FROM llm_tasks
WHERE agent_slug = :value AND status = :status AND (created_at, id) < (:after_ts, :after_id)
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: leases_of_tasks
-- Every lease of the tasks in the JSON array :task_ids, newest first: active ones by
-- leases_one_active_per_task, ended ones by leases_task_ended_idx.
SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
FROM (
    SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
    FROM leases WHERE task_id IN (SELECT value FROM json_each(:task_ids)) AND status = 'active'
    UNION ALL
    SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
    FROM leases WHERE task_id IN (SELECT value FROM json_each(:task_ids)) AND status <> 'active'
)
WHERE (:status IS NULL OR status = :status) AND (started_at, id) < (:after_ts, :after_id)
ORDER BY started_at DESC, id DESC
LIMIT :limit;

-- name: list_expired_leases
-- Most recent expiry first (leases_expired_idx).
SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id
FROM leases
WHERE status = 'expired' AND (expires_at, id) < (:after_ts, :after_id)
ORDER BY expires_at DESC, id DESC
LIMIT :limit;

-- name: list_audit_by_action
SELECT id, timestamp, action, entity_type, entity_id, actor, detail
FROM audit_logs
WHERE action = :action AND (timestamp, id) < (:after_ts, :after_id)
ORDER BY timestamp DESC, id DESC
LIMIT :limit;

-- name: list_audit_by_entity_action
-- One entity's entries are few: its index range, filtered by action.
SELECT id, timestamp, action, entity_type, entity_id, actor, detail
FROM audit_logs INDEXED BY audit_logs_entity_idx
WHERE entity_id = :entity_id AND action = :action AND (timestamp, id) < (:after_ts, :after_id)
ORDER BY timestamp DESC, id DESC
LIMIT :limit;

-- name: live_depth
-- The unfinished tasks by status, counted on llm_tasks_status_created_idx.
SELECT status, count(*) FROM llm_tasks WHERE status IN ('queued', 'leased', 'running') GROUP BY status;

-- name: oldest_queued
SELECT id, created_at FROM llm_tasks WHERE status = 'queued' ORDER BY created_at, id LIMIT 1;

-- name: activity
-- Per minute in [since, until): tasks created, results by outcome, leases expired, each
-- counted on an index ordered by its time column.
SELECT 'created', created_at / 60000 * 60000, count(*)
FROM llm_tasks WHERE created_at >= :since AND created_at < :until
GROUP BY 2
UNION ALL
SELECT CASE status WHEN 'success' THEN 'completed' ELSE 'failed' END, completed_at / 60000 * 60000, count(*)
FROM llm_results WHERE completed_at >= :since AND completed_at < :until
GROUP BY 1, 2
UNION ALL
SELECT 'expired', expires_at / 60000 * 60000, count(*)
FROM leases WHERE status = 'expired' AND expires_at >= :since AND expires_at < :until
GROUP BY 2;

-- ---------------------------------------------------------------------------
-- history (runtime_history)

-- name: last_history_minute
SELECT max(minute) FROM runtime_history;

-- name: history
SELECT minute, queued, leased, running, created, completed, failed, expired
FROM runtime_history
WHERE minute >= :since AND minute < :until
ORDER BY minute;

-- name: record_history
-- Several processes may sample the same minute: the first row stands.
INSERT INTO runtime_history (minute, queued, leased, running, created, completed, failed, expired, sampled_at)
VALUES (:minute, :queued, :leased, :running, :created, :completed, :failed, :expired, :now)
ON CONFLICT (minute) DO NOTHING
RETURNING minute;

-- name: prune_history
DELETE FROM runtime_history WHERE minute < :before;
