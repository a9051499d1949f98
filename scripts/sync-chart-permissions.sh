#!/usr/bin/env bash
# Writes (or, with --check, compares) the Helm chart's RBAC source,
# deploy/helm/sandbox-reconciler/files/permissions.json: what the binary declares,
# `sandbox-reconciler permissions --mode daemon|once --config files/config/default.toml
# --config files/config/PROFILE.toml --output json` for every mode and profile, with
# cluster.namespaces = ["release-namespace"] (the chart puts the watched namespaces there).
# Needs the binary, so it runs after the build (scripts/test.sh: --check after cargo test).
#
# --check also compares what the kustomize bases grant (target/rbac-granted.json and
# target/rbac-granted-once.json, written by scripts/check-deploy.sh for the namespace
# default) with `permissions --mode daemon|once --all-backends --config config/default.toml`:
# the base serves every profile.
#
# Usage: scripts/sync-chart-permissions.sh [--check] [BINARY]
#   BINARY  default target/debug/sandbox-reconciler (built first with cargo build if missing)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
check=0
binary=""
for arg in "$@"; do
  case "$arg" in
    --check) check=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "sync-chart-permissions: unknown argument: $arg" >&2; exit 2 ;;
    *) binary="$arg" ;;
  esac
done
if [[ -z "$binary" ]]; then
  binary=target/debug/sandbox-reconciler
  cargo build --locked --quiet --bin sandbox-reconciler
fi
[[ -x "$binary" ]] || { echo "sync-chart-permissions: $binary is not an executable" >&2; exit 1; }
if [[ $check == 1 ]]; then
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  rc=0
  for mode in daemon once; do
    granted=target/rbac-granted.json
    [[ $mode == once ]] && granted=target/rbac-granted-once.json
    [[ -f "$granted" ]] || { echo "sync-chart-permissions: $granted is missing: run scripts/check-deploy.sh first" >&2; exit 1; }
    "$binary" permissions --mode "$mode" --all-backends --config config/default.toml --output json > "$tmp/$mode.json" \
      || { echo "sync-chart-permissions: $binary permissions --mode $mode failed" >&2; exit 1; }
    echo "$granted (kustomize) against permissions --mode $mode --all-backends:"
    python3 scripts/deploy_checks.py rbac-compare "$granted" "$tmp/$mode.json" "$granted" || rc=1
  done
  echo "deploy/helm/sandbox-reconciler/files/permissions.json against permissions, every mode and profile:"
  python3 scripts/deploy_checks.py chart-permissions "$binary" || rc=1
  exit $rc
fi
exec python3 scripts/deploy_checks.py chart-permissions "$binary" deploy/helm/sandbox-reconciler/files/permissions.json
