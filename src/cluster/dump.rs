//! A cluster snapshot read from a `kubectl get pods,sandboxes -A -o json` dump.
//!
//! Offline audits (for example of a database restore) compare rows with a dump instead of a
//! live API server. The same namespaces and label selectors as a live listing apply. The
//! dump's clock (for the grace period) is the file's modification time, the moment kubectl
//! wrote it. A dump cannot confirm absences, so snapshot mode is always a dry run.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::lean::sandbox_is_suspended;
use super::{BackendKind, BackendView, ClusterError, ClusterSnapshot, ObjectFacts};
use crate::backends::Backends;
use crate::config::Settings;

#[derive(Deserialize)]
struct DumpList {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    items: Vec<serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct DumpMeta {
    name: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(rename = "deletionTimestamp")]
    deletion_timestamp: Option<String>,
}

/// Reads a dump file.
pub fn load(path: &Path, settings: &Settings) -> Result<ClusterSnapshot, ClusterError> {
    let err = |message: String| ClusterError::Dump {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let taken_at: DateTime<Utc> = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map(DateTime::<Utc>::from)
        .unwrap_or_else(|_| Utc::now());
    let mut snapshot = parse(&text, settings, taken_at).map_err(err)?;
    snapshot.source = path.display().to_string();
    Ok(snapshot)
}

/// Parses dump text; `taken_at` becomes the snapshot's clock.
pub fn parse(
    text: &str,
    settings: &Settings,
    taken_at: DateTime<Utc>,
) -> Result<ClusterSnapshot, String> {
    let list: DumpList =
        serde_json::from_str(text).map_err(|e| format!("not a kubectl JSON list: {e}"))?;
    if !list.kind.ends_with("List") {
        return Err(format!(
            "expected a List (kubectl get -o json), got kind {:?}",
            list.kind
        ));
    }
    let backends = Backends::from_settings(&settings.backends);
    let namespaces = settings.namespaces();
    let mut views: Vec<BackendView> = backends
        .enabled()
        .iter()
        .map(|b| BackendView::new(b.kind, &b.prefix))
        .collect();
    for (i, item) in list.items.iter().enumerate() {
        let kind = item["kind"].as_str().unwrap_or_default();
        let api_version = item["apiVersion"].as_str().unwrap_or_default();
        let meta: DumpMeta = serde_json::from_value(item["metadata"].clone())
            .map_err(|e| format!("item {i}: bad metadata: {e}"))?;
        let name = meta
            .name
            .as_deref()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("item {i} ({kind}) has no metadata.name"))?;
        if let Some(allowed) = namespaces {
            if !meta
                .namespace
                .as_ref()
                .is_some_and(|ns| allowed.contains(ns))
            {
                continue;
            }
        }
        let terminating = meta.deletion_timestamp.is_some();
        // Presence is by name; the selector only says which objects are the platform's.
        let Some(i) = backends
            .enabled()
            .iter()
            .position(|b| b.recognises(kind, api_version))
        else {
            continue;
        };
        let backend = &backends.enabled()[i];
        views[i].insert(
            name,
            ObjectFacts {
                terminating,
                suspended: backend.kind == BackendKind::AgentSandbox && sandbox_is_suspended(item),
                managed: backend.selector.matches(&meta.labels),
            },
        );
    }
    let mut snapshot = ClusterSnapshot::new(taken_at);
    snapshot.backends = views;
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pods_and_sandboxes_with_selectors() {
        let mut settings = Settings::default();
        settings.backends.agent_sandbox.enabled = true;
        settings.cluster.namespaces = vec!["agents".into()];
        let text = serde_json::json!({
            "apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p1", "namespace": "agents", "labels": {"centaur.ai/managed": "true"}}},
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p2", "namespace": "agents", "labels": {}}},
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p3", "namespace": "other", "labels": {"centaur.ai/managed": "true"}}},
                {"apiVersion": "agents.x-k8s.io/v1alpha1", "kind": "Sandbox", "metadata": {"name": "s1", "namespace": "agents"}, "spec": {"replicas": 0}}
            ]
        })
        .to_string();
        let snap = parse(&text, &settings, Utc::now()).unwrap();
        assert!(snap.backends[0].facts("p1").unwrap().managed);
        // Unlabelled: present (it protects its row) but not the platform's.
        assert!(!snap.backends[0].facts("p2").unwrap().managed);
        assert!(!snap.backends[0].contains("p3"));
        assert!(snap.backends[1].facts("s1").unwrap().suspended);
    }

    #[test]
    fn item_without_name_is_an_error() {
        let text = r#"{"kind":"List","items":[{"kind":"Pod","apiVersion":"v1","metadata":{}}]}"#;
        assert!(parse(text, &Settings::default(), Utc::now()).is_err());
    }
}
