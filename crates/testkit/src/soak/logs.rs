//! What the daemon and `--once` logs say (JSON lines).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde_json::Value;

/// What the daemon and `--once` logs say.
#[derive(Default)]
pub(crate) struct LogFacts {
    /// Lines by level, plus "panicked".
    pub(crate) counts: BTreeMap<String, u64>,
    /// (sweep id, session key) of every "downgraded session to gone" line.
    pub(crate) downgraded: HashSet<(String, String)>,
    /// Sweeps that logged "sweep failed", with the error.
    pub(crate) failed: HashMap<String, String>,
    /// Sweeps that logged "sweep finished".
    pub(crate) finished: HashSet<String>,
    /// "refusing to act" lines by reason.
    pub(crate) refusals: BTreeMap<String, u64>,
    /// The first refusal message of each reason.
    pub(crate) refusal_samples: BTreeMap<String, String>,
}

/// Reads every daemon and `--once` log.
pub(crate) fn scan_logs(dir: &Path) -> LogFacts {
    let mut facts = LogFacts::default();
    let counts = &mut facts.counts;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return facts;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for line in text.lines() {
            if line.contains("panicked") {
                *counts.entry("panicked".to_string()).or_default() += 1;
            }
            let Ok(event) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if let Some(level) = event["level"].as_str() {
                *counts.entry(level.to_lowercase()).or_default() += 1;
            }
            let sweep = event["sweep_id"].as_str().unwrap_or_default().to_string();
            match event["message"].as_str().unwrap_or_default() {
                "downgraded session to gone" => {
                    let key = event["key"].as_str().unwrap_or_default().to_string();
                    facts.downgraded.insert((sweep, key));
                }
                "sweep finished" => {
                    facts.finished.insert(sweep);
                }
                "sweep failed; nothing partial was written" => {
                    let error = event["error"].as_str().unwrap_or_default().to_string();
                    facts.failed.insert(sweep, error);
                }
                message if message.starts_with("refusing to act") => {
                    let reason = event["reason"].as_str().unwrap_or("none").to_string();
                    facts
                        .refusal_samples
                        .entry(reason.clone())
                        .or_insert_with(|| message.to_string());
                    *facts.refusals.entry(reason).or_default() += 1;
                }
                _ => {}
            }
        }
    }
    facts
}
