//! Errors as the API server answers them: Status bodies for missing objects, the three kinds
//! of 404, an expired continue token (410) and RBAC denials (403) that access reviews agree
//! with.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::ResourceExt;
use serde_json::json;
use testkit::fake_api::{FakeApiServer, Fault, FaultAction, EXPIRED_CONTINUE_MESSAGE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

#[tokio::test]
async fn missing_objects_answer_not_found_status() {
    let server = FakeApiServer::start().await;
    server.register_sandbox_version("v1alpha1");
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");
    let status = api_status(pods.get("x").await.unwrap_err());
    assert_eq!(status.code, 404);
    assert_eq!(status.reason, "NotFound");
    assert_eq!(status.message, "pods \"x\" not found");
    let details = status.details.unwrap();
    assert_eq!(
        (details.name.as_str(), details.kind.as_str()),
        ("x", "pods")
    );
    assert!(pods.get_opt("x").await.unwrap().is_none());
    assert!(pods.get_metadata_opt("x").await.unwrap().is_none());

    let sb = sandboxes(&server, "default");
    let status = api_status(sb.get("gone").await.unwrap_err());
    assert_eq!(
        status.message,
        "sandboxes.agents.x-k8s.io \"gone\" not found"
    );
    assert_eq!(status.details.unwrap().group, "agents.x-k8s.io");
    assert!(sb.get_opt("gone").await.unwrap().is_none());
    // A registered version with no objects lists empty.
    assert!(sb
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());

    // A version nobody serves, then the whole API gone: no handler for the group/version, so
    // the mux's plain-text 404, which kube-client cannot parse as a Status.
    let beta: Api<DynamicObject> =
        Api::namespaced_with(server.client(), "default", &sandbox_resource("v1beta1"));
    let status = api_status(beta.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(
        (status.code, status.message.as_str()),
        (404, "404 page not found")
    );
    assert_ne!(status.reason, "NotFound");
    server.disable_sandbox_api();
    let status = api_status(sb.list_metadata(&ListParams::default()).await.unwrap_err());
    assert_eq!(
        (status.code, status.message.as_str()),
        (404, "404 page not found")
    );
    assert_ne!(status.reason, "NotFound");

    // Unknown paths and unsupported methods.
    let req = http::Request::get("/apis/apps/v1/deployments")
        .body(vec![])
        .unwrap();
    let status = api_status(server.client().request_text(req).await.unwrap_err());
    assert_eq!(status.code, 404);
    server.add_pod("default", "p", &[]);
    let status = api_status(
        pods.delete("p", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status.code, status.reason.as_str()),
        (405, "MethodNotAllowed")
    );
}

/// The three 404s of a real apiserver, which a client must tell apart (only the first says an
/// object is absent): a missing object (a `NotFound` Status naming it: `details.name`,
/// `details.kind` = the plural, `details.group`), a resource its served group/version lacks (a
/// `NotFound` Status naming nothing: `the server could not find the requested resource`, empty
/// `details`), and a path under no served group/version (the mux's plain-text
/// `404 page not found`). The faults `UnknownResource` and `PageNotFound` answer the last two.
#[tokio::test]
async fn the_three_kinds_of_404_are_answered_as_the_apiserver_does() {
    let server = FakeApiServer::start().await;
    server.register_sandbox_version("v1alpha1");
    let raw = |uri: &'static str| plain_get(&server, uri);
    // A missing object.
    let (code, content_type, body) = raw("/api/v1/namespaces/default/pods/gone").await;
    assert_eq!((code, content_type.as_str()), (404, "application/json"));
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["reason"], "NotFound");
    assert_eq!(status["details"], json!({"name": "gone", "kind": "pods"}));
    let (_, _, body) =
        raw("/apis/agents.x-k8s.io/v1alpha1/namespaces/default/sandboxes/gone").await;
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        status["details"],
        json!({"name": "gone", "group": "agents.x-k8s.io", "kind": "sandboxes"})
    );
    // A resource the group/version does not have.
    for uri in [
        "/api/v1/namespaces/default/sandboxes/gone",
        "/apis/agents.x-k8s.io/v1alpha1/namespaces/default/sandboxs/gone",
        "/apis/agents.x-k8s.io/v1alpha1/namespaces/default/sandboxs",
    ] {
        let (code, content_type, body) = raw(uri).await;
        assert_eq!(
            (code, content_type.as_str()),
            (404, "application/json"),
            "{uri}"
        );
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status["reason"], "NotFound", "{uri}");
        assert_eq!(
            status["message"], "the server could not find the requested resource",
            "{uri}"
        );
        assert_eq!(status["details"], json!({}), "{uri}");
    }
    // No group/version: an unregistered group, a version not served, the API disabled.
    for uri in [
        "/apis/apps/v1/namespaces/default/deployments/x",
        "/apis/agents.x-k8s.io/v1beta1/namespaces/default/sandboxes/gone",
        "/api/v2/namespaces/default/pods/gone",
    ] {
        let (code, content_type, body) = raw(uri).await;
        assert_eq!(
            (code, content_type.as_str(), body.as_str()),
            (404, "text/plain; charset=utf-8", "404 page not found\n"),
            "{uri}"
        );
    }
    server.disable_sandbox_api();
    let (code, content_type, _) =
        raw("/apis/agents.x-k8s.io/v1alpha1/namespaces/default/sandboxes/gone").await;
    assert_eq!(
        (code, content_type.as_str()),
        (404, "text/plain; charset=utf-8")
    );
    let (code, content_type, _) = raw("/apis/agents.x-k8s.io").await;
    assert_eq!(
        (code, content_type.as_str()),
        (404, "text/plain; charset=utf-8")
    );

    // The faults answer the same, for any path.
    server.add_pod("default", "here", &[]);
    server.inject(Fault::on_get("/pods/here", FaultAction::UnknownResource).once());
    server.inject(Fault::on_get("/pods/here", FaultAction::PageNotFound).once());
    let (code, _, body) = raw("/api/v1/namespaces/default/pods/here").await;
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (code, status["message"].as_str(), &status["details"]),
        (
            404,
            Some("the server could not find the requested resource"),
            &json!({})
        )
    );
    let (code, content_type, body) = raw("/api/v1/namespaces/default/pods/here").await;
    assert_eq!(
        (code, content_type.as_str(), body.as_str()),
        (404, "text/plain; charset=utf-8", "404 page not found\n")
    );
    let (code, _, _) = raw("/api/v1/namespaces/default/pods/here").await;
    assert_eq!(code, 200);
    // kube-client's view: only the object's own 404 is `NotFound` with details.
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");
    let status = api_status(pods.get("gone").await.unwrap_err());
    assert_eq!(status.details.unwrap().name, "gone");
    server.inject(Fault::on_get("/pods/here", FaultAction::PageNotFound).once());
    let status = api_status(pods.get("here").await.unwrap_err());
    assert_eq!(
        (status.code, status.message.as_str()),
        (404, "404 page not found")
    );
    assert!(status.details.is_none());
}

/// A plain HTTP GET: status code, content type, body.
async fn plain_get(server: &FakeApiServer, uri: &str) -> (u16, String, String) {
    let mut socket = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let request = format!("GET {uri} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    socket.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (code, content_type, body.to_string())
}

#[tokio::test]
async fn expired_continue_answers_410_with_a_fresh_token() {
    let server = FakeApiServer::start().await;
    for i in 0..4 {
        server.add_pod("default", &format!("p{i}"), &[]);
    }
    server.inject(Fault::on_list("/pods", FaultAction::ExpireContinue).once());
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    let first = api.list(&ListParams::default().limit(2)).await.unwrap();
    let token = first.metadata.continue_.unwrap();
    let status = api_status(
        api.list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
    assert_eq!(status.message, EXPIRED_CONTINUE_MESSAGE);
    // The 410 carries a token that continues at the latest resourceVersion.
    let fresh = status.metadata.unwrap().continue_.unwrap();
    server.add_pod("default", "p9", &[]);
    let rest = api
        .list(&ListParams::default().limit(10).continue_token(&fresh))
        .await
        .unwrap();
    let names: Vec<_> = rest.items.iter().map(|p| p.name_any()).collect();
    assert_eq!(names, ["p2", "p3", "p9"]);
    assert_eq!(
        rest.metadata.resource_version.unwrap(),
        server.resource_version().to_string()
    );

    // Compaction expires old tokens; garbage tokens are a 400.
    let first = api.list(&ListParams::default().limit(1)).await.unwrap();
    server.add_pod("default", "p10", &[]);
    server.compact();
    let status = api_status(
        api.list(&ListParams::default().continue_token(&first.metadata.continue_.unwrap()))
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 410);
    let status = api_status(
        api.list(&ListParams::default().continue_token("not-a-token!"))
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (400, "BadRequest"));
}

#[tokio::test]
async fn denied_verbs_answer_403_and_access_reviews_agree() {
    let server = FakeApiServer::start().await;
    server.add_pod("default", "p", &[]);
    server.deny("list", "", "pods");
    server.deny("get", "agents.x-k8s.io", "sandboxes");
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");
    let status = api_status(pods.list(&ListParams::default()).await.unwrap_err());
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        status.message,
        "pods is forbidden: User \"system:serviceaccount:default:sandbox-reconciler\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
    );
    let all: Api<Pod> = Api::all(server.client());
    let status = api_status(all.list_metadata(&ListParams::default()).await.unwrap_err());
    assert!(
        status.message.ends_with("at the cluster scope"),
        "{}",
        status.message
    );
    // get is still allowed.
    assert!(pods.get_opt("p").await.unwrap().is_some());

    server.add_sandbox("v1alpha1", "default", "s", json!({}));
    let status = api_status(sandboxes(&server, "default").get("s").await.unwrap_err());
    assert_eq!(
        status.message,
        "sandboxes.agents.x-k8s.io \"s\" is forbidden: User \"system:serviceaccount:default:sandbox-reconciler\" cannot get resource \"sandboxes\" in API group \"agents.x-k8s.io\" in the namespace \"default\""
    );

    let reviews: Api<SelfSubjectAccessReview> = Api::all(server.client());
    let review = |verb: &str, group: &str, resource: &str| SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some("default".into()),
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let pp = PostParams::default();
    let denied = reviews
        .create(&pp, &review("list", "", "pods"))
        .await
        .unwrap();
    assert!(!denied.status.unwrap().allowed);
    let allowed = reviews
        .create(&pp, &review("get", "", "pods"))
        .await
        .unwrap();
    let allowed = allowed.status.unwrap();
    assert!(allowed.allowed);
    assert!(allowed.reason.is_some());
    assert_eq!(
        denied.spec.resource_attributes.unwrap().resource.as_deref(),
        Some("pods")
    );
    let sb = reviews
        .create(&pp, &review("list", "agents.x-k8s.io", "sandboxes"))
        .await
        .unwrap();
    assert!(sb.status.unwrap().allowed);
}
