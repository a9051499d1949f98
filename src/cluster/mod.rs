//! The cluster side: complete, paginated, metadata-only listings per backend.
//!
//! A sweep acts only on a *complete* view of the cluster (DESIGN.md rule 1). [`KubeCluster`]
//! lists every page of every configured backend through the real `kube::Client` and returns a
//! [`ClusterSnapshot`] of object names, or an error: there is no partial snapshot. The same
//! type is built from a `kubectl get -o json` dump by [`dump`] for offline audits.

pub mod dump;
mod kube_api;

use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;

pub use kube_api::{Absence, KubeCluster};

/// Which kind of object backs a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum BackendKind {
    /// One bare Pod per session.
    #[serde(rename = "pod")]
    Pod,
    /// One agent-sandbox `Sandbox` custom resource per session.
    #[serde(rename = "agent-sandbox")]
    AgentSandbox,
}

impl BackendKind {
    /// The label value used in reports and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Pod => "pod",
            BackendKind::AgentSandbox => "agent-sandbox",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the reconciler keeps about one object name (merged over namespaces).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObjectFacts {
    /// `metadata.deletionTimestamp` is set: not absent yet.
    pub terminating: bool,
    /// A Sandbox paused on purpose (`spec.replicas: 0` or `spec.operatingMode: Suspended`).
    pub suspended: bool,
}

/// All objects of one backend, by name.
#[derive(Debug, Clone)]
pub struct BackendView {
    pub kind: BackendKind,
    /// Rows with a missing object whose name starts with this are counted under this backend.
    pub name_prefix: String,
    objects: HashMap<Box<str>, ObjectFacts>,
    /// Requests the listing took (pages, including a restarted listing).
    pub requests: u64,
}

impl BackendView {
    pub fn new(kind: BackendKind, name_prefix: &str) -> BackendView {
        BackendView {
            kind,
            name_prefix: name_prefix.to_string(),
            objects: HashMap::new(),
            requests: 0,
        }
    }

    /// Adds an object; a name seen in several namespaces is kept once.
    pub fn insert(&mut self, name: &str, facts: ObjectFacts) {
        let entry = self.objects.entry(name.into()).or_default();
        entry.terminating |= facts.terminating;
        entry.suspended |= facts.suspended;
    }

    pub fn contains(&self, name: &str) -> bool {
        self.objects.contains_key(name)
    }

    /// The stored key for `name` (borrowed from the view), if present.
    pub fn key_of(&self, name: &str) -> Option<&str> {
        self.objects.get_key_value(name).map(|(k, _)| &**k)
    }

    pub fn facts(&self, name: &str) -> Option<ObjectFacts> {
        self.objects.get(name).copied()
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Objects that are terminating / deliberately suspended.
    pub fn count(&self, pred: impl Fn(&ObjectFacts) -> bool) -> usize {
        self.objects.values().filter(|f| pred(f)).count()
    }
}

/// A complete view of every enabled backend, taken at `listing_started_at`.
#[derive(Debug, Clone)]
pub struct ClusterSnapshot {
    pub listing_started_at: DateTime<Utc>,
    pub backends: Vec<BackendView>,
    /// Where the view came from ("api" or the dump file's path).
    pub source: String,
}

impl ClusterSnapshot {
    pub fn new(listing_started_at: DateTime<Utc>) -> ClusterSnapshot {
        ClusterSnapshot {
            listing_started_at,
            backends: Vec::new(),
            source: "api".into(),
        }
    }

    pub fn total_objects(&self) -> usize {
        self.backends.iter().map(BackendView::len).sum()
    }
}

/// Why the cluster could not be listed or an absence confirmed. Any of these aborts the
/// sweep before a write.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "Kubernetes configuration: {0}; run in a pod with a service account, or set KUBECONFIG"
    )]
    Config(String),
    #[error("{what}: forbidden ({message}); grant the reconciler's service account {verb} on {resource}")]
    Forbidden {
        what: String,
        verb: &'static str,
        resource: String,
        message: String,
    },
    #[error("{what}: the API server answered {code} {reason}: {message}")]
    Api {
        what: String,
        code: u16,
        reason: String,
        message: String,
    },
    #[error("{what}: the API server does not serve {resource} (404); install its CustomResourceDefinition, fix the backend's group/version/plural, or disable the backend")]
    NotServed { what: String, resource: String },
    #[error("{what}: the continue token expired twice (410); the listing could not complete")]
    Expired { what: String },
    #[error("{what}: no answer within {seconds}s")]
    Timeout { what: String, seconds: u64 },
    #[error("{what}: malformed response: {message}")]
    Malformed { what: String, message: String },
    #[error("{what}: {message}")]
    Transport { what: String, message: String },
    #[error("cluster snapshot {path}: {message}")]
    Dump { path: String, message: String },
}

impl ClusterError {
    /// A bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ClusterError::Config(_) => "config",
            ClusterError::Forbidden { .. } => "forbidden",
            ClusterError::Api { .. } => "api",
            ClusterError::Expired { .. } => "expired",
            ClusterError::NotServed { .. } => "not_served",
            ClusterError::Timeout { .. } => "timeout",
            ClusterError::Malformed { .. } => "malformed",
            ClusterError::Transport { .. } => "transport",
            ClusterError::Dump { .. } => "dump",
        }
    }
}
