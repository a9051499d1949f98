//! The one place a Kubernetes client is built, for sweeps and for `check` alike.
//!
//! The configuration is found the way `kube::Config::infer` finds it, in the same order, but
//! the reconciler says which source it used: first a kubeconfig (the file named by
//! `KUBECONFIG`, else `~/.kube/config`, at its current context), then the in-cluster service
//! account (`KUBERNETES_SERVICE_HOST` and the token mounted in the pod). A laptop with a
//! kubeconfig therefore talks to that kubeconfig's cluster even inside a pod; the API server
//! URL and the source are logged at start-up so a wrong context is visible.
//!
//! The watch timeouts live here too: the cache's watches ask the server for
//! [`WATCH_TIMEOUT_SECONDS`], and the client's read timeout must outlast that.

use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use super::ClusterError;
use crate::config::Settings;

/// Server-side timeout of each watch request of the cache (the API server caps it anyway).
pub(crate) const WATCH_TIMEOUT_SECONDS: u32 = 290;
/// The client's read timeout: longer than a watch's timeout, so only a dead connection (no
/// event, bookmark or end within it) trips it.
pub(crate) const WATCH_READ_TIMEOUT: Duration =
    Duration::from_secs(WATCH_TIMEOUT_SECONDS as u64 + 60);

/// Where the client configuration came from, for logs, reports and `check`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClientOrigin {
    /// The API server URL.
    pub server: String,
    /// "kubeconfig <path> context <name>" or "in-cluster service account".
    pub source: String,
}

/// Builds the client with the reconciler's timeouts; says where its configuration came from.
pub async fn connect(settings: &Settings) -> Result<(Client, ClientOrigin), ClusterError> {
    let (mut config, source) = match Config::from_kubeconfig(&KubeConfigOptions::default()).await {
        Ok(config) => (config, kubeconfig_source()),
        Err(kubeconfig) => match Config::incluster() {
            Ok(config) => (config, "in-cluster service account".to_string()),
            Err(in_cluster) => {
                return Err(ClusterError::Config(format!(
                    "no kubeconfig ({kubeconfig}) and not in a cluster ({in_cluster})"
                )))
            }
        },
    };
    config.apply_debug_overrides();
    // Retries are the reconciler's own decision (KubeCluster::call): what is retried, how
    // often, within the request deadline, and counted. kube's built-in layer would retry
    // 429/503/504 up to 15 times, invisibly, past any deadline.
    config.default_retry = false;
    let timeout = settings.cluster.request_timeout;
    // Every request carries its own deadline (KubeCluster::call); the transport's read
    // timeout only has to end a dead connection. It must outlast a watch's quiet spells: an
    // API server sends a bookmark about once a minute, and a watch lasts up to its
    // server-side timeout. A read timeout of request_timeout_seconds (30 s) would cut every
    // quiet watch and make the cache relist all the time.
    config.read_timeout = Some(WATCH_READ_TIMEOUT.max(timeout));
    config.connect_timeout = Some(timeout.min(Duration::from_secs(10)));
    let origin = ClientOrigin {
        server: config.cluster_url.to_string(),
        source,
    };
    let client = Client::try_from(config).map_err(|e| ClusterError::Config(e.to_string()))?;
    Ok((client, origin))
}

/// "kubeconfig <path> context <name>", as far as it can be told.
fn kubeconfig_source() -> String {
    let path = std::env::var("KUBECONFIG")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "~/.kube/config".to_string());
    let context = Kubeconfig::read()
        .ok()
        .and_then(|k| k.current_context)
        .unwrap_or_else(|| "(none)".to_string());
    format!("kubeconfig {path} context {context}")
}
