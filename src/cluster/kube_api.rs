//! The cluster through the real `kube::Client`: the scope check, listings, the GETs that
//! prove absence, `explain`'s lookups, and the one way every request is made.
//!
//! - Scope ([`KubeCluster::verify_scope`], [`KubeCluster::verify_served`]): the cluster's
//!   identity, the configured namespaces, a Sandbox the bare-pod backend alone would miss, and
//!   every enabled backend's resource served.
//! - Listings ([`KubeCluster::snapshot`], `list_into`): built with kube-client's request
//!   builders and decoded lean ([`lean`]): pods metadata-only (`PartialObjectMetadataList`),
//!   Sandboxes in full, since `spec` says whether one is paused on purpose. Every listing is
//!   paginated with `limit` + `continue`; a continue token that expired (410) restarts that
//!   listing once, a second expiry aborts. Any error (API status, timeout, transport, an item
//!   without a name, a list of the wrong kind) aborts the listing: there is no partial
//!   snapshot. The watch cache lists, reads revisions and starts its watches here too.
//! - Absence ([`KubeCluster::prove_absent_by_get`]): a GET per namespace, absent only on a 404
//!   whose Status names the object (`names_this_object`); [`KubeCluster::lookup`] asks the
//!   same of every backend and reports each answer.
//! - Requests: every one goes through `KubeCluster::request`, which times it (the request
//!   deadline and the retry policy of `KubeCluster::call`; a watch's start once, without a
//!   deadline), maps its failure to a [`ClusterError`] and counts its answer once in the
//!   request hook (`kube_requests_total`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures::Stream;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ApiResource, DynamicObject, ListParams, WatchEvent, WatchParams};
use kube::{Api, Client};

use super::client::{self, ClientOrigin, WATCH_TIMEOUT_SECONDS};
use super::lean::{self, LeanList, LeanObject};
use super::objects::ObjectMap;
use super::{BackendKind, BackendView, ClusterError, ClusterSnapshot};
use crate::backends::{Backend, Backends};
use crate::config::Settings;
use crate::plan::RefusalReason;
use crate::selector::LabelSelector;

/// Called once per API request with the verb ("list"/"get") and HTTP status (0 when no
/// answer arrived); the daemon counts these in `kube_requests_total`.
pub type RequestHook = Arc<dyn Fn(&'static str, u16) + Send + Sync>;

/// Called once per listed page with the backend and the objects on it (progress).
pub type PageHook = Arc<dyn Fn(BackendKind, u64) + Send + Sync>;

/// Called once per object and field found of the wrong type (see [`lean`]), with the backend
/// and the field (`"spec.replicas"`); the metrics count these.
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

    /// Rule 10: reads the cluster's identity (the `kube-system` Namespace's UID) and checks
    /// that it is the pinned one (`cluster.expected_uid`) and that every configured namespace
    /// exists. A missing namespace is a refusal, not an empty listing: a namespace typo would
    /// otherwise list nothing and make every object look deleted. Needs `get` on those
    /// Namespaces (a ClusterRole limited by `resourceNames`).
    pub async fn verify_scope(
        &self,
        expected_uid: Option<&str>,
    ) -> Result<ScopeVerdict, ClusterError> {
        let kube_system = self.get_namespace("kube-system").await?.ok_or_else(|| {
            ClusterError::Identity(
                "the namespace kube-system does not exist, so the cluster cannot be identified"
                    .into(),
            )
        })?;
        let cluster_uid = kube_system.metadata.uid.clone().ok_or_else(|| {
            ClusterError::Identity("the namespace kube-system has no metadata.uid".into())
        })?;
        if let Some(expected) = expected_uid.filter(|e| *e != cluster_uid) {
            return Ok(ScopeVerdict::Refuse {
                reason: RefusalReason::ClusterMismatch,
                detail: format!(
                    "this is cluster {cluster_uid} (the kube-system Namespace's UID) but cluster.expected_uid is {expected}; check the kubeconfig context or the in-cluster credentials{}",
                    self.origin
                        .as_ref()
                        .map(|o| format!(" ({} at {})", o.source, o.server))
                        .unwrap_or_default()
                ),
                cluster_uid,
            });
        }
        let mut missing = Vec::new();
        for ns in self.namespaces.iter().flatten() {
            match self.get_namespace(ns).await? {
                None => missing.push(ns.clone()),
                Some(n) if n.metadata.deletion_timestamp.is_some() => {
                    tracing::warn!(namespace = %ns, "the namespace is terminating");
                }
                Some(_) => {}
            }
        }
        if !missing.is_empty() {
            return Ok(ScopeVerdict::Refuse {
                reason: RefusalReason::NamespaceMissing,
                detail: format!(
                    "namespace {} of cluster.namespaces does not exist in cluster {cluster_uid}; fix cluster.namespaces (a typo?) or the kubeconfig context",
                    missing.join(", ")
                ),
                cluster_uid,
            });
        }
        if let Some(probe) = &self.sandbox_probe {
            if let Some(found) = self.find_unwatched_sandbox(probe).await? {
                return Ok(ScopeVerdict::Refuse {
                    reason: RefusalReason::SandboxesUnwatched,
                    detail: format!(
                        "{found} exists but backends.agent_sandbox is disabled: a paused Sandbox keeps no pod, so the bare-pod backend alone would take its session for an orphan; this cluster runs the agent-sandbox controller: use config/centaur-migration.toml (both backends) or config/centaur-agent-sandbox.toml"
                    ),
                    cluster_uid,
                });
            }
        }
        Ok(ScopeVerdict::Proceed { cluster_uid })
    }

    /// A Sandbox in a configured namespace, while the agent-sandbox backend is disabled:
    /// `None` when the API server does not serve the resource (discovery answers 404, as on
    /// centaur's bare-pod clusters, where no CRD is installed) or no Sandbox exists there.
    /// Discovery needs no permission; the `LIST ?limit=1` needs `list` on the resource.
    async fn find_unwatched_sandbox(
        &self,
        probe: &SandboxBackend,
    ) -> Result<Option<String>, ClusterError> {
        let r = &probe.resource;
        let what = format!("checking for Sandboxes ({}.{})", r.plural, r.group);
        let path = format!("/apis/{}/{}", r.group, r.version);
        let discovery = || async {
            let request = http::Request::get(path.as_str())
                .body(Vec::new())
                .map_err(|e| {
                    kube::Error::BuildRequest(kube::core::request::Error::BuildRequest(e))
                })?;
            self.client.request_text(request).await
        };
        let answer = self
            .request("get", &what, &path, Timing::Deadline, discovery, |_| 200)
            .await;
        let document = match answer {
            // Discovery answers 404 for a group/version nobody serves: no Sandbox here.
            Err(ClusterError::NotServed { .. }) => return Ok(None),
            other => other?,
        };
        let served = serde_json::from_str::<serde_json::Value>(&document)
            .ok()
            .and_then(|d| d["resources"].as_array().cloned())
            .is_some_and(|list| list.iter().any(|x| x["name"] == r.plural.as_str()));
        if !served {
            return Ok(None);
        }
        let resource = format!("{}.{}", r.plural, r.group);
        for ns in self.scopes() {
            let api = self.sandbox_api(probe, ns);
            let lp = ListParams::default().limit(1);
            let list = self
                .request(
                    "list",
                    &what,
                    &resource,
                    Timing::Deadline,
                    || api.list_metadata(&lp),
                    |_| 200,
                )
                .await?;
            if let Some(item) = list.items.first() {
                return Ok(Some(format!(
                    "Sandbox {}/{}",
                    item.metadata.namespace.as_deref().or(ns).unwrap_or("?"),
                    item.metadata.name.as_deref().unwrap_or("?")
                )));
            }
        }
        Ok(None)
    }

    /// Checks that the API server serves every enabled backend's resource, with one
    /// `LIST ?limit=1` per backend (in the first configured namespace). A backend that is
    /// not served is [`ClusterError::NotServed`]: a configuration error, never an absence.
    pub async fn verify_served(&self) -> Result<(), ClusterError> {
        let ns = self.scopes().into_iter().next().flatten();
        for target in &self.targets {
            let what = format!("checking that the API server serves {}", target.resource);
            self.fetch_page(target, ns, &ListParams::default().limit(1), &what)
                .await?;
        }
        Ok(())
    }

    /// GETs one Namespace; `None` only on a 404 `NotFound` Status.
    async fn get_namespace(&self, name: &str) -> Result<Option<Namespace>, ClusterError> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let what = format!("reading namespace {name}");
        // `get_opt` answers a 404 as `None`: counted as the 404 it was.
        let counted_as = |ns: &Option<Namespace>| if ns.is_some() { 200 } else { 404 };
        self.request(
            "get",
            &what,
            "namespaces",
            Timing::Deadline,
            || api.get_opt(name),
            counted_as,
        )
        .await
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

    /// Runs one API request with the reconciler's retry policy, the whole within the request
    /// deadline (`cluster.request_timeout_seconds`): 429, 503 and 504 answers are retried up to
    /// `cluster.retries` times, after the server's `Retry-After` (its Status'
    /// `details.retryAfterSeconds`) when it gives one and it fits the deadline, else after an
    /// exponential backoff from 100 ms. Nothing else is retried: any other failure aborts
    /// the sweep. Each retried answer is counted in `kube_requests_total` here; the final
    /// answer is counted by [`Self::request`], the only caller. (kube's own retry layer is
    /// off, see `client`.)
    async fn call<T, Fut>(
        &self,
        verb: &'static str,
        attempt: impl Fn() -> Fut,
    ) -> Result<kube::Result<T>, tokio::time::error::Elapsed>
    where
        Fut: std::future::Future<Output = kube::Result<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(100);
        let mut retries = 0;
        loop {
            let answer = tokio::time::timeout_at(deadline, attempt()).await?;
            let status = match &answer {
                Err(kube::Error::Api(status))
                    if matches!(status.code, 429 | 503 | 504) && retries < self.retries =>
                {
                    status
                }
                _ => return Ok(answer),
            };
            let delay = status
                .details
                .as_ref()
                .map(|d| Duration::from_secs(u64::from(d.retry_after_seconds)))
                .filter(|d| !d.is_zero())
                .unwrap_or(backoff);
            if tokio::time::Instant::now() + delay >= deadline {
                return Ok(answer);
            }
            self.note_code(verb, status.code);
            tracing::debug!(
                code = status.code,
                delay_ms = delay.as_millis() as u64,
                "retrying an API request"
            );
            retries += 1;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            tokio::time::sleep(delay).await;
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

    /// An object with fields of the wrong type, treated as absent ([`lean`]): logged and
    /// counted once per object and field (per process), never an error.
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

    /// Counts one request's answer in the request hook (`code` 0: no answer).
    fn note_code(&self, verb: &'static str, code: u16) {
        if let Some(hook) = &self.hook {
            hook(verb, code);
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

    /// Lists every enabled backend completely, pods and Sandboxes concurrently. The
    /// snapshot's clock is the moment the listing started.
    pub async fn snapshot(&self) -> Result<ClusterSnapshot, ClusterError> {
        let mut snapshot = ClusterSnapshot::new(Utc::now());
        let views =
            futures::future::try_join_all(self.targets.iter().map(|t| self.list_backend(t)))
                .await?;
        snapshot.backends = views;
        Ok(snapshot)
    }

    /// Every namespace of one backend, into one view.
    async fn list_backend(&self, target: &Target) -> Result<BackendView, ClusterError> {
        let mut view = BackendView::new(target.kind, &target.prefix);
        for ns in self.scopes() {
            let (objects, listing) = self.list_into(target, ns).await?;
            view.reserve(objects.names());
            for (name, facts) in objects.iter() {
                view.insert(name, facts);
            }
            view.requests += listing.requests;
        }
        Ok(view)
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

    /// Lists one backend in one namespace (or all) completely, into a map that is returned
    /// only whole: every page of one paginated LIST with `resourceVersion` unset, which the
    /// API server serves at one revision (never `resourceVersion=0`, which may be stale). A 410
    /// on a continue token restarts the whole listing, once, from an empty map. Objects are
    /// decoded lean ([`LeanObject`](super::lean::LeanObject)) and listed without the label
    /// selector: presence is by name, as a GET's is; the selector only marks the platform's
    /// objects (`managed`). The map is keyed by namespace and name (a listing of all
    /// namespaces can hold one name twice).
    pub(crate) async fn list_into(
        &self,
        target: &Target,
        ns: Option<&str>,
    ) -> Result<(ObjectMap, Listing), ClusterError> {
        let what = describe(&target.plural, ns);
        let mut objects = ObjectMap::default();
        let mut requests = 0u64;
        let mut restarted = false;
        let mut token: Option<String> = None;
        let mut revision = None;
        loop {
            let mut lp = ListParams::default().limit(self.page_size);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            requests += 1;
            let page = match self.fetch_page(target, ns, &lp, &what).await {
                Err(ClusterError::Api { code: 410, .. }) if token.is_some() => {
                    if restarted {
                        return Err(ClusterError::Expired { what });
                    }
                    tracing::warn!(
                        listing = %what,
                        "continue token expired (410); restarting the listing from its first page"
                    );
                    restarted = true;
                    token = None;
                    revision = None;
                    objects.clear();
                    continue;
                }
                other => other?,
            };
            if page.kind != target.list_kind {
                return Err(ClusterError::Malformed {
                    what,
                    message: format!(
                        "expected a {} but got kind {:?}",
                        target.list_kind, page.kind
                    ),
                });
            }
            if let Some(hook) = &self.page_hook {
                hook(target.kind, page.items.len() as u64);
            }
            if token.is_none() {
                // The first page's revision is the listing's: every page is served at it.
                revision = page
                    .metadata
                    .resource_version
                    .as_deref()
                    .and_then(lean::revision);
            }
            for object in &page.items {
                let name = object
                    .metadata
                    .name
                    .as_deref()
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| ClusterError::Malformed {
                        what: what.clone(),
                        message: "an item has no metadata.name".into(),
                    })?;
                let namespace = object.metadata.namespace.as_deref().or(ns).unwrap_or("");
                let odd = object.undecodable();
                if !odd.is_empty() {
                    self.note_undecodable(target.kind, namespace, name, odd);
                }
                objects.insert(namespace, name, object.facts(&target.selector));
            }
            match page.metadata.continue_.filter(|t| !t.is_empty()) {
                Some(next) => token = Some(next),
                None => return Ok((objects, Listing { requests, revision })),
            }
        }
    }

    /// One page, with the request deadline, counted in the request hook.
    async fn fetch_page(
        &self,
        target: &Target,
        ns: Option<&str>,
        lp: &ListParams,
        what: &str,
    ) -> Result<LeanList, ClusterError> {
        let request = kube::core::Request::new(target.url_path(ns));
        let built = if target.metadata_only {
            request.list_metadata(lp)
        } else {
            request.list(lp)
        }
        .map_err(|e| ClusterError::Malformed {
            what: what.to_string(),
            message: e.to_string(),
        })?;
        let page = || self.client.request::<LeanList>(clone_request(&built));
        self.request(
            "list",
            what,
            &target.resource,
            Timing::Deadline,
            page,
            |_| 200,
        )
        .await
    }

    /// Every API request goes through here: timed (within the request deadline and with the
    /// retry policy of [`Self::call`], or, for a watch's start, once and without a deadline),
    /// its final answer counted once in the request hook, and its failure mapped to a
    /// [`ClusterError`] naming `what` and, for a 403 or a 404 on a listing or GET, `verb` on
    /// `resource`. A success is counted as `counted_as` says: 200, or 404 for a GET whose
    /// not-found answer the attempt turned into a value.
    async fn request<T, Fut>(
        &self,
        verb: &'static str,
        what: &str,
        resource: &str,
        timing: Timing,
        attempt: impl Fn() -> Fut,
        counted_as: impl FnOnce(&T) -> u16,
    ) -> Result<T, ClusterError>
    where
        Fut: std::future::Future<Output = kube::Result<T>>,
    {
        let answer = match timing {
            Timing::Deadline => self.call(verb, attempt).await,
            Timing::Unbounded => Ok(attempt().await),
        };
        match answer {
            Err(_) => {
                self.note_code(verb, 0);
                Err(ClusterError::Timeout {
                    what: what.to_string(),
                    seconds: self.timeout.as_secs(),
                })
            }
            Ok(Err(e)) => {
                let err = map_error(what, verb, resource, e);
                self.note_code(verb, api_code(&err));
                Err(err)
            }
            Ok(Ok(value)) => {
                self.note_code(verb, counted_as(&value));
                Ok(value)
            }
        }
    }

    /// The API server's current revision for a target: a quorum `LIST ?limit=1` (no
    /// resourceVersion), whose list revision is the store's revision at that moment.
    pub(crate) async fn current_revision(
        &self,
        target: &Target,
        ns: Option<&str>,
    ) -> Result<u64, ClusterError> {
        let what = format!("reading the current revision of {}", target.plural);
        let page = self
            .fetch_page(target, ns, &ListParams::default().limit(1), &what)
            .await?;
        page.metadata
            .resource_version
            .as_deref()
            .and_then(lean::revision)
            .ok_or(ClusterError::Malformed {
                what,
                message: "the list has no integer metadata.resourceVersion".into(),
            })
    }

    /// Starts a watch of one target from `revision`, with bookmarks and the server-side
    /// timeout [`WATCH_TIMEOUT_SECONDS`], for the cache. Its answer is counted (verb `watch`)
    /// like every request's; a 410 is a [`ClusterError::Api`] with that code.
    pub(crate) async fn start_watch(
        &self,
        target: &Target,
        ns: Option<&str>,
        revision: u64,
    ) -> Result<impl Stream<Item = kube::Result<WatchEvent<LeanObject>>>, ClusterError> {
        let what = format!("watching {}", describe_scope(&target.plural, ns));
        // WatchParams asks for bookmarks by default (allowWatchBookmarks=true).
        let params = WatchParams::default().timeout(WATCH_TIMEOUT_SECONDS);
        let request = kube::core::Request::new(target.url_path(ns));
        let built = if target.metadata_only {
            request.watch_metadata(&params, &revision.to_string())
        } else {
            request.watch(&params, &revision.to_string())
        }
        .map_err(|e| ClusterError::Malformed {
            what: what.clone(),
            message: e.to_string(),
        })?;
        let watch = || {
            self.client
                .request_events::<LeanObject>(clone_request(&built))
        };
        self.request(
            "watch",
            &what,
            &target.resource,
            Timing::Unbounded,
            watch,
            |_| 200,
        )
        .await
    }

    /// Proves that the backend the row is attributed to has no object named `name`, by a
    /// direct GET in each namespace (or, when listing all namespaces, a list selected by
    /// `metadata.name`); a row of no single backend (`Unknown`) is asked of every enabled
    /// backend. Only a 404 whose Status names the object counts as absent
    /// ([`names_this_object`]); any other answer is an error and the row is left alone.
    ///
    /// One GET per orphan, not one per backend: a backend's distinguishing
    /// `object_name_prefix` says the name is not the other backend's object (an agent-sandbox
    /// Sandbox's pod shares its name, but the Sandbox is what backs the session). The sweep
    /// only asks about names its view found in no backend at all.
    pub async fn prove_absent_by_get(
        &self,
        name: &str,
        backend: BackendKind,
    ) -> Result<Absence, ClusterError> {
        let mut evidence = Vec::new();
        let pods = self.pod && backend != BackendKind::AgentSandbox;
        let sandboxes = self
            .sandbox
            .as_ref()
            .filter(|_| backend != BackendKind::Pod);
        for ns in self.scopes() {
            if pods {
                let api = self.pod_api(ns);
                let seen = self.probe(&api, &ResourceId::PODS, ns, name).await?;
                match seen {
                    Some(e) => return Ok(Absence::Present { evidence: e }),
                    None => evidence.push(probe_text("pods", ns, name)),
                }
            }
            if let Some(sb) = sandboxes {
                let api = self.sandbox_api(sb, ns);
                let id = ResourceId {
                    group: &sb.resource.group,
                    plural: &sb.resource.plural,
                    kind: &sb.resource.kind,
                };
                let seen = self.probe(&api, &id, ns, name).await?;
                match seen {
                    Some(e) => return Ok(Absence::Present { evidence: e }),
                    None => evidence.push(probe_text(&sb.resource.plural, ns, name)),
                }
            }
        }
        Ok(Absence::Absent {
            evidence: evidence.join("; "),
        })
    }

    /// Looks the object named `name` up in every enabled backend and namespace, each with its
    /// own request (a GET, or across all namespaces a LIST selected by `metadata.name`), and
    /// returns every answer, errors included: `explain`'s evidence of rule 2(a). Only reads.
    pub async fn lookup(&self, name: &str) -> Vec<ObjectLookup> {
        let mut out = Vec::new();
        for ns in self.scopes() {
            let verb = if ns.is_some() { "get" } else { "list" };
            let by_name = ListParams::default().fields(&format!("metadata.name={name}"));
            if self.pod {
                let api = self.pod_api(ns);
                let answer = self
                    .lookup_one("pods", ns, name, verb, || async {
                        match ns {
                            Some(_) => match api.get_metadata(name).await {
                                Ok(o) => Ok(Some((o.metadata, false))),
                                Err(kube::Error::Api(status))
                                    if names_this_object(&status, name, &ResourceId::PODS) =>
                                {
                                    Ok(None)
                                }
                                Err(e) => Err(e),
                            },
                            None => {
                                let list = api.list_metadata(&by_name).await?;
                                Ok(list.items.into_iter().next().map(|m| (m.metadata, false)))
                            }
                        }
                    })
                    .await;
                out.push(ObjectLookup {
                    backend: BackendKind::Pod,
                    namespace: ns.map(str::to_string),
                    request: request_text(verb, "pods", ns, name),
                    answer,
                });
            }
            if let Some(sb) = &self.sandbox {
                let api = self.sandbox_api(sb, ns);
                let plural = sb.resource.plural.clone();
                let id = ResourceId {
                    group: &sb.resource.group,
                    plural: &sb.resource.plural,
                    kind: &sb.resource.kind,
                };
                let answer = self
                    .lookup_one(&plural, ns, name, verb, || async {
                        let found = match ns {
                            // Absence decided as the confirming GET decides it.
                            Some(_) => match api.get(name).await {
                                Ok(o) => Some(o),
                                Err(kube::Error::Api(status))
                                    if names_this_object(&status, name, &id) =>
                                {
                                    None
                                }
                                Err(e) => return Err(e),
                            },
                            None => api.list(&by_name).await?.items.into_iter().next(),
                        };
                        Ok(found.map(|o| {
                            let paused = lean::sandbox_is_suspended(&o.data);
                            (o.metadata, paused)
                        }))
                    })
                    .await;
                out.push(ObjectLookup {
                    backend: BackendKind::AgentSandbox,
                    namespace: ns.map(str::to_string),
                    request: request_text(verb, &plural, ns, name),
                    answer,
                });
            }
        }
        out
    }

    /// One request of [`KubeCluster::lookup`], with the retry policy and the deadline.
    async fn lookup_one<Fut>(
        &self,
        resource: &str,
        ns: Option<&str>,
        name: &str,
        verb: &'static str,
        attempt: impl Fn() -> Fut,
    ) -> LookupAnswer
    where
        Fut: std::future::Future<
            Output = kube::Result<
                Option<(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
                    bool,
                )>,
            >,
        >,
    {
        let what = format!(
            "looking up {resource} {}{name}",
            ns.map(|n| format!("{n}/")).unwrap_or_default()
        );
        let counted_as = |found: &Option<_>| absence_code(found.is_none(), ns);
        let answer = self
            .request(verb, &what, resource, Timing::Deadline, attempt, counted_as)
            .await;
        match answer {
            Err(err) => LookupAnswer::Error {
                message: err.to_string(),
            },
            Ok(None) => LookupAnswer::Absent,
            Ok(Some((meta, paused))) => LookupAnswer::Found {
                namespace: meta.namespace.or(ns.map(str::to_string)),
                terminating: meta.deletion_timestamp.is_some(),
                paused,
            },
        }
    }

    /// One probe: `Some(evidence)` when the object exists, `None` on a definitive absence:
    /// a 404 whose Status names this object ([`names_this_object`]), or, across all
    /// namespaces, a complete name-selected list without items. Any other answer is an error,
    /// a 404 for a path the server does not serve included ([`ClusterError::NotServed`]).
    async fn probe<K>(
        &self,
        api: &Api<K>,
        resource: &ResourceId<'_>,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Option<String>, ClusterError>
    where
        K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let what = format!(
            "confirming {} {}{name}",
            resource.plural,
            ns.map(|n| format!("{n}/")).unwrap_or_default()
        );
        let verb = if ns.is_some() { "get" } else { "list" };
        let request = || async {
            match ns {
                Some(_) => match api.get_metadata(name).await {
                    Ok(object) => Ok(Some(object.metadata)),
                    // Decided here, not by kube's `is_not_found`: only the Status naming
                    // this very object is its absence.
                    Err(kube::Error::Api(status)) if names_this_object(&status, name, resource) => {
                        Ok(None)
                    }
                    Err(e) => Err(e),
                },
                // No namespace to GET in: list by name across all namespaces instead.
                None => {
                    let lp = ListParams::default().fields(&format!("metadata.name={name}"));
                    let list = api.list_metadata(&lp).await?;
                    Ok(list.items.into_iter().next().map(|m| m.metadata))
                }
            }
        };
        let counted_as = |found: &Option<_>| absence_code(found.is_none(), ns);
        let qualified = resource.qualified();
        let found = self
            .request(
                verb,
                &what,
                &qualified,
                Timing::Deadline,
                request,
                counted_as,
            )
            .await?;
        Ok(found.map(|meta| {
            format!(
                "{} {}/{name} exists{}",
                resource.plural,
                meta.namespace.as_deref().or(ns).unwrap_or("?"),
                terminating_note(&meta)
            )
        }))
    }
}

/// How [`KubeCluster::request`] times a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timing {
    /// Within the request deadline, 429, 503 and 504 retried ([`KubeCluster::call`]).
    Deadline,
    /// Once, without a deadline: a watch's start, which the cache's own freshness check
    /// bounds (a watch that does not start is as stale as a frozen one).
    Unbounded,
}

/// The code a definitive absence is counted as: a GET's 404, or a name-selected list's 200.
fn absence_code(absent: bool, ns: Option<&str>) -> u16 {
    if absent && ns.is_some() {
        404
    } else {
        200
    }
}

/// A resource as the API server names it in a `NotFound` Status' details.
#[derive(Debug, Clone, Copy)]
struct ResourceId<'a> {
    group: &'a str,
    plural: &'a str,
    kind: &'a str,
}

impl ResourceId<'_> {
    const PODS: ResourceId<'static> = ResourceId {
        group: "",
        plural: "pods",
        kind: "Pod",
    };

    /// "pods", or "sandboxes.agents.x-k8s.io".
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// Rule 2(a): whether a 404 says that this very object does not exist. The API server answers
/// a missing object with a `NotFound` Status whose details name it: `details.name` is the
/// name, `details.kind` the resource's plural (`pods "x" not found`; some servers write the
/// kind) and `details.group` its group. A path it does not serve answers 404 too, naming no
/// object: a Status `the server could not find the requested resource` with empty details
/// (a resource its group/version lacks), or a plain-text `404 page not found` from its mux
/// (a group/version nobody serves: a CRD not installed, a wrong version, a proxy). Those say
/// nothing about the object and are errors, whatever a client library makes of them.
fn names_this_object(status: &kube::core::Status, name: &str, resource: &ResourceId<'_>) -> bool {
    status.code == 404
        && status.reason == "NotFound"
        && status.details.as_ref().is_some_and(|d| {
            d.name == name
                && (d.kind == resource.plural || d.kind == resource.kind)
                && d.group == resource.group
        })
}

fn terminating_note(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> &'static str {
    if meta.deletion_timestamp.is_some() {
        " (terminating)"
    } else {
        ""
    }
}

/// The request a lookup made, as an operator would type it.
fn request_text(verb: &str, resource: &str, ns: Option<&str>, name: &str) -> String {
    match ns {
        Some(ns) => format!("{} {resource} {ns}/{name}", verb.to_uppercase()),
        None => format!(
            "{} {resource} --all-namespaces metadata.name={name}",
            verb.to_uppercase()
        ),
    }
}

fn probe_text(resource: &str, ns: Option<&str>, name: &str) -> String {
    match ns {
        Some(ns) => format!("GET {resource} {ns}/{name}: 404"),
        None => format!("LIST {resource} metadata.name={name}: 0 items"),
    }
}

fn describe(resource: &str, ns: Option<&str>) -> String {
    format!("listing {}", describe_scope(resource, ns))
}

/// "pods in namespace agents", or "pods in all namespaces".
fn describe_scope(resource: &str, ns: Option<&str>) -> String {
    match ns {
        Some(ns) => format!("{resource} in namespace {ns}"),
        None => format!("{resource} in all namespaces"),
    }
}

fn api_code(err: &ClusterError) -> u16 {
    match err {
        ClusterError::Api { code, .. } => *code,
        ClusterError::Forbidden { .. } => 403,
        ClusterError::NotServed { .. } => 404,
        _ => 0,
    }
}

fn map_error(what: &str, verb: &'static str, resource: &str, e: kube::Error) -> ClusterError {
    match e {
        kube::Error::Api(status) if status.code == 403 => ClusterError::Forbidden {
            what: what.to_string(),
            verb,
            resource: resource.to_string(),
            message: status.message.clone(),
        },
        // A 404 that reached here names no object (a listing's never does; a GET's that names
        // its object is absence, decided by the caller): the path is not served.
        kube::Error::Api(status) if status.code == 404 && matches!(verb, "list" | "get") => {
            ClusterError::NotServed {
                what: what.to_string(),
                resource: resource.to_string(),
            }
        }
        kube::Error::Api(status) => ClusterError::Api {
            what: what.to_string(),
            code: status.code,
            reason: status.reason.clone(),
            message: truncate(&status.message, 300),
        },
        kube::Error::SerdeError(e) => ClusterError::Malformed {
            what: what.to_string(),
            message: e.to_string(),
        },
        other => ClusterError::Transport {
            what: what.to_string(),
            message: other.to_string(),
        },
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A copy of a built request (an `http::Request<Vec<u8>>` is not `Clone`), for retries.
fn clone_request(request: &http::Request<Vec<u8>>) -> http::Request<Vec<u8>> {
    let mut copy = http::Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    copy
}
