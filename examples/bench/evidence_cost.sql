-- What the audit evidence costs the apply phase: the downgrade statement of one batch
-- (TableMapping::downgrade_sql for the benchmark's table), run 200 times over the 100,000
-- designated orphans of a benchmark database, one transaction per batch, in four variants:
--   cur     as the reconciler runs it: each row's evidence sent as text, cast to jsonb
--   shared  one evidence document per batch, parsed once, still stored in every audit record
--   noev    '{}' as evidence (what `floor-audit` writes)
--   nolock  as `cur`, without FOR UPDATE SKIP LOCKED
-- Run it on a database the benchmark left behind (docs/PERFORMANCE.md, "The apply phase").
DROP TABLE IF EXISTS exp_batches;
CREATE TABLE exp_batches AS
SELECT (d.n / 500) AS i, array_agg(d.thread_key ORDER BY d.n) AS keys, array_agg(s.sandbox_id ORDER BY d.n) AS objects,
       array_agg(d.updated_at ORDER BY d.n) AS upd
FROM bench_designated d JOIN sandbox_sessions s USING (thread_key) WHERE d.n < 100000 GROUP BY 1;
CREATE OR REPLACE PROCEDURE exp_run(variant text) LANGUAGE plpgsql AS $$
DECLARE r record; ev text := '{"absence":"absent from the watch cache, proven at least as fresh as a revision taken after the rows were read","cluster_source":"api","cluster_uid":"0b5f2c4e-6c1a-4a57-9d9e-2f3f7f6a1c11","api_server":"http://127.0.0.1:41234/","table":"public.sandbox_sessions","listing_started_at":"2026-11-30T09:00:00.123456Z","grace_period_seconds":86400}';
  evs text[]; bks text[]; sql text; lock text;
BEGIN
  IF variant = 'noev' THEN ev := '{}'; END IF;
  lock := CASE WHEN variant = 'nolock' THEN '' ELSE 'FOR UPDATE OF t SKIP LOCKED' END;
  sql := 'WITH c AS (SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[]) AS c(key, object, updated_at, backend, evidence)),
   old AS (SELECT t.ctid AS row_id, t.thread_key::text AS key, t.state::text AS old_state, t.sandbox_id::text AS object, t.updated_at AS old_updated_at,
           jsonb_build_object(''agent_thread_id'', to_jsonb(t.agent_thread_id)) AS cleared, c.backend, c.evidence
           FROM sandbox_sessions t JOIN c ON t.thread_key = c.key WHERE t.state = ''suspended'' AND t.sandbox_id = c.object AND t.updated_at = c.updated_at ' || lock || '),
   upd AS (UPDATE sandbox_sessions t SET state = ''gone'', updated_at = now(), agent_thread_id = NULL FROM old WHERE t.ctid = old.row_id
           RETURNING old.key, old.old_state, old.object, old.old_updated_at, old.cleared, old.backend, old.evidence, t.updated_at AS new_updated_at)
   INSERT INTO sandbox_reconciler_audit (sweep_id, action, session_table, session_scope, session_key, object_name, backend, old_state, new_state, old_updated_at, new_updated_at, cleared, reason, evidence)
   SELECT gen_random_uuid(), ''downgrade'', ''public.sandbox_sessions'', NULL, key, object, backend, old_state, ''gone'', old_updated_at, new_updated_at, cleared, ''orphaned_suspended'', ' || CASE WHEN variant = 'shared' THEN '$6' ELSE 'evidence::jsonb' END || ' FROM upd';
  FOR r IN SELECT * FROM exp_batches ORDER BY i LOOP
    evs := array_fill(ev, ARRAY[cardinality(r.keys)]);
    bks := array_fill('pod'::text, ARRAY[cardinality(r.keys)]);
    EXECUTE sql USING r.keys, r.objects, r.upd, bks, evs, ev::jsonb;
    COMMIT;
  END LOOP;
END $$;
