-- The first version's tables on PostgreSQL, as drizzle-kit creates them from its
-- shared/schema.ts (pg-core): varchar ids, text, bigint epoch-ms times, jsonb with
-- defaults, NOT NULL where the schema says .notNull(). The three agent columns of
-- workers came with its node management; an older database lacks them (see
-- WITHOUT_AGENT_COLUMNS in test_adopt.py).

CREATE TABLE IF NOT EXISTS "users" (
	"id" varchar PRIMARY KEY DEFAULT gen_random_uuid() NOT NULL,
	"username" text NOT NULL,
	"password" text NOT NULL,
	CONSTRAINT "users_username_unique" UNIQUE("username")
);

CREATE TABLE IF NOT EXISTS "llm_tasks" (
	"id" varchar PRIMARY KEY NOT NULL,
	"context_id" text NOT NULL,
	"agent_slug" text NOT NULL,
	"prompt" text NOT NULL,
	"context_hints" jsonb DEFAULT '[]'::jsonb NOT NULL,
	"policy" jsonb DEFAULT '{"timeout_sec":120,"budget":0}'::jsonb NOT NULL,
	"desired_format" text DEFAULT 'text' NOT NULL,
	"status" text DEFAULT 'queued' NOT NULL,
	"created_at" bigint NOT NULL,
	"updated_at" bigint NOT NULL,
	"lease_id" varchar,
	"worker_id" varchar,
	"attempts" integer DEFAULT 0 NOT NULL,
	"max_attempts" integer DEFAULT 3 NOT NULL
);

CREATE TABLE IF NOT EXISTS "leases" (
	"id" varchar PRIMARY KEY NOT NULL,
	"task_id" varchar NOT NULL,
	"worker_id" varchar NOT NULL,
	"started_at" bigint NOT NULL,
	"expires_at" bigint NOT NULL,
	"ttl_seconds" integer NOT NULL,
	"status" text DEFAULT 'active' NOT NULL,
	"last_heartbeat" bigint NOT NULL,
	"context_id" varchar
);

CREATE TABLE IF NOT EXISTS "workers" (
	"id" varchar PRIMARY KEY NOT NULL,
	"node_id" text NOT NULL,
	"url" text DEFAULT '' NOT NULL,
	"status" text DEFAULT 'unknown' NOT NULL,
	"capabilities" jsonb DEFAULT '{"claude_cli":true,"max_concurrency":1,"labels":[]}'::jsonb NOT NULL,
	"last_heartbeat" bigint,
	"ip_addrs" jsonb DEFAULT '[]'::jsonb NOT NULL,
	"obs_count" integer DEFAULT 0 NOT NULL,
	"db_sha" text DEFAULT '' NOT NULL,
	"registered_at" bigint NOT NULL,
	"active_leases" integer DEFAULT 0 NOT NULL,
	"agent_version" text DEFAULT 'unknown' NOT NULL,
	"os_info" text DEFAULT '' NOT NULL,
	"install_method" text DEFAULT 'manual' NOT NULL
);

CREATE TABLE IF NOT EXISTS "runtime_artifacts" (
	"id" varchar PRIMARY KEY NOT NULL,
	"task_id" varchar NOT NULL,
	"job_id" varchar,
	"type" text NOT NULL,
	"created_at" bigint NOT NULL,
	"finalized" boolean DEFAULT false NOT NULL,
	"url" text,
	"entity_refs" jsonb DEFAULT '[]'::jsonb NOT NULL,
	"tags" jsonb DEFAULT '[]'::jsonb NOT NULL,
	"content" text
);

CREATE TABLE IF NOT EXISTS "llm_results" (
	"id" varchar PRIMARY KEY NOT NULL,
	"task_id" varchar NOT NULL,
	"worker_id" varchar NOT NULL,
	"artifact_id" varchar NOT NULL,
	"status" text NOT NULL,
	"output" text,
	"error_message" text,
	"metrics" jsonb NOT NULL,
	"completed_at" bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS "audit_logs" (
	"id" varchar PRIMARY KEY NOT NULL,
	"timestamp" bigint NOT NULL,
	"action" text NOT NULL,
	"entity_type" text NOT NULL,
	"entity_id" varchar NOT NULL,
	"actor" text NOT NULL,
	"detail" text NOT NULL
);

CREATE TABLE IF NOT EXISTS "runtime_settings" (
	"key" varchar PRIMARY KEY NOT NULL,
	"value" text NOT NULL
);

-- Its managed git projects: not ours to read, left as they are.
CREATE TABLE IF NOT EXISTS "managed_projects" (
	"id" varchar PRIMARY KEY DEFAULT gen_random_uuid() NOT NULL,
	"name" text NOT NULL,
	"repo_url" text NOT NULL,
	"canonical_id" text NOT NULL,
	"target_path" text,
	"clone_status" text DEFAULT 'pending' NOT NULL,
	"primary_node_id" text,
	"created_at" bigint NOT NULL,
	"updated_at" bigint NOT NULL,
	"error_message" text
);

CREATE TABLE IF NOT EXISTS "project_node_status" (
	"id" varchar PRIMARY KEY DEFAULT gen_random_uuid() NOT NULL,
	"project_id" varchar NOT NULL,
	"node_id" text NOT NULL,
	"clone_status" text DEFAULT 'pending' NOT NULL,
	"last_sync_at" bigint,
	"error_message" text,
	"repo_path" text
);
