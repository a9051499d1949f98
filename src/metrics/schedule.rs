//! The daemon's schedule and leadership: when the next sweep is due, the schedule's period,
//! and whether this replica holds the writer lock. Set by `daemon`, not from a report.

use prometheus::{Gauge, IntGauge};

use super::Registrar;

/// The schedule and leadership metrics.
pub struct ScheduleMetrics {
    pub next_sweep_timestamp_seconds: Gauge,
    pub leader: IntGauge,
    pub sweep_interval_seconds: Gauge,
}

impl ScheduleMetrics {
    pub(super) fn new(r: &mut Registrar) -> ScheduleMetrics {
        ScheduleMetrics {
            next_sweep_timestamp_seconds: r.gauge(
                "next_sweep_timestamp_seconds",
                "Unix time the next scheduled sweep is due (daemon only).",
            ),
            leader: r.int_gauge("leader", "1 while this replica holds the writer lock."),
            sweep_interval_seconds: r.gauge(
                "sweep_interval_seconds",
                "Nominal period of the sweep schedule.",
            ),
        }
    }
}
