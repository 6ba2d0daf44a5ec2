-- Fewer index entries per write (as on PostgreSQL): leases are looked up by task
-- only while active (leases_one_active_per_task), and routing reads every active
-- lease at once, never one context's by index.
DROP INDEX IF EXISTS leases_task_idx;
DROP INDEX IF EXISTS leases_context_active_idx;
