//! Content negotiation: the full object, or its metadata only
//! (`as=PartialObjectMetadata[List]`).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::Kind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Representation {
    Full,
    PartialMetadata,
}

/// Picks the representation from the `Accept` header; `wanted` is the metadata-only kind the
/// request can be answered with (`PartialObjectMetadata[List]`). `None` = nothing acceptable
/// (406).
pub(super) fn negotiate(accept: Option<&str>, wanted: &str) -> Option<Representation> {
    let accept = accept.map(str::trim).unwrap_or_default();
    if accept.is_empty() {
        return Some(Representation::Full);
    }
    for alternative in accept.split(',') {
        let mut parts = alternative.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        if !matches!(media.as_str(), "application/json" | "*/*" | "application/*") {
            continue;
        }
        let params: BTreeMap<String, String> = parts
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let Some(as_kind) = params.get("as") else {
            return Some(Representation::Full);
        };
        if as_kind == wanted
            && params.get("g").is_some_and(|g| g == "meta.k8s.io")
            && params.get("v").is_some_and(|v| v == "v1")
        {
            return Some(Representation::PartialMetadata);
        }
    }
    None
}

pub(super) fn render_object(
    object: &Value,
    representation: Representation,
    kind: Kind,
    in_list: bool,
) -> Value {
    match representation {
        Representation::PartialMetadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": object["metadata"].clone()
        }),
        Representation::Full => {
            let mut out = object.clone();
            // Built-in lists (PodList) carry no per-item apiVersion/kind; CRD lists do.
            if in_list && kind.is_built_in() {
                if let Some(map) = out.as_object_mut() {
                    map.remove("apiVersion");
                    map.remove("kind");
                }
            }
            out
        }
    }
}
