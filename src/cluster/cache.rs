//! The daemon's cluster cache: list once, then watch, the way client-go's informers do.
//!
//! One informer per backend and namespace lists the objects completely (a paginated quorum
//! LIST, decoded lean), then watches from the listing's resourceVersion with bookmarks,
//! applying each event to the same compact map. It relists on a 410 (the watch fell behind
//! compaction) and on an event it cannot decode; a stream that ends (the server's timeout,
//! or a dropped connection, which kube-client surfaces as the end of the stream) resumes from
//! the last applied resourceVersion, from which the API server replays every later event or
//! answers 410. So the map is always the result of one listing and one unbroken history of
//! events after it. Each informer keeps a `synced` flag and a watermark: the highest revision
//! it has applied (an event or a bookmark).
//!
//! kube 5's `runtime::watcher` hides bookmarks and revisions, and both are what make the
//! cache usable as evidence (rule 2(c)): a sweep takes a quorum revision R after reading its
//! rows and waits until every informer has applied an event or bookmark at or past R. So the
//! loop is built on kube-client's request builders (`Request::watch`, `request_events`).
//!
//! A sweep never treats an unsynced cache as the cluster: it waits (bounded) or lists afresh.
//!
//! Every watch request's answer is counted in `kube_requests_total` (verb `watch`); a 403
//! relists under its own reason (`forbidden`).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use kube::api::{WatchEvent, WatchParams};
use tokio::sync::watch;

use super::kube_api::Target;
use super::lean::{self, LeanObject};
use super::objects::ObjectMap;
use super::{ClusterError, KubeCluster};
use crate::snapshot::{BackendKind, BackendView, ClusterSnapshot, ObjectFacts};

/// Server-side timeout of each watch request (the API server caps it anyway).
const WATCH_TIMEOUT_SECONDS: u32 = 290;
/// The client's read timeout: longer than a watch's timeout, so only a dead connection (no
/// event, bookmark or end within it) trips it.
pub const WATCH_READ_TIMEOUT: Duration = Duration::from_secs(WATCH_TIMEOUT_SECONDS as u64 + 60);
/// Delay before relisting (after the first listing), doubled up to the maximum; back to the
/// minimum after a watch that lasted [`HEALTHY_WATCH`].
const RELIST_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(30));
const HEALTHY_WATCH: Duration = Duration::from_secs(30);
/// A watch that resumes this often without delivering anything is backed off too.
const RESUME_BACKOFF: Duration = Duration::from_millis(200);

/// Why an informer listed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelistReason {
    /// The first listing.
    Initial,
    /// The watch answered 410: its resourceVersion was compacted away.
    Expired,
    /// The watch was answered 403 (RBAC lacks `watch`).
    Forbidden,
    /// The watch failed in a way that could hide events.
    WatchError,
    /// The previous listing failed.
    ListError,
}

impl RelistReason {
    pub const ALL: [RelistReason; 5] = [
        RelistReason::Initial,
        RelistReason::Expired,
        RelistReason::Forbidden,
        RelistReason::WatchError,
        RelistReason::ListError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RelistReason::Initial => "initial",
            RelistReason::Expired => "expired",
            RelistReason::Forbidden => "forbidden",
            RelistReason::WatchError => "watch_error",
            RelistReason::ListError => "list_error",
        }
    }
}

/// What the cache reports to the metrics (set by the daemon).
pub trait CacheObserver: Send + Sync {
    fn relisted(&self, backend: BackendKind, reason: RelistReason);
    fn watch_restarted(&self, backend: BackendKind);
}

/// One informer's state.
#[derive(Debug, Default)]
struct InformerState {
    /// By namespace and name: one informer of all namespaces can hold a name twice.
    objects: ObjectMap,
    synced: bool,
    /// The highest revision applied (listing, event or bookmark).
    watermark: u64,
    /// When the watermark last moved.
    advanced_at: Option<Instant>,
}

struct Informer {
    target: Target,
    namespace: Option<String>,
    state: Mutex<InformerState>,
}

impl Informer {
    fn state(&self) -> MutexGuard<'_, InformerState> {
        // A panic while holding the lock leaves plain data; keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Figures of the cache, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStatus {
    pub synced: bool,
    /// Objects per backend.
    pub objects: Vec<(BackendKind, u64)>,
    /// Seconds since the oldest informer's watermark last moved.
    pub watermark_age_seconds: u64,
}

/// The watch-fed cache of every backend and namespace.
pub struct ClusterCache {
    informers: Vec<Arc<Informer>>,
    stop: watch::Sender<bool>,
}

impl ClusterCache {
    /// Starts one informer task per backend and namespace.
    pub fn start(cluster: &KubeCluster, observer: Arc<dyn CacheObserver>) -> Arc<ClusterCache> {
        let (stop, stopped) = watch::channel(false);
        let mut informers = Vec::new();
        for target in cluster.targets() {
            for ns in cluster.namespace_scopes() {
                let informer = Arc::new(Informer {
                    target: target.clone(),
                    namespace: ns,
                    state: Mutex::new(InformerState::default()),
                });
                tokio::spawn(run_informer(
                    cluster.clone(),
                    informer.clone(),
                    observer.clone(),
                    stopped.clone(),
                ));
                informers.push(informer);
            }
        }
        Arc::new(ClusterCache { informers, stop })
    }

    /// Stops every informer.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Whether every informer has completed a listing and watches.
    pub fn synced(&self) -> bool {
        self.informers.iter().all(|i| i.state().synced)
    }

    /// Waits until synced, at most `wait`.
    pub async fn wait_synced(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        while !self.synced() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// The cache as a snapshot (`None` while not synced).
    pub fn snapshot(&self) -> Option<ClusterSnapshot> {
        let mut views: Vec<BackendView> = Vec::new();
        for informer in &self.informers {
            let state = informer.state();
            if !state.synced {
                return None;
            }
            let target = &informer.target;
            let view = match views.iter_mut().find(|v| v.kind == target.kind) {
                Some(v) => v,
                None => {
                    views.push(BackendView::new(target.kind, &target.prefix));
                    views.last_mut()?
                }
            };
            view.reserve(state.objects.names());
            for (name, facts) in state.objects.iter() {
                view.insert(name, facts);
            }
        }
        let mut snapshot = ClusterSnapshot::new(chrono::Utc::now());
        snapshot.backends = views;
        snapshot.source = "watch cache".into();
        Some(snapshot)
    }

    /// Rule 2(c): proves the cache at least as fresh as a revision taken now (after the rows
    /// were read). For each informer a quorum `LIST ?limit=1` gives the store's revision R;
    /// then waits, at most `wait`, until the informer has applied an event or bookmark at or
    /// past R while staying synced. Returns the requests made, or `None` when the proof could
    /// not be had in time (the caller lists afresh instead).
    ///
    /// Only the informers of `backends` are proven (every informer when it holds
    /// [`BackendKind::Unknown`]): an orphan attributed to one backend by its name's prefix is
    /// confirmed against that backend, as its GET would be.
    pub async fn prove_fresh(
        &self,
        cluster: &KubeCluster,
        wait: Duration,
        backends: &[BackendKind],
    ) -> Result<Option<u64>, ClusterError> {
        let every = backends.contains(&BackendKind::Unknown)
            || !self
                .informers
                .iter()
                .any(|i| backends.contains(&i.target.kind));
        let proven: Vec<&Arc<Informer>> = self
            .informers
            .iter()
            .filter(|i| every || backends.contains(&i.target.kind))
            .collect();
        let mut wanted = Vec::with_capacity(proven.len());
        for informer in &proven {
            let r = cluster
                .current_revision(&informer.target, informer.namespace.as_deref())
                .await?;
            wanted.push(r);
        }
        let requests = wanted.len() as u64;
        let deadline = Instant::now() + wait;
        loop {
            let fresh = proven.iter().zip(&wanted).all(|(informer, r)| {
                let state = informer.state();
                state.synced && state.watermark >= *r
            });
            if fresh {
                return Ok(Some(requests));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether any backend's cache holds an object of that name (in any namespace).
    pub fn contains(&self, name: &str) -> Option<ObjectFacts> {
        self.informers
            .iter()
            .find_map(|i| i.state().objects.get(name))
    }

    /// Figures for the metrics.
    pub fn status(&self) -> CacheStatus {
        let mut objects: Vec<(BackendKind, u64)> = Vec::new();
        let mut synced = true;
        let mut oldest = Duration::ZERO;
        for informer in &self.informers {
            let state = informer.state();
            synced &= state.synced;
            let n = state.objects.len() as u64;
            match objects.iter_mut().find(|(k, _)| *k == informer.target.kind) {
                Some((_, total)) => *total += n,
                None => objects.push((informer.target.kind, n)),
            }
            if let Some(at) = state.advanced_at {
                oldest = oldest.max(at.elapsed());
            }
        }
        CacheStatus {
            synced,
            objects,
            watermark_age_seconds: oldest.as_secs(),
        }
    }
}

impl Drop for ClusterCache {
    fn drop(&mut self) {
        self.stop();
    }
}

/// List, then watch, until stopped.
async fn run_informer(
    cluster: KubeCluster,
    informer: Arc<Informer>,
    observer: Arc<dyn CacheObserver>,
    mut stop: watch::Receiver<bool>,
) {
    let kind = informer.target.kind;
    let mut reason = RelistReason::Initial;
    let mut backoff = RELIST_BACKOFF.0;
    loop {
        if *stop.borrow() {
            return;
        }
        if reason != RelistReason::Initial {
            // A watch that keeps failing must not turn into a listing loop.
            if sleep_or_stop(&mut stop, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(RELIST_BACKOFF.1);
        }
        observer.relisted(kind, reason);
        informer.state().synced = false;
        let listed = cluster
            .list_into(&informer.target, informer.namespace.as_deref())
            .await;
        let revision = match listed {
            Ok((objects, listing)) => {
                let Some(revision) = listing.revision else {
                    tracing::warn!(backend = %kind, "a listing without an integer resourceVersion; relisting");
                    reason = RelistReason::ListError;
                    continue;
                };
                let mut state = informer.state();
                state.objects = objects;
                state.watermark = revision;
                state.advanced_at = Some(Instant::now());
                state.synced = true;
                revision
            }
            Err(e) => {
                tracing::warn!(backend = %kind, "the cache's listing failed: {e}");
                reason = RelistReason::ListError;
                continue;
            }
        };
        let watching = Instant::now();
        reason = match watch_from(&cluster, &informer, &observer, revision, &mut stop).await {
            WatchEnd::Stopped => return,
            WatchEnd::Relist(reason) => reason,
        };
        if watching.elapsed() >= HEALTHY_WATCH {
            backoff = RELIST_BACKOFF.0;
        }
    }
}

enum WatchEnd {
    Stopped,
    Relist(RelistReason),
}

/// Watches from `revision` for as long as the history is unbroken, resuming after each
/// server-side timeout from the last applied revision.
async fn watch_from(
    cluster: &KubeCluster,
    informer: &Informer,
    observer: &Arc<dyn CacheObserver>,
    mut revision: u64,
    stop: &mut watch::Receiver<bool>,
) -> WatchEnd {
    let target = &informer.target;
    let ns = informer.namespace.as_deref();
    loop {
        // WatchParams asks for bookmarks by default (allowWatchBookmarks=true).
        let params = WatchParams::default().timeout(WATCH_TIMEOUT_SECONDS);
        let request = kube::core::Request::new(target.url_path(ns));
        let built = if target.metadata_only {
            request.watch_metadata(&params, &revision.to_string())
        } else {
            request.watch(&params, &revision.to_string())
        };
        let Ok(built) = built else {
            return WatchEnd::Relist(RelistReason::WatchError);
        };
        let stream = match cluster.client().request_events::<LeanObject>(built).await {
            Ok(stream) => {
                cluster.note_code("watch", 200);
                stream
            }
            Err(kube::Error::Api(status)) => {
                cluster.note_code("watch", status.code);
                tracing::warn!(backend = %target.kind, code = status.code, "starting a watch failed: {}", status.message);
                return WatchEnd::Relist(match status.code {
                    410 => RelistReason::Expired,
                    403 => RelistReason::Forbidden,
                    _ => RelistReason::WatchError,
                });
            }
            Err(e) => {
                cluster.note_code("watch", 0);
                tracing::warn!(backend = %target.kind, "starting a watch failed: {e}");
                return WatchEnd::Relist(RelistReason::WatchError);
            }
        };
        futures::pin_mut!(stream);
        loop {
            let next = tokio::select! {
                next = stream.try_next() => next,
                _ = stop.changed() => return WatchEnd::Stopped,
            };
            let event = match next {
                Ok(Some(event)) => event,
                // The server ended the watch (its timeout): resume from the last revision.
                Ok(None) => break,
                Err(e) => {
                    // An event that cannot be decoded (or a transport error kube-client does
                    // report) may hide a change: relist rather than trust the map.
                    tracing::warn!(backend = %target.kind, "the watch stream failed: {e}; relisting");
                    return WatchEnd::Relist(RelistReason::WatchError);
                }
            };
            match apply(cluster, informer, event) {
                Ok(Some(at)) => revision = revision.max(at),
                Ok(None) => {}
                Err(reason) => return WatchEnd::Relist(reason),
            }
        }
        observer.watch_restarted(target.kind);
        if sleep_or_stop(stop, RESUME_BACKOFF).await {
            return WatchEnd::Stopped;
        }
    }
}

/// Applies one event; returns the revision it carries.
fn apply(
    cluster: &KubeCluster,
    informer: &Informer,
    event: WatchEvent<LeanObject>,
) -> Result<Option<u64>, RelistReason> {
    let selector = &informer.target.selector;
    let (object, deleted) = match event {
        WatchEvent::Added(o) | WatchEvent::Modified(o) => (o, false),
        WatchEvent::Deleted(o) => (o, true),
        WatchEvent::Bookmark(b) => {
            let at = lean::revision(&b.metadata.resource_version);
            if let Some(at) = at {
                advance(&mut informer.state(), at);
            }
            return Ok(at);
        }
        WatchEvent::Error(status) if status.code == 410 => return Err(RelistReason::Expired),
        WatchEvent::Error(status) => {
            tracing::warn!(backend = %informer.target.kind, "the watch sent an error: {}", status.message);
            return Err(if status.code == 403 {
                RelistReason::Forbidden
            } else {
                RelistReason::WatchError
            });
        }
    };
    let Some(name) = object.metadata.name.as_deref().filter(|n| !n.is_empty()) else {
        tracing::warn!(backend = %informer.target.kind, "a watch event without a name; relisting");
        return Err(RelistReason::WatchError);
    };
    let at = object
        .metadata
        .resource_version
        .as_deref()
        .and_then(lean::revision);
    let namespace = object
        .metadata
        .namespace
        .as_deref()
        .or(informer.namespace.as_deref())
        .unwrap_or("");
    if !deleted && !object.undecodable().is_empty() {
        cluster.note_undecodable(informer.target.kind, namespace, name, object.undecodable());
    }
    let mut state = informer.state();
    if deleted {
        state.objects.remove(namespace, name);
    } else {
        state
            .objects
            .insert(namespace, name, object.facts(selector));
    }
    if let Some(at) = at {
        advance(&mut state, at);
    }
    Ok(at)
}

fn advance(state: &mut InformerState, at: u64) {
    if at > state.watermark {
        state.watermark = at;
        state.advanced_at = Some(Instant::now());
    }
}

/// Sleeps, or returns true at once when stopped.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, delay: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}
