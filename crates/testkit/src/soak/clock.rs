//! The clocks: the database's against this host's.

use anyhow::{anyhow, Result};
use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// PostgreSQL's clock minus this host's, bounded by a round trip: `min <= offset <= max`.
/// Both are the same clock when the server runs on this host; the bounds keep the oracle's
/// claims true when it does not.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClockOffset {
    min: chrono::Duration,
    max: chrono::Duration,
}

impl ClockOffset {
    /// The latest database time that local instant `t` can correspond to.
    pub(crate) fn latest_db(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        t + self.max
    }

    /// The earliest database time that local instant `t` can correspond to.
    pub(crate) fn earliest_db(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        t + self.min
    }

    /// Measures the offset; keeps the tightest of a few round trips.
    pub(crate) async fn measure(pool: &PgPool) -> Result<ClockOffset> {
        let mut best: Option<ClockOffset> = None;
        for _ in 0..7 {
            let before = Utc::now();
            let db: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
                .fetch_one(pool)
                .await?;
            let after = Utc::now();
            // db was read somewhere in [before, after] (+ a microsecond of truncation).
            let candidate = ClockOffset {
                min: db - after,
                max: db - before + chrono::Duration::microseconds(1),
            };
            if best.is_none_or(|b| candidate.max - candidate.min < b.max - b.min) {
                best = Some(candidate);
            }
        }
        best.ok_or_else(|| anyhow!("could not read the database clock"))
    }

    /// The bounds in microseconds, for the report: (min, max).
    pub(crate) fn bounds_us(&self) -> (i64, i64) {
        (
            self.min.num_microseconds().unwrap_or(i64::MIN),
            self.max.num_microseconds().unwrap_or(i64::MAX),
        )
    }
}
