#!/usr/bin/env bash
# Times the downgrade statement's variants of examples/bench/evidence_cost.sql, each after the
# benchmark's own reset (orphans back to suspended, audit emptied, VACUUM ANALYZE, CHECKPOINT).
# Usage: bash examples/bench/evidence_cost.sh [database URL of a 1M benchmark database] [rounds]
set -euo pipefail
url=${1:-postgres://postgres@127.0.0.1:5432/sandbox_reconciler_bench}
rounds=${2:-2}
here=$(dirname "$0")
psql -q "$url" -f "$here/evidence_cost.sql"
reset="UPDATE sandbox_sessions s SET state = v.state, updated_at = v.updated_at, agent_thread_id = v.agent
FROM (SELECT thread_key, updated_at, CASE WHEN n < 100000 THEN 'suspended' ELSE 'gone' END AS state,
             CASE WHEN n < 100000 THEN agent_thread_id END AS agent FROM bench_designated) v
WHERE s.thread_key = v.thread_key
  AND (s.state, s.updated_at, s.agent_thread_id) IS DISTINCT FROM (v.state, v.updated_at, v.agent)"
for _ in $(seq "$rounds"); do
  for variant in cur shared noev nolock; do
    psql -q "$url" -c "$reset" -c "TRUNCATE sandbox_reconciler_audit RESTART IDENTITY" \
         -c "VACUUM ANALYZE sandbox_sessions" -c "CHECKPOINT"
    start=$(date +%s.%N)
    psql -q "$url" -c "CALL exp_run('$variant')"
    end=$(date +%s.%N)
    awk -v v="$variant" -v s="$start" -v e="$end" 'BEGIN { printf "%s %.3f s\n", v, e - s }'
  done
done
