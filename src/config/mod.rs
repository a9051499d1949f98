//! Typed settings for sandbox-reconciler.
//!
//! Settings come from `config/default.toml`-shaped TOML files (every key has a default, so a
//! file is optional) and are overridden by environment variables named
//! `SANDBOX_RECONCILER__SECTION__KEY` (`DATABASE_URL` is honoured for `database.url`), so
//! secrets never have to live in a file. Unknown keys are errors, not silently ignored: a typo
//! in a safety setting must not fall back to a default. [`Settings::validate`] checks every
//! value and names the key and the fix in its error.

mod validate;
mod values;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::selector::LabelSelector;
pub use values::{Confirm, Schedule};

/// Everything that can be wrong with the configuration. Each message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("configuration: {0}")]
    Parse(String),
    #[error("config key {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub sessions: SessionSettings,
    pub audit: AuditSettings,
    pub cluster: ClusterSettings,
    pub backends: BackendSettings,
    pub sweep: SweepSettings,
    pub guard: GuardSettings,
    pub server: ServerSettings,
    pub shutdown: ShutdownSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// PostgreSQL URL. Prefer the `DATABASE_URL` environment variable for real credentials.
    pub url: String,
    #[serde(rename = "connect_timeout_seconds", with = "values::seconds")]
    pub connect_timeout: Duration,
    /// `statement_timeout` for every statement the reconciler runs.
    #[serde(rename = "statement_timeout_seconds", with = "values::seconds")]
    pub statement_timeout: Duration,
    /// `lock_timeout`: how long an UPDATE waits for a row the application holds.
    #[serde(rename = "lock_timeout_seconds", with = "values::seconds")]
    pub lock_timeout: Duration,
    /// How long `--once` waits for the writer lock held by another reconciler.
    #[serde(rename = "writer_lock_wait_seconds", with = "values::seconds")]
    pub writer_lock_wait: Duration,
    /// Client-side deadline of every database call; longer than statement_timeout_seconds so
    /// the server's own timeout normally fires first. A half-open connection (after a
    /// failover) never answers at all: this is what ends the wait.
    #[serde(rename = "client_deadline_seconds", with = "values::seconds")]
    pub client_deadline: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSettings {
    /// Session table, optionally schema-qualified (`schema.table`).
    pub table: String,
    pub key_column: String,
    pub state_column: String,
    pub object_column: String,
    pub updated_at_column: String,
    /// Columns set to NULL on downgrade; their old values go into the audit record.
    pub clear_columns: Vec<String>,
    pub suspended_state: String,
    pub gone_state: String,
    /// States whose rows must have a live object (used by the misconfiguration guard).
    pub live_states: Vec<String>,
    /// Other states the platform uses; rows in states not listed anywhere are skipped and counted.
    pub other_states: Vec<String>,
    /// Optional row scope: only rows with `scope_column = scope_value` are read or written.
    pub scope_column: String,
    pub scope_value: String,
    /// The zone a `timestamp without time zone` updated_at column is written in (e.g.
    /// "America/New_York"); required for such a column, ignored for timestamptz.
    pub updated_at_time_zone: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// The reconciler's own audit table (created by its migrations).
    pub table: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// Namespaces to list; `["*"]` means all namespaces.
    pub namespaces: Vec<String>,
    /// `limit` of each list request.
    pub page_size: u32,
    /// Timeout of each API request.
    #[serde(rename = "request_timeout_seconds", with = "values::seconds")]
    pub request_timeout: Duration,
    /// Concurrent confirming GETs.
    pub confirm_concurrency: usize,
    /// The cluster's identity (the kube-system Namespace's UID) this reconciler may act on;
    /// empty (`None`) = any cluster (its identity is still recorded).
    #[serde(
        deserialize_with = "values::expected_uid",
        serialize_with = "values::serialize_expected_uid"
    )]
    pub expected_uid: Option<uuid::Uuid>,
    /// Daemon: at most this many orphans are confirmed by direct GETs (as the pod garbage
    /// collector does); more are confirmed by the watch cache proven fresh, else a listing.
    pub confirm_get_max: usize,
    /// Daemon: how long a sweep waits for the watch cache to sync before listing afresh.
    #[serde(rename = "cache_sync_wait_seconds", with = "values::seconds")]
    pub cache_sync_wait: Duration,
    /// Daemon: how long a sweep waits for the watch cache to reach a revision taken after the
    /// rows were read (a bookmark or event at or past it) before listing afresh.
    #[serde(rename = "cache_fresh_wait_seconds", with = "values::seconds")]
    pub cache_fresh_wait: Duration,
    /// 429, 503 and 504 answers are retried this many times, within the request deadline.
    pub retries: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSettings {
    pub pod: PodBackendSettings,
    pub agent_sandbox: SandboxBackendSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PodBackendSettings {
    pub enabled: bool,
    #[serde(deserialize_with = "values::pod_selector")]
    pub label_selector: LabelSelector,
    /// Rows whose object name starts with this prefix are counted under this backend when
    /// their object is missing (empty matches every name).
    pub object_name_prefix: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxBackendSettings {
    pub enabled: bool,
    pub group: String,
    pub version: String,
    pub plural: String,
    pub kind: String,
    #[serde(deserialize_with = "values::sandbox_selector")]
    pub label_selector: LabelSelector,
    pub object_name_prefix: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSettings {
    /// Cron expression with a seconds field, UTC (daemon mode).
    #[serde(deserialize_with = "values::schedule")]
    pub schedule: Schedule,
    /// Random delay in seconds added to each scheduled sweep (daemon mode).
    #[serde(rename = "jitter_seconds", with = "values::seconds")]
    pub jitter: Duration,
    /// Rows updated more recently than this (before the listing started) are never candidates.
    #[serde(rename = "grace_period_seconds", with = "values::seconds")]
    pub grace_period: Duration,
    pub max_downgrades_per_sweep: usize,
    /// Deprecated: `false` is `confirmation = "none"`, `true` changes nothing. Read only to
    /// keep old files working ([`Settings::deprecated_keys`] names it for a warning).
    #[serde(default, rename = "confirm_absence", skip_serializing)]
    pub(crate) deprecated_confirm_absence: Option<bool>,
    /// Rows per apply transaction.
    pub batch_size: usize,
    pub dry_run: bool,
    /// How an orphan's absence is established: see [`Confirm`].
    #[serde(deserialize_with = "values::confirmation")]
    pub confirmation: Confirm,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GuardSettings {
    /// Refuse to act when more than this fraction of live rows have no object.
    pub max_live_missing_ratio: f64,
    /// ... but only once at least this many live rows have no object.
    pub min_live_missing: u64,
    /// Agent-sandbox backend: refuse when more than this share of its suspended rows have no
    /// Sandbox (pausing keeps the Sandbox); 1 turns this guard off.
    pub max_suspended_missing_ratio: f64,
    pub min_suspended_missing: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    #[serde(deserialize_with = "values::listen")]
    pub listen: SocketAddr,
    /// /healthz fails when a sweep has been running longer than this many schedule periods.
    pub liveness_sweep_periods: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    #[serde(rename = "timeout_seconds", with = "values::seconds")]
    pub timeout: Duration,
}

/// Every key with its default: `config/default.toml`, embedded as the first layer, so the
/// file is the one place a default is written (a unit test parses it).
pub const DEFAULTS_TOML: &str = include_str!("../../config/default.toml");

impl Default for Settings {
    /// The defaults of `config/default.toml`, unvalidated (its `database.url` is a local
    /// placeholder).
    fn default() -> Self {
        config::Config::builder()
            .add_source(config::File::from_str(
                DEFAULTS_TOML,
                config::FileFormat::Toml,
            ))
            .build()
            .and_then(|c| c.try_deserialize())
            .expect("config/default.toml (embedded) sets every key; a unit test checks it")
    }
}

const LIST_KEYS: &[&str] = &[
    "sessions.clear_columns",
    "sessions.live_states",
    "sessions.other_states",
    "cluster.namespaces",
];

impl Settings {
    /// Loads the given files in order (later files override earlier ones), then the
    /// environment, then validates.
    pub fn load(files: &[PathBuf]) -> Result<Settings, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(files, &env)
    }

    /// Like [`Settings::load`] with an explicit environment (for tests).
    pub fn load_from(files: &[PathBuf], env: &[(String, String)]) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULTS_TOML,
            config::FileFormat::Toml,
        ));
        for path in files {
            if !path.is_file() {
                return Err(ConfigError::File {
                    path: path.clone(),
                    message: "not found or not a file; pass an existing file to --config".into(),
                });
            }
            builder = builder
                .add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml));
        }
        let mut source = config::Environment::with_prefix("SANDBOX_RECONCILER")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .source(Some(
                env.iter()
                    .filter(|(k, _)| k.starts_with("SANDBOX_RECONCILER__"))
                    .cloned()
                    .collect(),
            ));
        for key in LIST_KEYS {
            source = source.with_list_parse_key(key);
        }
        builder = builder.add_source(source);
        if let Some((_, url)) = env.iter().find(|(k, _)| k == "DATABASE_URL").filter(|_| {
            !env.iter()
                .any(|(k, _)| k == "SANDBOX_RECONCILER__DATABASE__URL")
        }) {
            builder = builder
                .set_override("database.url", url.clone())
                .map_err(|e| ConfigError::Parse(e.to_string()))?;
        }
        let raw = builder.build().map_err(|e| file_error(files, e))?;
        let mut settings: Settings = raw.try_deserialize().map_err(|e| file_error(files, e))?;
        settings.absorb_deprecated()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Folds deprecated keys into the settings that replaced them.
    fn absorb_deprecated(&mut self) -> Result<(), ConfigError> {
        if self.sweep.deprecated_confirm_absence == Some(false) {
            match self.sweep.confirmation {
                Confirm::Auto | Confirm::None => self.sweep.confirmation = Confirm::None,
                Confirm::Get => {
                    return Err(invalid(
                        "sweep.confirm_absence",
                        "is deprecated, and false contradicts sweep.confirmation = \"get\"; remove sweep.confirm_absence (sweep.confirmation = \"none\" is what false meant)",
                    ))
                }
            }
        }
        Ok(())
    }

    /// Deprecated keys the configuration set, each with what replaces it, for a warning.
    pub fn deprecated_keys(&self) -> Vec<(&'static str, &'static str)> {
        let mut keys = Vec::new();
        if self.sweep.deprecated_confirm_absence.is_some() {
            keys.push((
                "sweep.confirm_absence",
                "sweep.confirmation (\"none\" is what false meant; true is the default \"auto\")",
            ));
        }
        keys
    }

    /// The namespaces to list, or `None` for all namespaces.
    pub fn namespaces(&self) -> Option<&[String]> {
        match self.cluster.namespaces.as_slice() {
            [only] if only == "*" => None,
            list => Some(list),
        }
    }
}

/// The longest audit.table name whose derived names fit 63 bytes.
const MAX_AUDIT_NAME: usize = 63 - "_session_idx".len();
/// The longest grace period: long enough for any policy, short enough for date arithmetic.
pub const MAX_GRACE_PERIOD_SECONDS: u64 = 100 * 365 * 24 * 3600;

/// Turns a `config` crate error into one that says which file and key.
fn file_error(files: &[PathBuf], e: config::ConfigError) -> ConfigError {
    let text = e.to_string();
    // A value that failed to parse into its type already names its key.
    if let Some(at) = text.find(values::KEYED) {
        let keyed = &text[at + values::KEYED.len()..];
        if let Some((key, message)) = keyed.split_once(": ") {
            // The config crate appends the key it was reading; the message already names it.
            let message = message
                .rsplit_once(" for key `")
                .map_or(message, |(head, _)| head);
            return invalid(key, message.trim_end());
        }
    }
    let hint = if text.contains("unknown field") {
        "; remove or correct the key (see config/default.toml for every key)"
    } else {
        ""
    };
    let origin = files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if origin.is_empty() {
        ConfigError::Parse(format!("{text}{hint}"))
    } else {
        ConfigError::Parse(format!("{text}{hint} (files: {origin})"))
    }
}

/// RFC 1123 label, as Kubernetes requires of namespace names.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        Settings::load_from(&[], &[]).unwrap();
        Settings::default().validate().unwrap();
    }

    /// A settings document flattened to `section.key` (nested tables joined), sorted.
    fn flatten(value: &serde_json::Value) -> Vec<(String, serde_json::Value)> {
        fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
            match v.as_object() {
                Some(map) => {
                    for (k, v) in map {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, v, out);
                    }
                }
                None => out.push((prefix.to_string(), v.clone())),
            }
        }
        let mut out = Vec::new();
        walk("", value, &mut out);
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every key of the embedded defaults with its value.
    fn default_keys() -> Vec<(String, serde_json::Value)> {
        let value: serde_json::Value = config::Config::builder()
            .add_source(config::File::from_str(
                DEFAULTS_TOML,
                config::FileFormat::Toml,
            ))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        flatten(&value)
    }

    /// Settings serialize to the keys and values they were read from: the defaults written
    /// back are config/default.toml's, key for key (tests write configuration files this way).
    #[test]
    fn settings_serialize_to_the_keys_they_read() {
        let written = serde_json::to_value(Settings::default()).unwrap();
        assert_eq!(flatten(&written), default_keys());
    }

    /// The README's configuration table is checked against config/default.toml, the one
    /// source of every default: each key is documented there, with the same default.
    #[test]
    fn the_readme_documents_every_key_with_its_default() {
        let readme = include_str!("../../README.md");
        let mut documented = std::collections::BTreeMap::new();
        for line in readme
            .lines()
            .filter(|l| l.starts_with("| `") && l.contains('.'))
        {
            let cells: Vec<&str> = line.split(" | ").collect();
            if cells.len() < 3 {
                continue;
            }
            let keys: Vec<&str> = cells[0]
                .trim_start_matches("| ")
                .split(" / ")
                .map(|k| k.trim_matches('`'))
                .collect();
            let Some((section, _)) = keys[0].rsplit_once('.') else {
                continue;
            };
            let values: Vec<&str> = cells[1].split(" / ").collect();
            for (i, key) in keys.iter().enumerate() {
                let full = if i == 0 {
                    key.to_string()
                } else {
                    format!("{section}.{key}")
                };
                let value = values.get(i).or(values.first()).copied().unwrap_or("");
                documented.insert(full, value.trim().trim_matches('`').to_string());
            }
        }
        let normalise = |s: &str| match s {
            "empty" | "\"\"" => String::new(),
            other => other.replace(' ', ""),
        };
        for (key, value) in default_keys() {
            let Some(shown) = documented.get(&key) else {
                panic!("README.md's configuration table does not document {key}");
            };
            let actual = match &value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            assert_eq!(
                normalise(shown),
                normalise(&actual),
                "README.md shows the default of {key} as {shown:?}; config/default.toml says {actual:?}"
            );
        }
    }

    #[test]
    fn env_overrides_and_database_url() {
        let s = Settings::load_from(
            &[],
            &env(&[
                ("DATABASE_URL", "postgres://u@h/db"),
                ("SANDBOX_RECONCILER__SWEEP__GRACE_PERIOD_SECONDS", "42"),
                ("SANDBOX_RECONCILER__CLUSTER__NAMESPACES", "a,b"),
                (
                    "SANDBOX_RECONCILER__BACKENDS__AGENT_SANDBOX__ENABLED",
                    "true",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(s.database.url, "postgres://u@h/db");
        assert_eq!(s.sweep.grace_period.as_secs(), 42);
        assert_eq!(s.cluster.namespaces, vec!["a", "b"]);
        assert!(s.backends.agent_sandbox.enabled);
    }

    #[test]
    fn bad_identifier_names_the_key() {
        let err = Settings::load_from(
            &[],
            &env(&[(
                "SANDBOX_RECONCILER__SESSIONS__OBJECT_COLUMN",
                "x; drop table y",
            )]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sessions.object_column"), "{err}");
    }

    #[test]
    fn unknown_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[sweep]\ngrace_period_secs = 5\n").unwrap();
        let err = Settings::load_from(&[path], &[]).unwrap_err().to_string();
        assert!(err.contains("grace_period_secs"), "{err}");
    }

    #[test]
    fn contradictory_states_rejected() {
        let err = Settings::load_from(
            &[],
            &env(&[(
                "SANDBOX_RECONCILER__SESSIONS__LIVE_STATES",
                "running,suspended",
            )]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sessions.live_states"), "{err}");
    }

    #[test]
    fn schedule_is_validated_and_has_a_period() {
        let err = Settings::load_from(
            &[],
            &env(&[("SANDBOX_RECONCILER__SWEEP__SCHEDULE", "*/5 * * *")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sweep.schedule"), "{err}");
    }

    /// A value parsed into its type reports like every validation error: the key, the value
    /// and what to write instead.
    #[test]
    fn typed_values_name_their_key() {
        for (var, value, expected) in [
            (
                "SANDBOX_RECONCILER__SERVER__LISTEN",
                "nowhere",
                "config key server.listen: \"nowhere\" is not an address:port such as 0.0.0.0:9090",
            ),
            (
                "SANDBOX_RECONCILER__SWEEP__CONFIRMATION",
                "always",
                "config key sweep.confirmation: \"always\" is not one of",
            ),
            (
                "SANDBOX_RECONCILER__CLUSTER__EXPECTED_UID",
                "prod-cluster",
                "config key cluster.expected_uid: \"prod-cluster\" is not a UID",
            ),
            (
                "SANDBOX_RECONCILER__BACKENDS__AGENT_SANDBOX__LABEL_SELECTOR",
                "a in (b",
                "config key backends.agent_sandbox.label_selector: ",
            ),
            (
                "SANDBOX_RECONCILER__SWEEP__SCHEDULE",
                "*/5 * * *",
                "config key sweep.schedule: \"*/5 * * *\" is not a cron expression",
            ),
        ] {
            let err = Settings::load_from(&[], &env(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(expected), "{var}={value}: {err}");
            assert!(!err.contains(" for key `"), "the key is named once: {err}");
        }
        let s = Settings::load_from(
            &[],
            &env(&[
                ("SANDBOX_RECONCILER__SERVER__LISTEN", "127.0.0.1:9191"),
                (
                    "SANDBOX_RECONCILER__CLUSTER__EXPECTED_UID",
                    "0B9C1F2E-3D4A-4B5C-8D6E-7F8091A2B3C4",
                ),
                ("SANDBOX_RECONCILER__SWEEP__CONFIRMATION", "get"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.listen.port(), 9191);
        assert_eq!(
            s.cluster.expected_uid.map(|u| u.to_string()).as_deref(),
            Some("0b9c1f2e-3d4a-4b5c-8d6e-7f8091a2b3c4")
        );
        assert_eq!(s.sweep.confirmation, Confirm::Get);
        assert!(s.deprecated_keys().is_empty());
    }

    /// `sweep.confirm_absence` is still read: false is `confirmation = "none"`, true changes
    /// nothing, and false beside `confirmation = "get"` is a contradiction named by key.
    #[test]
    fn the_deprecated_confirm_absence_key_is_absorbed() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| {
            let path = dir.path().join("c.toml");
            std::fs::write(&path, text).unwrap();
            Settings::load_from(&[path], &[])
        };
        let off = load("[sweep]\nconfirm_absence = false\n").unwrap();
        assert_eq!(off.sweep.confirmation, Confirm::None);
        assert_eq!(off.deprecated_keys()[0].0, "sweep.confirm_absence");
        let on = load("[sweep]\nconfirm_absence = true\n").unwrap();
        assert_eq!(on.sweep.confirmation, Confirm::Auto);
        assert_eq!(on.deprecated_keys().len(), 1);
        let err = load("[sweep]\nconfirm_absence = false\nconfirmation = \"get\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config key sweep.confirm_absence: "),
            "{err}"
        );
        assert_eq!(
            Settings::default().sweep.confirmation,
            Confirm::Auto,
            "the default"
        );
    }

    #[test]
    fn empty_namespaces_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[cluster]\nnamespaces = []\n").unwrap();
        let err = Settings::load_from(&[path], &[]).unwrap_err().to_string();
        assert!(err.contains("cluster.namespaces"), "{err}");
    }
}
