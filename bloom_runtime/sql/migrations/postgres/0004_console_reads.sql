-- What the read side needs to stay fast on large tables: task search, the leases of
-- a task, recent expiries, audit by action, and the per-minute history.
--
-- A task or lease changing status is never a HOT update, so every index on those
-- tables takes an entry per change; the lease indexes here are partial on ended
-- leases, which heartbeats (active leases only) never touch.

-- Tasks of one context or one agent, newest first, one status or every status
-- (a status is then a range of its own: the read merges them).
CREATE INDEX llm_tasks_context_idx ON llm_tasks (context_id, status, created_at DESC, id DESC);
CREATE INDEX llm_tasks_agent_idx ON llm_tasks (agent_slug, status, created_at DESC, id DESC);

-- Every lease of a task: the active one through leases_one_active_per_task, the
-- ended ones here (one entry per lease, written when it ends).
CREATE INDEX leases_task_ended_idx ON leases (task_id) WHERE status <> 'active';

-- Recent expiries and expiries per minute (one entry per expired lease).
CREATE INDEX leases_expired_idx ON leases (expires_at DESC, id DESC) WHERE status = 'expired';

-- The audit log filtered by action (insert-only: one entry per audit entry).
CREATE INDEX audit_logs_action_idx ON audit_logs (action, timestamp DESC, id DESC);

-- One row per minute, written by the history sampler and pruned past its retention.
-- Depths are those seen when the minute closed; a minute filled in after downtime
-- has its counts (rebuilt from the stored rows) but no depths.
CREATE TABLE runtime_history (
    minute      bigint PRIMARY KEY,
    queued      integer,
    leased      integer,
    running     integer,
    created     integer NOT NULL DEFAULT 0,
    completed   integer NOT NULL DEFAULT 0,
    failed      integer NOT NULL DEFAULT 0,
    expired     integer NOT NULL DEFAULT 0,
    sampled_at  bigint NOT NULL
);
