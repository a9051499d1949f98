//! The cluster side: everything the reconciler reads of Kubernetes (it writes nothing there).
//!
//! - [`KubeCluster`] (`kube_api`): the scope check before any listing, complete paginated
//!   listings of every enabled backend into a [`ClusterSnapshot`] (rule 1: every page, or an
//!   error; never a partial snapshot), the GETs that prove an object absent (rule 2(a)) and
//!   `explain`'s lookups. Every request is timed, retried, mapped to a [`ClusterError`] and
//!   counted in one place.
//! - [`cache`]: the daemon's watch-fed cache, one informer per backend and namespace (list,
//!   then watch with bookmarks), its staleness bounded, and proven fresh for rule 2(c).
//! - [`lean`]: the lean decoding of objects (only the fields kept), shared by listings, watch
//!   events and GETs; [`objects`]: a listing's or informer's objects by namespace and name.
//! - [`client`]: the one place a `kube::Client` is built, with its timeouts.
//! - [`dump`]: the same [`ClusterSnapshot`] read from a `kubectl get -o json` dump, for
//!   offline audits.
//!
//! Which backends are listed, and each one's resource, selector and prefix, is decided once by
//! [`crate::backends`]; this module only reads them.

pub mod cache;
pub mod client;
pub mod dump;
mod kube_api;
pub mod lean;
pub mod objects;

pub use crate::snapshot::{BackendKind, BackendView, ClusterSnapshot, NameMap, ObjectFacts};
pub use kube_api::{
    Absence, KubeCluster, LookupAnswer, ObjectLookup, PageHook, RequestHook, ScopeVerdict,
    UndecodableHook,
};

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
    #[error("{what}: the API server does not serve {resource} (404). This is a configuration error, not an absence: either install the backend's CustomResourceDefinition (agent-sandbox's manifests), or disable the backend (backends.agent_sandbox.enabled = false; centaur's default bare-pod controller installs no Sandbox CRD: use the bare-pod profile, config/centaur.toml); if the CRD is installed, fix backends.agent_sandbox.group, .version or .plural to a served one")]
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
    /// Whether the error is the configuration's, not the cluster's: an enabled backend whose
    /// resource the API server does not serve (exit 2, never an absence).
    pub fn is_configuration(&self) -> bool {
        matches!(self, ClusterError::NotServed { .. })
    }
}
