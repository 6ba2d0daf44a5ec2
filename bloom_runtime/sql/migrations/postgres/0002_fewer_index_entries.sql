-- Fewer index entries per write. A task or lease changing status is never a HOT
-- update, so every index on its table takes a new entry each time.

-- Leases are looked up by task only while active (leases_one_active_per_task), and
-- routing reads every active lease at once, never one context's by index.
DROP INDEX IF EXISTS leases_task_idx;
DROP INDEX IF EXISTS leases_context_active_idx;

-- Only tasks created with an idempotency key need an entry. Creation's
-- ON CONFLICT DO NOTHING takes any unique index, partial ones included.
CREATE UNIQUE INDEX llm_tasks_idempotency_key_idx ON llm_tasks (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
ALTER TABLE llm_tasks DROP CONSTRAINT IF EXISTS llm_tasks_idempotency_key_key;
