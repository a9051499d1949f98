#!/usr/bin/env bash
# Writes the generated deployment files; scripts/check-deploy.sh checks them and fails while
# they are out of date. Needs only python3 (standard library).
#
# Usage: scripts/sync-deploy.sh [--runbook-base-url URL]
#   --runbook-base-url URL  first store URL as the runbook address (the one setting,
#                           deploy/prometheus/runbook-base-url.txt), e.g.
#                           https://git.internal/platform/sandbox-reconciler/-/blob/main/deploy/README.md
#
# Writes:
#   - every runbook_url in deploy/prometheus/alerts.yaml and the expected ones in
#     deploy/prometheus/alerts_test.yaml: <runbook address>#<alert name in lower case>
#   - deploy/components/prometheus-operator/prometheusrule.yaml: the groups of alerts.yaml
#   - the Helm chart's copies: deploy/helm/sandbox-reconciler/files/alerts.yaml (of
#     deploy/prometheus/alerts.yaml) and files/config/*.toml (of config/default.toml and the
#     centaur profiles)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
exec python3 scripts/deploy_checks.py sync "$@"
