#!/usr/bin/env bash
# The main job on a local default: seeds a demo database with sample centaur sessions (a
# bare-pod deployment, centaur's default controller, with its backlog of suspended sessions
# whose pods are gone) and runs one dry-run sweep with the centaur profile against the shipped
# cluster snapshot, printing the orphan report.
# Nothing is written to the sessions; run it as often as you like.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-postgres.sh sandbox_reconciler_demo
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/sandbox_reconciler_demo"
# The demo cluster runs its sessions in namespace "agents".
export SANDBOX_RECONCILER__CLUSTER__NAMESPACES="${SANDBOX_RECONCILER__CLUSTER__NAMESPACES:-agents}"
PGOPTIONS="-c client_min_messages=warning" psql "$DATABASE_URL" -q -v ON_ERROR_STOP=1 -f examples/demo/seed.sql >/dev/null
# The dump was "taken" now, so the grace period is measured from this run.
touch examples/demo/cluster-snapshot.json
cargo run --locked --quiet -- \
  --once --dry-run \
  --config config/default.toml --config config/centaur.toml \
  --cluster-snapshot examples/demo/cluster-snapshot.json "$@"
