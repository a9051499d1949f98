#!/usr/bin/env bash
# The whole test suite on a fresh machine: starts (or installs) PostgreSQL, then runs
# formatting, lint and every test against it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-postgres.sh test
export TEST_DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --all-targets
