#!/usr/bin/env bash
# A short run of the benchmark harness (examples/bench/) with small sizes, so the harness
# keeps compiling and keeps measuring the right thing. Takes seconds (plus the build); a debug
# build is fine. Exits non-zero if any scenario fails or changes the wrong number of rows: the
# harness itself checks that each sweep found, confirmed, downgraded and audited exactly its
# orphans, that the naive script and the SQL floors changed exactly theirs, and that every
# sweep read every row. The figures of a full run are in docs/PERFORMANCE.md.
#
# Uses the PostgreSQL server of TEST_DATABASE_URL (default: the local trust-auth server) and
# creates (drops first) its own database there, sandbox_reconciler_bench_smoke.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-postgres.sh test
url="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

cargo run --locked --quiet --example bench -- \
  --admin-url "$url" \
  --database sandbox_reconciler_bench_smoke \
  --rows 5000 --pods 1000 --sandboxes 200 \
  --orphans 500 --steady-orphans 10 --naive-orphans 100 \
  --page-size 100 --batch-size 100 \
  --json "$out/bench.json" --explain "$out/explain.md" \
  > "$out/bench.md"

cat "$out/bench.md"
# Belt and braces: the JSON must list every scenario as ok (the harness already exits 1 if not).
scenarios="$(grep -c '"scenario"' "$out/bench.json")"
failed="$(grep -c '"ok": false' "$out/bench.json" || true)"
if [ "$scenarios" -ne 10 ] || [ "$failed" -ne 0 ]; then
  echo "bench-smoke: expected 6 scenarios, all ok; got $scenarios scenarios, $failed failed" >&2
  exit 1
fi
grep -q 'downgrade batch' "$out/explain.md" || { echo "bench-smoke: no EXPLAIN output" >&2; exit 1; }
psql "$url" -qc 'DROP DATABASE IF EXISTS sandbox_reconciler_bench_smoke WITH (FORCE)' >/dev/null 2>&1 || true
echo "bench-smoke: ok"
