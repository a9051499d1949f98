//! Lean decoding of the API server's answers: only what the reconciler keeps of an object.
//!
//! A Pod or Sandbox answer carries `managedFields`, status, spec and annotations that the
//! reconciler never reads; decoding them into `ObjectMeta` or `DynamicObject` costs most of a
//! listing's time and memory. These types name only the fields the reconciler uses (name,
//! namespace, labels, deletionTimestamp, resourceVersion, and a Sandbox's pause fields);
//! serde skips everything else without allocating it. Lists, watch events and single objects
//! decode into the same [`LeanObject`].
//!
//! A Sandbox's spec is decoded leniently: a schemaless or forked CRD may let `spec.replicas` be
//! `"0"`, `spec.operatingMode` be `1`, or `spec` be no object at all. The decision needs only
//! whether the Sandbox exists; such a field is treated as absent (the Sandbox is present and
//! not known to be paused, the safe side) and named in [`LeanSpec::undecodable`], so that the
//! listing goes on and the caller counts and logs it, instead of one odd object failing every
//! listing.

use std::collections::BTreeMap;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
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

/// Every value [`LeanSpec::undecodable`] can name (the metric's `field` label).
pub const UNDECODABLE_FIELDS: [&str; 3] = ["spec", "spec.replicas", "spec.operatingMode"];

/// The pause fields of a Sandbox's spec, decoded leniently (see the module's notes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeanSpec {
    pub replicas: Option<i64>,
    pub operating_mode: Option<String>,
    /// Fields that were present but of the wrong type, treated as absent: `"spec"` (not an
    /// object), `"spec.replicas"` (not an integer), `"spec.operatingMode"` (not a string).
    pub undecodable: Vec<&'static str>,
}

impl LeanSpec {
    /// `spec.replicas: 0` (v1alpha1) or `spec.operatingMode: Suspended` (v1beta1).
    pub fn paused(&self) -> bool {
        self.replicas == Some(0) || self.operating_mode.as_deref() == Some("Suspended")
    }
}

impl<'de> Deserialize<'de> for LeanSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<LeanSpec, D::Error> {
        deserializer.deserialize_any(SpecVisitor)
    }
}

/// The spec's keys the reconciler reads; every other key is skipped unread.
enum SpecField {
    Replicas,
    OperatingMode,
    Other,
}

impl<'de> Deserialize<'de> for SpecField {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<SpecField, D::Error> {
        struct FieldVisitor;
        impl Visitor<'_> for FieldVisitor {
            type Value = SpecField;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<SpecField, E> {
                Ok(match key {
                    "replicas" => SpecField::Replicas,
                    "operatingMode" => SpecField::OperatingMode,
                    _ => SpecField::Other,
                })
            }
        }
        deserializer.deserialize_identifier(FieldVisitor)
    }
}

struct SpecVisitor;

impl SpecVisitor {
    /// A spec that is not an object: nothing can be read from it.
    fn not_an_object() -> LeanSpec {
        LeanSpec {
            undecodable: vec!["spec"],
            ..LeanSpec::default()
        }
    }
}

impl<'de> Visitor<'de> for SpecVisitor {
    type Value = LeanSpec;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a Sandbox spec")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LeanSpec, A::Error> {
        let mut spec = LeanSpec::default();
        while let Some(field) = map.next_key::<SpecField>()? {
            match field {
                SpecField::Replicas => match map.next_value::<serde_json::Value>()? {
                    serde_json::Value::Null => spec.replicas = None,
                    value => match value.as_i64() {
                        Some(n) => spec.replicas = Some(n),
                        None => {
                            spec.replicas = None;
                            spec.undecodable.push("spec.replicas");
                        }
                    },
                },
                SpecField::OperatingMode => match map.next_value::<serde_json::Value>()? {
                    serde_json::Value::Null => spec.operating_mode = None,
                    serde_json::Value::String(mode) => spec.operating_mode = Some(mode),
                    _ => {
                        spec.operating_mode = None;
                        spec.undecodable.push("spec.operatingMode");
                    }
                },
                SpecField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(spec)
    }

    fn visit_unit<E: de::Error>(self) -> Result<LeanSpec, E> {
        Ok(LeanSpec::default())
    }

    fn visit_none<E: de::Error>(self) -> Result<LeanSpec, E> {
        Ok(LeanSpec::default())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<LeanSpec, D::Error> {
        deserializer.deserialize_any(SpecVisitor)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<LeanSpec, E> {
        Ok(Self::not_an_object())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<LeanSpec, E> {
        Ok(Self::not_an_object())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<LeanSpec, E> {
        Ok(Self::not_an_object())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<LeanSpec, E> {
        Ok(Self::not_an_object())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<LeanSpec, E> {
        Ok(Self::not_an_object())
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<LeanSpec, E> {
        Ok(Self::not_an_object())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<LeanSpec, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::not_an_object())
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

    /// The spec's fields that were of the wrong type (treated as absent).
    pub fn undecodable(&self) -> &[&'static str] {
        self.spec.as_ref().map_or(&[], |s| s.undecodable.as_slice())
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

/// Whether a Sandbox given as JSON (a dump's item, a `DynamicObject`'s data) is paused on
/// purpose: its `spec` read as a [`LeanSpec`] is [`LeanSpec::paused`], the same test as a
/// listed or watched Sandbox's ([`LeanObject::paused`]).
pub fn sandbox_is_suspended(object: &serde_json::Value) -> bool {
    LeanSpec::deserialize(&object["spec"]).is_ok_and(|s| s.paused())
}

/// A resourceVersion as an integer: they compare as integers within a resource type
/// (documented since Kubernetes 1.35). `None` for a value that is not one.
pub fn revision(resource_version: &str) -> Option<u64> {
    resource_version.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn suspended_sandbox_detection() {
        use super::sandbox_is_suspended;
        assert!(sandbox_is_suspended(
            &serde_json::json!({"spec": {"replicas": 0}})
        ));
        assert!(sandbox_is_suspended(
            &serde_json::json!({"spec": {"operatingMode": "Suspended"}})
        ));
        assert!(!sandbox_is_suspended(
            &serde_json::json!({"spec": {"replicas": 1}})
        ));
        assert!(!sandbox_is_suspended(&serde_json::json!({})));
    }

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
        assert!(page.items.iter().all(|o| o.undecodable().is_empty()));
        assert_eq!(revision("17"), Some(17));
        assert_eq!(revision("x"), None);
    }

    #[test]
    fn fields_of_the_wrong_type_are_absent_and_named() {
        let page: LeanList = serde_json::from_value(serde_json::json!({
            "kind": "SandboxList",
            "items": [
                {"metadata": {"name": "a"}, "spec": {"replicas": "0", "podTemplate": {}}},
                {"metadata": {"name": "b"}, "spec": {"operatingMode": 1, "replicas": 0}},
                {"metadata": {"name": "c"}, "spec": "not an object"},
                {"metadata": {"name": "d"}, "spec": [1, {"x": 2}]},
                {"metadata": {"name": "e"}, "spec": {"replicas": 1.5, "operatingMode": {"x": 1}}},
                {"metadata": {"name": "f"}, "spec": null},
                {"metadata": {"name": "g"}, "spec": {"replicas": null, "operatingMode": "Suspended"}},
                {"metadata": {"name": "h"}, "spec": 7}
            ]
        }))
        .unwrap();
        let seen: Vec<(bool, Vec<&str>)> = page
            .items
            .iter()
            .map(|o| {
                let mut fields = o.undecodable().to_vec();
                fields.sort_unstable();
                (o.paused(), fields)
            })
            .collect();
        assert_eq!(
            seen,
            [
                (false, vec!["spec.replicas"]),
                (true, vec!["spec.operatingMode"]),
                (false, vec!["spec"]),
                (false, vec!["spec"]),
                (false, vec!["spec.operatingMode", "spec.replicas"]),
                (false, vec![]),
                (true, vec![]),
                (false, vec!["spec"]),
            ]
        );
        // Metadata stays strict: the name is what presence is decided by.
        assert!(serde_json::from_value::<LeanObject>(serde_json::json!({
            "metadata": {"name": 1}
        }))
        .is_err());
    }
}
