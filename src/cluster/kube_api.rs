//! Listing and confirming through the real `kube::Client`.
//!
//! Pods are listed metadata-only (`PartialObjectMetadataList`); Sandboxes are listed as
//! `DynamicObject`s because `spec` says whether one is paused on purpose. Every listing is
//! paginated with `limit` + `continue`; a continue token that expired (410) restarts that
//! listing once, a second expiry aborts. Every request has a deadline. Any error — API status,
//! timeout, transport, an item without a name, a list of the wrong kind — aborts the listing:
//! there is no partial snapshot.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ApiResource, DynamicObject, ListParams, ObjectList};
use kube::{Api, Client};

use super::client::{self, ClientOrigin};
use super::{BackendKind, BackendView, ClusterError, ClusterSnapshot, ObjectFacts};
use crate::config::Settings;
use crate::plan::RefusalReason;

/// Called once per API request with the verb ("list"/"get") and HTTP status (0 when no
/// answer arrived); the daemon counts these in `kube_requests_total`.
pub type RequestHook = Arc<dyn Fn(&'static str, u16) + Send + Sync>;

#[derive(Debug, Clone)]
struct PodBackend {
    selector: String,
    prefix: String,
}

#[derive(Debug, Clone)]
struct SandboxBackend {
    resource: ApiResource,
    selector: String,
    prefix: String,
}

/// The answer of a confirming GET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Absence {
    /// Every backend answered 404 (or an empty name-selected list) for the name.
    Absent { evidence: String },
    /// Some backend has an object of that name.
    Present { evidence: String },
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
    pod: Option<PodBackend>,
    sandbox: Option<SandboxBackend>,
    hook: Option<RequestHook>,
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
        Ok(ScopeVerdict::Proceed { cluster_uid })
    }

    /// GETs one Namespace; `None` only on a 404 `NotFound` Status.
    async fn get_namespace(&self, name: &str) -> Result<Option<Namespace>, ClusterError> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let what = format!("reading namespace {name}");
        match tokio::time::timeout(self.timeout, api.get_opt(name)).await {
            Err(_) => {
                self.note("get", Err(0));
                Err(ClusterError::Timeout {
                    what,
                    seconds: self.timeout.as_secs(),
                })
            }
            Ok(Err(e)) => {
                let err = map_error(&what, "get", "namespaces", e);
                self.note("get", Err(api_code(&err)));
                Err(err)
            }
            Ok(Ok(None)) => {
                self.note("get", Err(404));
                Ok(None)
            }
            Ok(Ok(Some(ns))) => {
                self.note("get", Ok(()));
                Ok(Some(ns))
            }
        }
    }

    /// Uses an existing client (in-process callers).
    pub fn with_client(client: Client, settings: &Settings) -> KubeCluster {
        let b = &settings.backends;
        let pod = b.pod.enabled.then(|| PodBackend {
            selector: b.pod.label_selector.trim().to_string(),
            prefix: b.pod.object_name_prefix.clone(),
        });
        let s = &b.agent_sandbox;
        let sandbox = s.enabled.then(|| SandboxBackend {
            resource: ApiResource {
                group: s.group.clone(),
                version: s.version.clone(),
                api_version: format!("{}/{}", s.group, s.version),
                kind: s.kind.clone(),
                plural: s.plural.clone(),
            },
            selector: s.label_selector.trim().to_string(),
            prefix: s.object_name_prefix.clone(),
        });
        KubeCluster {
            client,
            origin: None,
            namespaces: settings.namespaces().map(<[String]>::to_vec),
            page_size: settings.cluster.page_size,
            timeout: Duration::from_secs(settings.cluster.request_timeout_seconds),
            pod,
            sandbox,
            hook: None,
        }
    }

    /// Installs a per-request observer (metrics).
    pub fn set_request_hook(&mut self, hook: RequestHook) {
        self.hook = Some(hook);
    }

    fn note(&self, verb: &'static str, result: Result<(), u16>) {
        if let Some(hook) = &self.hook {
            hook(verb, result.map_or_else(|code| code, |()| 200));
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

    /// Lists every enabled backend completely. The snapshot's clock is the moment the
    /// listing started.
    pub async fn snapshot(&self) -> Result<ClusterSnapshot, ClusterError> {
        let mut snapshot = ClusterSnapshot::new(Utc::now());
        if let Some(pod) = &self.pod {
            let mut view = BackendView::new(BackendKind::Pod, &pod.prefix);
            for ns in self.scopes() {
                let api = self.pod_api(ns);
                let what = describe("pods", ns);
                let base = selector_params(&pod.selector);
                view.requests += self
                    .list_complete(
                        &what,
                        "list",
                        "pods",
                        &["PartialObjectMetadataList"],
                        |lp| {
                            let api = api.clone();
                            async move { api.list_metadata(&lp).await }
                        },
                        base,
                        |item| record(&mut view, &item.metadata, false),
                    )
                    .await?;
            }
            snapshot.backends.push(view);
        }
        if let Some(sb) = &self.sandbox {
            let mut view = BackendView::new(BackendKind::AgentSandbox, &sb.prefix);
            let list_kind = format!("{}List", sb.resource.kind);
            for ns in self.scopes() {
                let api = self.sandbox_api(sb, ns);
                let what = describe(&sb.resource.plural, ns);
                let base = selector_params(&sb.selector);
                let resource = format!("{}.{}", sb.resource.plural, sb.resource.group);
                view.requests += self
                    .list_complete(
                        &what,
                        "list",
                        &resource,
                        &[list_kind.as_str()],
                        |lp| {
                            let api = api.clone();
                            async move { api.list(&lp).await }
                        },
                        base,
                        |item| record(&mut view, &item.metadata, sandbox_is_suspended(&item.data)),
                    )
                    .await?;
            }
            snapshot.backends.push(view);
        }
        Ok(snapshot)
    }

    /// Pages through one listing until `continue` is empty; returns the request count.
    #[allow(clippy::too_many_arguments)]
    async fn list_complete<T, F, Fut>(
        &self,
        what: &str,
        verb: &'static str,
        resource: &str,
        expected_kinds: &[&str],
        fetch: F,
        base: ListParams,
        mut on_item: impl FnMut(&T) -> Result<(), &'static str>,
    ) -> Result<u64, ClusterError>
    where
        T: Clone,
        F: Fn(ListParams) -> Fut,
        Fut: Future<Output = kube::Result<ObjectList<T>>>,
    {
        let mut requests = 0u64;
        let mut restarted = false;
        let mut token: Option<String> = None;
        loop {
            let mut lp = base.clone().limit(self.page_size);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            requests += 1;
            let answer = tokio::time::timeout(self.timeout, fetch(lp)).await;
            let page = match answer {
                Err(_) => {
                    self.note(verb, Err(0));
                    return Err(ClusterError::Timeout {
                        what: what.to_string(),
                        seconds: self.timeout.as_secs(),
                    });
                }
                Ok(Err(kube::Error::Api(status))) if status.code == 410 && token.is_some() => {
                    self.note(verb, Err(410));
                    if restarted {
                        return Err(ClusterError::Expired {
                            what: what.to_string(),
                        });
                    }
                    tracing::warn!(
                        listing = what,
                        "continue token expired (410); restarting the listing once"
                    );
                    restarted = true;
                    token = None;
                    continue;
                }
                Ok(Err(e)) => {
                    let err = map_error(what, verb, resource, e);
                    self.note(verb, Err(api_code(&err)));
                    return Err(err);
                }
                Ok(Ok(page)) => page,
            };
            self.note(verb, Ok(()));
            if !expected_kinds.iter().any(|k| *k == page.types.kind) {
                return Err(ClusterError::Malformed {
                    what: what.to_string(),
                    message: format!(
                        "expected a {} but got kind {:?}",
                        expected_kinds.join(" or "),
                        page.types.kind
                    ),
                });
            }
            for item in &page.items {
                on_item(item).map_err(|message| ClusterError::Malformed {
                    what: what.to_string(),
                    message: message.to_string(),
                })?;
            }
            match page.metadata.continue_.filter(|t| !t.is_empty()) {
                Some(next) => token = Some(next),
                None => return Ok(requests),
            }
        }
    }

    /// Confirms that no enabled backend has an object named `name`, by direct GETs (or, when
    /// listing all namespaces, a list selected by `metadata.name`). Only 404 counts as absent;
    /// any other failure is an error and the row is left alone.
    pub async fn confirm_absent(&self, name: &str) -> Result<Absence, ClusterError> {
        let mut evidence = Vec::new();
        for ns in self.scopes() {
            if self.pod.is_some() {
                let api = self.pod_api(ns);
                let seen = self.probe(&api, "pods", ns, name).await?;
                match seen {
                    Some(e) => return Ok(Absence::Present { evidence: e }),
                    None => evidence.push(probe_text("pods", ns, name)),
                }
            }
            if let Some(sb) = &self.sandbox {
                let api = self.sandbox_api(sb, ns);
                let seen = self.probe(&api, &sb.resource.plural, ns, name).await?;
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

    /// One probe: `Some(evidence)` when the object exists, `None` on a definitive 404.
    async fn probe<K>(
        &self,
        api: &Api<K>,
        resource: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Option<String>, ClusterError>
    where
        K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let what = format!(
            "confirming {resource} {}{name}",
            ns.map(|n| format!("{n}/")).unwrap_or_default()
        );
        let verb = if ns.is_some() { "get" } else { "list" };
        let request = async {
            match ns {
                Some(_) => api
                    .get_metadata_opt(name)
                    .await
                    .map(|o| o.map(|m| m.metadata)),
                // No namespace to GET in: list by name across all namespaces instead.
                None => {
                    let lp = ListParams::default().fields(&format!("metadata.name={name}"));
                    let list = api.list_metadata(&lp).await?;
                    Ok(list.items.into_iter().next().map(|m| m.metadata))
                }
            }
        };
        match tokio::time::timeout(self.timeout, request).await {
            Err(_) => {
                self.note(verb, Err(0));
                Err(ClusterError::Timeout {
                    what,
                    seconds: self.timeout.as_secs(),
                })
            }
            Ok(Err(e)) => {
                let err = map_error(&what, verb, resource, e);
                self.note(verb, Err(api_code(&err)));
                Err(err)
            }
            Ok(Ok(None)) => {
                self.note(verb, if ns.is_some() { Err(404) } else { Ok(()) });
                Ok(None)
            }
            Ok(Ok(Some(meta))) => {
                self.note(verb, Ok(()));
                Ok(Some(format!(
                    "{resource} {}/{name} exists{}",
                    meta.namespace.as_deref().or(ns).unwrap_or("?"),
                    terminating_note(&meta)
                )))
            }
        }
    }
}

/// Adds one listed object to `view`; an object without a name makes the listing malformed.
fn record(
    view: &mut BackendView,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    suspended: bool,
) -> Result<(), &'static str> {
    let name = meta.name.as_deref().ok_or("an item has no metadata.name")?;
    view.insert(
        name,
        ObjectFacts {
            terminating: meta.deletion_timestamp.is_some(),
            suspended,
        },
    );
    Ok(())
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

fn probe_text(resource: &str, ns: Option<&str>, name: &str) -> String {
    match ns {
        Some(ns) => format!("GET {resource} {ns}/{name}: 404"),
        None => format!("LIST {resource} metadata.name={name}: 0 items"),
    }
}

fn selector_params(selector: &str) -> ListParams {
    if selector.is_empty() {
        ListParams::default()
    } else {
        ListParams::default().labels(selector)
    }
}

fn describe(resource: &str, ns: Option<&str>) -> String {
    match ns {
        Some(ns) => format!("listing {resource} in namespace {ns}"),
        None => format!("listing {resource} in all namespaces"),
    }
}

/// Whether a Sandbox is paused on purpose: `spec.replicas: 0` (v1alpha1) or
/// `spec.operatingMode: Suspended` (v1beta1).
pub fn sandbox_is_suspended(data: &serde_json::Value) -> bool {
    let spec = &data["spec"];
    spec["replicas"].as_i64() == Some(0) || spec["operatingMode"].as_str() == Some("Suspended")
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
        kube::Error::Api(status) if status.code == 404 && verb == "list" => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspended_sandbox_detection() {
        assert!(sandbox_is_suspended(
            &serde_json::json!({"spec": {"replicas": 0}})
        ));
        assert!(sandbox_is_suspended(
            &serde_json::json!({"spec": {"operatingMode": "Suspended"}})
        ));
        assert!(!sandbox_is_suspended(
            &serde_json::json!({"spec": {"replicas": 1}})
        ));
        assert!(!sandbox_is_suspended(&serde_json::json!({})));
    }
}
