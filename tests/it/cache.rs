//! The daemon's watch-fed cache against the fake API server: steady-state sweeps that cost the
//! database read and the scope checks, confirmation by the cache proven fresh, and the faults
//! it must survive (watch dropped, 410 on watch, no bookmarks, a cache that never syncs, an
//! object deleted and recreated, a row resumed behind a stale cache, changes that reach the
//! cache only through a relist), each with nothing wrong written.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use sandbox_reconciler::cluster::cache::{CacheTuning, ClusterCache};
use sandbox_reconciler::cluster::KubeCluster;
use sandbox_reconciler::config::Settings;
use sandbox_reconciler::metrics::Metrics;
use sandbox_reconciler::sweep::{
    ClusterSource, Confirmation, Reconciler, SweepOptions, SweepReport, SweepResult,
};

use crate::support::daemon::metric;
use crate::support::*;

/// The cluster an in-process reconciler (`support::reconciler`) talks to.
fn api_cluster(r: &mut Reconciler) -> &mut KubeCluster {
    let ClusterSource::Api(cluster) = &mut r.source else {
        unreachable!("an API reconciler")
    };
    cluster
}

/// A reconciler whose sweeps read a started, synced cache.
async fn cached(settings: Settings, api: &FakeApiServer) -> (Reconciler, Arc<Metrics>) {
    let metrics = Metrics::new(&settings);
    let mut r = reconciler(settings, api);
    let cluster = api_cluster(&mut r);
    metrics.observe_cluster(cluster);
    let cache = ClusterCache::start(cluster, metrics.clone());
    assert!(
        cache.wait_synced(Duration::from_secs(10)).await,
        "the cache syncs"
    );
    metrics.observe_cache(cache.clone());
    (r.with_cache(cache), metrics)
}

/// `cached` over a world of `seeded(live, orphans)` with `paused`, a suspended row whose pod
/// exists, and the cache it reads.
async fn cached_with_paused(
    live: usize,
    orphans: usize,
) -> (World, Reconciler, Arc<Metrics>, Arc<ClusterCache>) {
    let w = World::seeded(live, orphans)
        .await
        .row("paused", "suspended", "pod-paused", minutes(120))
        .pod("pod-paused")
        .build()
        .await;
    let (r, metrics) = cached(w.settings.clone(), &w.api).await;
    let cache = r.cache().unwrap().clone();
    (w, r, metrics, cache)
}

/// Settings that confirm more than `confirm_get_max` orphans by the cache proven fresh and
/// wait at most a second for that proof.
fn proof_waited_for_a_second(confirm_get_max: usize) -> impl FnOnce(&mut Settings) {
    move |s| {
        s.cluster.confirm_get_max = confirm_get_max;
        s.cluster.cache_fresh_wait = std::time::Duration::from_secs(1);
    }
}

/// The rows of the live sessions (`live-i`), for "left alone" assertions.
async fn live_rows(db: &TestDb) -> Vec<(String, String, Option<String>)> {
    db.fingerprint()
        .await
        .into_iter()
        .filter(|(k, _, _)| k.starts_with("live-"))
        .collect()
}

/// The metrics text once `pred` holds of it, or after 5 s (metrics follow events).
async fn rendered_when(metrics: &Metrics, pred: impl Fn(&str) -> bool) -> String {
    let mut m = metrics.render();
    for _ in 0..200 {
        if pred(&m) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        m = metrics.render();
    }
    m
}

async fn sweep_with(r: &Reconciler) -> SweepReport {
    let (_tx, rx) = tokio::sync::watch::channel(false);
    r.sweep(&SweepOptions::default(), &rx).await
}

/// Waits until `pred` holds of the cache (events arrive asynchronously).
async fn eventually(what: &str, pred: impl Fn() -> bool) {
    for _ in 0..200 {
        if pred() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what} did not happen within 5 s");
}

fn lists_of(api: &FakeApiServer, resource: &str) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.path.ends_with(resource) && r.query_param("watch").is_none())
        .count()
}

/// Ten Sandboxes with their rows, half running and half paused on purpose: enough for the
/// agent-sandbox backend's guards when a test's orphans are attributed to it or to no backend.
async fn add_sandboxes(db: &TestDb, api: &FakeApiServer) {
    for i in 0..10 {
        let (name, replicas) = (format!("sb-{i}"), i % 2);
        let state = if replicas == 1 {
            "running"
        } else {
            "suspended"
        };
        api.add_sandbox("v1alpha1", "agents", &name, json!({ "replicas": replicas }));
        db.insert(&name, state, &name, minutes(60)).await;
    }
}

/// The pod informer's relists after a failed or expired watch, from the metrics text.
fn pod_relists_after_failure(m: &str) -> f64 {
    ["expired", "watch_error"]
        .iter()
        .filter_map(|reason| {
            metric(
                m,
                &format!(
                    "sandbox_reconciler_cache_relists_total{{backend=\"pod\",reason=\"{reason}\"}}"
                ),
            )
        })
        .sum()
}

/// Steady state: no listing at all, only the scope checks (kube-system and the namespace).
#[tokio::test]
async fn a_steady_state_sweep_reads_the_cache_and_makes_only_the_scope_checks() {
    let (db, api) = seeded(20, 0).await;
    let (r, _) = cached(db.settings(), &api).await;
    api.clear_requests();
    let report = sweep_with(&r).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(report.cluster_view, "watch cache");
    let requests = api.requests();
    let not_watches: Vec<_> = requests
        .iter()
        .filter(|r| r.query_param("watch").is_none())
        .collect();
    assert!(not_watches.len() <= 2, "{not_watches:#?}");
    assert_eq!(lists_of(&api, "/pods"), 0);
}

/// Changes after the listing reach the cache through the watch: a pod deleted later makes its
/// suspended row an orphan (confirmed by GET, few orphans), a pod created later protects its row.
#[tokio::test]
async fn the_watch_brings_later_changes_into_the_cache() {
    let World { db, api, .. } = World::seeded(4, 0)
        .await
        .row("paused", "suspended", "pod-paused", minutes(120))
        .pod("pod-paused")
        .row("late", "suspended", "pod-late", minutes(120))
        .build()
        .await;
    let (r, _) = cached(db.settings(), &api).await;
    api.remove(Kind::Pod, "agents", "pod-paused");
    api.add_pod("agents", "pod-late", MANAGED);
    let cache = r.cache().unwrap().clone();
    eventually("the watch applies both events", || {
        cache.contains("pod-paused").is_none() && cache.contains("pod-late").is_some()
    })
    .await;
    let report = sweep_with(&r).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(report.confirmation, Confirmation::Get);
    assert_eq!(db.state("paused").await, "gone");
    assert_eq!(db.state("late").await, "suspended");
}

/// Few orphans are confirmed by one GET each, of the backend their name is attributed to; a
/// name no single backend claims is asked of every backend.
#[tokio::test]
async fn a_confirming_get_asks_only_the_backend_the_name_belongs_to() {
    let World {
        db, api, settings, ..
    } = World::seeded(20, 1)
        .await
        .row("sandbox-orphan", "suspended", "sb-gone", minutes(90))
        .row("nobodys-orphan", "suspended", "x-gone", minutes(95))
        .settings(|s| s.backends.pod.object_name_prefix = "pod-".into())
        .build()
        .await;
    add_sandboxes(&db, &api).await;
    let (r, _) = cached(settings, &api).await;
    api.clear_requests();
    let report = sweep_with(&r).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(report.confirmation, Confirmation::Get);
    assert_eq!(report.downgraded, 3, "{report:?}");
    let gets = |path: &str| {
        api.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(path))
            .count()
    };
    assert_eq!(gets("/pods/pod-gone-0"), 1);
    assert_eq!(
        gets("/sandboxes/pod-gone-0"),
        0,
        "a pod's name is not a Sandbox's"
    );
    assert_eq!(gets("/sandboxes/sb-gone"), 1);
    assert_eq!(
        gets("/pods/sb-gone"),
        0,
        "a Sandbox backs its session, not its pod"
    );
    assert_eq!(
        gets("/pods/x-gone"),
        1,
        "an unattributed name is asked of both"
    );
    assert_eq!(
        gets("/sandboxes/x-gone"),
        1,
        "an unattributed name is asked of both"
    );
}

/// Many orphans: the cache proven at least as fresh as a revision taken after the rows were
/// read (rule 2(c)) confirms them, with a revision read per informer and no GET per orphan.
#[tokio::test]
async fn many_orphans_are_confirmed_by_the_cache_proven_fresh() {
    let World { api, settings, .. } = World::seeded(6, 5)
        .await
        .settings(|s| s.cluster.confirm_get_max = 2)
        .build()
        .await;
    api.set_bookmark_interval(Duration::from_millis(100));
    let (r, _) = cached(settings, &api).await;
    api.clear_requests();
    let report = sweep_with(&r).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(report.confirmation, Confirmation::WatchCache, "{report:?}");
    assert_eq!(report.downgraded, 5);
    let gets = api
        .requests()
        .iter()
        .filter(|r| r.path.contains("/pods/pod-gone"))
        .count();
    assert_eq!(gets, 0, "no GET per orphan");
    assert!(report.confirmation_requests <= 2, "{report:?}");
    // The wait for the proof is reported, as part of the confirmation's time.
    let t = &report.timings;
    assert!(t.confirm_wait > 0.0 && t.confirm_wait <= t.confirm, "{t:?}");
}

/// An API server that stops sending bookmarks: the proof cannot come, so after the bounded
/// wait the sweep lists afresh (rule 2(b)) and still confirms correctly.
#[tokio::test]
async fn without_bookmarks_the_sweep_falls_back_to_a_fresh_listing() {
    let World {
        db, api, settings, ..
    } = World::seeded(6, 4)
        .await
        .settings(proof_waited_for_a_second(1))
        .build()
        .await;
    let (r, _) = cached(settings, &api).await;
    api.stop_bookmarks();
    // One orphan's pod comes back meanwhile: the fresh listing must see it.
    api.add_pod("agents", "pod-gone-0", MANAGED);
    // Then the store's revision moves on (a change elsewhere), so the watch of "agents"
    // never reaches it without a bookmark. (In the other order the pod's own event would
    // carry the pod informer to the revision, a proof as good as a bookmark.)
    api.add_pod("elsewhere", "pod-unrelated", MANAGED);
    let report = sweep_with(&r).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(report.confirmation, Confirmation::Listing, "{report:?}");
    assert_eq!(db.state("orphan-0").await, "suspended");
    assert_eq!(report.downgraded, 3);
}

/// A watch dropped mid-stream resumes from the last applied revision and sees the changes
/// made while it was down; a 410 on the watch relists. Nothing wrong is written.
#[tokio::test]
async fn dropped_and_expired_watches_recover_without_a_wrong_write() {
    let (World { db, api, .. }, r, metrics, cache) = cached_with_paused(4, 0).await;
    api.drop_watches();
    api.add_pod("agents", "pod-new", MANAGED);
    eventually(
        "the resumed watch sees the pod created while it was down",
        || cache.contains("pod-new").is_some(),
    )
    .await;
    // The next watch is answered 410 (its revision compacted away): the informer relists.
    api.inject(Fault::on_watch("/pods", FaultAction::ExpireWatch).once());
    api.drop_watches();
    api.add_pod("agents", "pod-after-compaction", MANAGED);
    eventually("a relist after 410", || {
        cache.contains("pod-after-compaction").is_some()
    })
    .await;
    let m = metrics.render();
    assert!(pod_relists_after_failure(&m) >= 1.0, "{m}");
    let report = sweep_with(&r).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(db.state("paused").await, "suspended");
    assert_eq!(report.downgraded, 0);
}

/// A cache that never syncs is never taken for the cluster: the sweep lists afresh, and when
/// that fails too, it fails with nothing written.
#[tokio::test]
async fn a_cache_that_never_syncs_is_never_the_cluster() {
    let World {
        db, api, settings, ..
    } = World::seeded(4, 2)
        .await
        .settings(|s| s.cluster.cache_sync_wait = std::time::Duration::from_secs(1))
        .build()
        .await;
    api.inject(Fault::on_list("/pods", FaultAction::Status(500, None)));
    let metrics = Metrics::new(&settings);
    let mut r = reconciler(settings, &api);
    let cache = ClusterCache::start(api_cluster(&mut r), metrics);
    let r = r.with_cache(cache.clone());
    let before = db.fingerprint().await;
    let report = sweep_with(&r).await;
    assert!(!cache.synced());
    assert_eq!(report.result, SweepResult::Failed, "{report:?}");
    assert_eq!(db.fingerprint().await, before);
    // Once the API answers, the cache syncs and sweeps work.
    api.clear_faults();
    assert!(cache.wait_synced(Duration::from_secs(15)).await);
    let report = sweep_with(&r).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(report.downgraded, 2);
}

/// An object deleted and recreated with the same name (a new UID) after the listing is
/// present in the cache: its row is never an orphan.
#[tokio::test]
async fn an_object_deleted_and_recreated_stays_present() {
    let (World { db, api, .. }, r, _, cache) = cached_with_paused(4, 0).await;
    api.remove(Kind::Pod, "agents", "pod-paused");
    api.add_pod("agents", "pod-paused", MANAGED);
    api.add_pod("agents", "pod-marker", MANAGED);
    eventually("the marker arrives after both events", || {
        cache.contains("pod-marker").is_some()
    })
    .await;
    assert!(cache.contains("pod-paused").is_some());
    let report = sweep_with(&r).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(db.state("paused").await, "suspended");
}

/// A row resumed while the cache is behind: the platform created the row's object after the
/// last watch event the cache applied (its watch is stuck), and has not changed the row yet.
/// The stale cache shows the row as an orphan; the confirmation does not: a GET finds the
/// object (few orphans), and the cache cannot be proven fresh, so a fresh listing finds it
/// (many orphans). Nothing is written either way.
#[tokio::test]
async fn a_row_resumed_behind_a_stale_cache_is_left_alone() {
    let World {
        db, api, settings, ..
    } = World::seeded(20, 0)
        .await
        .row("resumed", "suspended", "pod-resumed", minutes(120))
        .settings(proof_waited_for_a_second(0))
        .build()
        .await;
    let (by_get, _) = cached(db.settings(), &api).await;
    let (by_proof, _) = cached(settings, &api).await;
    // Every watch from now on hangs before its first event: both caches stop learning.
    api.inject(Fault::on_watch(
        "/pods",
        FaultAction::Hang(Duration::from_secs(3600)),
    ));
    api.drop_watches();
    api.add_pod("agents", "pod-resumed", MANAGED);
    for r in [&by_get, &by_proof] {
        assert!(
            r.cache().unwrap().contains("pod-resumed").is_none(),
            "stale"
        );
    }
    let before = db.fingerprint().await;

    let report = sweep_with(&by_get).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(
        report.cluster_view, "watch cache",
        "the stale cache was read"
    );
    assert_eq!(report.orphans_found, 1, "{report:?}");
    assert_eq!(report.confirmation, Confirmation::Get);
    assert_eq!(report.downgraded, 0, "{report:?}");

    // Many orphans: the stale cache cannot be proven fresh, so the sweep lists afresh and
    // plans on that listing, in which the row has its object.
    let report = sweep_with(&by_proof).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(
        report.cluster_view, "listing (watch cache not proven fresh)",
        "the stale cache was read, then a listing"
    );
    assert_eq!(report.orphans_found, 0, "{report:?}");
    assert_eq!(report.confirmation, Confirmation::Listing, "{report:?}");
    assert_eq!(report.downgraded, 0, "{report:?}");

    assert_eq!(db.fingerprint().await, before);
    assert_eq!(db.state("resumed").await, "suspended");
}

/// Changes the watch can no longer replay (the history compacted while the watch was failing)
/// reach the cache through the relist, deletions included: the relist replaces the cache's
/// contents, it does not merge into them. Nothing wrong is written meanwhile.
#[tokio::test]
async fn changes_compacted_away_arrive_through_the_relist() {
    let World { db, api, .. } = World::seeded(20, 0)
        .await
        .row("paused", "suspended", "pod-paused", minutes(120))
        .pods(&["pod-paused", "pod-doomed"])
        .build()
        .await;
    let (r, metrics) = cached(db.settings(), &api).await;
    let cache = r.cache().unwrap().clone();
    assert!(cache.contains("pod-doomed").is_some());
    api.inject(Fault::on_watch("/pods", FaultAction::Status(500, None)));
    api.drop_watches();
    api.remove(Kind::Pod, "agents", "pod-doomed");
    api.add_pod("agents", "pod-born", MANAGED);
    api.compact();
    api.clear_faults();
    eventually(
        "the relisted cache holds the new pod and not the deleted one",
        || cache.contains("pod-born").is_some() && cache.contains("pod-doomed").is_none(),
    )
    .await;
    assert!(cache.contains("pod-paused").is_some());
    let m = metrics.render();
    assert!(pod_relists_after_failure(&m) >= 1.0, "{m}");
    let report = sweep_with(&r).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(db.state("paused").await, "suspended");
    assert_eq!(report.downgraded, 0);
}

/// Proving the cache fresh for many orphans asks only the informers of the backends they are
/// attributed to, as their GETs would: a stuck Sandbox watch does not hold up orphans of the
/// bare-pod backend, but does hold up a name no backend claims (then a fresh listing confirms).
#[tokio::test]
async fn the_proof_of_freshness_covers_the_orphans_backends() {
    let World {
        db, api, settings, ..
    } = World::seeded(20, 4)
        .await
        .settings(|s| s.backends.pod.object_name_prefix = "pod-".into())
        .settings(proof_waited_for_a_second(0))
        .build()
        .await;
    api.set_bookmark_interval(Duration::from_millis(100));
    add_sandboxes(&db, &api).await;
    let (r, _) = cached(settings, &api).await;
    // The Sandbox informer's watch hangs from now on: its watermark stops.
    api.inject(Fault::on_watch(
        "/sandboxes",
        FaultAction::Hang(Duration::from_secs(3600)),
    ));
    api.drop_watches();
    api.add_pod("elsewhere", "pod-unrelated", MANAGED);

    let report = sweep_with(&r).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(report.confirmation, Confirmation::WatchCache, "{report:?}");
    assert_eq!(
        report.confirmation_requests, 1,
        "one revision read, of pods"
    );
    assert_eq!(report.downgraded, 4);

    db.insert("nobodys-orphan", "suspended", "x-gone", minutes(95))
        .await;
    let report = sweep_with(&r).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(report.confirmation, Confirmation::Listing, "{report:?}");
    assert_eq!(report.downgraded, 1);
    assert_eq!(db.state("nobodys-orphan").await, "gone");
}

/// `namespaces = ["*"]`: one informer per backend covers every namespace, so two objects of
/// the same name in two namespaces are two entries of the cache. Deleting one leaves the
/// name present: its suspended row stays, even when many orphans make the cache, proven
/// fresh, the evidence (rule 2(c)); the real orphans are downgraded.
#[tokio::test]
async fn all_namespaces_cache_keeps_a_name_that_lives_on_in_another_namespace() {
    let World {
        db, api, settings, ..
    } = World::seeded(6, 3)
        .await
        .row("twin", "suspended", "pod-twin", minutes(120))
        .settings(|s| {
            s.cluster.namespaces = vec!["*".into()];
            s.cluster.confirm_get_max = 1;
        })
        .build()
        .await;
    api.set_bookmark_interval(Duration::from_millis(100));
    api.add_pod("ns-a", "pod-twin", MANAGED);
    api.add_pod("ns-b", "pod-twin", MANAGED);
    let (r, _) = cached(settings, &api).await;
    let cache = r.cache().unwrap().clone();
    api.remove(Kind::Pod, "ns-a", "pod-twin");
    api.add_pod("agents", "pod-marker", MANAGED);
    eventually("the watch applies the deletion and the marker", || {
        cache.contains("pod-marker").is_some()
    })
    .await;
    let report = sweep_with(&r).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(db.state("twin").await, "suspended", "ns-b/pod-twin exists");
    assert_eq!(report.confirmation, Confirmation::WatchCache, "{report:?}");
    assert_eq!(report.downgraded, 3, "{report:?}");
    for i in 0..3 {
        assert_eq!(db.state(&format!("orphan-{i}")).await, "gone");
    }
    assert!(cache.contains("pod-twin").is_some());
    // Once the last one goes, the name is absent.
    api.remove(Kind::Pod, "ns-b", "pod-twin");
    eventually("the second deletion arrives", || {
        cache.contains("pod-twin").is_none()
    })
    .await;
}

/// Sandboxes whose spec a schemaless or forked CRD lets be of another type
/// (`replicas: "0"`, `operatingMode: 1`, a `spec` that is a string): their pause state cannot
/// be read, so they are simply present (the safe side), counted and logged, and the listing
/// goes on. In a one-off sweep and in the daemon's cache (listing and watch events) alike the
/// orphans elsewhere are downgraded and the odd Sandboxes' rows are kept.
#[tokio::test]
async fn sandboxes_with_fields_of_the_wrong_type_do_not_stop_the_sweep() {
    let (db, api) = seeded(20, 2).await;
    add_sandboxes(&db, &api).await;
    let odd = [
        ("sb-odd-replicas", json!({ "replicas": "0" })),
        ("sb-odd-mode", json!({ "operatingMode": 1, "replicas": 1 })),
        ("sb-odd-spec", json!("not an object")),
    ];
    for (name, spec) in &odd {
        api.add_sandbox("v1alpha1", "agents", name, spec.clone());
        db.insert(name, "suspended", name, minutes(120)).await;
    }
    db.insert("sb-orphan", "suspended", "sb-gone", minutes(90))
        .await;

    // One-off: the listing completes and is the proof.
    let once_metrics = Metrics::new(&db.settings());
    let mut once = reconciler(db.settings(), &api);
    once_metrics.observe_cluster(api_cluster(&mut once));
    let report = sweep_with(&once).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(report.downgraded, 3, "{report:?}");
    assert_eq!(db.state("sb-orphan").await, "gone");
    for (name, _) in &odd {
        assert_eq!(db.state(name).await, "suspended", "{name}");
    }

    // The daemon's cache syncs over them, and over one that arrives by a watch event.
    db.insert("orphan-late", "suspended", "pod-gone-late", minutes(90))
        .await;
    let (r, metrics) = cached(db.settings(), &api).await;
    api.add_sandbox(
        "v1alpha1",
        "agents",
        "sb-odd-late",
        json!({ "replicas": [0] }),
    );
    db.insert("sb-odd-late", "suspended", "sb-odd-late", minutes(120))
        .await;
    let cache = r.cache().unwrap().clone();
    eventually("the odd Sandbox's event is applied", || {
        cache.contains("sb-odd-late").is_some()
    })
    .await;
    let report = sweep_with(&r).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(report.cluster_view, "watch cache");
    assert_eq!(db.state("orphan-late").await, "gone");
    assert_eq!(db.state("sb-odd-late").await, "suspended");
    for (name, _) in &odd {
        assert_eq!(db.state(name).await, "suspended", "{name}");
    }
    // Counted once per object and field, however often they are listed.
    let undecodable = |m: &str, field: &str| {
        metric(
            m,
            &format!("sandbox_reconciler_objects_undecodable_total{{backend=\"agent-sandbox\",field=\"{field}\"}}"),
        )
    };
    let m = once_metrics.render();
    assert_eq!(undecodable(&m, "spec.replicas"), Some(1.0), "{m}");
    assert_eq!(undecodable(&m, "spec.operatingMode"), Some(1.0), "{m}");
    assert_eq!(undecodable(&m, "spec"), Some(1.0), "{m}");
    api.inject(Fault::on_watch("/sandboxes", FaultAction::ExpireWatch).once());
    api.drop_watches();
    let relisted = |m: &str| {
        metric(
            m,
            "sandbox_reconciler_cache_relists_total{backend=\"agent-sandbox\",reason=\"expired\"}",
        )
        .unwrap_or(0.0)
            >= 1.0
    };
    let m = rendered_when(&metrics, |m| relisted(m) && cache.synced()).await;
    assert!(relisted(&m), "{m}");
    assert_eq!(undecodable(&m, "spec.replicas"), Some(2.0), "{m}");
    assert_eq!(undecodable(&m, "spec.operatingMode"), Some(1.0), "{m}");
    assert_eq!(undecodable(&m, "spec"), Some(1.0), "{m}");
    let watch_errors = metric(
        &m,
        "sandbox_reconciler_cache_relists_total{backend=\"agent-sandbox\",reason=\"watch_error\"}",
    );
    assert_eq!(watch_errors, Some(0.0), "{m}");
}

/// A watch answered 403 (RBAC without `watch`) is counted in `kube_requests_total` with verb
/// `watch` and code 403, like every other watch request's answer, and the relist it causes is
/// counted under its own reason. Once permitted again the cache works and the orphan goes.
#[tokio::test]
async fn a_forbidden_watch_is_counted_and_its_relists_are_counted_by_reason() {
    let World {
        db, api, settings, ..
    } = World::seeded(4, 1).await.build().await;
    let metrics = Metrics::new(&settings);
    let mut r = reconciler(settings, &api);
    let cluster = api_cluster(&mut r);
    let m = metrics.clone();
    cluster.set_request_hook(Arc::new(move |verb, code| m.kube_request(verb, code)));
    let cache = ClusterCache::start(cluster, metrics.clone());
    assert!(cache.wait_synced(Duration::from_secs(10)).await);
    metrics.observe_cache(cache.clone());
    let r = r.with_cache(cache.clone());
    api.deny("watch", "", "pods");
    api.drop_watches();
    let counted = |m: &str| {
        metric(
            m,
            "sandbox_reconciler_kube_requests_total{code=\"403\",verb=\"watch\"}",
        )
        .unwrap_or(0.0)
            >= 1.0
            && metric(
                m,
                "sandbox_reconciler_cache_relists_total{backend=\"pod\",reason=\"forbidden\"}",
            )
            .unwrap_or(0.0)
                >= 1.0
    };
    let m = rendered_when(&metrics, counted).await;
    assert!(counted(&m), "{m}");
    assert!(
        metric(
            &m,
            "sandbox_reconciler_kube_requests_total{code=\"200\",verb=\"watch\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    api.allow_all();
    assert!(cache.wait_synced(Duration::from_secs(40)).await);
    let report = sweep_with(&r).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(db.state("orphan-0").await, "gone");
    assert_eq!(report.downgraded, 1);
}

/// `seeded(20, orphans)` with bookmarks every 100 ms, `doomed` (a suspended row whose pod
/// exists, to be deleted under a frozen watch) and `resumed` (a suspended row whose pod is to
/// be created under it).
async fn doomed_and_resumed(orphans: usize) -> WorldBuilder {
    World::seeded(20, orphans)
        .await
        .bookmark_interval(Duration::from_millis(100))
        .row("doomed", "suspended", "pod-doomed", minutes(120))
        .pod("pod-doomed")
        .row("resumed", "suspended", "pod-resumed", minutes(120))
}

/// A watch that stops following the store (an apiserver whose watch cache froze: no events,
/// bookmarks at a frozen revision) while an object is deleted. Many orphans: the proof of
/// freshness cannot come, so the sweep lists afresh and that listing is its whole view; it
/// finds the row the deletion orphaned (downgraded in that very sweep) and reseeds the
/// informer, whose map then lacks the deleted pod. A row whose pod was created during the
/// freeze, and every live row, are left alone.
#[tokio::test]
async fn a_frozen_watch_is_overtaken_by_the_fallback_listing_which_reseeds_the_cache() {
    let World {
        db, api, settings, ..
    } = doomed_and_resumed(3)
        .await
        .settings(proof_waited_for_a_second(0))
        .build()
        .await;
    let (r, _) = cached(settings, &api).await;
    let cache = r.cache().unwrap().clone();
    api.inject(Fault::on_watch("/pods", FaultAction::FreezeWatch));
    api.drop_watches();
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.remove(Kind::Pod, "agents", "pod-doomed");
    api.add_pod("agents", "pod-resumed", MANAGED);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(cache.contains("pod-doomed").is_some(), "the frozen cache");
    let live_before = live_rows(&db).await;

    let report = sweep_with(&r).await;
    assert_eq!(report.result, SweepResult::Success, "{report:?}");
    assert_eq!(report.confirmation, Confirmation::Listing, "{report:?}");
    assert_eq!(db.state("doomed").await, "gone", "{report:?}");
    assert_eq!(db.state("resumed").await, "suspended");
    assert_eq!(report.downgraded, 4, "{report:?}");
    let live_after = live_rows(&db).await;
    assert_eq!(live_after, live_before);
    assert!(
        cache.contains("pod-doomed").is_none(),
        "the listing reseeded the cache"
    );
    assert!(cache.contains("pod-resumed").is_some());
}

/// The same freeze with few orphans, confirmed by GET: no proof of freshness is ever asked
/// for, so the informer checks itself. Its watermark stays put for
/// `CacheTuning::stall_check_after`; it reads the server's revision, does not reach it within
/// `stall_grace`, and relists (`cache_relists_total{reason="stale"}`). The row the deletion
/// orphaned is downgraded within a bounded number of sweeps; no live row is touched, and a
/// row whose pod was created during the freeze is kept.
#[tokio::test]
async fn a_frozen_watch_is_found_by_the_informers_own_check() {
    let World {
        db, api, settings, ..
    } = doomed_and_resumed(0).await.build().await;
    let metrics = Metrics::new(&settings);
    let mut r = reconciler(settings, &api);
    let cluster = api_cluster(&mut r);
    let tuning = CacheTuning {
        stall_check_after: Duration::from_millis(700),
        stall_grace: Duration::from_millis(500),
    };
    let cache = ClusterCache::start_tuned(cluster, metrics.clone(), tuning);
    assert!(cache.wait_synced(Duration::from_secs(10)).await);
    metrics.observe_cache(cache.clone());
    let r = r.with_cache(cache.clone());
    api.inject(Fault::on_watch("/pods", FaultAction::FreezeWatch));
    api.drop_watches();
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.remove(Kind::Pod, "agents", "pod-doomed");
    api.add_pod("agents", "pod-resumed", MANAGED);
    let live_before = live_rows(&db).await;
    let mut sweeps = 0;
    while db.state("doomed").await != "gone" {
        sweeps += 1;
        assert!(sweeps <= 20, "not found within 20 sweeps");
        let report = sweep_with(&r).await;
        assert_eq!(report.result, SweepResult::Success, "{report:?}");
        assert_eq!(db.state("resumed").await, "suspended", "{report:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let live_after = live_rows(&db).await;
    assert_eq!(live_after, live_before);
    assert_eq!(db.state("resumed").await, "suspended");
    let m = metrics.render();
    assert!(
        metric(
            &m,
            "sandbox_reconciler_cache_relists_total{backend=\"pod\",reason=\"stale\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
}
