"""Checks and generators for deploy/ and dashboards/; run from the repository root.

scripts/check-deploy.sh runs the checks (in its virtual environment, which has PyYAML);
scripts/sync-deploy.sh runs `sync`, which needs only the standard library.

    deploy_checks.py sync [--runbook-base-url URL]   write the generated files
    deploy_checks.py <check> [ARGS...]               one check (see COMMANDS at the end)
"""
import json
import os
import re
import sys

try:
    import tomllib
except ImportError:  # Python < 3.11: only `sync` works there
    tomllib = None

try:
    import yaml
except ImportError:  # `sync` does not need it
    yaml = None

ALERTS = "deploy/prometheus/alerts.yaml"
ALERTS_TEST = "deploy/prometheus/alerts_test.yaml"
RUNBOOK_SETTING = "deploy/prometheus/runbook-base-url.txt"
PROMETHEUS_RULE = "deploy/components/prometheus-operator/prometheusrule.yaml"
DASHBOARD = "dashboards/sandbox-reconciler.json"
PANEL_TESTS = "dashboards/panel_queries_test.yaml"
README = "deploy/README.md"
ROOT_README = "README.md"
NETWORK_POLICY = "deploy/common/networkpolicy.yaml"
CONFIG = "config/default.toml"

def load_contract():
    """The metrics the binary exports, read from `sandbox-reconciler --print-metrics` (written
    by check-deploy.sh into $SANDBOX_RECONCILER_METRICS_CONTRACT): names are stated once, in
    src/metrics/, never in a list kept here. Lines: NAME KIND LABELS HELP."""
    path = os.environ.get("SANDBOX_RECONCILER_METRICS_CONTRACT")
    if not path:
        sys.exit("deploy_checks: SANDBOX_RECONCILER_METRICS_CONTRACT is not set "
                 "(scripts/check-deploy.sh writes it from `sandbox-reconciler --print-metrics`)")
    kinds = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                name, kind = line.split()[:2]
                kinds[name] = kind
    if not kinds:
        sys.exit(f"deploy_checks: {path} lists no metric")
    return kinds


# Commands that never look at metrics run without the contract (sync-deploy.sh has no binary).
_WITHOUT_CONTRACT = {"sync", "chart-permissions", "rbac-compare"}
_ALL = load_contract() if __name__ == "__main__" and sys.argv[1:2] and sys.argv[1] not in _WITHOUT_CONTRACT else {}
# The daemon's own metrics (prefix sandbox_reconciler_), histograms by base name.
CONTRACT = {n for n in _ALL if n.startswith("sandbox_reconciler_")}
# The process collector's series (no prefix); the binary exports them on Linux.
PROCESS = {n for n in _ALL if n.startswith("process_")}
# Series Prometheus itself writes for every target; never in the binary's /metrics.
SYNTHETIC = {"up"}
HISTOGRAMS = {n for n, kind in _ALL.items() if kind == "histogram"}
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
# Words that mark a value nobody filled in.
PLACEHOLDERS = re.compile(r"OWNER|CHANGE-?ME|REPLACE|TODO|FIXME|example\.(com|org|net)|<[^>]*>", re.I)
# The dashboard's variables and what a panel test substitutes by default (match everything,
# as the "All" option does).
DASHBOARD_VARIABLES = ("cluster", "job", "namespace")
GRAFANA_BUILTINS = [
    ("$__rate_interval", "5m"), ("${__rate_interval}", "5m"),
    ("$__interval", "1m"), ("${__interval}", "1m"),
    ("$__range", "1h"), ("${__range}", "1h"),
]

errors = []


def fail(msg):
    errors.append(msg)
    print(f"  ERROR: {msg}")


def finish():
    if errors:
        print(f"  {len(errors)} error(s)")
        sys.exit(1)


def need_yaml():
    if yaml is None:
        sys.exit("PyYAML is missing: run this check through scripts/check-deploy.sh")


def load_yaml(path):
    need_yaml()
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def metric_names(expr):
    """Metric names in PromQL (sandbox_reconciler_* and process_*), histogram suffixes stripped."""
    names = set()
    for m in re.finditer(r"\b(?:sandbox_reconciler|process)_[a-zA-Z0-9_]+", expr):
        name = m.group(0)
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
                name = name[: -len(suffix)]
        names.add(name)
    return names


def selectors(expr, metrics=r"(?:sandbox_reconciler|process)_[a-zA-Z0-9_]+|up"):
    """(name, matcher text) of every series selector of the given metrics in an expression."""
    for m in re.finditer(r"\b(" + metrics + r")\b(\{[^}]*\})?", expr):
        yield m.group(1), m.group(2) or ""


# --- the runbook base URL (one setting) -----------------------------------------------------

def runbook_base():
    lines = [ln.strip() for ln in read(RUNBOOK_SETTING).splitlines()]
    values = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(values) != 1:
        sys.exit(f"{RUNBOOK_SETTING}: expected exactly one non-comment line (the URL), found {len(values)}")
    return values[0]


def runbook_base_problems(url):
    problems = []
    if not re.fullmatch(r"https?://[^\s#]+", url):
        problems.append("must be an http(s) URL without spaces or '#'")
    if PLACEHOLDERS.search(url):
        problems.append(f"contains a placeholder ({PLACEHOLDERS.search(url).group(0)})")
    return problems


RUNBOOK_URL = re.compile(r"(runbook_url:[ \t]*)(\S+?)#([\w\-]+)[ \t]*$", re.M)


# --- sync: generated files ---------------------------------------------------------------------

PR_HEADER = """\
# GENERATED from deploy/prometheus/alerts.yaml by scripts/sync-deploy.sh. Do not edit: change
# alerts.yaml (or the runbook address, deploy/prometheus/runbook-base-url.txt) and run
# scripts/sync-deploy.sh; scripts/check-deploy.sh fails while they differ.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: sandbox-reconciler
  labels:
    app.kubernetes.io/name: sandbox-reconciler
    app.kubernetes.io/part-of: sandbox-reconciler
spec:
"""


def write_if_changed(path, text):
    if os.path.exists(path) and read(path) == text:
        print(f"  {path}: unchanged")
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"  {path}: written")


def sync(*args):
    """Writes the runbook URLs of alerts.yaml and alerts_test.yaml from the setting, and the
    PrometheusRule from alerts.yaml. Standard library only."""
    args = list(args)
    if args[:1] == ["--runbook-base-url"] and len(args) == 2:
        url = args[1]
        problems = runbook_base_problems(url)
        if problems:
            sys.exit(f"--runbook-base-url {url}: " + "; ".join(problems))
        text = read(RUNBOOK_SETTING)
        old = runbook_base()
        write_if_changed(RUNBOOK_SETTING, re.sub(r"^" + re.escape(old) + r"$", url, text, count=1, flags=re.M))
    elif args:
        sys.exit("usage: deploy_checks.py sync [--runbook-base-url URL]")
    base = runbook_base()
    problems = runbook_base_problems(base)
    if problems:
        sys.exit(f"{RUNBOOK_SETTING}: {base}: " + "; ".join(problems))
    for path in (ALERTS, ALERTS_TEST):
        write_if_changed(path, RUNBOOK_URL.sub(lambda m: f"{m.group(1)}{base}#{m.group(3)}", read(path)))
    text = read(ALERTS)
    start = re.search(r"^groups:", text, re.M)
    if not start:
        sys.exit(f"{ALERTS}: no top-level `groups:`")
    body = "".join(("  " + line) if line.strip() else line for line in text[start.start():].splitlines(True))
    write_if_changed(PROMETHEUS_RULE, PR_HEADER + body)
    # The Helm chart's copies (Helm reads only files inside the chart).
    for copy, original in sorted(CHART_COPIES.items()):
        if os.path.exists(original):
            write_if_changed(copy, read(original))


# --- PrometheusRule <-> alerts.yaml ------------------------------------------------------

def extract_prometheusrule_groups(out):
    doc = load_yaml(PROMETHEUS_RULE)
    if doc.get("apiVersion") != "monitoring.coreos.com/v1" or doc.get("kind") != "PrometheusRule":
        fail(f"{PROMETHEUS_RULE}: not a monitoring.coreos.com/v1 PrometheusRule")
    groups = (doc.get("spec") or {}).get("groups")
    plain = load_yaml(ALERTS).get("groups")
    if groups != plain:
        fail(f"{PROMETHEUS_RULE}: spec.groups differ from the groups of {ALERTS}; run scripts/sync-deploy.sh")
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


def grouping_clauses(expr):
    """The label lists of every by (...) and on (...) of an expression."""
    for m in re.finditer(r"\b(by|on)\s*\(([^)]*)\)", expr):
        yield m.group(1), [x.strip() for x in m.group(2).split(",") if x.strip()]


def alert_conventions():
    anchors = github_anchors(read(README))
    base = runbook_base()
    for problem in runbook_base_problems(base):
        fail(f"{RUNBOOK_SETTING}: {base} {problem}")
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
            want = f"{base}#{name.lower()}"
            if name.lower() not in anchors:
                fail(f"{name}: {README} has no section #{name.lower()} (a heading `### {name}`)")
            if url != want:
                fail(f"{name}: runbook_url is {url}, want {want} (the base is {RUNBOOK_SETTING}; "
                     "run scripts/sync-deploy.sh)")
            # Several clusters in one Prometheus: aggregate where the kubernetes-mixin does.
            for kind, labels_ in grouping_clauses(rule["expr"]):
                if "namespace" in labels_ and "cluster" not in labels_:
                    fail(f"{name}: `{kind} ({', '.join(labels_)})` lacks `cluster`: series of several "
                         "clusters with the same namespace and job would be merged")
    print(f"  {len(names)} alerts: {', '.join(names)}")
    print(f"  runbook base URL ({RUNBOOK_SETTING}): {base}")
    tested = set()
    for test in load_yaml(ALERTS_TEST)["tests"]:
        for t in test.get("alert_rule_test") or []:
            if t.get("exp_alerts"):
                tested.add(t["alertname"])
            for a in t.get("exp_alerts") or []:
                url = (a.get("exp_annotations") or {}).get("runbook_url")
                if url and url != f"{base}#{t['alertname'].lower()}":
                    fail(f"{ALERTS_TEST}: {t['alertname']} expects runbook_url {url}; run scripts/sync-deploy.sh")
    for name in names:
        if name not in tested:
            fail(f"{name}: alerts_test.yaml has no case in which it fires")
    for path in (ALERTS, ALERTS_TEST, PROMETHEUS_RULE, README):
        for m in re.finditer(r"https?://\S*\bOWNER\b\S*", read(path)):
            fail(f"{path}: placeholder OWNER in {m.group(0)}; the runbook address is one setting, {RUNBOOK_SETTING}")
    finish()


# --- dashboard ---------------------------------------------------------------------------

def dashboard_targets(panels):
    for p in panels:
        yield from ((p, t) for t in p.get("targets") or [])
        yield from dashboard_targets(p.get("panels") or [])


def load_dashboard():
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def variable_query(v):
    q = v.get("query")
    return q.get("query") if isinstance(q, dict) else q


def concrete(expr, variables=None):
    """A panel expression with Grafana's variables replaced: each dashboard variable by the
    given regex or by `.*` (what "All" sends), the built-in intervals by fixed durations."""
    values = {name: ".*" for name in DASHBOARD_VARIABLES}
    values.update(variables or {})
    for name, value in values.items():
        expr = expr.replace("${" + name + "}", value)
        expr = re.sub(r"\$" + name + r"\b", lambda _m, v=value: v, expr)
    for var, value in GRAFANA_BUILTINS:
        expr = expr.replace(var, value)
    return expr


def dashboard(rule_out):
    d = load_dashboard()
    if "__inputs" in d:
        fail("dashboard has __inputs: export it without 'share externally'")
    if not 36 <= int(d.get("schemaVersion", 0)) <= 41:
        fail(f"dashboard schemaVersion {d.get('schemaVersion')} is not a current one (36..41)")
    variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        fail("dashboard needs a template variable `datasource` of type datasource, query prometheus")
    for i, name in enumerate(DASHBOARD_VARIABLES):
        v = variables.get(name)
        if not v or v.get("type") != "query":
            fail(f"dashboard needs a query variable `{name}`")
            continue
        q = variable_query(v)
        if not q or not q.startswith("label_values(") or not q.rstrip(")").endswith(name):
            fail(f"variable {name}: query must be label_values(..., {name}): {q}")
        # Each variable offers only the values the ones before it select.
        for before in DASHBOARD_VARIABLES[:i]:
            if f'{before}=~"${before}"' not in (q or ""):
                fail(f"variable {name}: its query must filter by {before}=~\"${before}\": {q}")
        if (v.get("datasource") or {}).get("uid") != "${datasource}":
            fail(f"variable {name}: datasource must be ${{datasource}}")
        # "All" must match series without the label too (one cluster, no `cluster` label).
        if not v.get("includeAll") or v.get("allValue") != ".*":
            fail(f"variable {name}: includeAll with allValue \".*\" (matches series without the label)")
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
        for name, matchers in selectors(expr):
            for var in DASHBOARD_VARIABLES:
                if f'{var}=~"${var}"' not in matchers:
                    fail(f"panel '{title}': selector {name}{matchers} lacks {var}=~\"${var}\"")
        if re.search(r'phase\s*=~?\s*"total"', expr):
            fail(f"panel '{title}': there is no phase \"total\"; whole sweeps are sandbox_reconciler_sweep_duration_seconds")
        for name, matchers in selectors(expr, r"sandbox_reconciler_sweep_duration_seconds(?:_bucket|_sum|_count)?"):
            if "phase" in matchers:
                fail(f"panel '{title}': the whole-sweep histogram has no phase label: {name}{matchers}")
        if re.search(r"sandbox_reconciler_sweep_phase_duration_seconds_(sum|count)", expr) \
                and "phase" not in re.sub(r"\{[^}]*\}", "", expr):
            fail(f"panel '{title}': phase durations summed across phases; group them by phase")
        if panel.get("type") == "stat" and not target.get("instant"):
            fail(f"panel '{title}': a stat's query should be instant")
        names |= metric_names(expr)
        conc = concrete(expr)
        if "$" in conc:
            fail(f"panel '{title}': unknown variable left in {conc}")
        rules.append({"record": f"dashboard:panel_{panel.get('id')}_{target.get('refId')}", "expr": conc})
    for v in variables.values():
        q = variable_query(v)
        if isinstance(q, str):
            names |= metric_names(q)
    missing = sorted(CONTRACT - names)
    if missing:
        fail(f"dashboard shows no panel for: {', '.join(missing)}")
    # The standard series: when the process started (uptime, restarts), its memory, CPU and
    # file descriptors, and which commit runs.
    missing = sorted({"process_start_time_seconds", "process_resident_memory_bytes", "process_cpu_seconds_total",
                      "process_open_fds"} - names)
    if missing:
        fail(f"dashboard shows no panel for the process collector's {', '.join(missing)}")
    if not any("sandbox_reconciler_build_info" in t.get("expr", "") and re.search(r"\brevision\b", t.get("expr", ""))
               for _, t in dashboard_targets(d.get("panels", []))):
        fail("dashboard: no panel shows build_info's revision (the git commit that runs)")
    with open(rule_out, "w", encoding="utf-8") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard-expressions", "rules": rules}]}, f, sort_keys=False)
    print(f"  {len(rules)} panel queries extracted, all filtered by cluster, namespace and job")
    finish()


# --- panel query tests ---------------------------------------------------------------------

def find_target(d, title, ref):
    found = [(p, t) for p, t in dashboard_targets(d.get("panels", []))
             if p.get("title") == title and t.get("refId") == ref]
    if len(found) != 1:
        return None, None
    return found[0]


def display(panel, value):
    """(text, color) a stat panel shows for a value: value mappings first, then thresholds."""
    defaults = (panel.get("fieldConfig") or {}).get("defaults") or {}
    for mapping in defaults.get("mappings") or []:
        opts = mapping.get("options") or {}
        result = None
        if mapping.get("type") == "value":
            for key, res in opts.items():
                try:
                    if float(key) == value:
                        result = res
                except ValueError:
                    pass
        elif mapping.get("type") == "range":
            lo, hi = opts.get("from"), opts.get("to")
            if (lo is None or value >= lo) and (hi is None or value <= hi):
                result = opts.get("result")
        if result:
            return result.get("text"), result.get("color") or threshold_color(defaults, value)
    return None, threshold_color(defaults, value)


def threshold_color(defaults, value):
    color = None
    for step in ((defaults.get("thresholds") or {}).get("steps")) or []:
        if step.get("value") is None or value >= step["value"]:
            color = step.get("color")
    return color


def panel_tests(out):
    """dashboards/panel_queries_test.yaml names panels instead of expressions; this writes the
    promtool test file with each panel's exact expression, so the tests cannot drift from the
    dashboard. Also checks what stat panels display for the expected values, and that every
    query that measures time (time()) is tested."""
    d = load_dashboard()
    spec = load_yaml(PANEL_TESTS)
    tested = set()
    groups = []
    for gi, group in enumerate(spec.get("tests") or []):
        group = dict(group)
        cases = group.pop("panel_expr_test", None) or []
        if not cases:
            fail(f"{PANEL_TESTS}: test group {gi} has no panel_expr_test")
        exprs = []
        for case in cases:
            case = dict(case)
            title, ref = case.pop("panel", None), case.pop("refId", "A")
            where = f"{PANEL_TESTS}: panel '{title}' {ref} at {case.get('eval_time')}"
            panel, target = find_target(d, title, ref)
            if not target:
                fail(f"{where}: no such panel target (or more than one) in {DASHBOARD}")
                continue
            tested.add((title, ref))
            variables = case.pop("variables", None) or {}
            unknown = set(variables) - set(DASHBOARD_VARIABLES)
            if unknown:
                fail(f"{where}: unknown variables {sorted(unknown)}")
            exp_display = case.pop("exp_display", None)
            if exp_display:
                if panel.get("type") != "stat":
                    fail(f"{where}: exp_display only applies to stat panels")
                for sample in case.get("exp_samples") or []:
                    text, color = display(panel, float(sample["value"]))
                    if "text" in exp_display and text != exp_display["text"]:
                        fail(f"{where}: value {sample['value']} shows text {text!r}, want {exp_display['text']!r}")
                    if "color" in exp_display and color != exp_display["color"]:
                        fail(f"{where}: value {sample['value']} shows color {color!r}, want {exp_display['color']!r}")
                    if "not_color" in exp_display and color == exp_display["not_color"]:
                        fail(f"{where}: value {sample['value']} shows color {color!r}")
            case["expr"] = concrete(target["expr"], variables)
            exprs.append(case)
        group["promql_expr_test"] = exprs
        groups.append(group)
    untested = []
    for panel, target in dashboard_targets(d.get("panels", [])):
        if "time()" in target.get("expr", "") and (panel.get("title"), target.get("refId")) not in tested:
            untested.append(f"'{panel.get('title')}' {target.get('refId')}")
    for name in ("Writer",):
        if not any(t == name for t, _ in tested):
            untested.append(f"'{name}'")
    if untested:
        fail(f"{PANEL_TESTS} tests no case of these queries (every query using time(), and the Writer "
             f"stat, needs one): {', '.join(untested)}")
    with open(out, "w", encoding="utf-8") as f:
        f.write(f"# GENERATED by scripts/check-deploy.sh from {PANEL_TESTS} and {DASHBOARD}\n")
        yaml.safe_dump({"rule_files": [], "evaluation_interval": spec.get("evaluation_interval", "1m"),
                        "tests": groups}, f, sort_keys=False, width=1000)
    print(f"  {sum(len(g['promql_expr_test']) for g in groups)} panel queries in {len(groups)} test groups "
          f"({len(tested)} distinct queries) written to {out}")
    finish()


# --- metric names ------------------------------------------------------------------------

def all_metric_names(out):
    names = set()
    sources = {}
    for path in (ALERTS, PROMETHEUS_RULE):
        doc = load_yaml(path)
        for group in (doc.get("groups") or (doc.get("spec") or {}).get("groups") or []):
            for rule in group["rules"]:
                for n in metric_names(rule["expr"]):
                    names.add(n)
                    sources.setdefault(n, set()).add(os.path.basename(path))
    for n in metric_names(read(DASHBOARD)):
        names.add(n)
        sources.setdefault(n, set()).add("dashboard")
    unknown = sorted(names - CONTRACT - PROCESS - SYNTHETIC)
    for n in unknown:
        fail(f"{n} (used by {', '.join(sorted(sources[n]))}) is not in the daemon's metrics contract")
    for n in sorted(names):
        print(f"  {n}  [{', '.join(sorted(sources[n]))}]")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        exported = sorted(names - SYNTHETIC)
        with open(out, "w", encoding="utf-8") as f:
            f.write("".join(n + "\n" for n in exported))
        print(f"  wrote {len(exported)} names to {out}")
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


CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "Namespace"}
RECOMMENDED_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                      "app.kubernetes.io/part-of")


def crate_version():
    with open("Cargo.toml", "rb") as f:
        return tomllib.load(f)["package"]["version"]


def pod_templates(d):
    """(where, template metadata labels, pod spec) of a workload."""
    kind = d["kind"]
    if kind in ("Deployment", "Job"):
        yield "template", (d["spec"]["template"].get("metadata") or {}).get("labels") or {}, d["spec"]["template"]["spec"]
    elif kind == "CronJob":
        jt = d["spec"]["jobTemplate"]
        yield "jobTemplate", (jt.get("metadata") or {}).get("labels") or {}, None
        yield "jobTemplate.template", (jt["spec"]["template"].get("metadata") or {}).get("labels") or {}, \
            jt["spec"]["template"]["spec"]


def check_labels(docs):
    version = crate_version()
    for d in docs:
        meta = d.get("metadata") or {}
        where = f"{d['kind']}/{meta.get('name')}"
        labels = meta.get("labels") or {}
        for key in RECOMMENDED_LABELS:
            if not labels.get(key):
                fail(f"{where}: label {key} missing")
        if labels.get("app.kubernetes.io/version") not in (None, version):
            fail(f"{where}: app.kubernetes.io/version {labels.get('app.kubernetes.io/version')} is not the crate "
                 f"version {version}")
        if d["kind"] in ("Deployment", "Job", "CronJob"):
            for part, tlabels, pod in pod_templates(d):
                for key in RECOMMENDED_LABELS:
                    if not tlabels.get(key):
                        fail(f"{where}: {part} label {key} missing")
                for c in (pod or {}).get("containers") or []:
                    tag = c.get("image", "").rsplit(":", 1)[-1] if ":" in c.get("image", "") else None
                    if tag != version:
                        fail(f"{where}/{c['name']}: image tag {tag} is not the crate version {version}")
        # Selectors are immutable (Deployment, Job) or must keep matching after an upgrade:
        # a version there would orphan the running pods.
        for path, sel in selectors_of(d):
            for key in ("app.kubernetes.io/version", "app.kubernetes.io/instance"):
                if key in sel:
                    fail(f"{where}: {path} must not select on {key}")


def selectors_of(d):
    spec = d.get("spec") or {}
    kind = d["kind"]
    if kind in ("Deployment", "PodDisruptionBudget"):
        yield "spec.selector", (spec.get("selector") or {}).get("matchLabels") or {}
    if kind == "Service":
        yield "spec.selector", spec.get("selector") or {}
    if kind == "NetworkPolicy":
        yield "spec.podSelector", (spec.get("podSelector") or {}).get("matchLabels") or {}
    if kind == "ServiceMonitor":
        yield "spec.selector", (spec.get("selector") or {}).get("matchLabels") or {}


def has_wildcard(rule):
    return any("*" in str(x) for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs")
               for x in rule.get(key) or [])


READ_VERBS = {"get", "list", "watch"}


def check_rbac(by_kind, namespace):
    """Shape and least privilege of the rendered RBAC. Which verbs on which resources is not
    stated here: it is what the binary declares (`sandbox-reconciler permissions`), compared
    with what the rendering grants (granted_permissions) by rbac-compare after the build and
    by the test suite (target/rbac-granted.json)."""
    roles = by_kind.get("Role", [])
    for role in roles:
        name = role["metadata"]["name"]
        for r in role.get("rules") or []:
            if has_wildcard(r):
                fail(f"Role {name}: no wildcard anywhere: {r}")
            if set(r.get("verbs") or []) - READ_VERBS or not r.get("verbs"):
                fail(f"Role {name}: read-only verbs only (get, list, watch): {r}")
            if "namespaces" in (r.get("resources") or []) and r.get("verbs") != ["get"]:
                fail(f"Role {name}: only get on namespaces (in a Role: its own Namespace): {r}")
            if r.get("nonResourceURLs"):
                fail(f"Role {name}: no nonResourceURLs: {r}")
    for rb in by_kind.get("RoleBinding", []):
        ref = rb.get("roleRef") or {}
        if ref.get("kind") != "Role" or ref.get("name") not in {r["metadata"]["name"] for r in roles}:
            fail(f"RoleBinding {rb['metadata']['name']}: roleRef must name the rendered Role")
    cluster_roles = by_kind.get("ClusterRole", [])
    if len(cluster_roles) != 1:
        fail(f"expected exactly one ClusterRole (the kube-system Namespace), found {len(cluster_roles)}")
    for cr in cluster_roles:
        name = cr["metadata"]["name"]
        rules = cr.get("rules") or []
        if cr.get("aggregationRule"):
            fail(f"ClusterRole {name}: no aggregationRule")
        if len(rules) != 1:
            fail(f"ClusterRole {name}: exactly one rule (get on named namespaces), found {len(rules)}")
        for r in rules:
            if has_wildcard(r):
                fail(f"ClusterRole {name}: no wildcard anywhere: {r}")
            if r.get("apiGroups") != [""] or r.get("resources") != ["namespaces"] or r.get("verbs") != ["get"] \
                    or r.get("nonResourceURLs"):
                fail(f"ClusterRole {name}: only get on core namespaces is allowed: {r}")
            names = r.get("resourceNames") or []
            if "kube-system" not in names:
                fail(f"ClusterRole {name}: resourceNames must include kube-system (the cluster's identity): {names}")
            for n in names:
                if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", n):
                    fail(f"ClusterRole {name}: resourceName {n!r} is not a namespace name")
    crbs = by_kind.get("ClusterRoleBinding", [])
    if len(crbs) != 1:
        fail(f"expected exactly one ClusterRoleBinding, found {len(crbs)}")
    for crb in crbs:
        name = crb["metadata"]["name"]
        ref = crb.get("roleRef") or {}
        if ref.get("kind") != "ClusterRole" or ref.get("name") not in {c["metadata"]["name"] for c in cluster_roles}:
            fail(f"ClusterRoleBinding {name}: roleRef must name the rendered ClusterRole: {ref}")
        subjects = crb.get("subjects") or []
        sa = [s for s in subjects if s.get("kind") == "ServiceAccount" and s.get("name") == "sandbox-reconciler"]
        if len(subjects) != 1 or len(sa) != 1:
            fail(f"ClusterRoleBinding {name}: the only subject must be the ServiceAccount sandbox-reconciler: {subjects}")
        elif namespace and sa[0].get("namespace") != namespace:
            fail(f"ClusterRoleBinding {name}: subject namespace {sa[0].get('namespace')!r}, want {namespace!r} "
                 "(kustomize fills it from `namespace:`)")
        elif not namespace and sa[0].get("namespace"):
            fail(f"ClusterRoleBinding {name}: the base must not name a namespace in its subject")


def granted_permissions(docs, sa="sandbox-reconciler", sa_namespace="", default_namespace=""):
    """What the rendered RBAC grants the ServiceAccount, in the shape of `sandbox-reconciler
    permissions --output json`: one rule per (api_group, resource) with sorted verbs,
    `namespaces` (["*"]: cluster-wide) and `resource_names` (keys absent when empty), sorted by
    (api_group, resource). A Role's `get` on `namespaces` counts as resource_names [its own
    namespace] (the only Namespace it can grant). Objects without a namespace (a base) are in
    `default_namespace`. Verbs that differ between namespaces of one resource are an error:
    the reconciler asks for the same verbs everywhere."""
    by_key = {}
    roles = {((d["metadata"].get("namespace") or default_namespace), d["metadata"]["name"]): d
             for d in docs if d.get("kind") == "Role"}
    cluster_roles = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ClusterRole"}
    problems = []
    if not sa_namespace:
        # The ServiceAccount's own namespace in this rendering.
        sa_namespace = next(((d["metadata"].get("namespace") or "") for d in docs
                             if d.get("kind") == "ServiceAccount" and d["metadata"]["name"] == sa), "")

    def grant(group, resource, verbs, namespace=None, names=None):
        entry = by_key.setdefault((group, resource), {"verbs": None, "namespaces": set(), "resource_names": set()})
        verbs = tuple(sorted(set(verbs)))
        if entry["verbs"] is not None and entry["verbs"] != verbs:
            problems.append(f"{group or 'core'}/{resource}: verbs {list(entry['verbs'])} in one grant, "
                            f"{list(verbs)} in another")
        entry["verbs"] = verbs if entry["verbs"] is None else tuple(sorted(set(entry["verbs"]) | set(verbs)))
        if namespace is not None:
            entry["namespaces"].add(namespace)
        entry["resource_names"].update(names or [])

    for b in docs:
        if b.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        bns = (b["metadata"].get("namespace") or default_namespace) if b["kind"] == "RoleBinding" else ""
        # A subject without namespace: a RoleBinding's own one; in a base, default_namespace.
        subject_ns = {(s.get("namespace") or bns or default_namespace)
                      for s in b.get("subjects") or [] if s.get("kind") == "ServiceAccount" and s.get("name") == sa}
        if (sa_namespace or default_namespace) not in subject_ns:
            continue
        ref = b.get("roleRef") or {}
        role = roles.get((bns, ref.get("name"))) if ref.get("kind") == "Role" else cluster_roles.get(ref.get("name"))
        if role is None:
            problems.append(f"{b['kind']} {b['metadata']['name']}: roleRef {ref} names no rendered object")
            continue
        for r in role.get("rules") or []:
            for group in r.get("apiGroups") or []:
                for resource in r.get("resources") or []:
                    names = r.get("resourceNames") or []
                    if b["kind"] == "RoleBinding":
                        if (group, resource) == ("", "namespaces"):
                            # Namespaces are cluster-scoped: a Role grants only its own one.
                            own = [n for n in names if n == bns] if names else [bns]
                            if own:
                                grant(group, resource, r.get("verbs") or [], names=own)
                        elif names:
                            problems.append(f"Role {ref.get('name')}: resourceNames on {resource} are not supported")
                        else:
                            grant(group, resource, r.get("verbs") or [], namespace=bns)
                    elif names:
                        grant(group, resource, r.get("verbs") or [], names=names)
                    else:
                        grant(group, resource, r.get("verbs") or [], namespace="*")
    rules = []
    for (group, resource), entry in sorted(by_key.items()):
        rule = {"api_group": group, "resource": resource, "verbs": list(entry["verbs"] or [])}
        namespaces = sorted(entry["namespaces"])
        if "*" in namespaces:
            namespaces = ["*"]
        if namespaces:
            rule["namespaces"] = namespaces
        if entry["resource_names"]:
            rule["resource_names"] = sorted(entry["resource_names"])
        rules.append(rule)
    return rules, problems


def rbac_granted(rendered, out, default_namespace=""):
    """Writes what a rendering grants the ServiceAccount sandbox-reconciler (granted_permissions)
    to OUT as JSON."""
    with open(rendered, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    rules, problems = granted_permissions(docs, default_namespace=default_namespace)
    for p in problems:
        fail(p)
    if not rules:
        fail(f"{rendered}: grants the ServiceAccount sandbox-reconciler nothing")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(rules, f, indent=2)
        f.write("\n")
    print(f"  {out}: " + "; ".join(
        f"{r['api_group'] or 'core'}/{r['resource']} {','.join(r['verbs'])}"
        + (f" in {','.join(r['namespaces'])}" if r.get("namespaces") else "")
        + (f" named {','.join(r['resource_names'])}" if r.get("resource_names") else "") for r in rules))
    finish()


def normalize_permissions(rules):
    out = []
    for r in rules:
        n = {"api_group": r.get("api_group", ""), "resource": r["resource"], "verbs": sorted(r.get("verbs") or [])}
        if r.get("namespaces"):
            n["namespaces"] = sorted(r["namespaces"])
        if r.get("resource_names"):
            n["resource_names"] = sorted(r["resource_names"])
        out.append(n)
    return sorted(out, key=lambda r: (r["api_group"], r["resource"]))


def permission_differences(granted, declared):
    """Human-readable differences between two permission lists (empty: equal)."""
    g = {(r["api_group"], r["resource"]): r for r in normalize_permissions(granted)}
    d = {(r["api_group"], r["resource"]): r for r in normalize_permissions(declared)}
    diffs = []
    for key in sorted(set(g) | set(d)):
        what = f"{key[0] or 'core'}/{key[1]}"
        if key not in g:
            diffs.append(f"{what}: declared {d[key]}, not granted")
        elif key not in d:
            diffs.append(f"{what}: granted {g[key]}, not declared (more than the binary needs)")
        elif g[key] != d[key]:
            diffs.append(f"{what}: granted {g[key]}, declared {d[key]}")
    return diffs


def rbac_compare(granted_path, declared_path, what="the rendering"):
    """Fails unless GRANTED (rbac-granted output) equals DECLARED (`sandbox-reconciler
    permissions --output json`)."""
    with open(granted_path, encoding="utf-8") as f:
        granted = json.load(f)
    with open(declared_path, encoding="utf-8") as f:
        declared = json.load(f)
    for diff in permission_differences(granted, declared):
        fail(f"{what}: {diff}")
    if not errors:
        print(f"  {what} grants exactly what the binary declares ({len(declared)} rules)")
    finish()


def check_network_policy_docs(by_kind):
    """The documentation must not promise destinations a port-only policy cannot enforce."""
    port_only = any(not (r.get("to") or []) for np in by_kind.get("NetworkPolicy", [])
                    for r in np["spec"].get("egress", []))
    if not port_only:
        return
    claim = re.compile(r"\bonly\b[^.;:]{0,40}\bAPI server\b", re.I | re.S)
    for path in (README, ROOT_README, NETWORK_POLICY):
        if not os.path.exists(path):
            continue
        for m in claim.finditer(read(path)):
            text = " ".join(m.group(0).split())
            fail(f"{path}: says the NetworkPolicy allows {text!r}..., but its egress is limited by port "
                 "only (any address on those ports)")


def manifests(rendered, variant, namespace=""):
    """The project's own invariants on a rendered variant. `namespace`: the namespace the
    rendering must put every namespaced object in ("" for a namespace-agnostic base)."""
    with open(rendered, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    with open(CONFIG, "rb") as f:
        config = tomllib.load(f)
    shutdown = int(config["shutdown"]["timeout_seconds"])
    listen_port = int(config["server"]["listen"].rsplit(":", 1)[1])
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
        ns = (d.get("metadata") or {}).get("namespace")
        where = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in CLUSTER_SCOPED:
            if ns:
                fail(f"{where}: a cluster-scoped object has no namespace")
        elif not namespace and ns:
            fail(f"{where}: namespace is set; the base must stay namespace-agnostic")
        elif namespace and ns != namespace:
            fail(f"{where}: namespace {ns!r}, want {namespace!r}")
    if "Secret" in by_kind:
        fail("a Secret is rendered; database credentials must not be shipped")
    for kind in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "NetworkPolicy"):
        if len(by_kind.get(kind, [])) != 1:
            fail(f"expected exactly one {kind}, found {len(by_kind.get(kind, []))}")
    if "Lease" in by_kind:
        fail("Lease rendered; the writer is elected with a PostgreSQL advisory lock")
    check_rbac(by_kind, namespace)
    check_labels(docs)
    check_network_policy_docs(by_kind)
    configmaps = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}
    for cm in configmaps.values():
        if cm.get("data", {}).get("default.toml") != read(CONFIG):
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
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if pdb["spec"].get("unhealthyPodEvictionPolicy") != "AlwaysAllow":
            fail("PodDisruptionBudget: unhealthyPodEvictionPolicy must be AlwaysAllow (a crash-looping "
                 "replica must never block a node drain)")
    for d in by_kind.get("Deployment", []):
        pod_labels = (d["spec"]["template"].get("metadata") or {}).get("labels") or {}
        spread = [c for c in d["spec"]["template"]["spec"].get("topologySpreadConstraints") or []
                  if c.get("topologyKey") == "topology.kubernetes.io/zone"]
        if len(spread) != 1:
            fail("Deployment: one topologySpreadConstraint over topology.kubernetes.io/zone is required "
                 "(two replicas must prefer different zones)")
        for c in spread:
            sel = (c.get("labelSelector") or {}).get("matchLabels") or {}
            if not sel or not sel.items() <= pod_labels.items():
                fail(f"Deployment: the zone spread's labelSelector must select its own pods: {sel}")
            if c.get("whenUnsatisfiable") != "ScheduleAnyway" or c.get("maxSkew") != 1:
                fail("Deployment: the zone spread must be maxSkew 1, ScheduleAnyway (single-zone clusters still schedule)")
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
    print(f"  invariants hold for {variant}{' in namespace ' + namespace if namespace else ''} ({len(docs)} objects)")
    finish()


# --- Helm chart ------------------------------------------------------------------------------

CHART = "deploy/helm/sandbox-reconciler"
# The chart's copies of files outside its directory (Helm reads only files inside a chart).
CHART_COPIES = {
    f"{CHART}/files/config/default.toml": "config/default.toml",
    f"{CHART}/files/config/centaur.toml": "config/centaur.toml",
    f"{CHART}/files/config/centaur-agent-sandbox.toml": "config/centaur-agent-sandbox.toml",
    f"{CHART}/files/config/centaur-migration.toml": "config/centaur-migration.toml",
    f"{CHART}/files/alerts.yaml": ALERTS,
}
CHART_PROFILES = {"bare-pod": "centaur.toml", "agent-sandbox": "centaur-agent-sandbox.toml",
                  "migration": "centaur-migration.toml"}
# Labels only Helm writes; the kustomize base has no equivalent.
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")
KUSTOMIZE_HASH = re.compile(r"^(.*)-[a-z0-9]{10}$")


def chart_copies():
    """Every file the chart carries a copy of is byte-identical to its original."""
    for copy, original in sorted(CHART_COPIES.items()):
        if not os.path.exists(original):
            fail(f"{original} does not exist (the chart carries {copy}; the profile must exist in config/ too)")
        elif not os.path.exists(copy):
            fail(f"{copy} is missing; run scripts/sync-deploy.sh")
        elif read(copy) != read(original):
            fail(f"{copy} differs from {original}; run scripts/sync-deploy.sh")
        else:
            print(f"  {copy} == {original}")
    finish()


def _strip_labels(labels):
    return {k: v for k, v in (labels or {}).items() if k not in HELM_LABELS}


def normalize_for_comparison(doc, source):
    """The parts of an object in which the chart and the kustomize base may differ by design,
    removed: Helm's own labels; the rollout checksum annotation of pod templates; the hash
    suffix kustomize's generator gives the ConfigMap (and its references); every
    configuration file after default.toml (the chart layers the profile's file; which one is
    checked by chart-render). `source` is "chart" or "kustomize"."""
    d = json.loads(json.dumps(doc))

    def walk(obj):
        if isinstance(obj, dict):
            meta = obj.get("metadata")
            if isinstance(meta, dict):
                if "labels" in meta:
                    meta["labels"] = _strip_labels(meta["labels"])
                ann = {k: v for k, v in (meta.get("annotations") or {}).items() if k != "checksum/config"}
                if ann:
                    meta["annotations"] = ann
                else:
                    meta.pop("annotations", None)
            cm = obj.get("configMap")
            if isinstance(cm, dict) and source == "kustomize":
                m = KUSTOMIZE_HASH.match(cm.get("name", ""))
                if m:
                    cm["name"] = m.group(1)
            if isinstance(obj.get("args"), list):
                obj["args"] = [a for a in obj["args"] if not (isinstance(a, str) and a.startswith("--config=")
                                                              and not a.endswith("/default.toml"))]
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(d)
    if d.get("kind") == "ConfigMap":
        if source == "kustomize":
            m = KUSTOMIZE_HASH.match(d["metadata"]["name"])
            if m:
                d["metadata"]["name"] = m.group(1)
        d["data"] = {k: v for k, v in (d.get("data") or {}).items() if k == "default.toml"}
    return d


def _load_all(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _key(d):
    return (d["kind"], (d.get("metadata") or {}).get("namespace", ""), d["metadata"]["name"])


def chart_vs_kustomize(chart_rendered, kustomize_rendered):
    """The chart renders the same objects as the kustomize base (up to normalize_for_comparison)."""
    chart = {_key(d): d for d in (normalize_for_comparison(d, "chart") for d in _load_all(chart_rendered))}
    kust = {_key(d): d for d in (normalize_for_comparison(d, "kustomize") for d in _load_all(kustomize_rendered))}
    for k in sorted(set(chart) - set(kust)):
        fail(f"{'/'.join(x for x in k if x)}: rendered by the chart, not by kustomize")
    for k in sorted(set(kust) - set(chart)):
        fail(f"{'/'.join(x for x in k if x)}: rendered by kustomize, not by the chart")
    import difflib
    for k in sorted(set(chart) & set(kust)):
        if chart[k] != kust[k]:
            a = yaml.safe_dump(kust[k], sort_keys=True).splitlines()
            b = yaml.safe_dump(chart[k], sort_keys=True).splitlines()
            diff = "\n".join(difflib.unified_diff(a, b, "kustomize", "chart", lineterm="", n=2))
            fail(f"{'/'.join(x for x in k if x)} differs between kustomize and the chart:\n{diff}")
    if not errors:
        print(f"  the chart renders the same {len(chart)} objects as kustomize: "
              + ", ".join(f"{k[0]}/{k[2]}" for k in sorted(chart)))
    finish()


DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def check_names(docs):
    """Object names an API server accepts (schemas do not check them): DNS-1123 subdomains of
    at most 253 characters; a Service's name a DNS-1035 label."""
    for d in docs:
        name = (d.get("metadata") or {}).get("name", "")
        ok = DNS_LABEL.fullmatch(name) if d["kind"] == "Service" else \
            (len(name) <= 253 and DNS_SUBDOMAIN.fullmatch(name))
        if not ok:
            fail(f"{d['kind']}/{name}: not a valid object name")


def chart_render(rendered, profile, mode, namespace, watch=""):
    """One chart rendering: the profile's file is layered after default.toml and equals the
    repository's; the workload is the mode's; RBAC is namespaced in every watched namespace
    (or cluster-wide for "*"); the project's invariants (manifests) hold."""
    docs = _load_all(rendered)
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    check_names(docs)
    profile_file = CHART_PROFILES[profile]
    for cm in by_kind.get("ConfigMap", []):
        data = cm.get("data") or {}
        # (chart-copies checks that the chart's copy is the repository's config/ file.)
        if data.get(profile_file) != read(f"{CHART}/files/config/{profile_file}"):
            fail(f"ConfigMap {cm['metadata']['name']}: {profile_file} differs from {CHART}/files/config/{profile_file}")
        extra = set(data) - {"default.toml", profile_file, "site.toml"}
        if extra:
            fail(f"ConfigMap {cm['metadata']['name']}: unexpected files {sorted(extra)}")
    workloads = by_kind.get("Deployment", []) + by_kind.get("CronJob", [])
    want = "Deployment" if mode == "daemon" else "CronJob"
    if [w["kind"] for w in workloads] != [want]:
        fail(f"mode {mode}: want one {want}, rendered {[w['kind'] for w in workloads]}")
    for w in workloads:
        pod = w["spec"]["template"]["spec"] if w["kind"] == "Deployment" else \
            w["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        args = pod["containers"][0].get("args") or []
        configs = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
        if configs[:2] != ["/etc/sandbox-reconciler/default.toml", f"/etc/sandbox-reconciler/{profile_file}"]:
            fail(f"{w['kind']}: --config must layer default.toml, then {profile_file}: {configs}")
        if (mode == "cronjob") != ("--once" in args):
            fail(f"{w['kind']}: --once must be given exactly in the cronjob mode: {args}")
    watched = [n for n in watch.split(",") if n] or [namespace]
    if watched == ["*"]:
        if by_kind.get("Role"):
            fail("watchNamespaces [\"*\"]: no Role, a ClusterRole instead")
    else:
        got = sorted(r["metadata"].get("namespace") for r in by_kind.get("Role", []))
        if got != sorted(watched):
            fail(f"Roles in {got}, want one in each watched namespace {sorted(watched)}")
    # RBAC: exactly what files/permissions.json (the binary's declaration) asks for.
    perms = json.loads(read(f"{CHART}/files/permissions.json"))
    placeholder = perms["namespacePlaceholder"]
    declared = []
    for r in perms["once" if mode == "cronjob" else "daemon"][profile]:
        r = dict(r)
        if r.get("namespaces"):
            r["namespaces"] = ["*"] if watched == ["*"] else \
                sorted({n for x in r["namespaces"] for n in (watched if x == placeholder else [x])})
        if r.get("resource_names"):
            names = {n for x in r["resource_names"] for n in (watched if x == placeholder else [x])} - {"*"}
            r["resource_names"] = sorted(names)
            if not names:
                del r["resource_names"]
        declared.append(r)
    granted, problems = granted_permissions(docs, sa=(by_kind.get("ServiceAccount") or [{}])[0]
                                            .get("metadata", {}).get("name", "sandbox-reconciler"))
    for p in problems:
        fail(p)
    for diff in permission_differences(granted, declared):
        fail(f"RBAC: {diff} (files/permissions.json)")
    print(f"  chart: mode {mode}, profile {profile}, namespace {namespace}"
          f"{', watching ' + watch if watch else ''}: {len(docs)} objects")
    finish()


def chart_parent(rendered_off, rendered_on):
    """As a subchart: disabled renders nothing of it, enabled renders its workload."""
    off = [d for d in _load_all(rendered_off) if (d.get("metadata") or {}).get("labels", {})
           .get("app.kubernetes.io/name") == "sandbox-reconciler"]
    on = _load_all(rendered_on)
    ours = [d for d in on if ((d.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/name")
            == "sandbox-reconciler"]
    if "charts/sandboxReconciler/" in read(rendered_off):
        fail("sandboxReconciler.enabled=false still renders templates of charts/sandboxReconciler/")
    if off:
        fail(f"sandboxReconciler.enabled=false still renders {[(d['kind'], d['metadata']['name']) for d in off]}")
    if not [d for d in ours if d["kind"] in ("Deployment", "CronJob")]:
        fail("sandboxReconciler.enabled=true renders no reconciler workload")
    check_names(on)
    others = [d for d in on if d not in ours]
    if not others:
        fail("the parent chart's own objects are missing from its rendering")
    print(f"  disabled: 0 objects of the subchart; enabled: {len(ours)} "
          f"({', '.join(sorted({d['kind'] for d in ours}))}) beside the parent's {len(others)}")
    finish()


def chart_permissions(binary, out=""):
    """files/permissions.json as the binary declares it (sandbox-reconciler permissions for each
    mode and profile). With OUT, writes it there; without, compares with the chart's file."""
    import subprocess
    import tempfile
    path = f"{CHART}/files/permissions.json"
    placeholder = "release-namespace"
    doc = {"generatedBy": json.load(open(path))["generatedBy"] if os.path.exists(path) else "",
           "namespacePlaceholder": placeholder}
    with tempfile.TemporaryDirectory() as tmp:
        ns_file = os.path.join(tmp, "namespaces.toml")
        with open(ns_file, "w") as f:
            f.write(f'[cluster]\nnamespaces = ["{placeholder}"]\n')
        for mode in ("daemon", "once"):
            doc[mode] = {}
            for profile, file in CHART_PROFILES.items():
                cmd = [binary, "permissions", "--mode", mode, "--config", f"{CHART}/files/config/default.toml",
                       "--config", f"{CHART}/files/config/{file}", "--config", ns_file, "--output", "json"]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    sys.exit(f"{' '.join(cmd)}: exit {res.returncode}: {res.stderr.strip()}")
                doc[mode][profile] = normalize_permissions(json.loads(res.stdout))
    text = json.dumps(doc, indent=2) + "\n"
    if out:
        write_if_changed(out, text)
        return
    if read(path) != text:
        fail(f"{path} is not what the binary declares; run scripts/sync-chart-permissions.sh")
        import difflib
        print("\n".join(difflib.unified_diff(read(path).splitlines(), text.splitlines(), path, "declared",
                                             lineterm="")))
    else:
        print(f"  {path} is what the binary declares")
    finish()


# --- Dockerfile ------------------------------------------------------------------------------

def dockerfile():
    text = read("deploy/Dockerfile")
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
    if os.path.exists("build.rs") and "SANDBOX_RECONCILER_REVISION" in read("build.rs"):
        if not re.search(r"^ARG REVISION\b", builder, re.M) \
                or 'SANDBOX_RECONCILER_REVISION="${REVISION}"' not in builder:
            fail("build.rs takes the git revision from SANDBOX_RECONCILER_REVISION (the build context has no "
                 ".git): the builder stage must declare ARG REVISION and run "
                 'SANDBOX_RECONCILER_REVISION="${REVISION}" cargo build')
    for member in (cargo.get("workspace") or {}).get("members") or []:
        if member != "." and member.split("/")[0] not in copied:
            fail(f"Cargo.toml has workspace member {member}, which the builder stage does not COPY "
                 "(cargo reads every member's manifest)")
    for registry, crates in (cargo.get("patch") or {}).items():
        for name, spec in crates.items():
            path = spec.get("path") if isinstance(spec, dict) else None
            if path and path.split("/")[0] not in copied:
                fail(f"Cargo.toml patches {name} ({registry}) with {path}, which the builder stage does not COPY")
    build_script = (cargo.get("package") or {}).get("build")
    if isinstance(build_script, str) and build_script.split("/")[0] not in copied:
        fail(f"Cargo.toml names build script {build_script}, which the builder stage does not COPY")
    for dirpath, _, files in os.walk("src"):
        for fn in files:
            if not fn.endswith(".rs"):
                continue
            path = os.path.join(dirpath, fn)
            src = read(path)
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
    # The OCI labels the image test checks, each from a build argument.
    for key, arg in (("source", "SOURCE"), ("revision", "REVISION"), ("version", "VERSION")):
        if not re.search(r"^ARG " + arg + r"\b", runtime, re.M) \
                or f'org.opencontainers.image.{key}="${{{arg}}}"' not in runtime:
            fail(f"the runtime stage must declare ARG {arg} and label org.opencontainers.image.{key}=\"${{{arg}}}\"")
    user = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    if not user or user[-1].split(":")[0] in ("root", "0"):
        fail("the runtime stage must run as a non-root USER")
    print(f"  builder copies {', '.join(sorted(copied))}; runtime runs as USER {user[-1] if user else '?'}")
    finish()


COMMANDS = {
    "sync": sync,
    "prometheusrule-groups": extract_prometheusrule_groups,
    "alert-conventions": alert_conventions,
    "dashboard": dashboard,
    "panel-tests": panel_tests,
    "metric-names": all_metric_names,
    "split": split,
    "manifests": manifests,
    "dockerfile": dockerfile,
    "rbac-granted": rbac_granted,
    "rbac-compare": rbac_compare,
    "chart-copies": chart_copies,
    "chart-vs-kustomize": chart_vs_kustomize,
    "chart-render": chart_render,
    "chart-parent": chart_parent,
    "chart-permissions": chart_permissions,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(COMMANDS)}}} [ARGS...]")
    COMMANDS[sys.argv[1]](*sys.argv[2:])
