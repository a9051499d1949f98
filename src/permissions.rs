//! The Kubernetes permissions the reconciler needs, declared once.
//!
//! The binary states what it will ask the API server for, per mode, the way it states its
//! metrics contract (`--print-metrics`): `sandbox-reconciler permissions` prints this list,
//! `check` reviews exactly this list with SelfSubjectAccessReviews, the deploy checks compare
//! the rendered Role and ClusterRole with it, and the integration tests run the daemon
//! against an API server that denies everything the rendered manifests do not grant.
//!
//! - The daemon keeps a watch-fed cache: `get`, `list` and `watch` on each enabled backend's
//!   resource, in each configured namespace (all namespaces for `["*"]`).
//! - A one-off sweep (`--once`, the CronJob) lists once and confirms by GET: `get` and `list`.
//! - Both read the cluster's identity (`get` on the `kube-system` Namespace) and check that
//!   each configured namespace exists (`get` on those Namespaces).
//! - With only the bare-pod backend enabled, a sweep first makes sure no Sandbox exists
//!   (a paused Sandbox keeps no pod, so its row would look orphaned): `list` on the Sandbox
//!   resource, used only when discovery says the API server serves it.
//!
//! The reconciler never writes to the cluster.

use serde::Serialize;

use crate::backends::{Backend, Backends};
use crate::config::Settings;

/// Which way the reconciler runs, for the permissions it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The Deployment: a watch cache, confirming GETs.
    Daemon,
    /// `--once` (the CronJob): one listing after the rows are read.
    Once,
}

/// One resource the reconciler reads, with the verbs it uses on it and where.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Rule {
    /// "" for the core group.
    pub api_group: String,
    pub resource: String,
    /// Sorted.
    pub verbs: Vec<&'static str>,
    /// Namespaces the verbs are used in; `["*"]` means cluster-wide. Empty for
    /// cluster-scoped resources.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Only these objects (cluster-scoped `namespaces`). Empty: every object.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resource_names: Vec<String>,
}

impl Rule {
    /// `resource.group`, or `resource` for the core group.
    pub fn full_resource(&self) -> String {
        if self.api_group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.api_group)
        }
    }
}

/// The verbs a mode uses on a backend's resource.
pub fn backend_verbs(mode: Mode) -> Vec<&'static str> {
    match mode {
        Mode::Daemon => vec!["get", "list", "watch"],
        Mode::Once => vec!["get", "list"],
    }
}

/// Every permission the reconciler needs with these settings in this mode, sorted by group
/// and resource. `all_backends` declares every backend as if it were enabled (manifests that
/// serve any profile grant that).
pub fn required(settings: &Settings, mode: Mode, all_backends: bool) -> Vec<Rule> {
    let namespaces: Vec<String> = match settings.namespaces() {
        Some(list) => list.to_vec(),
        None => vec!["*".to_string()],
    };
    let backends = if all_backends {
        Backends::all(&settings.backends)
    } else {
        Backends::from_settings(&settings.backends)
    };
    let rule = |backend: &Backend, verbs: Vec<&'static str>| Rule {
        api_group: backend.group.clone(),
        resource: backend.plural.clone(),
        verbs,
        namespaces: namespaces.clone(),
        resource_names: Vec::new(),
    };
    let mut rules: Vec<Rule> = backends
        .enabled()
        .iter()
        .map(|backend| rule(backend, backend_verbs(mode)))
        .collect();
    // The bare-pod backend alone only probes for Sandboxes (`LIST ?limit=1`).
    if let Some(probe) = backends.sandbox_probe() {
        rules.push(rule(probe, vec!["list"]));
    }
    let mut named: Vec<String> = settings
        .namespaces()
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    named.push("kube-system".into());
    named.sort();
    named.dedup();
    rules.push(Rule {
        api_group: String::new(),
        resource: "namespaces".into(),
        verbs: vec!["get"],
        namespaces: Vec::new(),
        resource_names: named,
    });
    rules.sort();
    rules
}

/// The list as a table, for people.
pub fn text(rules: &[Rule]) -> String {
    let mut out = String::from("RESOURCE                          VERBS            WHERE\n");
    for r in rules {
        let place = if !r.resource_names.is_empty() {
            format!("only {}", r.resource_names.join(", "))
        } else if r.namespaces == ["*"] {
            "all namespaces (ClusterRole)".to_string()
        } else {
            format!("namespaces {}", r.namespaces.join(", "))
        };
        out.push_str(&format!(
            "{:<33} {:<16} {place}\n",
            r.full_resource(),
            r.verbs.join(",")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemon_watches_and_a_one_off_sweep_does_not() {
        let mut s = Settings::default();
        s.cluster.namespaces = vec!["agents".into()];
        let daemon = required(&s, Mode::Daemon, false);
        assert_eq!(daemon.len(), 3, "{daemon:?}");
        // The bare-pod backend alone probes for Sandboxes.
        assert_eq!(daemon[2].resource, "sandboxes");
        assert_eq!(daemon[2].verbs, ["list"]);
        assert_eq!(daemon[1].resource, "pods");
        assert_eq!(daemon[1].verbs, ["get", "list", "watch"]);
        assert_eq!(daemon[1].namespaces, ["agents"]);
        assert_eq!(daemon[0].resource, "namespaces");
        assert_eq!(daemon[0].resource_names, ["agents", "kube-system"]);
        let once = required(&s, Mode::Once, false);
        assert_eq!(once[1].verbs, ["get", "list"]);
        // Every backend, as manifests for any profile grant.
        let all = required(&s, Mode::Daemon, true);
        assert!(all
            .iter()
            .any(|r| r.api_group == "agents.x-k8s.io" && r.resource == "sandboxes"));
        // All namespaces: cluster-wide, and only kube-system by name.
        s.cluster.namespaces = vec!["*".into()];
        let wide = required(&s, Mode::Daemon, false);
        assert_eq!(wide[1].namespaces, ["*"]);
        assert_eq!(wide[0].resource_names, ["kube-system"]);
    }
}
