//! The scope check before any listing ([`KubeCluster::verify_scope`]): the cluster's identity
//! (the `kube-system` Namespace's UID), every configured namespace present, no Sandbox that a
//! bare-pod-only sweep would miss; and [`KubeCluster::verify_served`], every enabled backend's
//! resource served.

use k8s_openapi::api::core::v1::Namespace;
use kube::api::ListParams;
use kube::Api;

use super::request::Timing;
use super::{KubeCluster, SandboxBackend, ScopeVerdict};
use crate::cluster::ClusterError;
use crate::plan::RefusalReason;

impl KubeCluster {
    /// Rule 10: reads the cluster's identity (the `kube-system` Namespace's UID) and checks
    /// that it is the pinned one (`cluster.expected_uid`) and that every configured namespace
    /// exists. A missing namespace is a refusal, not an empty listing: a namespace typo would
    /// otherwise list nothing and make every object look deleted. Needs `get` on those
    /// Namespaces (a ClusterRole limited by `resourceNames`).
    pub async fn verify_scope(
        &self,
        expected_uid: Option<uuid::Uuid>,
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
        // Compared in the canonical (lower-case, hyphenated) form the API server writes.
        if let Some(expected) = expected_uid.filter(|e| e.to_string() != cluster_uid) {
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
}
