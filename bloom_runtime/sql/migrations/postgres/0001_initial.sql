-- The runtime's tables, named as in the first version so its data carries over.
-- Times are epoch milliseconds (bigint); structured fields are JSONB.

CREATE TABLE llm_tasks (
    id              text PRIMARY KEY,
    context_id      text NOT NULL,
    agent_slug      text NOT NULL,
    prompt          text NOT NULL,
    context_hints   jsonb NOT NULL DEFAULT '[]'::jsonb,
    policy          jsonb NOT NULL DEFAULT '{"timeout_sec": 120, "budget": 0}'::jsonb,
    desired_format  text NOT NULL DEFAULT 'text' CHECK (desired_format IN ('json', 'text')),
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'leased', 'running', 'completed', 'failed', 'dead', 'cancelled')),
    created_at      bigint NOT NULL,
    updated_at      bigint NOT NULL,
    lease_id        text,
    worker_id       text,
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts    integer NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 10),
    labels          jsonb NOT NULL DEFAULT '[]'::jsonb,
    not_before      bigint,
    idempotency_key text UNIQUE,
    CHECK (attempts <= max_attempts)
);
-- Claim order: the oldest queued task first.
CREATE INDEX llm_tasks_queue_idx ON llm_tasks (created_at, id) WHERE status = 'queued';
-- Listing, newest first, with and without a status filter.
CREATE INDEX llm_tasks_created_idx ON llm_tasks (created_at DESC, id DESC);
CREATE INDEX llm_tasks_status_created_idx ON llm_tasks (status, created_at DESC, id DESC);

CREATE TABLE leases (
    id              text PRIMARY KEY,
    task_id         text NOT NULL,
    worker_id       text NOT NULL,
    started_at      bigint NOT NULL,
    expires_at      bigint NOT NULL,
    ttl_seconds     integer NOT NULL CHECK (ttl_seconds > 0),
    status          text NOT NULL DEFAULT 'active'
                    CHECK (status IN ('active', 'released', 'expired', 'failed')),
    last_heartbeat  bigint NOT NULL,
    context_id      text NOT NULL
);
-- At most one active lease per task, whatever the callers do.
CREATE UNIQUE INDEX leases_one_active_per_task ON leases (task_id) WHERE status = 'active';
CREATE INDEX leases_task_idx ON leases (task_id);
CREATE INDEX leases_expiry_idx ON leases (expires_at) WHERE status = 'active';
CREATE INDEX leases_worker_active_idx ON leases (worker_id) WHERE status = 'active';
CREATE INDEX leases_context_active_idx ON leases (context_id) WHERE status = 'active';
CREATE INDEX leases_started_idx ON leases (started_at DESC, id DESC);
CREATE INDEX leases_status_started_idx ON leases (status, started_at DESC, id DESC);

CREATE TABLE workers (
    id              text PRIMARY KEY,
    node_id         text NOT NULL,
    url             text,
    status          text NOT NULL DEFAULT 'online'
                    CHECK (status IN ('online', 'offline', 'syncing', 'error', 'unknown')),
    capabilities    jsonb NOT NULL DEFAULT '{"claude_cli": true, "max_concurrency": 1, "labels": []}'::jsonb,
    last_heartbeat  bigint,
    ip_addrs        jsonb NOT NULL DEFAULT '[]'::jsonb,
    obs_count       integer NOT NULL DEFAULT 0,
    db_sha          text,
    registered_at   bigint NOT NULL,
    agent_version   text,
    os_info         text,
    install_method  text,
    source          text NOT NULL DEFAULT 'api' CHECK (source IN ('api', 'pull', 'membridge'))
);

CREATE TABLE runtime_artifacts (
    id              text PRIMARY KEY,
    task_id         text NOT NULL,
    job_id          text,
    type            text NOT NULL,
    created_at      bigint NOT NULL,
    finalized       boolean NOT NULL DEFAULT true,
    url             text,
    entity_refs     jsonb NOT NULL DEFAULT '[]'::jsonb,
    tags            jsonb NOT NULL DEFAULT '[]'::jsonb,
    content         text
);
CREATE INDEX runtime_artifacts_task_idx ON runtime_artifacts (task_id, created_at DESC, id DESC);
CREATE INDEX runtime_artifacts_created_idx ON runtime_artifacts (created_at DESC, id DESC);

CREATE TABLE llm_results (
    id              text PRIMARY KEY,
    task_id         text NOT NULL,
    worker_id       text,
    artifact_id     text,
    status          text NOT NULL CHECK (status IN ('success', 'error')),
    output          text,
    error_message   text,
    metrics         jsonb NOT NULL DEFAULT '{}'::jsonb,
    completed_at    bigint NOT NULL
);
CREATE INDEX llm_results_task_idx ON llm_results (task_id, completed_at DESC, id DESC);
CREATE INDEX llm_results_completed_idx ON llm_results (completed_at DESC, id DESC);

CREATE TABLE audit_logs (
    id              text PRIMARY KEY,
    timestamp       bigint NOT NULL,
    action          text NOT NULL,
    entity_type     text NOT NULL,
    entity_id       text NOT NULL,
    actor           text NOT NULL,
    detail          text
);
CREATE INDEX audit_logs_timestamp_idx ON audit_logs (timestamp DESC, id DESC);
CREATE INDEX audit_logs_entity_idx ON audit_logs (entity_id, timestamp DESC, id DESC);

CREATE TABLE runtime_settings (
    key             text PRIMARY KEY,
    value           text NOT NULL,
    updated_at      bigint NOT NULL
);

CREATE TABLE users (
    id              text PRIMARY KEY,
    username        text NOT NULL UNIQUE,
    password        text NOT NULL
);
