//! The cluster through the real `kube::Client`: the scope check, listings, the GETs that
//! prove absence, `explain`'s lookups, and the one way every request is made.
//!
//! This file holds [`KubeCluster`] itself (its constructors, hooks and accessors) and the
//! public types; each concern is a child module of `impl KubeCluster` blocks:
//!
//! - `scope` ([`KubeCluster::verify_scope`], [`KubeCluster::verify_served`]): the cluster's
//!   identity, the configured namespaces, a Sandbox the bare-pod backend alone would miss, and
//!   every enabled backend's resource served.
//! - `listing` ([`KubeCluster::snapshot`], `list_into`): built with kube-client's request
//!   builders and decoded lean ([`lean`](super::lean)): pods metadata-only
//!   (`PartialObjectMetadataList`), Sandboxes in full, since `spec` says whether one is paused
//!   on purpose. Every listing is paginated with `limit` + `continue`; a continue token that
//!   expired (410) restarts that listing once, a second expiry aborts. Any error (API status,
//!   timeout, transport, an item without a name, a list of the wrong kind) aborts the
//!   listing: there is no partial snapshot. The watch cache lists, reads revisions and starts
//!   its watches here too.
//! - `lookup` ([`KubeCluster::prove_absent_by_get`]): a GET per namespace, absent only on a
//!   404 whose Status names the object (`names_this_object`); [`KubeCluster::lookup`] asks
//!   the same of every backend and reports each answer.
//! - `request`: every request goes through `KubeCluster::request`, which times it (the
//!   request deadline and the retry policy of `KubeCluster::call`; a watch's start once,
//!   without a deadline), maps its failure to a [`ClusterError`] and counts its answer once
//!   in the request hook (`kube_requests_total`).
//!
//! `scope`, `listing` and `lookup` make their requests through `request` and use nothing of
//! each other's but `scope`'s one page of `listing` (`fetch_page`).

mod listing;
mod lookup;
mod request;
mod scope;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject};
use kube::{Api, Client};

use super::client::{self, ClientOrigin};
use super::{BackendKind, ClusterError};
use crate::backends::{Backend, Backends};
use crate::config::Settings;
use crate::plan::RefusalReason;
use crate::selector::LabelSelector;

/// Called once per API request with the verb ("list"/"get") and HTTP status (0 when no
/// answer arrived); the daemon counts these in `kube_requests_total`.
pub type RequestHook = Arc<dyn Fn(&'static str, u16) + Send + Sync>;

/// Called once per listed page with the backend and the objects on it (progress).
pub type PageHook = Arc<dyn Fn(BackendKind, u64) + Send + Sync>;

/// Called once per object and field found of the wrong type (see [`lean`](super::lean)), with
/// the backend and the field (`"spec.replicas"`); the metrics count these.
pub type UndecodableHook = Arc<dyn Fn(BackendKind, &'static str) + Send + Sync>;

/// Objects already reported undecodable, so each is logged and counted once: (backend,
/// "namespace/name", field). Bounded: past this many it starts afresh.
const UNDECODABLE_REMEMBERED: usize = 10_000;
type UndecodableSeen = Arc<Mutex<HashSet<(BackendKind, Box<str>, &'static str)>>>;

#[derive(Debug, Clone)]
struct SandboxBackend {
    resource: ApiResource,
}

/// One backend's resource, as listed and watched.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub kind: BackendKind,
    /// For messages and permission hints: "pods" or "sandboxes.agents.x-k8s.io".
    pub resource: String,
    /// "/api/v1" or "/apis/{group}/{version}".
    base: String,
    pub plural: String,
    /// The kind a list answer must have.
    list_kind: String,
    /// Pods are read metadata-only; Sandboxes in full, since their spec says whether they
    /// are paused.
    pub metadata_only: bool,
    pub selector: LabelSelector,
    pub prefix: String,
}

impl Target {
    fn of(backend: &Backend) -> Target {
        // Pods are listed metadata-only; Sandboxes in full, for their spec.
        let metadata_only = backend.kind == BackendKind::Pod;
        Target {
            kind: backend.kind,
            resource: backend.resource(),
            base: backend.base_path(),
            plural: backend.plural.clone(),
            list_kind: if metadata_only {
                "PartialObjectMetadataList".into()
            } else {
                format!("{}List", backend.object_kind)
            },
            metadata_only,
            selector: backend.selector.clone(),
            prefix: backend.prefix.clone(),
        }
    }

    /// The collection's path in one namespace, or across all.
    pub fn url_path(&self, ns: Option<&str>) -> String {
        match ns {
            Some(ns) => format!("{}/namespaces/{ns}/{}", self.base, self.plural),
            None => format!("{}/{}", self.base, self.plural),
        }
    }
}

/// What one complete listing took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Listing {
    /// Requests (pages, including a restarted listing).
    pub requests: u64,
    /// The revision the listing was served at.
    pub revision: Option<u64>,
}

/// The answer of a confirming GET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Absence {
    /// Every backend answered 404 (or an empty name-selected list) for the name.
    Absent { evidence: String },
    /// Some backend has an object of that name.
    Present { evidence: String },
}

/// One request of [`KubeCluster::lookup`] and its answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ObjectLookup {
    pub backend: BackendKind,
    /// The namespace asked (`None`: all namespaces).
    pub namespace: Option<String>,
    /// The request, e.g. `GET pods agents/NAME`.
    pub request: String,
    pub answer: LookupAnswer,
}

/// What the API server said about one name in one backend and namespace.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum LookupAnswer {
    /// The object exists (`paused`: a Sandbox paused on purpose; `terminating`: its
    /// deletionTimestamp is set, so it is not absent yet).
    Found {
        namespace: Option<String>,
        paused: bool,
        terminating: bool,
    },
    /// 404 (or no item in a name-selected list): definitively absent here (rule 2(a)).
    Absent,
    /// No definitive answer: the object may exist.
    Error { message: String },
}

/// The answer of [`KubeCluster::verify_scope`]: whether this is the intended cluster and
/// every configured namespace exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeVerdict {
    /// Proceed; the cluster's identity (the `kube-system` Namespace's UID).
    Proceed { cluster_uid: String },
    /// Refuse before any listing: a configured namespace is missing or the cluster is not the
    /// pinned one.
    Refuse {
        reason: RefusalReason,
        detail: String,
        cluster_uid: String,
    },
}

/// The cluster as seen through the Kubernetes API.
#[derive(Clone)]
pub struct KubeCluster {
    client: Client,
    origin: Option<ClientOrigin>,
    namespaces: Option<Vec<String>>,
    page_size: u32,
    timeout: Duration,
    retries: u32,
    pod: bool,
    sandbox: Option<SandboxBackend>,
    /// The agent-sandbox backend's resource while that backend is disabled: a bare-pod-only
    /// sweep first makes sure no Sandbox exists, since a paused Sandbox keeps no pod and its
    /// row would look orphaned.
    sandbox_probe: Option<SandboxBackend>,
    targets: Vec<Target>,
    hook: Option<RequestHook>,
    page_hook: Option<PageHook>,
    undecodable_hook: Option<UndecodableHook>,
    undecodable_seen: UndecodableSeen,
}

impl KubeCluster {
    /// Connects with a kubeconfig, else the in-cluster service account (see [`client`]),
    /// and logs which one and the API server URL.
    pub async fn connect(settings: &Settings) -> Result<KubeCluster, ClusterError> {
        let (client, origin) = client::connect(settings).await?;
        tracing::info!(
            server = %origin.server,
            source = %origin.source,
            "Kubernetes client configured"
        );
        let mut cluster = Self::with_client(client, settings);
        cluster.origin = Some(origin);
        Ok(cluster)
    }

    /// Where the client configuration came from (`None` for an in-process client).
    pub fn origin(&self) -> Option<&ClientOrigin> {
        self.origin.as_ref()
    }

    /// Uses an existing client (in-process callers).
    pub fn with_client(client: Client, settings: &Settings) -> KubeCluster {
        Self::with_backends(
            client,
            settings,
            Backends::from_settings(&settings.backends),
        )
    }

    /// Uses an existing client and lists `backends` (e.g. one of the configured ones).
    pub fn with_backends(client: Client, settings: &Settings, backends: Backends) -> KubeCluster {
        let sandbox_of = |b: &Backend| SandboxBackend {
            resource: ApiResource {
                group: b.group.clone(),
                version: b.version.clone(),
                api_version: b.api_version(),
                kind: b.object_kind.clone(),
                plural: b.plural.clone(),
            },
        };
        let targets = backends.enabled().iter().map(Target::of).collect();
        let sandbox = backends.get(BackendKind::AgentSandbox).map(sandbox_of);
        let sandbox_probe = backends.sandbox_probe().map(sandbox_of);
        let pod = backends.is_enabled(BackendKind::Pod);
        KubeCluster {
            client,
            origin: None,
            namespaces: settings.namespaces().map(<[String]>::to_vec),
            page_size: settings.cluster.page_size,
            timeout: settings.cluster.request_timeout,
            retries: settings.cluster.retries,
            pod,
            sandbox,
            sandbox_probe,
            targets,
            hook: None,
            page_hook: None,
            undecodable_hook: None,
            undecodable_seen: UndecodableSeen::default(),
        }
    }

    /// Installs a per-page observer (progress on a terminal).
    pub fn set_page_hook(&mut self, hook: PageHook) {
        self.page_hook = Some(hook);
    }

    /// Installs a per-request observer (metrics).
    pub fn set_request_hook(&mut self, hook: RequestHook) {
        self.hook = Some(hook);
    }

    /// Installs the observer of objects with fields of the wrong type (metrics).
    pub fn set_undecodable_hook(&mut self, hook: UndecodableHook) {
        self.undecodable_hook = Some(hook);
    }

    /// An object with fields of the wrong type, treated as absent ([`lean`](super::lean)):
    /// logged and counted once per object and field (per process), never an error.
    pub(crate) fn note_undecodable(
        &self,
        kind: BackendKind,
        namespace: &str,
        name: &str,
        fields: &[&'static str],
    ) {
        for field in fields {
            let key = (kind, format!("{namespace}/{name}").into_boxed_str(), *field);
            let first = {
                let mut seen = self
                    .undecodable_seen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if seen.len() >= UNDECODABLE_REMEMBERED {
                    seen.clear();
                }
                seen.insert(key)
            };
            if !first {
                continue;
            }
            tracing::warn!(
                backend = %kind,
                object = %format!("{namespace}/{name}"),
                field = *field,
                "a field of the wrong type, read as absent: the object counts as present and not paused; fix the object or its CustomResourceDefinition's schema"
            );
            if let Some(hook) = &self.undecodable_hook {
                hook(kind, field);
            }
        }
    }

    /// Namespaces to visit: `None` in the list means "all namespaces".
    fn scopes(&self) -> Vec<Option<&str>> {
        match &self.namespaces {
            Some(list) => list.iter().map(|n| Some(n.as_str())).collect(),
            None => vec![None],
        }
    }

    fn pod_api(&self, ns: Option<&str>) -> Api<Pod> {
        match ns {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    fn sandbox_api(&self, sb: &SandboxBackend, ns: Option<&str>) -> Api<DynamicObject> {
        match ns {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &sb.resource),
            None => Api::all_with(self.client.clone(), &sb.resource),
        }
    }

    /// The targets (backend resources) this cluster lists.
    pub(crate) fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The namespaces this cluster lists (`None`: all namespaces).
    pub(crate) fn namespace_scopes(&self) -> Vec<Option<String>> {
        self.scopes()
            .into_iter()
            .map(|n| n.map(str::to_string))
            .collect()
    }
}
