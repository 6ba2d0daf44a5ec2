-- Adopting the first version's tables, as drizzle created them from its shared/schema.ts,
-- into the layout 0001_initial builds (see bloom_runtime/sql/adopt.py). Not a numbered
-- migration: `migrate` runs it once, in the one transaction that also records
-- 0001_initial, when it finds those tables and no schema_migrations. Named blocks, as in
-- queries/postgres.sql; the order here is the order they run in.

-- ---------------------------------------------------------------- what is there

-- name: tables_present
SELECT c.relname FROM pg_class c
WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
  AND c.relname = ANY(%(tables)s::text[])

-- name: columns
SELECT table_name, column_name, data_type FROM information_schema.columns
WHERE table_schema = current_schema() AND table_name = ANY(%(tables)s::text[])

-- name: unknown_values
-- Values 0001's checks would refuse, by column: these rows cannot be adopted as they are.
SELECT 'llm_tasks.status', status, count(*) FROM llm_tasks WHERE status <> ALL(%(task_statuses)s::text[]) GROUP BY status
UNION ALL
SELECT 'llm_tasks.desired_format', desired_format, count(*) FROM llm_tasks
WHERE desired_format NOT IN ('json', 'text') GROUP BY desired_format
UNION ALL
SELECT 'leases.status', status, count(*) FROM leases WHERE status <> ALL(%(lease_statuses)s::text[]) GROUP BY status
UNION ALL
SELECT 'workers.status', status, count(*) FROM workers WHERE status <> ALL(%(worker_statuses)s::text[]) GROUP BY status
UNION ALL
SELECT 'llm_results.status', status, count(*) FROM llm_results WHERE status NOT IN ('success', 'error') GROUP BY status

-- name: unaddressable_ids
-- Ids the API's paths refuse (the first version took any worker name): still listed, routed and
-- leased, but not reachable as /workers/{id}, /llm-tasks/{id}.
SELECT 'workers', id FROM workers WHERE id !~ %(pattern)s OR length(id) > 128
UNION ALL
SELECT 'llm_tasks', id FROM llm_tasks WHERE id !~ %(pattern)s OR length(id) > 128
ORDER BY 1, 2
LIMIT 20

-- name: row_counts
SELECT 'llm_tasks', count(*) FROM llm_tasks UNION ALL SELECT 'leases', count(*) FROM leases
UNION ALL SELECT 'workers', count(*) FROM workers UNION ALL SELECT 'llm_results', count(*) FROM llm_results
UNION ALL SELECT 'runtime_artifacts', count(*) FROM runtime_artifacts UNION ALL SELECT 'audit_logs', count(*) FROM audit_logs
UNION ALL SELECT 'runtime_settings', count(*) FROM runtime_settings

-- ---------------------------------------------------------------- rows made valid

-- name: create_helpers
-- JSON the stores decode strictly, made to decode: a list of strings, an integer in range,
-- a number in range. Temporary: dropped by drop_helpers before the transaction commits.
CREATE FUNCTION pg_temp.bloom_text_list(v jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(v) = 'array' THEN COALESCE(
        (SELECT jsonb_agg(CASE WHEN jsonb_typeof(e) = 'string' THEN e ELSE to_jsonb(e #>> '{}') END ORDER BY n)
         FROM jsonb_array_elements(v) WITH ORDINALITY AS a(e, n) WHERE jsonb_typeof(e) <> 'null'),
        '[]'::jsonb) ELSE '[]'::jsonb END
$$;
CREATE FUNCTION pg_temp.bloom_int(v jsonb, lo numeric, hi numeric, fallback integer) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(v) = 'number' THEN LEAST(GREATEST(round(v::text::numeric), lo), hi)::integer
                ELSE fallback END
$$;
CREATE FUNCTION pg_temp.bloom_number(v jsonb, lo numeric, hi numeric, fallback numeric) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(v) = 'number' THEN to_jsonb(LEAST(GREATEST(v::text::numeric, lo), hi))
                ELSE to_jsonb(fallback) END
$$;
CREATE FUNCTION pg_temp.bloom_object(v jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(v) = 'object' THEN v ELSE '{}'::jsonb END
$$;
CREATE FUNCTION pg_temp.bloom_policy(v jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT pg_temp.bloom_object(v) || jsonb_build_object(
        'timeout_sec', pg_temp.bloom_int(v -> 'timeout_sec', 1, 3600, 120),
        'budget', pg_temp.bloom_number(v -> 'budget', 0, 1e12, 0))
$$;
CREATE FUNCTION pg_temp.bloom_capabilities(v jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT pg_temp.bloom_object(v) || jsonb_build_object(
        'claude_cli', CASE WHEN jsonb_typeof(v -> 'claude_cli') = 'boolean' THEN v -> 'claude_cli' ELSE 'true'::jsonb END,
        'max_concurrency', pg_temp.bloom_int(v -> 'max_concurrency', 1, 32, 1),
        'labels', pg_temp.bloom_text_list(v -> 'labels'))
$$

-- name: fix_task_json
-- Compared as text: jsonb calls 120.0 equal to 120, which an integer field does not take.
UPDATE llm_tasks SET context_hints = pg_temp.bloom_text_list(context_hints), policy = pg_temp.bloom_policy(policy)
WHERE context_hints::text <> pg_temp.bloom_text_list(context_hints)::text
   OR policy::text <> pg_temp.bloom_policy(policy)::text

-- name: fix_task_attempts
-- 0001 holds 1 <= max_attempts <= 10 and 0 <= attempts <= max_attempts.
UPDATE llm_tasks SET max_attempts = LEAST(GREATEST(max_attempts, 1), 10),
                     attempts = LEAST(GREATEST(attempts, 0), LEAST(GREATEST(max_attempts, 1), 10))
WHERE max_attempts NOT BETWEEN 1 AND 10 OR attempts < 0 OR attempts > max_attempts

-- name: expire_unheld_leases
-- An active lease its task does not hold (a second grant of one task, or a task that moved on
-- without releasing it) would block a slot of its worker and the one-active-lease-per-task index.
UPDATE leases l SET status = 'expired'
WHERE l.status = 'active' AND NOT EXISTS (
    SELECT 1 FROM llm_tasks t WHERE t.id = l.task_id AND t.lease_id = l.id AND t.status IN ('leased', 'running'))
RETURNING l.id, l.task_id, l.worker_id

-- name: recover_orphaned_tasks
-- A task leased or running under no active lease (the first version expired only leased tasks)
-- would never move again: back to the queue while attempts are left, else dead, as an expiry does.
UPDATE llm_tasks t SET status = CASE WHEN t.attempts < t.max_attempts THEN 'queued' ELSE 'dead' END,
                       lease_id = NULL, worker_id = NULL, updated_at = %(now)s
WHERE t.status IN ('leased', 'running') AND NOT EXISTS (
    SELECT 1 FROM leases l WHERE l.id = t.lease_id AND l.status = 'active')
RETURNING t.id, t.status, t.attempts, t.max_attempts

-- name: fix_leases
-- 0001 holds context_id NOT NULL (the task's, as grants store it) and ttl_seconds > 0.
UPDATE leases l SET context_id = COALESCE(l.context_id, (SELECT t.context_id FROM llm_tasks t WHERE t.id = l.task_id), ''),
                    ttl_seconds = GREATEST(l.ttl_seconds, 1)
WHERE l.context_id IS NULL OR l.ttl_seconds < 1

-- name: fix_workers
UPDATE workers SET capabilities = pg_temp.bloom_capabilities(capabilities), ip_addrs = pg_temp.bloom_text_list(ip_addrs),
                   last_heartbeat = COALESCE(last_heartbeat, registered_at)
WHERE capabilities::text <> pg_temp.bloom_capabilities(capabilities)::text
   OR ip_addrs::text <> pg_temp.bloom_text_list(ip_addrs)::text OR last_heartbeat IS NULL

-- name: fix_artifacts
UPDATE runtime_artifacts SET entity_refs = pg_temp.bloom_text_list(entity_refs), tags = pg_temp.bloom_text_list(tags)
WHERE entity_refs::text <> pg_temp.bloom_text_list(entity_refs)::text OR tags::text <> pg_temp.bloom_text_list(tags)::text

-- name: fix_results
UPDATE llm_results SET metrics = pg_temp.bloom_object(metrics) WHERE jsonb_typeof(metrics) <> 'object'

-- name: fix_settings
-- The first version kept the membridge admin key as admin_key, and wrote last_test "null" before a test.
UPDATE runtime_settings SET key = 'membridge_admin_key'
WHERE key = 'admin_key' AND NOT EXISTS (SELECT 1 FROM runtime_settings WHERE key = 'membridge_admin_key');
DELETE FROM runtime_settings WHERE key = 'admin_key';
UPDATE runtime_settings SET value = '' WHERE key = 'last_test' AND value !~ '^[0-9]+$'

-- name: drop_helpers
DROP FUNCTION pg_temp.bloom_capabilities(jsonb), pg_temp.bloom_policy(jsonb), pg_temp.bloom_object(jsonb),
              pg_temp.bloom_number(jsonb, numeric, numeric, numeric), pg_temp.bloom_int(jsonb, numeric, numeric, integer),
              pg_temp.bloom_text_list(jsonb)

-- ---------------------------------------------------------------- the 0001 layout

-- name: layout
-- Types, defaults, nullability, new columns, checks and indexes as 0001_initial.sql has them.
-- Where the first version was stricter (NOT NULL, '' defaults) this relaxes to 0001: every
-- existing value stays valid.
DO $$
DECLARE c record;
BEGIN
    FOR c IN SELECT conrelid::regclass AS tab, conname, contype FROM pg_constraint
             WHERE connamespace = current_schema()::regnamespace AND contype IN ('p', 'u')
               AND conrelid::regclass::text IN ('llm_tasks', 'leases', 'workers', 'runtime_artifacts', 'llm_results',
                                                'audit_logs', 'runtime_settings', 'users') LOOP
        IF c.contype = 'p' AND c.conname <> c.tab::text || '_pkey' THEN
            EXECUTE format('ALTER TABLE %s RENAME CONSTRAINT %I TO %I', c.tab, c.conname, c.tab::text || '_pkey');
        ELSIF c.contype = 'u' THEN
            EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', c.tab, c.conname);
        END IF;
    END LOOP;
END $$;

ALTER TABLE llm_tasks
    ALTER COLUMN id TYPE text,
    ALTER COLUMN context_id TYPE text,
    ALTER COLUMN agent_slug TYPE text,
    ALTER COLUMN prompt TYPE text,
    ALTER COLUMN policy SET DEFAULT '{"timeout_sec": 120, "budget": 0}'::jsonb,
    ALTER COLUMN desired_format TYPE text,
    ALTER COLUMN status TYPE text,
    ALTER COLUMN lease_id TYPE text,
    ALTER COLUMN worker_id TYPE text,
    ADD COLUMN labels jsonb NOT NULL DEFAULT '[]'::jsonb,
    ADD COLUMN not_before bigint,
    ADD COLUMN idempotency_key text,
    ADD CONSTRAINT llm_tasks_desired_format_check CHECK (desired_format IN ('json', 'text')),
    ADD CONSTRAINT llm_tasks_status_check
        CHECK (status IN ('queued', 'leased', 'running', 'completed', 'failed', 'dead', 'cancelled')),
    ADD CONSTRAINT llm_tasks_attempts_check CHECK (attempts >= 0),
    ADD CONSTRAINT llm_tasks_max_attempts_check CHECK (max_attempts BETWEEN 1 AND 10),
    ADD CONSTRAINT llm_tasks_check CHECK (attempts <= max_attempts),
    ADD CONSTRAINT llm_tasks_idempotency_key_key UNIQUE (idempotency_key);
CREATE INDEX llm_tasks_queue_idx ON llm_tasks (created_at, id) WHERE status = 'queued';
CREATE INDEX llm_tasks_created_idx ON llm_tasks (created_at DESC, id DESC);
CREATE INDEX llm_tasks_status_created_idx ON llm_tasks (status, created_at DESC, id DESC);

ALTER TABLE leases
    ALTER COLUMN id TYPE text,
    ALTER COLUMN task_id TYPE text,
    ALTER COLUMN worker_id TYPE text,
    ALTER COLUMN status TYPE text,
    ALTER COLUMN context_id TYPE text,
    ALTER COLUMN context_id SET NOT NULL,
    ADD CONSTRAINT leases_ttl_seconds_check CHECK (ttl_seconds > 0),
    ADD CONSTRAINT leases_status_check CHECK (status IN ('active', 'released', 'expired', 'failed'));
CREATE UNIQUE INDEX leases_one_active_per_task ON leases (task_id) WHERE status = 'active';
CREATE INDEX leases_task_idx ON leases (task_id);
CREATE INDEX leases_expiry_idx ON leases (expires_at) WHERE status = 'active';
CREATE INDEX leases_worker_active_idx ON leases (worker_id) WHERE status = 'active';
CREATE INDEX leases_context_active_idx ON leases (context_id) WHERE status = 'active';
CREATE INDEX leases_started_idx ON leases (started_at DESC, id DESC);
CREATE INDEX leases_status_started_idx ON leases (status, started_at DESC, id DESC);

-- active_leases was a count the first version kept beside the leases; it is counted from them.
ALTER TABLE workers
    DROP COLUMN active_leases,
    ADD COLUMN IF NOT EXISTS agent_version text,
    ADD COLUMN IF NOT EXISTS os_info text,
    ADD COLUMN IF NOT EXISTS install_method text;
ALTER TABLE workers
    ALTER COLUMN id TYPE text,
    ALTER COLUMN node_id TYPE text,
    ALTER COLUMN url TYPE text,
    ALTER COLUMN url DROP DEFAULT,
    ALTER COLUMN url DROP NOT NULL,
    ALTER COLUMN status TYPE text,
    ALTER COLUMN status SET DEFAULT 'online',
    ALTER COLUMN db_sha TYPE text,
    ALTER COLUMN db_sha DROP DEFAULT,
    ALTER COLUMN db_sha DROP NOT NULL,
    ALTER COLUMN agent_version TYPE text,
    ALTER COLUMN agent_version DROP DEFAULT,
    ALTER COLUMN agent_version DROP NOT NULL,
    ALTER COLUMN os_info TYPE text,
    ALTER COLUMN os_info DROP DEFAULT,
    ALTER COLUMN os_info DROP NOT NULL,
    ALTER COLUMN install_method TYPE text,
    ALTER COLUMN install_method DROP DEFAULT,
    ALTER COLUMN install_method DROP NOT NULL,
    ADD COLUMN source text NOT NULL DEFAULT 'api',
    ADD CONSTRAINT workers_status_check CHECK (status IN ('online', 'offline', 'syncing', 'error', 'unknown')),
    ADD CONSTRAINT workers_source_check CHECK (source IN ('api', 'pull', 'membridge'));

ALTER TABLE runtime_artifacts
    ALTER COLUMN id TYPE text,
    ALTER COLUMN task_id TYPE text,
    ALTER COLUMN job_id TYPE text,
    ALTER COLUMN type TYPE text,
    ALTER COLUMN finalized SET DEFAULT true,
    ALTER COLUMN url TYPE text,
    ALTER COLUMN content TYPE text;
CREATE INDEX runtime_artifacts_task_idx ON runtime_artifacts (task_id, created_at DESC, id DESC);
CREATE INDEX runtime_artifacts_created_idx ON runtime_artifacts (created_at DESC, id DESC);

ALTER TABLE llm_results
    ALTER COLUMN id TYPE text,
    ALTER COLUMN task_id TYPE text,
    ALTER COLUMN worker_id TYPE text,
    ALTER COLUMN worker_id DROP NOT NULL,
    ALTER COLUMN artifact_id TYPE text,
    ALTER COLUMN artifact_id DROP NOT NULL,
    ALTER COLUMN status TYPE text,
    ALTER COLUMN output TYPE text,
    ALTER COLUMN error_message TYPE text,
    ALTER COLUMN metrics SET DEFAULT '{}'::jsonb,
    ADD CONSTRAINT llm_results_status_check CHECK (status IN ('success', 'error'));
CREATE INDEX llm_results_task_idx ON llm_results (task_id, completed_at DESC, id DESC);
CREATE INDEX llm_results_completed_idx ON llm_results (completed_at DESC, id DESC);

ALTER TABLE audit_logs
    ALTER COLUMN id TYPE text,
    ALTER COLUMN action TYPE text,
    ALTER COLUMN entity_type TYPE text,
    ALTER COLUMN entity_id TYPE text,
    ALTER COLUMN actor TYPE text,
    ALTER COLUMN detail TYPE text,
    ALTER COLUMN detail DROP NOT NULL;
CREATE INDEX audit_logs_timestamp_idx ON audit_logs (timestamp DESC, id DESC);
CREATE INDEX audit_logs_entity_idx ON audit_logs (entity_id, timestamp DESC, id DESC);

-- Settings written before this have no time of their own: they are dated by the adoption.
ALTER TABLE runtime_settings
    ALTER COLUMN key TYPE text,
    ALTER COLUMN value TYPE text,
    ADD COLUMN updated_at bigint NOT NULL DEFAULT (extract(epoch FROM now()) * 1000)::bigint;
ALTER TABLE runtime_settings ALTER COLUMN updated_at DROP DEFAULT;

ALTER TABLE users
    ALTER COLUMN id TYPE text,
    ALTER COLUMN id DROP DEFAULT,
    ALTER COLUMN username TYPE text,
    ALTER COLUMN password TYPE text,
    ADD CONSTRAINT users_username_key UNIQUE (username)
