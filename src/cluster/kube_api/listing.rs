//! Complete, paginated listings ([`KubeCluster::snapshot`], `list_into`), decoded lean, and
//! what the watch cache asks of the API server: a target's current revision and the start
//! of a watch. A listing is returned whole or not at all (rule 1).

use chrono::Utc;
use futures::Stream;
use kube::api::{ListParams, WatchEvent, WatchParams};

use super::request::{clone_request, Timing};
use super::{KubeCluster, Listing, Target};
use crate::cluster::client::WATCH_TIMEOUT_SECONDS;
use crate::cluster::lean::{self, LeanList, LeanObject};
use crate::cluster::objects::ObjectMap;
use crate::cluster::{BackendView, ClusterError, ClusterSnapshot};

impl KubeCluster {
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

    /// Lists one backend in one namespace (or all) completely, into a map that is returned
    /// only whole: every page of one paginated LIST with `resourceVersion` unset, which the
    /// API server serves at one revision (never `resourceVersion=0`, which may be stale). A 410
    /// on a continue token restarts the whole listing, once, from an empty map. Objects are
    /// decoded lean ([`LeanObject`]) and listed without the label selector: presence is by
    /// name, as a GET's is; the selector only marks the platform's objects (`managed`). The
    /// map is keyed by namespace and name (a listing of all namespaces can hold one name
    /// twice).
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
    pub(super) async fn fetch_page(
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
