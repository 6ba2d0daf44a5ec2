-- Rows as the first version wrote them (its storage.ts and routes.ts): a fleet, tasks in each
-- of its states with their leases, results and artifacts, its audit wording and its settings.
-- Times are epoch ms around 1700000000000.

INSERT INTO users (username, password) VALUES ('admin', 'not-a-real-hash');

INSERT INTO workers (id, node_id, url, status, capabilities, last_heartbeat, ip_addrs, obs_count, db_sha,
                     registered_at, active_leases, agent_version, os_info, install_method) VALUES
    ('node-a', 'node-a', 'http://10.0.0.11:8001', 'online',
     '{"claude_cli":true,"max_concurrency":2,"labels":["systemd","aarch64"]}', 1700000090000, '["10.0.0.11"]', 42,
     'sha-1f2e', 1699990000000, 0, '0.4.0', 'node-a / Debian GNU/Linux 12 (bookworm)', 'script'),
    ('node-b', 'node-b', '', 'unknown', '{"claude_cli":true,"max_concurrency":1,"labels":[]}', NULL, '[]', 0, '',
     1699995000000, 0, 'unknown', '', 'manual'),
    ('my laptop', 'my laptop', 'http://10.0.0.13:8001', 'offline', '{"claude_cli":false,"max_concurrency":1}', 1699999000000,
     '[]', 0, '', 1699998000000, 0, 'unknown', '', 'manual');

INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status, created_at,
                       updated_at, lease_id, worker_id, attempts, max_attempts) VALUES
    ('6f1c0a52-0000-4000-8000-000000000001', 'garden', 'writer', 'queued prompt', '["notes/a.md"]',
     '{"timeout_sec":120,"budget":0}', 'text', 'queued', 1700000001000, 1700000001000, NULL, NULL, 0, 3),
    ('6f1c0a52-0000-4000-8000-000000000002', 'garden', 'writer', 'leased prompt', '[]',
     '{"timeout_sec":60,"budget":0.5}', 'json', 'leased', 1700000002000, 1700000080000,
     '7a2d0b63-0000-4000-8000-000000000002', 'node-a', 1, 3),
    ('6f1c0a52-0000-4000-8000-000000000003', 'orchard', 'reviewer', 'stuck prompt', '[]',
     '{"timeout_sec":120,"budget":0}', 'text', 'running', 1700000003000, 1700000040000,
     '7a2d0b63-0000-4000-8000-000000000003', 'node-a', 1, 3),
    ('6f1c0a52-0000-4000-8000-000000000004', 'garden', 'writer', 'done prompt', '[]',
     '{"timeout_sec":120,"budget":0}', 'text', 'completed', 1700000004000, 1700000050000,
     '7a2d0b63-0000-4000-8000-000000000004', 'node-a', 1, 3),
    ('6f1c0a52-0000-4000-8000-000000000005', 'garden', 'writer', 'failed prompt', '[]',
     '{"timeout_sec":120,"budget":0}', 'text', 'failed', 1700000005000, 1700000060000,
     '7a2d0b63-0000-4000-8000-000000000005', 'node-a', 1, 3),
    ('6f1c0a52-0000-4000-8000-000000000006', 'garden', 'writer', 'dead prompt', '[]',
     '{"timeout_sec":120,"budget":0}', 'text', 'dead', 1700000006000, 1700000070000,
     '7a2d0b63-0000-4000-8000-000000000006', 'node-a', 3, 3);

INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id) VALUES
    -- Active, and held by its leased task: kept as it is.
    ('7a2d0b63-0000-4000-8000-000000000002', '6f1c0a52-0000-4000-8000-000000000002', 'node-a', 1700000080000,
     1700000380000, 300, 'active', 1700000080000, 'garden'),
    -- Expired while its task ran: the first version left the task running for good.
    ('7a2d0b63-0000-4000-8000-000000000003', '6f1c0a52-0000-4000-8000-000000000003', 'node-a', 1700000010000,
     1700000310000, 300, 'expired', 1700000040000, NULL),
    ('7a2d0b63-0000-4000-8000-000000000004', '6f1c0a52-0000-4000-8000-000000000004', 'node-a', 1700000020000,
     1700000320000, 300, 'released', 1700000045000, 'garden'),
    ('7a2d0b63-0000-4000-8000-000000000005', '6f1c0a52-0000-4000-8000-000000000005', 'node-a', 1700000030000,
     1700000330000, 300, 'released', 1700000030000, 'garden'),
    ('7a2d0b63-0000-4000-8000-000000000006', '6f1c0a52-0000-4000-8000-000000000006', 'node-a', 1700000040000,
     1700000340000, 300, 'expired', 1700000040000, 'garden');

INSERT INTO runtime_artifacts (id, task_id, job_id, type, created_at, finalized, url, entity_refs, tags, content) VALUES
    ('8b3e1c74-0000-4000-8000-000000000004', '6f1c0a52-0000-4000-8000-000000000004', NULL, 'LLM_RESULT', 1700000050000,
     true, NULL, '[]', '["draft"]', 'the answer'),
    ('8b3e1c74-0000-4000-8000-000000000005', '6f1c0a52-0000-4000-8000-000000000005', NULL, 'LLM_RESULT', 1700000060000,
     true, 'https://minio.example/artifacts/5.json', '[]', '[]', NULL);

INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message, metrics, completed_at) VALUES
    ('9c4f2d85-0000-4000-8000-000000000004', '6f1c0a52-0000-4000-8000-000000000004', 'node-a',
     '8b3e1c74-0000-4000-8000-000000000004', 'success', 'the answer', NULL, '{"duration_ms":1200,"tokens_used":321}',
     1700000050000),
    ('9c4f2d85-0000-4000-8000-000000000005', '6f1c0a52-0000-4000-8000-000000000005', 'unknown',
     '8b3e1c74-0000-4000-8000-000000000005', 'error', NULL, 'claude exited 1', '{"duration_ms":5}', 1700000060000);

INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail) VALUES
    ('a0000000-0000-4000-8000-000000000001', 1700000001000, 'task_created', 'llm_task',
     '6f1c0a52-0000-4000-8000-000000000001', 'api', 'Task for agent writer, context garden'),
    ('a0000000-0000-4000-8000-000000000002', 1700000080000, 'task_leased', 'lease',
     '7a2d0b63-0000-4000-8000-000000000002', 'router',
     'Task 6f1c0a52-0000-4000-8000-000000000002 leased to worker node-a, TTL 300s'),
    ('a0000000-0000-4000-8000-000000000003', 1700000090000, 'config_updated', 'runtime_config', 'singleton', 'admin',
     'Updated membridge URL to http://127.0.0.1:8000');

INSERT INTO runtime_settings (key, value) VALUES
    ('membridge_server_url', 'http://127.0.0.1:8000'),
    ('admin_key', 'adm-first-version-key-cdef'),
    ('connected', 'true'),
    ('last_test', '1700000095000');

INSERT INTO managed_projects (name, repo_url, canonical_id, created_at, updated_at)
VALUES ('garden', 'https://github.com/example/garden.git', 'c0ffee', 1700000000000, 1700000000000);
