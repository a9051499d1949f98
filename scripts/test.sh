#!/usr/bin/env bash
# The whole test suite on a fresh machine: starts (or installs) PostgreSQL, installs and runs
# the deployment checks (promtool, kubectl kustomize, kubernetes-validate, yamllint, helm),
# then formatting, lint and every Rust test against real PostgreSQL, a fake Kubernetes API
# server and a real Prometheus server, the RBAC against the binary's declared permissions,
# and last the container image (buildah, release build). Missing tools are failures here,
# never silent skips.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-postgres.sh test
export TEST_DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
export SANDBOX_RECONCILER_REQUIRE_TOOLS=1
mkdir -p target
bash scripts/check-deploy.sh --metric-names-out target/metric-names.txt
export SANDBOX_RECONCILER_METRIC_NAMES="$PWD/target/metric-names.txt"
# What the rendered manifests grant (written by the deploy checks), for the RBAC tests.
export SANDBOX_RECONCILER_RBAC_GRANTED="$PWD/target/rbac-granted.json"
cargo fmt --all -- --check
# The shape of src/: no function over 80 lines (outside tests and SQL text builders), no
# import cycle between sibling modules.
python3 scripts/structure.py
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo test --locked --workspace --all-targets 2>&1 | tee target/test-output.txt
# RBAC against what the binary declares (it exists now): the Helm chart's
# files/permissions.json and the kustomize bases' grants (target/rbac-granted*.json).
bash scripts/sync-chart-permissions.sh --check
# A seconds-long run of the benchmark harness keeps it from rotting (the full run is in
# docs/PERFORMANCE.md and is not part of the suite).
bash scripts/bench-smoke.sh
# The container image: deploy/Dockerfile built with buildah and the release binary, run and
# checked (non-root, no shell, CA bundle, labels, --version, --print-metrics). The release
# build is most of its cost (8-14 minutes on a fresh machine; see README.md).
bash scripts/image-test.sh
# One closing line for the whole run.
passed=$(grep -oE 'test result: ok\. [0-9]+ passed' target/test-output.txt | awk '{s += $4} END {print s + 0}')
echo "tests: ${passed} passed, 0 failed"
