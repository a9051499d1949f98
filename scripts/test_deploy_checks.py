"""Unit tests of scripts/deploy_checks.py's helpers (run by scripts/check-deploy.sh with the
tools' virtualenv: python -m unittest discover -s scripts -p 'test_*.py')."""

import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploy_checks as dc  # noqa: E402


class MetricNames(unittest.TestCase):
    def test_histogram_suffixes_reduce_to_the_base_name(self):
        dc.HISTOGRAMS.add("sandbox_reconciler_sweep_duration_seconds")
        expr = ("histogram_quantile(0.9, sum by (le) (rate("
                "sandbox_reconciler_sweep_duration_seconds_bucket[5m]))) + process_open_fds")
        self.assertEqual(dc.metric_names(expr),
                         {"sandbox_reconciler_sweep_duration_seconds", "process_open_fds"})

    def test_counters_keep_their_suffix(self):
        self.assertEqual(dc.metric_names("sandbox_reconciler_sweeps_total{result='failed'}"),
                         {"sandbox_reconciler_sweeps_total"})


class Contract(unittest.TestCase):
    def test_the_contract_is_read_from_the_binary_listing(self):
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("sandbox_reconciler_leader gauge - 1 while this replica holds the lock.\n")
            f.write("sandbox_reconciler_sweep_duration_seconds histogram - Whole sweeps.\n")
            path = f.name
        old = os.environ.get("SANDBOX_RECONCILER_METRICS_CONTRACT")
        os.environ["SANDBOX_RECONCILER_METRICS_CONTRACT"] = path
        try:
            kinds = dc.load_contract()
        finally:
            os.unlink(path)
            if old is None:
                del os.environ["SANDBOX_RECONCILER_METRICS_CONTRACT"]
            else:
                os.environ["SANDBOX_RECONCILER_METRICS_CONTRACT"] = old
        self.assertEqual(kinds["sandbox_reconciler_sweep_duration_seconds"], "histogram")
        self.assertEqual(len(kinds), 2)


class Anchors(unittest.TestCase):
    def test_github_anchors_follow_githubs_slugs(self):
        md = "# Title\n### SandboxReconcilerDown\n## Several clusters, one database\n"
        self.assertEqual(dc.github_anchors(md),
                         {"title", "sandboxreconcilerdown", "several-clusters-one-database"})


class Grouping(unittest.TestCase):
    def test_by_and_on_clauses(self):
        clauses = list(dc.grouping_clauses("max by (cluster, namespace) (x) and on (job) y"))
        self.assertEqual(clauses, [("by", ["cluster", "namespace"]), ("on", ["job"])])


class Concrete(unittest.TestCase):
    def test_variables_become_match_all_unless_given(self):
        expr = 'up{job=~"$job", namespace=~"${namespace}"}'
        self.assertEqual(dc.concrete(expr, {"job": "a"}), 'up{job=~"a", namespace=~".*"}')


class RunbookBase(unittest.TestCase):
    def test_placeholders_are_refused(self):
        self.assertTrue(dc.runbook_base_problems("https://github.com/OWNER/x/blob/main/README.md"))
        self.assertTrue(dc.runbook_base_problems("https://example.com/runbooks/README.md"))
        self.assertFalse(dc.runbook_base_problems("https://git.internal.corp/ops/runbooks/README.md"))


class Rbac(unittest.TestCase):
    def test_wildcards_are_found(self):
        self.assertTrue(dc.has_wildcard({"resources": ["*"]}))
        self.assertFalse(dc.has_wildcard({"resources": ["pods"], "verbs": ["get"]}))


def _role(name, rules, namespace=None):
    meta = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"kind": "Role", "metadata": meta, "rules": rules}


def _binding(kind, name, ref_kind, ref, subject_ns=None, namespace=None):
    subject = {"kind": "ServiceAccount", "name": "sandbox-reconciler"}
    if subject_ns:
        subject["namespace"] = subject_ns
    meta = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"kind": kind, "metadata": meta, "roleRef": {"kind": ref_kind, "name": ref}, "subjects": [subject]}


BASE = [
    {"kind": "ServiceAccount", "metadata": {"name": "sandbox-reconciler"}},
    _role("sandbox-reconciler", [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["watch", "get", "list"]},
        {"apiGroups": ["agents.x-k8s.io"], "resources": ["sandboxes"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]},
    ]),
    _binding("RoleBinding", "sandbox-reconciler", "Role", "sandbox-reconciler"),
    {"kind": "ClusterRole", "metadata": {"name": "identity"},
     "rules": [{"apiGroups": [""], "resources": ["namespaces"], "resourceNames": ["kube-system"], "verbs": ["get"]}]},
    _binding("ClusterRoleBinding", "identity", "ClusterRole", "identity"),
]


class GrantedPermissions(unittest.TestCase):
    def test_the_base_in_default_grants_the_declared_shape(self):
        rules, problems = dc.granted_permissions(BASE, default_namespace="default")
        self.assertEqual(problems, [])
        self.assertEqual(rules, [
            {"api_group": "", "resource": "namespaces", "verbs": ["get"], "resource_names": ["default", "kube-system"]},
            {"api_group": "", "resource": "pods", "verbs": ["get", "list", "watch"], "namespaces": ["default"]},
            {"api_group": "agents.x-k8s.io", "resource": "sandboxes", "verbs": ["get", "list", "watch"],
             "namespaces": ["default"]},
        ])

    def test_a_role_in_another_namespace_counts_only_when_bound_to_our_account(self):
        docs = [dict(d) for d in BASE]
        for d in docs:
            if d["kind"] in ("ServiceAccount", "Role", "RoleBinding"):
                d["metadata"] = dict(d["metadata"], namespace="ops")
            if d["kind"] == "ClusterRoleBinding":
                d["subjects"] = [dict(d["subjects"][0], namespace="ops")]
        docs.append(_role("sandbox-reconciler", BASE[1]["rules"], namespace="agents"))
        docs.append(_binding("RoleBinding", "sandbox-reconciler", "Role", "sandbox-reconciler",
                             subject_ns="ops", namespace="agents"))
        # Bound to someone else's account: not ours.
        docs.append(_role("other", BASE[1]["rules"], namespace="eu"))
        docs.append(_binding("RoleBinding", "other", "Role", "other", subject_ns="elsewhere", namespace="eu"))
        rules, problems = dc.granted_permissions(docs)
        self.assertEqual(problems, [])
        by = {r["resource"]: r for r in rules}
        self.assertEqual(by["pods"]["namespaces"], ["agents", "ops"])
        self.assertEqual(by["namespaces"]["resource_names"], ["agents", "kube-system", "ops"])

    def test_a_cluster_role_without_names_is_cluster_wide(self):
        docs = BASE + [
            {"kind": "ClusterRole", "metadata": {"name": "all"},
             "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]},
            _binding("ClusterRoleBinding", "all", "ClusterRole", "all"),
        ]
        rules, _ = dc.granted_permissions(docs, default_namespace="default")
        self.assertEqual([r for r in rules if r["resource"] == "pods"][0]["namespaces"], ["*"])

    def test_verbs_differing_between_namespaces_are_a_problem(self):
        docs = BASE + [
            _role("narrow", [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}], namespace="x"),
            _binding("RoleBinding", "narrow", "Role", "narrow", subject_ns="default", namespace="x"),
        ]
        _, problems = dc.granted_permissions(docs, default_namespace="default")
        self.assertTrue(any("pods" in p for p in problems), problems)

    def test_differences_name_a_missing_verb_and_an_extra_grant(self):
        granted, _ = dc.granted_permissions(BASE, default_namespace="default")
        declared = [
            {"api_group": "", "resource": "pods", "verbs": ["get", "list"], "namespaces": ["default"]},
            {"api_group": "", "resource": "namespaces", "verbs": ["get"], "resource_names": ["kube-system", "default"]},
        ]
        diffs = dc.permission_differences(granted, declared)
        self.assertEqual(len(diffs), 2, diffs)
        self.assertTrue(any(d.startswith("core/pods") for d in diffs))
        self.assertTrue(any("sandboxes" in d and "not declared" in d for d in diffs))
        self.assertEqual(dc.permission_differences(granted, list(reversed(granted))), [])


class ChartVsKustomize(unittest.TestCase):
    def _pod(self, cm, args, annotations=None):
        meta = {"name": "sandbox-reconciler", "labels": {"app.kubernetes.io/name": "sandbox-reconciler"}}
        tmeta = {"labels": {"app.kubernetes.io/name": "sandbox-reconciler"}}
        if annotations:
            tmeta["annotations"] = annotations
        return {"kind": "Deployment", "metadata": meta, "spec": {"template": {"metadata": tmeta, "spec": {
            "containers": [{"name": "c", "args": args}], "volumes": [{"name": "config", "configMap": {"name": cm}}]}}}}

    def test_helm_labels_checksum_hash_suffix_and_profile_file_are_not_differences(self):
        chart = self._pod("sandbox-reconciler-config", ["--config=/etc/sandbox-reconciler/default.toml",
                                                         "--config=/etc/sandbox-reconciler/centaur.toml", "--log-format=json"],
                          {"checksum/config": "abc"})
        chart["metadata"]["labels"].update({"helm.sh/chart": "sandbox-reconciler-0.1.0",
                                            "app.kubernetes.io/managed-by": "Helm"})
        kust = self._pod("sandbox-reconciler-config-g77tgmcg7b",
                         ["--config=/etc/sandbox-reconciler/default.toml", "--log-format=json"])
        self.assertEqual(dc.normalize_for_comparison(chart, "chart"), dc.normalize_for_comparison(kust, "kustomize"))

    def test_any_other_difference_remains(self):
        chart = self._pod("sandbox-reconciler-config", ["--config=/etc/sandbox-reconciler/default.toml", "--once"])
        kust = self._pod("sandbox-reconciler-config-g77tgmcg7b", ["--config=/etc/sandbox-reconciler/default.toml"])
        self.assertNotEqual(dc.normalize_for_comparison(chart, "chart"), dc.normalize_for_comparison(kust, "kustomize"))

    def test_configmaps_compare_by_default_toml_only(self):
        chart = {"kind": "ConfigMap", "metadata": {"name": "x-config"}, "data": {"default.toml": "a", "centaur.toml": "b"}}
        kust = {"kind": "ConfigMap", "metadata": {"name": "x-config-abcde12345"}, "data": {"default.toml": "a"}}
        self.assertEqual(dc.normalize_for_comparison(chart, "chart"), dc.normalize_for_comparison(kust, "kustomize"))
        kust["data"]["default.toml"] = "changed"
        self.assertNotEqual(dc.normalize_for_comparison(chart, "chart"), dc.normalize_for_comparison(kust, "kustomize"))


if __name__ == "__main__":
    unittest.main()
