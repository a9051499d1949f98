//! Discovery documents (`/version`, `/api`, `/apis`, ...) and `SelfSubjectAccessReview`s.

use serde_json::{json, Value};

use super::status::{bad_request, method_not_allowed, page_not_found, Reply};
use super::store::State;
use super::{RecordedRequest, SANDBOX_GROUP};

pub(super) fn access_review(state: &State, body: &str) -> Reply {
    let mut review: Value = match serde_json::from_str(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return bad_request(
                "the body of the request was in an unknown format - accepted media types include: application/json",
            )
        }
    };
    let attrs = &review["spec"]["resourceAttributes"];
    let status = if attrs.is_object() {
        let field = |name: &str| attrs[name].as_str().unwrap_or_default().to_string();
        let (verb, group, mut resource) = (field("verb"), field("group"), field("resource"));
        let (name, subresource) = (field("name"), field("subresource"));
        if !subresource.is_empty() {
            resource = format!("{resource}/{subresource}");
        }
        // A deny rule covers every object name, so the name only shows in the reason.
        if state.is_denied(&verb, &group, &resource) {
            let object = if name.is_empty() {
                String::new()
            } else {
                format!(" (name \"{name}\")")
            };
            json!({ "allowed": false, "reason": format!("fake API server denies {verb} on {resource}{object} in API group \"{group}\"") })
        } else {
            json!({ "allowed": true, "reason": "RBAC: allowed by fake API server" })
        }
    } else {
        json!({ "allowed": true, "reason": "fake API server allows non-resource requests" })
    };
    review["status"] = status;
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    review["kind"] = json!("SelfSubjectAccessReview");
    if !review["metadata"].is_object() {
        review["metadata"] = json!({});
    }
    review["metadata"]["creationTimestamp"] = Value::Null;
    Reply::json(201, review)
}

/// Legacy discovery documents and `/version`.
pub(super) fn discovery(state: &State, req: &RecordedRequest) -> Reply {
    let path = req.path.trim_end_matches('/');
    let sandbox_versions: Vec<String> = if state.sandbox_api_disabled {
        Vec::new()
    } else {
        let mut v: Vec<String> = state.sandbox_versions.iter().cloned().collect();
        v.sort_by(|a, b| compare_versions(b, a));
        v
    };
    let group_doc = |name: &str, versions: &[String]| {
        let versions: Vec<Value> = versions
            .iter()
            .map(|v| json!({ "groupVersion": format!("{name}/{v}"), "version": v }))
            .collect();
        json!({ "name": name, "versions": versions, "preferredVersion": versions[0] })
    };
    let authz_versions = vec!["v1".to_string()];
    let body = match path {
        "/version" => json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake",
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24.0", "compiler": "gc",
            "platform": "linux/amd64"
        }),
        "/api" => json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": state.addr.to_string() }]
        }),
        "/api/v1" => json!({
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [
                { "name": "namespaces", "singularName": "namespace", "namespaced": false, "kind": "Namespace", "verbs": ["get", "list", "watch"], "shortNames": ["ns"] },
                { "name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod", "verbs": ["get", "list", "watch"], "shortNames": ["po"] }
            ]
        }),
        "/apis" => {
            let mut groups = vec![group_doc("authorization.k8s.io", &authz_versions)];
            if !sandbox_versions.is_empty() {
                groups.push(group_doc(SANDBOX_GROUP, &sandbox_versions));
            }
            json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
        }
        "/apis/authorization.k8s.io" => {
            let mut doc = group_doc("authorization.k8s.io", &authz_versions);
            doc["kind"] = json!("APIGroup");
            doc["apiVersion"] = json!("v1");
            doc
        }
        "/apis/authorization.k8s.io/v1" => json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "authorization.k8s.io/v1",
            "resources": [{ "name": "selfsubjectaccessreviews", "singularName": "selfsubjectaccessreview", "namespaced": false, "kind": "SelfSubjectAccessReview", "verbs": ["create"] }]
        }),
        p if p == format!("/apis/{SANDBOX_GROUP}") && !sandbox_versions.is_empty() => {
            let mut doc = group_doc(SANDBOX_GROUP, &sandbox_versions);
            doc["kind"] = json!("APIGroup");
            doc["apiVersion"] = json!("v1");
            doc
        }
        p => match p.strip_prefix(&format!("/apis/{SANDBOX_GROUP}/")) {
            Some(v) if sandbox_versions.iter().any(|s| s == v) => json!({
                "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{SANDBOX_GROUP}/{v}"),
                "resources": [{ "name": "sandboxes", "singularName": "sandbox", "namespaced": true, "kind": "Sandbox", "verbs": ["get", "list", "watch"] }]
            }),
            _ => return page_not_found(),
        },
    };
    if req.method != "GET" {
        return method_not_allowed();
    }
    Reply::json(200, body)
}

/// Orders Kubernetes version strings by priority (v1 > v1beta2 > v1beta1 > v1alpha1).
pub(super) fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    pub(super) fn rank(v: &str) -> (u8, u64, u64) {
        let Some(rest) = v.strip_prefix('v') else {
            return (0, 0, 0);
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(major) = digits.parse::<u64>() else {
            return (0, 0, 0);
        };
        let tail = &rest[digits.len()..];
        let (stage, minor) = if tail.is_empty() {
            (3, 0)
        } else if let Some(n) = tail.strip_prefix("beta") {
            (2, n.parse().unwrap_or(0))
        } else if let Some(n) = tail.strip_prefix("alpha") {
            (1, n.parse().unwrap_or(0))
        } else {
            return (0, 0, 0);
        };
        (stage, major, minor)
    }
    rank(a).cmp(&rank(b)).then_with(|| b.cmp(a))
}
