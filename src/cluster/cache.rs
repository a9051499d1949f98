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
//! it has applied (an event or a bookmark). Both are published on a `tokio::sync::watch`
//! channel per informer as they change, so a sweep waiting for the cache to sync or to reach
//! a revision is woken by the change itself.
//!
//! kube 5's `runtime::watcher` hides bookmarks and revisions, and both are what make the
//! cache usable as evidence (rule 2(c)): a sweep takes a quorum revision R after reading its
//! rows and waits until every informer has applied an event or bookmark at or past R. So the
//! loop is built on kube-client's request builders (`Request::watch`, `request_events`).
//!
//! A sweep never treats an unsynced cache as the cluster: it waits (bounded) or lists afresh.
//!
//! Staleness is bounded. A watch can stop following the store without failing (an apiserver
//! whose watch cache froze sends bookmarks at a frozen revision; a stream that ends cleanly is
//! resumed from the same revision without end), so "synced" alone proves nothing. Three
//! things catch it:
//! - an informer whose watermark has not moved for [`CacheTuning::stall_check_after`] reads
//!   the API server's current revision (a quorum `LIST ?limit=1`) and relists (reason
//!   `stale`) when it has not reached it within [`CacheTuning::stall_grace`]; at or past it,
//!   the informer is known current (a quiet resource) and the check costs one request;
//! - a sweep whose proof of freshness does not come lists afresh ([`ClusterCache::list_afresh`])
//!   and that listing reseeds every informer that is behind it: its map and watermark are
//!   replaced and its watch restarts from the listing's revision;
//! - `cache_watermark_age_seconds` is the time since the stalest informer was last known
//!   current (an event or bookmark moved its watermark, a check or a proof found it at the
//!   server's revision, or a listing seeded it); an alert pages when it grows.
//!
//! Every watch request's answer is counted in `kube_requests_total` (verb `watch`); a 403
//! relists under its own reason (`forbidden`).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use kube::api::WatchEvent;
use tokio::sync::watch;

use super::kube_api::Target;
use super::lean::{self, LeanObject};
use super::objects::ObjectMap;
use super::{ClusterError, KubeCluster};
use crate::snapshot::{BackendKind, BackendView, ClusterSnapshot, ObjectFacts};

/// Delay before relisting (after the first listing), doubled up to the maximum; back to the
/// minimum after a watch that lasted [`HEALTHY_WATCH`].
const RELIST_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(30));
const HEALTHY_WATCH: Duration = Duration::from_secs(30);
/// A watch that resumes this often without delivering anything is backed off too.
const RESUME_BACKOFF: Duration = Duration::from_millis(200);

crate::label::labelled! {
    /// Why an informer listed again.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum RelistReason {
        /// The first listing.
        Initial = "initial",
        /// The watch answered 410: its resourceVersion was compacted away.
        Expired = "expired",
        /// The watch was answered 403 (RBAC lacks `watch`).
        Forbidden = "forbidden",
        /// The watch failed in a way that could hide events.
        WatchError = "watch_error",
        /// The informer fell behind the API server's revision without its watch failing (a
        /// frozen watch): found by its own check or by a sweep's listing, which reseeded it.
        Stale = "stale",
        /// The previous listing failed.
        ListError = "list_error",
    }
}

/// How the cache bounds its staleness (see the module's notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheTuning {
    /// An informer whose watermark has not moved for this long (about five bookmark
    /// intervals of a real API server) reads the server's current revision.
    pub stall_check_after: Duration,
    /// It relists when its watermark has not reached that revision within this (a healthy
    /// watch gets there with the next bookmark, about a minute).
    pub stall_grace: Duration,
}

impl Default for CacheTuning {
    fn default() -> Self {
        CacheTuning {
            stall_check_after: Duration::from_secs(300),
            stall_grace: Duration::from_secs(120),
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
    /// When the informer was last known current: its watermark moved, or a check or a
    /// proof found it at the API server's revision.
    advanced_at: Option<Instant>,
    /// Bumped when a sweep's listing reseeds the map: the watch that fed the old map must
    /// not touch the new one (its events may predate the listing).
    generation: u64,
}

struct Informer {
    target: Target,
    namespace: Option<String>,
    state: Mutex<InformerState>,
    /// Wakes the informer's task: its map was reseeded, its watch must restart.
    reseeded: tokio::sync::Notify,
    /// `synced` and the watermark as last changed, for the sweeps that wait on them
    /// ([`ClusterCache::wait_synced`], [`ClusterCache::prove_fresh`]).
    progress: watch::Sender<Progress>,
}

/// What a sweep waits for of an informer: published on every change (see [`Update`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Progress {
    synced: bool,
    watermark: u64,
}

impl Informer {
    fn new(target: Target, namespace: Option<String>) -> Informer {
        Informer {
            target,
            namespace,
            state: Mutex::new(InformerState::default()),
            reseeded: tokio::sync::Notify::new(),
            progress: watch::Sender::new(Progress::default()),
        }
    }

    /// The state, to read, or to change anything but `synced` and the watermark.
    fn state(&self) -> MutexGuard<'_, InformerState> {
        // A panic while holding the lock leaves plain data; keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state, to change `synced` or the watermark: published when the guard drops.
    fn update(&self) -> Update<'_> {
        Update {
            informer: self,
            state: self.state(),
        }
    }
}

/// An informer's state locked for a change; its `synced` and watermark are published to the
/// informer's [`Progress`] channel, still under the lock, when it drops (so a waiter that
/// sees a watermark also finds the map that goes with it).
struct Update<'a> {
    informer: &'a Informer,
    state: MutexGuard<'a, InformerState>,
}

impl std::ops::Deref for Update<'_> {
    type Target = InformerState;
    fn deref(&self) -> &InformerState {
        &self.state
    }
}

impl std::ops::DerefMut for Update<'_> {
    fn deref_mut(&mut self) -> &mut InformerState {
        &mut self.state
    }
}

impl Drop for Update<'_> {
    fn drop(&mut self) {
        let now = Progress {
            synced: self.state.synced,
            watermark: self.state.watermark,
        };
        self.informer.progress.send_if_modified(|progress| {
            let changed = *progress != now;
            *progress = now;
            changed
        });
    }
}

/// Waits until `holds(n, progress)` is true of every informer `n` at once, or until
/// `deadline`; woken by their [`Progress`] channels, not by polling. Whether it held.
async fn wait_for_all(
    informers: &[&Arc<Informer>],
    deadline: Instant,
    holds: impl Fn(usize, Progress) -> bool,
) -> bool {
    let mut receivers: Vec<_> = informers.iter().map(|i| i.progress.subscribe()).collect();
    let all_hold = |receivers: &mut [watch::Receiver<Progress>]| {
        receivers
            .iter_mut()
            .enumerate()
            .all(|(n, rx)| holds(n, *rx.borrow_and_update()))
    };
    let timeout = sleep_until(deadline);
    futures::pin_mut!(timeout);
    loop {
        if all_hold(&mut receivers) {
            return true;
        }
        // Not empty: `all` holds of no informer. The senders live as long as the informers.
        let changed =
            futures::future::select_all(receivers.iter_mut().map(|rx| Box::pin(rx.changed())));
        tokio::select! {
            _ = changed => {}
            _ = &mut timeout => break,
        }
    }
    all_hold(&mut receivers)
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
    started: Instant,
}

impl ClusterCache {
    /// Starts one informer task per backend and namespace.
    pub fn start(cluster: &KubeCluster, observer: Arc<dyn CacheObserver>) -> Arc<ClusterCache> {
        Self::start_tuned(cluster, observer, CacheTuning::default())
    }

    /// [`ClusterCache::start`] with staleness bounds of its own.
    pub fn start_tuned(
        cluster: &KubeCluster,
        observer: Arc<dyn CacheObserver>,
        tuning: CacheTuning,
    ) -> Arc<ClusterCache> {
        let (stop, stopped) = watch::channel(false);
        let mut informers = Vec::new();
        for target in cluster.targets() {
            for ns in cluster.namespace_scopes() {
                let informer = Arc::new(Informer::new(target.clone(), ns));
                tokio::spawn(run_informer(
                    cluster.clone(),
                    informer.clone(),
                    observer.clone(),
                    stopped.clone(),
                    tuning,
                ));
                informers.push(informer);
            }
        }
        Arc::new(ClusterCache {
            informers,
            stop,
            started: Instant::now(),
        })
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
        let informers: Vec<&Arc<Informer>> = self.informers.iter().collect();
        wait_for_all(&informers, Instant::now() + wait, |_, p| p.synced).await
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
        let fresh = |n: usize, p: Progress| p.synced && p.watermark >= wanted[n];
        if !wait_for_all(&proven, Instant::now() + wait, fresh).await {
            return Ok(None);
        }
        let now = Instant::now();
        for informer in &proven {
            informer.state().advanced_at = Some(now);
        }
        Ok(Some(requests))
    }

    /// Rule 2(b) when the cache cannot be proven fresh: lists every informer's backend and
    /// namespace completely (rows read before), as one snapshot, and reseeds every informer
    /// that is behind its listing with it: the map and watermark are replaced and its watch
    /// restarts from the listing's revision (a frozen or lagging watch is overtaken, and the
    /// cache needs no second listing to catch up). Fails whole, like
    /// [`KubeCluster::snapshot`].
    pub async fn list_afresh(
        &self,
        cluster: &KubeCluster,
    ) -> Result<ClusterSnapshot, ClusterError> {
        let started = chrono::Utc::now();
        // As many listings at a time as there are backends, as `KubeCluster::snapshot` makes,
        // not one per namespace at once.
        let backends = cluster.targets().len().max(1);
        let mut listings = Vec::with_capacity(self.informers.len());
        for informers in self.informers.chunks(backends) {
            let listed = futures::future::try_join_all(
                informers
                    .iter()
                    .map(|i| cluster.list_into(&i.target, i.namespace.as_deref())),
            )
            .await?;
            listings.extend(listed);
        }
        let mut views: Vec<BackendView> = Vec::new();
        for (informer, (objects, listing)) in self.informers.iter().zip(listings) {
            let target = &informer.target;
            let view = match views.iter_mut().find(|v| v.kind == target.kind) {
                Some(v) => v,
                None => {
                    views.push(BackendView::new(target.kind, &target.prefix));
                    match views.last_mut() {
                        Some(v) => v,
                        None => continue,
                    }
                }
            };
            view.reserve(objects.names());
            for (name, facts) in objects.iter() {
                view.insert(name, facts);
            }
            view.requests += listing.requests;
            if let Some(revision) = listing.revision {
                reseed(informer, objects, revision);
            }
        }
        let mut snapshot = ClusterSnapshot::new(started);
        snapshot.backends = views;
        Ok(snapshot)
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
            // An informer that never listed has been stale since the cache started.
            let at = state.advanced_at.unwrap_or(self.started);
            oldest = oldest.max(at.elapsed());
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

/// Replaces an informer's map with a listing at `revision` when the informer is behind it,
/// and wakes the informer so that its watch restarts from there.
fn reseed(informer: &Informer, objects: ObjectMap, revision: u64) {
    {
        let mut state = informer.update();
        if revision <= state.watermark && state.synced {
            return;
        }
        tracing::info!(
            backend = %informer.target.kind,
            from = state.watermark,
            to = revision,
            "reseeding the cache from a fresh listing: the informer was behind it"
        );
        state.objects = objects;
        state.watermark = revision;
        state.advanced_at = Some(Instant::now());
        state.synced = true;
        state.generation += 1;
    }
    informer.reseeded.notify_one();
}

/// List, then watch, until stopped.
async fn run_informer(
    cluster: KubeCluster,
    informer: Arc<Informer>,
    observer: Arc<dyn CacheObserver>,
    mut stop: watch::Receiver<bool>,
    tuning: CacheTuning,
) {
    let kind = informer.target.kind;
    let mut reason = RelistReason::Initial;
    let mut reseeded = false;
    let mut backoff = RELIST_BACKOFF.0;
    loop {
        if *stop.borrow() {
            return;
        }
        let revision = if reseeded {
            // A sweep's listing replaced the map: watch on from its revision.
            observer.relisted(kind, RelistReason::Stale);
            informer.state().watermark
        } else {
            if reason != RelistReason::Initial {
                // A watch that keeps failing must not turn into a listing loop.
                if sleep_or_stop(&mut stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(RELIST_BACKOFF.1);
            }
            observer.relisted(kind, reason);
            let generation = {
                let mut state = informer.update();
                state.synced = false;
                state.generation
            };
            let listed = cluster
                .list_into(&informer.target, informer.namespace.as_deref())
                .await;
            match listed {
                Ok((objects, listing)) => {
                    let Some(revision) = listing.revision else {
                        tracing::warn!(backend = %kind, "a listing without an integer resourceVersion; relisting");
                        reason = RelistReason::ListError;
                        continue;
                    };
                    let mut state = informer.update();
                    if state.generation == generation || revision > state.watermark {
                        state.objects = objects;
                        state.watermark = revision;
                        state.advanced_at = Some(Instant::now());
                        state.generation += 1;
                    }
                    // Else a sweep's listing reseeded the map meanwhile, at a later revision.
                    state.synced = true;
                    state.watermark
                }
                Err(e) => {
                    tracing::warn!(backend = %kind, "the cache's listing failed: {e}");
                    reason = RelistReason::ListError;
                    continue;
                }
            }
        };
        let watching = Instant::now();
        (reason, reseeded) =
            match watch_from(&cluster, &informer, &observer, revision, &mut stop, tuning).await {
                WatchEnd::Stopped => return,
                WatchEnd::Relist(reason) => (reason, false),
                WatchEnd::Reseeded => (RelistReason::Stale, true),
            };
        if watching.elapsed() >= HEALTHY_WATCH {
            backoff = RELIST_BACKOFF.0;
        }
    }
}

enum WatchEnd {
    Stopped,
    Relist(RelistReason),
    /// A sweep's listing replaced the map: watch on from its watermark, no listing.
    Reseeded,
}

/// The informer's own freshness check (see [`CacheTuning`]).
struct StallCheck {
    tuning: CacheTuning,
    /// The server's revision read by the check, and when the informer must have reached it.
    pending: Option<(u64, Instant)>,
    /// After a failed check: not before then.
    retry_at: Option<Instant>,
}

impl StallCheck {
    /// When to look next.
    fn due(&self, informer: &Informer) -> Instant {
        match self.pending {
            Some((_, deadline)) => deadline,
            None => {
                let known = informer.state().advanced_at.unwrap_or_else(Instant::now);
                let due = known + self.tuning.stall_check_after;
                self.retry_at.map_or(due, |retry| due.max(retry))
            }
        }
    }

    /// Runs when due: `Some(Stale)` when the informer must relist.
    async fn run(&mut self, cluster: &KubeCluster, informer: &Informer) -> Option<RelistReason> {
        let kind = informer.target.kind;
        if let Some((wanted, deadline)) = self.pending {
            let watermark = informer.state().watermark;
            if watermark >= wanted {
                self.pending = None;
                informer.state().advanced_at = Some(Instant::now());
                return None;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    backend = %kind,
                    watermark,
                    wanted,
                    "the watch stopped following the API server (no event or bookmark reached its revision); relisting"
                );
                self.pending = None;
                return Some(RelistReason::Stale);
            }
            return None;
        }
        let known = informer.state().advanced_at;
        if known.is_some_and(|at| at.elapsed() < self.tuning.stall_check_after)
            || self.retry_at.is_some_and(|at| Instant::now() < at)
        {
            return None;
        }
        self.retry_at = None;
        match cluster
            .current_revision(&informer.target, informer.namespace.as_deref())
            .await
        {
            Ok(wanted) => {
                let mut state = informer.state();
                if state.watermark >= wanted {
                    // A quiet resource: nothing happened, the cache is current.
                    state.advanced_at = Some(Instant::now());
                } else {
                    self.pending = Some((wanted, Instant::now() + self.tuning.stall_grace));
                }
            }
            Err(e) => {
                tracing::warn!(backend = %kind, "checking the watch's freshness failed: {e}");
                self.pending = None;
                // Look again after the grace period, not in a loop.
                self.retry_at = Some(Instant::now() + self.tuning.stall_grace);
            }
        }
        None
    }
}

/// Watches from `revision` for as long as the history is unbroken, resuming after each
/// server-side timeout from the last applied revision, and checking that the watch still
/// follows the server ([`StallCheck`]). Returns early when a sweep's listing reseeds the map.
async fn watch_from(
    cluster: &KubeCluster,
    informer: &Informer,
    observer: &Arc<dyn CacheObserver>,
    mut revision: u64,
    stop: &mut watch::Receiver<bool>,
    tuning: CacheTuning,
) -> WatchEnd {
    let mut watch = Watch {
        cluster,
        informer,
        stop,
        generation: informer.state().generation,
        check: StallCheck {
            tuning,
            pending: None,
            retry_at: None,
        },
    };
    loop {
        let stream = match watch.start(revision).await {
            Ok(stream) => stream,
            Err(end) => return end,
        };
        if let Err(end) = watch.follow(stream, &mut revision).await {
            return end;
        }
        observer.watch_restarted(informer.target.kind);
        if sleep_or_stop(watch.stop, RESUME_BACKOFF).await {
            return WatchEnd::Stopped;
        }
    }
}

/// One informer's watch while it runs: what each step of [`watch_from`] needs.
struct Watch<'a> {
    cluster: &'a KubeCluster,
    informer: &'a Informer,
    stop: &'a mut watch::Receiver<bool>,
    /// The map's generation when the watch began (see [`apply`]).
    generation: u64,
    check: StallCheck,
}

/// What came first while a watch waited on something (see [`Watch::first`]).
enum Woken<T> {
    /// The awaited request or event.
    Done(T),
    /// Stopped, reseeded, or found stale by the freshness check.
    End(WatchEnd),
    /// The freshness check ran and found nothing wrong: wait again.
    Checked,
}

type EventStream = futures::stream::BoxStream<'static, kube::Result<WatchEvent<LeanObject>>>;

impl Watch<'_> {
    /// Awaits `work` unless the informer is stopped or reseeded first, running the freshness
    /// check ([`StallCheck`]) when it falls due meanwhile (which drops `work`).
    async fn first<T>(&mut self, work: impl std::future::Future<Output = T>) -> Woken<T> {
        let (cluster, informer) = (self.cluster, self.informer);
        tokio::select! {
            done = work => Woken::Done(done),
            _ = self.stop.changed() => Woken::End(WatchEnd::Stopped),
            _ = informer.reseeded.notified() => Woken::End(WatchEnd::Reseeded),
            _ = sleep_until(self.check.due(informer)) => {
                match self.check.run(cluster, informer).await {
                    Some(reason) => Woken::End(WatchEnd::Relist(reason)),
                    None => Woken::Checked,
                }
            }
        }
    }

    /// Starts the watch from `revision`; a failed start relists (410 `Expired`, 403
    /// `Forbidden`, else `WatchError`). A watch that does not even start is as stale as a
    /// frozen one: the freshness check runs meanwhile, and the start is asked again after it.
    async fn start(&mut self, revision: u64) -> Result<EventStream, WatchEnd> {
        let (cluster, informer) = (self.cluster, self.informer);
        let ns = informer.namespace.as_deref();
        loop {
            let started = match self
                .first(cluster.start_watch(&informer.target, ns, revision))
                .await
            {
                Woken::Done(started) => started,
                Woken::End(end) => return Err(end),
                Woken::Checked => continue,
            };
            return match started {
                Ok(stream) => Ok(Box::pin(stream)),
                Err(e) => {
                    tracing::warn!(backend = %informer.target.kind, "starting a watch failed: {e}");
                    Err(WatchEnd::Relist(match e {
                        ClusterError::Api { code: 410, .. } => RelistReason::Expired,
                        ClusterError::Forbidden { .. } => RelistReason::Forbidden,
                        _ => RelistReason::WatchError,
                    }))
                }
            };
        }
    }

    /// Applies the stream's events, raising `revision` to each one's, until the server ends
    /// the watch (its timeout: `Ok`, resume from `revision`) or the informer must stop,
    /// relist or watch on from a reseeded map.
    async fn follow(
        &mut self,
        mut stream: EventStream,
        revision: &mut u64,
    ) -> Result<(), WatchEnd> {
        loop {
            let next = match self.first(stream.try_next()).await {
                Woken::Done(next) => next,
                Woken::End(end) => return Err(end),
                Woken::Checked => continue,
            };
            let event = match next {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(()),
                Err(e) => {
                    // An event that cannot be decoded (or a transport error kube-client does
                    // report) may hide a change: relist rather than trust the map.
                    tracing::warn!(backend = %self.informer.target.kind, "the watch stream failed: {e}; relisting");
                    return Err(WatchEnd::Relist(RelistReason::WatchError));
                }
            };
            match apply(self.cluster, self.informer, self.generation, event) {
                Ok(Some(at)) => *revision = (*revision).max(at),
                Ok(None) => {}
                // Only a reseeded map makes `apply` answer `Stale`.
                Err(RelistReason::Stale) => return Err(WatchEnd::Reseeded),
                Err(reason) => return Err(WatchEnd::Relist(reason)),
            }
        }
    }
}

/// Applies one event of the watch begun at `generation`; returns the revision it carries.
/// A watch whose map was reseeded since applies nothing more (`Stale`: watch on from the
/// reseeded revision).
fn apply(
    cluster: &KubeCluster,
    informer: &Informer,
    generation: u64,
    event: WatchEvent<LeanObject>,
) -> Result<Option<u64>, RelistReason> {
    let selector = &informer.target.selector;
    let (object, deleted) = match event {
        WatchEvent::Added(o) | WatchEvent::Modified(o) => (o, false),
        WatchEvent::Deleted(o) => (o, true),
        WatchEvent::Bookmark(b) => {
            let at = lean::revision(&b.metadata.resource_version);
            let mut state = informer.update();
            if state.generation != generation {
                return Err(RelistReason::Stale);
            }
            if let Some(at) = at {
                advance(&mut state, at);
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
    let mut state = informer.update();
    if state.generation != generation {
        return Err(RelistReason::Stale);
    }
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

async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await
}

/// Sleeps, or returns true at once when stopped.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, delay: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}
