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


if __name__ == "__main__":
    unittest.main()
