//! The running process: which build runs (`build_info`), whether it only reports
//! (`dry_run`), and the standard process collector (`process_*`, on Linux).

use prometheus::{IntGauge, IntGaugeVec};

use super::Registrar;
use crate::config::Settings;

/// The build and process metrics.
pub struct ProcessMetrics {
    pub build_info: IntGaugeVec,
    pub dry_run: IntGauge,
}

impl ProcessMetrics {
    /// Registers the build and mode metrics, set from this build and `settings`, and the
    /// process collector.
    pub(super) fn new(r: &mut Registrar, settings: &Settings) -> ProcessMetrics {
        let m = ProcessMetrics {
            build_info: r.int_gauge_vec(
                "build_info",
                "Always 1; the version and revision (git commit) labels say which build runs.",
                &["version", "revision"],
            ),
            dry_run: r.int_gauge(
                "dry_run",
                "1 when the reconciler only reports and never writes.",
            ),
        };
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            r.described.extend(super::describe_collector("", &process));
            if let Err(e) = r.registry.register(Box::new(process)) {
                tracing::warn!("the process collector could not be registered: {e}");
            }
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), crate::REVISION])
            .set(1);
        m.dry_run.set(i64::from(settings.sweep.dry_run));
        m
    }
}
