//! The typed values of settings that are written as text: each is parsed once, when the
//! configuration is read, into the type the code uses, and a value that does not parse is an
//! error naming its key. Nothing downstream parses these strings again.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::de::{Deserializer, Error as _};
use serde::{Deserialize, Serialize, Serializer};

use crate::selector::LabelSelector;

/// The prefix of an error raised while a value is deserialized: the loader turns such an
/// error back into [`super::ConfigError::Invalid`] text, so it reads like every other.
pub(super) const KEYED: &str = "config key ";

/// Reads a string and parses it, naming `key` in the error.
fn keyed<'de, D, T>(
    d: D,
    key: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let text = String::deserialize(d)?;
    parse(&text).map_err(|message| D::Error::custom(format!("{KEYED}{key}: {message}")))
}

/// A sweep schedule: a cron expression with a seconds field, in UTC (`sweep.schedule`).
#[derive(Clone)]
pub struct Schedule {
    expression: String,
    cron: croner::Cron,
}

impl Schedule {
    /// Parses an expression the way the scheduler does (seconds field required, UTC).
    pub fn parse(expression: &str) -> Result<Schedule, String> {
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .dom_and_dow(true)
            .build()
            .parse(expression)
            .map_err(|e| {
                format!("{expression:?} is not a cron expression with a seconds field ({e}); e.g. \"0 */5 * * * *\" for every 5 minutes")
            })?;
        Ok(Schedule {
            expression: expression.to_string(),
            cron,
        })
    }

    /// The expression as written, for the scheduler and the logs.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The next occurrence strictly after `after`.
    pub fn next_after(
        &self,
        after: &chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        self.cron.find_next_occurrence(after, false).ok()
    }

    /// The nominal period: the longest gap between the next dozen occurrences.
    pub fn period(&self) -> Duration {
        let mut longest = Duration::ZERO;
        // Whole seconds: occurrences are whole seconds too.
        let now = chrono::Utc::now().timestamp();
        let mut prev = chrono::DateTime::from_timestamp(now, 0).unwrap_or_default();
        for _ in 0..12 {
            let Some(next) = self.next_after(&prev) else {
                break;
            };
            if let Ok(gap) = (next - prev).to_std() {
                longest = longest.max(gap);
            }
            prev = next;
        }
        longest
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expression)
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.expression)
    }
}

/// `sweep.confirmation`: how an orphan's absence is established before its row is downgraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// A one-off sweep's complete listing, started after the rows were read, is the
    /// confirmation; the daemon GETs a few orphans and proves its watch cache fresh for many.
    Auto,
    /// A direct GET answering 404 per orphan, always.
    Get,
    /// A one-off sweep trusts its view without a separate confirmation; the daemon, whose
    /// cache may lag, still confirms as with `auto`. The deprecated
    /// `sweep.confirm_absence = false` means this.
    None,
}

impl Confirm {
    pub const ALL: [Confirm; 3] = [Confirm::Auto, Confirm::Get, Confirm::None];

    /// The value as written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Confirm::Auto => "auto",
            Confirm::Get => "get",
            Confirm::None => "none",
        }
    }

    fn parse(text: &str) -> Result<Confirm, String> {
        Confirm::ALL
            .into_iter()
            .find(|c| c.as_str() == text)
            .ok_or_else(|| format!("{text:?} is not one of \"auto\", \"get\", \"none\""))
    }
}

impl fmt::Display for Confirm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses `server.listen`.
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an address:port such as 0.0.0.0:9090"))
}

/// Parses `cluster.expected_uid`: empty means any cluster.
fn parse_expected_uid(text: &str) -> Result<Option<uuid::Uuid>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    uuid::Uuid::parse_str(text).map(Some).map_err(|_| {
        format!(
            "{text:?} is not a UID; use the kube-system Namespace's metadata.uid (kubectl get namespace kube-system -o jsonpath='{{.metadata.uid}}'), or leave it empty"
        )
    })
}

pub(super) fn listen<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    keyed(d, "server.listen", parse_listen)
}

pub(super) fn schedule<'de, D: Deserializer<'de>>(d: D) -> Result<Schedule, D::Error> {
    keyed(d, "sweep.schedule", Schedule::parse)
}

pub(super) fn confirmation<'de, D: Deserializer<'de>>(d: D) -> Result<Confirm, D::Error> {
    keyed(d, "sweep.confirmation", Confirm::parse)
}

pub(super) fn expected_uid<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<uuid::Uuid>, D::Error> {
    keyed(d, "cluster.expected_uid", parse_expected_uid)
}

pub(super) fn pod_selector<'de, D: Deserializer<'de>>(d: D) -> Result<LabelSelector, D::Error> {
    keyed(d, "backends.pod.label_selector", LabelSelector::parse)
}

pub(super) fn sandbox_selector<'de, D: Deserializer<'de>>(d: D) -> Result<LabelSelector, D::Error> {
    keyed(
        d,
        "backends.agent_sandbox.label_selector",
        LabelSelector::parse,
    )
}

// Written back as the text they were read from, so a `Settings` serializes to a file that
// reads back the same.

impl Serialize for Schedule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.expression)
    }
}

impl Serialize for Confirm {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl Serialize for LabelSelector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `cluster.expected_uid` as written: empty for any cluster.
pub(super) fn serialize_expected_uid<S: Serializer>(
    uid: &Option<uuid::Uuid>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&uid.map(|u| u.to_string()).unwrap_or_default())
}

/// A `*_seconds` key: whole seconds in the file, a `Duration` in the code.
pub(super) mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(value.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_has_a_period() {
        assert_eq!(
            Schedule::parse("0 */5 * * * *").unwrap().period().as_secs(),
            300
        );
        assert_eq!(
            Schedule::parse("*/1 * * * * *").unwrap().period().as_secs(),
            1
        );
        assert!(Schedule::parse("*/5 * * *").is_err());
    }

    #[test]
    fn confirmation_values_round_trip() {
        for c in Confirm::ALL {
            assert_eq!(Confirm::parse(c.as_str()), Ok(c));
        }
        assert!(Confirm::parse("always").unwrap_err().contains("\"none\""));
    }

    #[test]
    fn an_expected_uid_is_parsed_or_empty() {
        assert_eq!(parse_expected_uid("  "), Ok(None));
        let uid = "0b9c1f2e-3d4a-4b5c-8d6e-7f8091a2b3c4";
        assert_eq!(parse_expected_uid(uid).unwrap().unwrap().to_string(), uid);
        assert!(parse_expected_uid("prod-cluster").is_err());
    }
}
