//! The daemon's watch cache: objects held, whether every informer is synced, how stale the
//! stalest informer is (read from the cache at every scrape), and its relists and watch
//! restarts (counted as they happen, through `CacheObserver`).

use std::sync::{Arc, Mutex};

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec};

use super::Registrar;
use crate::backends::Backends;
use crate::cluster::cache::{ClusterCache, RelistReason};
use crate::snapshot::BackendKind;

/// The watch cache metrics.
pub struct CacheMetrics {
    pub cache_objects: IntGaugeVec,
    pub cache_synced: IntGauge,
    pub cache_relists_total: IntCounterVec,
    pub cache_watch_restarts_total: IntCounterVec,
    pub cache_watermark_age_seconds: IntGauge,
    /// The daemon's watch cache, read at each scrape.
    cache: Mutex<Option<Arc<ClusterCache>>>,
}

impl CacheMetrics {
    /// Registers the cache metrics; every enabled backend's relists (by reason) and watch
    /// restarts start at zero.
    pub(super) fn new(r: &mut Registrar, backends: &Backends) -> CacheMetrics {
        let m = CacheMetrics {
            cache_objects: r.int_gauge_vec(
                "cache_objects",
                "Objects in the daemon's watch cache.",
                &["backend"],
            ),
            cache_synced: r.int_gauge(
                "cache_synced",
                "1 while every informer of the watch cache has listed and watches.",
            ),
            cache_relists_total: r.int_counter_vec(
                "cache_relists_total",
                "Complete listings of the watch cache, by reason: initial, expired (410 on the watch), watch_error, list_error.",
                &["backend", "reason"],
            ),
            cache_watch_restarts_total: r.int_counter_vec(
                "cache_watch_restarts_total",
                "Watches resumed from the last applied revision (server timeouts, dropped streams).",
                &["backend"],
            ),
            cache_watermark_age_seconds: r.int_gauge(
                "cache_watermark_age_seconds",
                "Seconds since the stalest informer last applied an event or bookmark.",
            ),
            cache: Mutex::new(None),
        };
        // An informer is per listed backend.
        for kind in backends.enabled().iter().map(|b| b.kind) {
            m.cache_watch_restarts_total
                .with_label_values(&[kind.as_str()]);
            for reason in RelistReason::ALL {
                m.cache_relists_total
                    .with_label_values(&[kind.as_str(), reason.as_str()]);
            }
        }
        m
    }

    /// Reads `cache`'s figures at every scrape from now on.
    pub fn observe(&self, cache: Arc<ClusterCache>) {
        if let Ok(mut slot) = self.cache.lock() {
            *slot = Some(cache);
        }
    }

    /// Sets the gauges from the observed cache, if any.
    pub(super) fn refresh(&self) {
        let cache = self.cache.lock().ok().and_then(|c| c.clone());
        let Some(cache) = cache else {
            return;
        };
        let status = cache.status();
        self.cache_synced.set(i64::from(status.synced));
        for (backend, n) in status.objects {
            self.cache_objects
                .with_label_values(&[backend.as_str()])
                .set(n as i64);
        }
        self.cache_watermark_age_seconds
            .set(status.watermark_age_seconds as i64);
    }

    /// Counts one complete listing of `backend`'s informer.
    pub fn relisted(&self, backend: BackendKind, reason: RelistReason) {
        self.cache_relists_total
            .with_label_values(&[backend.as_str(), reason.as_str()])
            .inc();
    }

    /// Counts one watch of `backend`'s informer resumed.
    pub fn watch_restarted(&self, backend: BackendKind) {
        self.cache_watch_restarts_total
            .with_label_values(&[backend.as_str()])
            .inc();
    }
}
