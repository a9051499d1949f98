//! Lean decoding of the API server's answers: only what the reconciler keeps of an object.
//!
//! A Pod or Sandbox answer carries `managedFields`, status, spec and annotations that the
//! reconciler never reads; decoding them into `ObjectMeta` or `DynamicObject` costs most of a
//! listing's time and memory. These types name only the fields the reconciler uses (name,
//! namespace, labels, deletionTimestamp, resourceVersion, and a Sandbox's pause fields);
//! serde skips everything else without allocating it. Lists, watch events and single objects
//! decode into the same [`LeanObject`].

use std::collections::BTreeMap;

use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::selector::LabelSelector;
use crate::snapshot::ObjectFacts;

/// One object as the reconciler sees it.
#[derive(Debug, Clone, Deserialize)]
pub struct LeanObject {
    #[serde(default)]
    pub metadata: LeanMeta,
    /// Sandboxes only: whether they are paused on purpose. Absent on metadata-only answers.
    #[serde(default)]
    pub spec: Option<LeanSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeanMeta {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub resource_version: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Only whether it is set matters.
    pub deletion_timestamp: Option<IgnoredAny>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeanSpec {
    pub replicas: Option<i64>,
    pub operating_mode: Option<String>,
}

impl LeanSpec {
    /// `spec.replicas: 0` (v1alpha1) or `spec.operatingMode: Suspended` (v1beta1).
    pub fn paused(&self) -> bool {
        self.replicas == Some(0) || self.operating_mode.as_deref() == Some("Suspended")
    }
}

/// A page of a list answer.
#[derive(Debug, Clone, Deserialize)]
pub struct LeanList {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: LeanListMeta,
    #[serde(default)]
    pub items: Vec<LeanObject>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeanListMeta {
    pub resource_version: Option<String>,
    #[serde(rename = "continue")]
    pub continue_: Option<String>,
}

impl LeanObject {
    /// Whether a Sandbox is paused on purpose: `spec.replicas: 0` (v1alpha1) or
    /// `spec.operatingMode: Suspended` (v1beta1).
    pub fn paused(&self) -> bool {
        self.spec.as_ref().is_some_and(LeanSpec::paused)
    }

    /// The facts kept about this object; `selector` says whether it is one of the platform's
    /// (it still protects its row when it is not: presence is by name, as a GET is).
    pub fn facts(&self, selector: &LabelSelector) -> ObjectFacts {
        ObjectFacts {
            terminating: self.metadata.deletion_timestamp.is_some(),
            suspended: self.paused(),
            managed: selector.matches(&self.metadata.labels),
        }
    }
}

/// A resourceVersion as an integer: they compare as integers within a resource type
/// (documented since Kubernetes 1.35). `None` for a value that is not one.
pub fn revision(resource_version: &str) -> Option<u64> {
    resource_version.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_only_what_is_kept() {
        let page: LeanList = serde_json::from_value(serde_json::json!({
            "kind": "SandboxList",
            "metadata": {"resourceVersion": "42", "continue": "abc"},
            "items": [{
                "metadata": {
                    "name": "sb-1", "namespace": "agents", "resourceVersion": "40",
                    "labels": {"app": "x"},
                    "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
                    "deletionTimestamp": "2026-01-01T00:00:00Z"
                },
                "spec": {"replicas": 0, "podTemplate": {"spec": {"containers": []}}},
                "status": {"conditions": []}
            }, {
                "metadata": {"name": "sb-2"},
                "spec": {"operatingMode": "Suspended"}
            }, {
                "metadata": {"name": "sb-3"},
                "spec": {"replicas": 1}
            }]
        }))
        .unwrap();
        assert_eq!(page.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(page.metadata.continue_.as_deref(), Some("abc"));
        let selector = LabelSelector::parse("app=x").unwrap();
        let facts: Vec<ObjectFacts> = page.items.iter().map(|o| o.facts(&selector)).collect();
        assert!(facts[0].terminating && facts[0].suspended && facts[0].managed);
        assert!(!facts[1].terminating && facts[1].suspended && !facts[1].managed);
        assert!(!facts[2].suspended);
        assert_eq!(revision("17"), Some(17));
        assert_eq!(revision("x"), None);
    }
}
