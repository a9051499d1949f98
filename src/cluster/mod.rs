//! The cluster side: complete, paginated, metadata-only listings per backend.
//!
//! A sweep acts only on a *complete* view of the cluster (docs/DESIGN.md, rule 1). [`KubeCluster`]
//! lists every page of every configured backend through the real `kube::Client` and returns a
//! [`ClusterSnapshot`] of object names, or an error: there is no partial snapshot. The same
//! type is built from a `kubectl get -o json` dump by [`dump`] for offline audits.

pub mod cache;
pub mod client;
pub mod dump;
mod kube_api;
pub mod lean;
pub mod objects;

pub use crate::snapshot::{BackendKind, BackendView, ClusterSnapshot, NameMap, ObjectFacts};
pub use kube_api::{Absence, KubeCluster, PageHook, RequestHook, ScopeVerdict, UndecodableHook};

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
    #[error("cluster identity: {0}")]
    Identity(String),
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
            ClusterError::Identity(_) => "identity",
        }
    }
}
