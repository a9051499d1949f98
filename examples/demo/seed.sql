-- Demo data for scripts/demo.sh: a centaur-shaped sandbox_sessions table with a realistic
-- mix of sessions matching examples/demo/cluster-snapshot.json. Recreated on every run.
DROP TABLE IF EXISTS sandbox_sessions;
DROP TABLE IF EXISTS sandbox_reconciler_audit;
DROP TABLE IF EXISTS sandbox_reconciler_audit_migrations;
-- The table has the shape of centaur's (the same fixture the tests use).
\ir ../../crates/testkit/fixtures/centaur_sandbox_sessions.sql

-- live sessions whose pods exist
INSERT INTO sandbox_sessions (thread_key, sandbox_id, state, updated_at, agent_thread_id)
SELECT 'slack:C01:' || i, format('sbx-run-%s', lpad(i::text, 3, '0')), 'running', now() - interval '5 minutes', 'T-run-' || i
FROM generate_series(1, 30) i;
INSERT INTO sandbox_sessions (thread_key, sandbox_id, state, updated_at, agent_thread_id)
SELECT 'slack:C02:' || i, format('sbx-idle-%s', lpad(i::text, 3, '0')), 'idle', now() - interval '2 hours', 'T-idle-' || i
FROM generate_series(1, 10) i;
INSERT INTO sandbox_sessions (thread_key, sandbox_id, state, updated_at, agent_thread_id)
SELECT 'slack:C03:' || i, format('sbx-deliver-%s', lpad(i::text, 3, '0')), 'delivering', now() - interval '1 minute', 'T-del-' || i
FROM generate_series(1, 5) i;
-- agent-sandbox sessions: running, and paused on purpose (the Sandbox stays, replicas 0)
INSERT INTO sandbox_sessions (thread_key, sandbox_id, state, updated_at, agent_thread_id)
SELECT 'slack:C04:' || i, format('sb-run-%s', lpad(i::text, 3, '0')), 'running', now() - interval '30 minutes', 'T-sbrun-' || i
FROM generate_series(1, 10) i;
INSERT INTO sandbox_sessions (thread_key, sandbox_id, state, updated_at, agent_thread_id)
SELECT 'slack:C05:' || i, format('sb-paused-%s', lpad(i::text, 3, '0')), 'suspended', now() - interval '3 days', 'T-sbpause-' || i
FROM generate_series(1, 20) i;
-- the backlog: suspended bare-pod sessions whose pods were deleted long ago (orphans)
INSERT INTO sandbox_sessions (thread_key, sandbox_id, state, updated_at, agent_thread_id)
SELECT 'slack:C06:' || i, format('sbx-susp-%s', lpad(i::text, 3, '0')), 'suspended', now() - (i || ' hours')::interval - interval '1 day', 'T-susp-' || i
FROM generate_series(1, 40) i;
-- ...a Sandbox deleted by hand (orphan on the agent-sandbox backend)
INSERT INTO sandbox_sessions (thread_key, sandbox_id, state, updated_at, agent_thread_id)
VALUES ('slack:C07:1', 'sb-deleted-001', 'suspended', now() - interval '9 days', 'T-sbdel-1');
-- suspended a moment ago: inside the grace period, left alone
INSERT INTO sandbox_sessions (thread_key, sandbox_id, state, updated_at, agent_thread_id)
SELECT 'slack:C08:' || i, format('sbx-fresh-%s', lpad(i::text, 3, '0')), 'suspended', now() - interval '2 minutes', 'T-fresh-' || i
FROM generate_series(1, 3) i;
-- suspended, pod still terminating: not absent yet
INSERT INTO sandbox_sessions (thread_key, sandbox_id, state, updated_at, agent_thread_id)
VALUES ('slack:C09:1', 'sbx-susp-terminating', 'suspended', now() - interval '1 hour', 'T-term-1');
-- history: gone, stopped, error, creating
INSERT INTO sandbox_sessions (thread_key, sandbox_id, state, updated_at)
SELECT 'slack:C10:' || i, format('sbx-old-%s', lpad(i::text, 4, '0')), 'gone', now() - interval '30 days'
FROM generate_series(1, 80) i;
INSERT INTO sandbox_sessions (thread_key, sandbox_id, state, updated_at) VALUES
  ('slack:C11:1', 'sbx-stopped-001', 'stopped', now() - interval '4 days'),
  ('slack:C11:2', 'sbx-error-001', 'error', now() - interval '4 hours'),
  ('slack:C11:3', 'sbx-creating-001', 'creating', now() - interval '10 seconds');
