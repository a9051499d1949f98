//! Proves that the fake Kubernetes API server (`testkit::fake_api`) answers the real
//! `kube::Client` the way a real API server would: pagination, selectors, metadata-only
//! content negotiation, Status errors, RBAC, Namespaces and the cluster's identity, fault
//! injection and request recording, watches (replay from a resourceVersion, 410 for a
//! compacted one, bookmarks, selectors, metadata-only events, broken streams) and the cached
//! encoding of list pages.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::StreamExt;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::{GroupVersionKind, ObjectList, PartialObjectMeta, Status};
use kube::{Resource, ResourceExt};
use serde_json::json;
use testkit::fake_api::{
    FakeApiServer, Fault, FaultAction, FaultMatch, Kind, EXPIRED_CONTINUE_MESSAGE, FAKE_TOKEN,
    INITIAL_EVENTS_END,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sandbox_resource(version: &str) -> ApiResource {
    ApiResource {
        group: "agents.x-k8s.io".into(),
        version: version.into(),
        api_version: format!("agents.x-k8s.io/{version}"),
        kind: "Sandbox".into(),
        plural: "sandboxes".into(),
    }
}

fn sandboxes(server: &FakeApiServer, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(server.client(), ns, &sandbox_resource("v1alpha1"))
}

fn api_status(err: kube::Error) -> Status {
    match err {
        kube::Error::Api(status) => *status,
        other => panic!("expected kube::Error::Api, got {other:?}"),
    }
}

async fn raw_get(server: &FakeApiServer, uri: &str) -> serde_json::Value {
    let req = http::Request::get(uri).body(vec![]).unwrap();
    let text = server.client().request_text(req).await.unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Lists every page with `limit`, returning the pages.
async fn all_pages<K>(api: &Api<K>, lp: ListParams) -> Result<Vec<ObjectList<K>>, kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut pages = Vec::new();
    let mut lp = lp;
    loop {
        let page = api.list(&lp).await?;
        let next = page.metadata.continue_.clone().filter(|c| !c.is_empty());
        pages.push(page);
        match next {
            Some(token) => lp = lp.continue_token(&token),
            None => return Ok(pages),
        }
    }
}

#[tokio::test]
async fn pagination_returns_every_object_once_from_one_snapshot() {
    let server = FakeApiServer::start().await;
    for i in 0..4 {
        server.add_pod("default", &format!("pod-{i}"), &[("app", "sandbox")]);
    }
    for i in 0..3 {
        server.add_pod("other", &format!("pod-{i}"), &[("app", "sandbox")]);
    }
    let api: Api<Pod> = Api::all(server.client());

    let first = api.list(&ListParams::default().limit(3)).await.unwrap();
    let rv = first.metadata.resource_version.clone().unwrap();
    assert_eq!(first.items.len(), 3);
    assert_eq!(first.metadata.remaining_item_count, Some(4));
    // Changes after the listing started are invisible to its later pages.
    server.add_pod("zzz", "late", &[("app", "sandbox")]);
    server.remove(Kind::Pod, "other", "pod-2");

    let mut seen = first
        .items
        .iter()
        .map(|p| format!("{}/{}", p.namespace().unwrap(), p.name_any()))
        .collect::<Vec<_>>();
    let mut token = first.metadata.continue_.clone().unwrap();
    let mut pages = 1;
    loop {
        let page = api
            .list(&ListParams::default().limit(3).continue_token(&token))
            .await
            .unwrap();
        pages += 1;
        assert_eq!(page.metadata.resource_version.as_deref(), Some(rv.as_str()));
        seen.extend(
            page.items
                .iter()
                .map(|p| format!("{}/{}", p.namespace().unwrap(), p.name_any())),
        );
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(t) => {
                // The count is the snapshot's, whatever changed since the first page.
                assert_eq!(page.metadata.remaining_item_count, Some(1));
                token = t
            }
            None => {
                assert_eq!(page.metadata.remaining_item_count, None);
                break;
            }
        }
    }
    assert_eq!(pages, 3);
    let expected = [
        "default/pod-0",
        "default/pod-1",
        "default/pod-2",
        "default/pod-3",
        "other/pod-0",
        "other/pod-1",
        "other/pod-2",
    ];
    assert_eq!(seen, expected);

    // A new listing sees the current state.
    let fresh = api.list(&ListParams::default()).await.unwrap();
    assert!(
        fresh
            .metadata
            .resource_version
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > rv.parse().unwrap()
    );
    assert_eq!(fresh.items.len(), 7);
    assert!(fresh.items.iter().any(|p| p.name_any() == "late"));

    // Namespaced listing only sees its namespace.
    let ns: Api<Pod> = Api::namespaced(server.client(), "other");
    let names: Vec<_> = ns
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    assert_eq!(names, ["pod-0", "pod-1"]);
}

#[tokio::test]
async fn objects_have_uid_and_increasing_resource_versions() {
    let server = FakeApiServer::start().await;
    server.add_pod("default", "a", &[]);
    server.add_pod("default", "b", &[]);
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    let a = api.get("a").await.unwrap();
    let b = api.get("b").await.unwrap();
    let rv = |p: &Pod| p.resource_version().unwrap().parse::<u64>().unwrap();
    assert!(rv(&b) > rv(&a));
    assert_ne!(a.uid(), b.uid());
    assert!(a.metadata.creation_timestamp.is_some());
    assert_eq!(rv(&b), server.resource_version());

    // Replacing keeps the uid, bumps the resourceVersion.
    server.add_pod("default", "a", &[("x", "y")]);
    let a2 = api.get("a").await.unwrap();
    assert_eq!(a2.uid(), a.uid());
    assert!(rv(&a2) > rv(&b));
    assert_eq!(a2.labels().get("x").map(String::as_str), Some("y"));
}

#[tokio::test]
async fn label_and_field_selectors_filter() {
    let server = FakeApiServer::start().await;
    server.add_pod("default", "a", &[("managed", "true"), ("tier", "x")]);
    server.add_pod("default", "b", &[("managed", "true"), ("tier", "y")]);
    server.add_pod("default", "c", &[("managed", "false")]);
    server.add_pod("default", "d", &[]);
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    let names = |selector: &'static str| {
        let api = api.clone();
        async move {
            api.list(&ListParams::default().labels(selector))
                .await
                .map(|l| l.items.iter().map(|p| p.name_any()).collect::<Vec<_>>())
        }
    };
    assert_eq!(names("managed=true").await.unwrap(), ["a", "b"]);
    assert_eq!(names("managed==true").await.unwrap(), ["a", "b"]);
    assert_eq!(names("managed!=true").await.unwrap(), ["c", "d"]);
    assert_eq!(names("managed").await.unwrap(), ["a", "b", "c"]);
    assert_eq!(names("!managed").await.unwrap(), ["d"]);
    assert_eq!(names("tier in (x, z)").await.unwrap(), ["a"]);
    assert_eq!(names("tier notin (x)").await.unwrap(), ["b", "c", "d"]);
    assert_eq!(names("managed=true,tier!=x").await.unwrap(), ["b"]);
    for bad in ["managed=(", "tier in ()", "=x", "a b"] {
        let status = api_status(names(bad).await.unwrap_err());
        assert_eq!(
            (status.code, status.reason.as_str()),
            (400, "BadRequest"),
            "{bad}"
        );
    }

    let by_name = api
        .list(&ListParams::default().fields("metadata.name=c"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);
    let not_ns = api
        .list(&ListParams::default().fields("metadata.namespace!=default"))
        .await
        .unwrap();
    assert!(not_ns.items.is_empty());
    let status = api_status(
        api.list(&ListParams::default().fields("spec.bogus=1"))
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 400);
    assert!(
        status.message.contains("field label not supported"),
        "{}",
        status.message
    );

    // With a selector and a limit, pages hold matching objects and carry no count.
    let page = api
        .list(&ListParams::default().labels("managed").limit(1))
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
    assert!(page.metadata.continue_.is_some());
    assert_eq!(page.metadata.remaining_item_count, None);
}

#[tokio::test]
async fn metadata_only_lists_and_gets_carry_no_spec() {
    let server = FakeApiServer::start().await;
    for i in 0..5 {
        server.add_sandbox(
            "v1alpha1",
            "default",
            &format!("sb-{i}"),
            json!({"replicas": 0}),
        );
    }
    server.set_terminating(Kind::Sandbox, "default", "sb-3");
    let api = sandboxes(&server, "default");

    let mut names = Vec::new();
    let mut lp = ListParams::default().limit(2);
    let mut rvs = BTreeSet::new();
    loop {
        let page = api.list_metadata(&lp).await.unwrap();
        rvs.insert(page.metadata.resource_version.clone().unwrap());
        for item in &page.items {
            let types = item.types.as_ref().unwrap();
            assert_eq!(types.kind, "PartialObjectMetadata");
            assert_eq!(types.api_version, "meta.k8s.io/v1");
            assert!(item.metadata.uid.is_some());
            assert!(item.metadata.resource_version.is_some());
            names.push(item.name_any());
        }
        match page.metadata.continue_ {
            Some(t) => lp = lp.continue_token(&t),
            None => break,
        }
    }
    assert_eq!(names, ["sb-0", "sb-1", "sb-2", "sb-3", "sb-4"]);
    assert_eq!(rvs.len(), 1);

    // The raw body: a PartialObjectMetadataList with nothing but metadata.
    let req = http::Request::get("/apis/agents.x-k8s.io/v1alpha1/namespaces/default/sandboxes")
        .header(
            "Accept",
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        )
        .body(vec![])
        .unwrap();
    let raw: serde_json::Value =
        serde_json::from_str(&server.client().request_text(req).await.unwrap()).unwrap();
    assert_eq!(raw["kind"], "PartialObjectMetadataList");
    assert_eq!(raw["apiVersion"], "meta.k8s.io/v1");
    for item in raw["items"].as_array().unwrap() {
        assert_eq!(item.as_object().unwrap().len(), 3, "{item}");
        assert!(item.get("spec").is_none());
    }

    let meta = api.get_metadata("sb-3").await.unwrap();
    assert!(meta.metadata.deletion_timestamp.is_some());
    assert_eq!(meta.types.unwrap().kind, "PartialObjectMetadata");
    let full = api.get("sb-3").await.unwrap();
    assert_eq!(full.data["spec"], json!({"replicas": 0}));
    assert!(full.metadata.deletion_timestamp.is_some());
    assert_eq!(full.types.unwrap().api_version, "agents.x-k8s.io/v1alpha1");

    // Full list: SandboxList with typed items.
    let list = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.types.kind, "SandboxList");
    assert_eq!(list.items[0].data["spec"]["replicas"], 0);

    let requests = server.requests();
    assert_eq!(
        requests[0].accept.as_deref(),
        Some("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1")
    );
    assert_eq!(requests[0].query, "&limit=2");
    assert_eq!(requests[0].query_param("limit").as_deref(), Some("2"));
    assert!(requests[1].query_param("continue").is_some());
    assert!(requests.iter().all(|r| r.status == Some(200)));
    let get_meta = requests.iter().find(|r| r.path.ends_with("/sb-3")).unwrap();
    assert_eq!(
        get_meta.accept.as_deref(),
        Some("application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1")
    );
}

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

/// A frozen watch (`FaultAction::FreezeWatch`) sends no event, only bookmarks at the revision
/// it started from, however the store moves on; the next watch (the fault fired once) is normal.
#[tokio::test]
async fn a_frozen_watch_sends_bookmarks_at_a_frozen_revision() {
    let server = FakeApiServer::start().await;
    server.set_bookmark_interval(Duration::from_millis(100));
    server.add_pod("default", "a", &[]);
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    let start = server.resource_version();
    server.inject(Fault::on_watch("/pods", FaultAction::FreezeWatch).once());
    let mut events = watch(&api, &wp(), start).await;
    server.remove(Kind::Pod, "default", "a");
    server.add_pod("default", "b", &[]);
    for _ in 0..3 {
        match next_item(&mut events).await {
            Some(Ok(WatchEvent::Bookmark(b))) => {
                assert_eq!(b.metadata.resource_version, start.to_string())
            }
            other => panic!("expected a frozen bookmark, got {other:?}"),
        }
    }
    server.send_bookmarks();
    match next_item(&mut events).await {
        Some(Ok(WatchEvent::Bookmark(b))) => {
            assert_eq!(b.metadata.resource_version, start.to_string())
        }
        other => panic!("expected a frozen bookmark, got {other:?}"),
    }
    assert!(server.resource_version() > start);
    let mut normal = watch(&api, &wp(), start).await;
    let changes = next_changes(&mut normal, 2).await;
    assert_eq!(changes.len(), 2);
}

#[tokio::test]
async fn injected_500_on_a_later_page_is_surfaced() {
    let server = FakeApiServer::start().await;
    for i in 0..6 {
        server.add_pod("default", &format!("p{i}"), &[]);
    }
    server.inject(Fault::on_list_page(
        "/pods",
        2,
        FaultAction::Status(500, None),
    ));
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    let status = api_status(
        all_pages(&api, ListParams::default().limit(2))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status.code, status.reason.as_str()),
        (500, "InternalError")
    );
    let codes: Vec<_> = server.requests().iter().map(|r| r.status).collect();
    assert_eq!(codes, [Some(200), Some(200), Some(500)]);

    server.clear_faults();
    let pages = all_pages(&api, ListParams::default().limit(2))
        .await
        .unwrap();
    assert_eq!(pages.len(), 3);
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

#[tokio::test]
async fn terminating_objects_are_still_listed_with_deletion_timestamp() {
    let server = FakeApiServer::start().await;
    server.add_pod("default", "p", &[]);
    let before = server.resource_version();
    server.set_terminating(Kind::Pod, "default", "p");
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    let pod = api.get("p").await.unwrap();
    assert!(pod.metadata.deletion_timestamp.is_some());
    assert!(pod.resource_version().unwrap().parse::<u64>().unwrap() > before);
    let listed = api.list_metadata(&ListParams::default()).await.unwrap();
    assert!(listed.items[0].metadata.deletion_timestamp.is_some());
    assert!(server.remove(Kind::Pod, "default", "p"));
    assert!(!server.remove(Kind::Pod, "default", "p"));
    assert!(api.get_opt("p").await.unwrap().is_none());
}

#[tokio::test]
async fn body_faults_surface_as_client_errors() {
    let server = FakeApiServer::start().await;
    server.add_pod("default", "a", &[]);
    server.add_pod("default", "b", &[]);
    let api: Api<Pod> = Api::namespaced(server.client(), "default");

    server.inject(Fault::on_list("/pods", FaultAction::MalformedJson).once());
    assert!(matches!(
        api.list(&ListParams::default()).await,
        Err(kube::Error::SerdeError(_))
    ));

    server.inject(Fault::on_list("/pods", FaultAction::WrongKind).once());
    assert!(matches!(
        api.list(&ListParams::default()).await,
        Err(kube::Error::SerdeError(_))
    ));
    server.inject(Fault::on_list("/pods", FaultAction::WrongKind).once());
    let meta = api.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(meta.types.kind, "ConfigMapList");
    assert!(meta.items[0].metadata.name.is_none());

    server.inject(Fault::on_list("/pods", FaultAction::ItemWithoutName).once());
    let list = api.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 2);
    assert!(list.items[0].metadata.name.is_none());
    assert_eq!(list.items[1].metadata.name.as_deref(), Some("b"));

    server.inject(Fault::on_get("/pods/a", FaultAction::CloseConnection).once());
    let err = api.get("a").await.unwrap_err();
    assert!(!matches!(err, kube::Error::Api(_)), "{err:?}");
    assert_eq!(server.requests().last().unwrap().status, None);

    server.inject(Fault::on_get("/pods/a", FaultAction::Hang(Duration::from_secs(60))).once());
    let hung = tokio::time::timeout(Duration::from_millis(200), api.get("a")).await;
    assert!(hung.is_err());

    // Everything is back to normal afterwards.
    assert_eq!(api.get("a").await.unwrap().name_any(), "a");
}

#[tokio::test]
async fn kube_retries_429_transparently_and_nth_targets_one_request() {
    let server = FakeApiServer::start().await;
    server.add_pod("default", "a", &[]);
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    server.inject(Fault::on_get("/pods/", FaultAction::Status(429, None)).times(2));
    assert_eq!(api.get("a").await.unwrap().name_any(), "a");
    let codes: Vec<_> = server.requests().iter().map(|r| r.status).collect();
    assert_eq!(codes, [Some(429), Some(429), Some(200)]);

    server.clear_requests();
    server.inject(Fault::on_get("/pods/", FaultAction::Status(409, None)).nth(1));
    assert!(api.get("a").await.is_ok());
    let status = api_status(api.get("a").await.unwrap_err());
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert!(api.get("a").await.is_ok());

    // Retry-After is sent as a header and in the Status details.
    server.clear_faults();
    server.inject(Fault::always(FaultAction::Status(500, Some(7))));
    let status = api_status(api.get("a").await.unwrap_err());
    assert_eq!(status.details.unwrap().retry_after_seconds, 7);
}

#[tokio::test]
async fn kubeconfig_client_reaches_the_server_with_its_token() {
    let server = FakeApiServer::start().await;
    server.add_pod("default", "a", &[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path);
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    let client = kube::Client::try_from(config).unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client);
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    assert_eq!(
        server.requests()[0].authorization.as_deref(),
        Some(format!("Bearer {FAKE_TOKEN}").as_str())
    );
}

#[tokio::test]
async fn discovery_reflects_served_sandbox_versions() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    assert_eq!(client.apiserver_version().await.unwrap().minor, "33");
    server.add_sandbox("v1alpha1", "default", "a", json!({}));
    server.register_sandbox_version("v1beta1");
    let gvk = GroupVersionKind::gvk("agents.x-k8s.io", "v1alpha1", "Sandbox");
    let (resource, caps) = kube::discovery::pinned_kind(&client, &gvk).await.unwrap();
    assert_eq!(resource.plural, "sandboxes");
    assert!(caps.supports_operation(kube::discovery::verbs::WATCH));
    let group = kube::discovery::group(&client, "agents.x-k8s.io")
        .await
        .unwrap();
    assert_eq!(group.preferred_version_or_latest(), "v1beta1");
    let raw = raw_get(&server, "/apis").await;
    assert_eq!(raw["kind"], "APIGroupList");
    server.disable_sandbox_api();
    assert!(kube::discovery::group(&client, "agents.x-k8s.io")
        .await
        .is_err());
}

#[tokio::test]
async fn exact_resource_version_reads_history() {
    let server = FakeApiServer::start().await;
    server.add_pod("default", "a", &[]);
    let rv = server.resource_version();
    server.remove(Kind::Pod, "default", "a");
    server.add_pod("default", "b", &[]);
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    let old = api
        .list(
            &ListParams::default()
                .at(&rv.to_string())
                .matching(kube::api::VersionMatch::Exact),
        )
        .await
        .unwrap();
    assert_eq!(
        old.items.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        ["a"]
    );
    let now = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        now.items.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        ["b"]
    );
    let req = http::Request::get("/api/v1/pods?watch=true&resourceVersion=abc")
        .body(vec![])
        .unwrap();
    let status = api_status(server.client().request_text(req).await.unwrap_err());
    assert_eq!((status.code, status.reason.as_str()), (400, "BadRequest"));
}

fn namespaces(server: &FakeApiServer) -> Api<Namespace> {
    Api::all(server.client())
}

fn phase(ns: &Namespace) -> Option<&str> {
    ns.status.as_ref().and_then(|s| s.phase.as_deref())
}

fn ns_review(verb: &str, name: Option<&str>) -> SelfSubjectAccessReview {
    SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: name.map(Into::into),
                verb: Some(verb.into()),
                group: Some(String::new()),
                resource: Some("namespaces".into()),
                name: name.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[tokio::test]
async fn new_server_has_default_and_kube_system_whose_uid_is_the_cluster_uid() {
    let server = FakeApiServer::start().await;
    let api = namespaces(&server);
    let default = api.get_opt("default").await.unwrap().unwrap();
    assert_eq!(default.name_any(), "default");
    assert_eq!(phase(&default), Some("Active"));
    assert!(default.metadata.creation_timestamp.is_some());
    assert!(default.metadata.namespace.is_none());
    assert_eq!(
        default.labels().get("kubernetes.io/metadata.name"),
        Some(&"default".to_string())
    );
    let kube_system = api.get_opt("kube-system").await.unwrap().unwrap();
    let uid = server.cluster_uid();
    assert_eq!(kube_system.uid().as_deref(), Some(uid.as_str()));
    assert_ne!(default.uid(), kube_system.uid());
    // A UUID v4, random per server.
    assert_eq!(uid.len(), 36);
    assert_eq!(&uid[14..15], "4");
    let other = FakeApiServer::start().await;
    assert_ne!(other.cluster_uid(), uid);

    // The raw object, and the metadata-only representation.
    let raw = raw_get(&server, "/api/v1/namespaces/kube-system").await;
    assert_eq!(
        (raw["kind"].as_str(), raw["apiVersion"].as_str()),
        (Some("Namespace"), Some("v1"))
    );
    assert_eq!(raw["status"]["phase"], "Active");
    assert!(raw["metadata"]["resourceVersion"].as_str().is_some());
    let meta = api.get_metadata_opt("kube-system").await.unwrap().unwrap();
    assert_eq!(meta.types.unwrap().kind, "PartialObjectMetadata");
    assert_eq!(meta.metadata.uid.as_deref(), Some(uid.as_str()));

    // Listing: NamespaceList in name order, paginated, metadata-only too.
    let list = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.types.kind, "NamespaceList");
    let names: Vec<_> = list.items.iter().map(|n| n.name_any()).collect();
    assert_eq!(names, ["default", "kube-system"]);
    assert_eq!(server.namespaces(), names);
    let pages = all_pages(&api, ListParams::default().limit(1))
        .await
        .unwrap();
    assert_eq!(pages.len(), 2);
    assert_eq!(pages[0].metadata.remaining_item_count, Some(1));
    let meta = api.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(meta.types.kind, "PartialObjectMetadataList");
    assert_eq!(meta.items.len(), 2);
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=kube-system"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);
    let raw_list = raw_get(&server, "/api/v1/namespaces").await;
    assert!(raw_list["items"][0].get("kind").is_none());

    // Another cluster behind the same address: kube-system changes its uid.
    let before = server.resource_version();
    server.set_cluster_uid("11111111-2222-4333-8444-555555555555");
    assert_eq!(server.cluster_uid(), "11111111-2222-4333-8444-555555555555");
    let kube_system = api.get("kube-system").await.unwrap();
    assert_eq!(
        kube_system.uid().as_deref(),
        Some("11111111-2222-4333-8444-555555555555")
    );
    assert!(
        kube_system
            .resource_version()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > before
    );

    // Discovery lists namespaces as a cluster-scoped resource.
    let (resource, caps) = kube::discovery::pinned_kind(
        &server.client(),
        &GroupVersionKind::gvk("", "v1", "Namespace"),
    )
    .await
    .unwrap();
    assert_eq!(resource.plural, "namespaces");
    assert_eq!(caps.scope, kube::discovery::Scope::Cluster);
}

#[tokio::test]
async fn adding_objects_creates_their_namespace_implicitly() {
    let server = FakeApiServer::start().await;
    let api = namespaces(&server);
    assert!(api.get_opt("agents").await.unwrap().is_none());
    server.add_pod("agents", "p", &[]);
    let agents = api.get_opt("agents").await.unwrap().unwrap();
    assert_eq!(phase(&agents), Some("Active"));
    // The namespace is written before the object: the object is the latest revision.
    let pods: Api<Pod> = Api::namespaced(server.client(), "agents");
    let pod = pods.get("p").await.unwrap();
    assert_eq!(
        pod.resource_version().unwrap(),
        server.resource_version().to_string()
    );
    assert!(agents.resource_version().unwrap().parse::<u64>().unwrap() < server.resource_version());
    // Adding more objects leaves the namespace as it is.
    server.add_pod("agents", "q", &[]);
    assert_eq!(api.get("agents").await.unwrap().uid(), agents.uid());
    server.add_sandbox("v1alpha1", "sandboxes", "s", json!({}));
    assert!(api.get_opt("sandboxes").await.unwrap().is_some());

    assert!(server.add_namespace("empty"));
    assert!(!server.add_namespace("empty"));
    assert!(!server.add_namespace("default"));
    assert_eq!(
        server.namespaces(),
        ["agents", "default", "empty", "kube-system", "sandboxes"]
    );
}

#[tokio::test]
async fn removed_namespace_answers_not_found_status() {
    let server = FakeApiServer::start().await;
    server.add_pod("agents", "p", &[]);
    let api = namespaces(&server);
    let uid = api.get("agents").await.unwrap().uid();
    assert!(server.remove_namespace("agents"));
    assert!(!server.remove_namespace("agents"));
    assert!(api.get_opt("agents").await.unwrap().is_none());
    assert!(api.get_metadata_opt("agents").await.unwrap().is_none());
    let err = api.get("agents").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"),
        "{err:?}"
    );
    let status = api_status(err);
    assert_eq!(status.message, "namespaces \"agents\" not found");
    let details = status.details.unwrap();
    assert_eq!(
        (
            details.name.as_str(),
            details.kind.as_str(),
            details.group.as_str()
        ),
        ("agents", "namespaces", "")
    );
    // Only the Namespace went; its pods are still there.
    let pods: Api<Pod> = Api::namespaced(server.client(), "agents");
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    assert_eq!(server.namespaces(), ["default", "kube-system"]);

    // Adding an object creates it again, as a new object.
    server.add_pod("agents", "q", &[]);
    assert_ne!(api.get("agents").await.unwrap().uid(), uid);

    // kube-system comes back with the cluster's identity.
    let cluster = server.cluster_uid();
    assert!(server.remove_namespace("kube-system"));
    assert!(api.get_opt("kube-system").await.unwrap().is_none());
    assert!(server.add_namespace("kube-system"));
    assert_eq!(
        api.get("kube-system").await.unwrap().uid().as_deref(),
        Some(cluster.as_str())
    );
}

#[tokio::test]
async fn terminating_namespace_has_deletion_timestamp() {
    let server = FakeApiServer::start().await;
    server.add_pod("agents", "p", &[]);
    let api = namespaces(&server);
    let before = server.resource_version();
    server.set_namespace_terminating("agents");
    let agents = api.get("agents").await.unwrap();
    assert!(agents.metadata.deletion_timestamp.is_some());
    assert_eq!(phase(&agents), Some("Terminating"));
    assert!(agents.resource_version().unwrap().parse::<u64>().unwrap() > before);
    let terminating = api
        .list(&ListParams::default().fields("status.phase=Terminating"))
        .await
        .unwrap();
    let names: Vec<_> = terminating.items.iter().map(|n| n.name_any()).collect();
    assert_eq!(names, ["agents"]);
    // Adding into a terminating namespace leaves it terminating.
    server.add_pod("agents", "q", &[]);
    assert_eq!(
        phase(&api.get("agents").await.unwrap()),
        Some("Terminating")
    );
    // The generic call does the same for Kind::Namespace.
    server.set_terminating(Kind::Namespace, "", "default");
    let default = api.get_metadata("default").await.unwrap();
    assert!(default.metadata.deletion_timestamp.is_some());
}

#[tokio::test]
async fn denied_namespace_get_answers_403_and_access_reviews_agree() {
    let server = FakeApiServer::start().await;
    let api = namespaces(&server);
    let reviews: Api<SelfSubjectAccessReview> = Api::all(server.client());
    let pp = PostParams::default();
    let allowed = |r: SelfSubjectAccessReview| r.status.unwrap().allowed;
    assert!(allowed(
        reviews
            .create(&pp, &ns_review("get", Some("kube-system")))
            .await
            .unwrap()
    ));

    server.deny("get", "", "namespaces");
    let status = api_status(api.get("kube-system").await.unwrap_err());
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        status.message,
        "namespaces \"kube-system\" is forbidden: User \"system:serviceaccount:default:sandbox-reconciler\" cannot get resource \"namespaces\" in API group \"\" in the namespace \"kube-system\""
    );
    let details = status.details.unwrap();
    assert_eq!(
        (details.name.as_str(), details.kind.as_str()),
        ("kube-system", "namespaces")
    );
    // get_opt maps only 404 to None: a 403 stays an error.
    assert!(api.get_opt("default").await.is_err());
    // list is another verb.
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        2
    );

    // Reviews: denied whatever the name, or without one; other verbs stay allowed.
    for name in [Some("kube-system"), Some("agents"), None] {
        let review = reviews.create(&pp, &ns_review("get", name)).await.unwrap();
        let status = review.status.unwrap();
        assert!(!status.allowed, "{name:?}");
        assert!(status.reason.is_some());
        assert_eq!(
            review.spec.resource_attributes.unwrap().name.as_deref(),
            name
        );
    }
    assert!(allowed(
        reviews.create(&pp, &ns_review("list", None)).await.unwrap()
    ));

    server.deny("list", "", "namespaces");
    let status = api_status(api.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(
        status.message,
        "namespaces is forbidden: User \"system:serviceaccount:default:sandbox-reconciler\" cannot list resource \"namespaces\" in API group \"\" at the cluster scope"
    );

    server.allow_all();
    assert!(api.get_opt("kube-system").await.unwrap().is_some());
    assert!(allowed(
        reviews
            .create(&pp, &ns_review("get", Some("kube-system")))
            .await
            .unwrap()
    ));
}

#[tokio::test]
async fn faults_on_namespace_gets_fire_on_them_and_not_on_lists_inside() {
    let server = FakeApiServer::start().await;
    server.add_pod("agents", "p", &[]);
    server.add_pod("agents-2", "p", &[]);
    let api = namespaces(&server);
    let pods: Api<Pod> = Api::namespaced(server.client(), "agents");

    // A path-substring rule: a namespace GET is a single-object GET, not a list.
    server.inject(Fault::on_get("/namespaces/agents", FaultAction::Status(500, None)).once());
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    assert_eq!(server.requests().last().unwrap().status, Some(200));
    let status = api_status(api.get("agents").await.unwrap_err());
    assert_eq!(
        (status.code, status.reason.as_str()),
        (500, "InternalError")
    );
    let last = server.requests().last().cloned().unwrap();
    assert_eq!(
        (last.method.as_str(), last.path.as_str(), last.status),
        ("GET", "/api/v1/namespaces/agents", Some(500))
    );
    assert!(api.get_opt("agents").await.unwrap().is_some());

    // on_list rules do not fire on a namespace GET.
    server.inject(Fault::on_list(
        "/namespaces/agents",
        FaultAction::Status(500, None),
    ));
    assert!(api.get_opt("agents").await.unwrap().is_some());
    assert!(pods.list(&ListParams::default()).await.is_err());
    server.clear_faults();

    // on_namespace_get targets exactly one Namespace: not the pods in it, not agents-2.
    server.inject(Fault::on_namespace_get("agents", FaultAction::Status(404, None)).once());
    assert!(pods.get_opt("p").await.unwrap().is_some());
    assert!(pods.list(&ListParams::default()).await.is_ok());
    assert!(api.get_opt("agents-2").await.unwrap().is_some());
    let status = api_status(api.get("agents").await.unwrap_err());
    assert_eq!(
        (status.code, status.message.as_str()),
        (404, "namespaces \"agents\" not found")
    );
    assert!(api.get_opt("agents").await.unwrap().is_some());

    server.inject(Fault::on_namespace_get("kube-system", FaultAction::Status(403, None)).once());
    let status = api_status(api.get("kube-system").await.unwrap_err());
    assert!(
        status.message.ends_with("in the namespace \"kube-system\""),
        "{}",
        status.message
    );
    server.inject(Fault::on_get("/namespaces/kube-system", FaultAction::MalformedJson).once());
    assert!(matches!(
        api.get("kube-system").await,
        Err(kube::Error::SerdeError(_))
    ));
    let codes: Vec<_> = server
        .requests()
        .iter()
        .filter(|r| r.path == "/api/v1/namespaces/kube-system")
        .map(|r| r.status)
        .collect();
    assert_eq!(codes, [Some(403), Some(200)]);
}

// ---------------------------------------------------------------------------------------------
// Watch

type Events<K> = BoxStream<'static, Result<WatchEvent<K>, kube::Error>>;

/// A watch with a server-side timeout of 30 s (bookmarks allowed, as kube's default).
fn wp() -> WatchParams {
    WatchParams::default().timeout(30)
}

async fn watch<K>(api: &Api<K>, params: &WatchParams, rv: u64) -> Events<K>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    api.watch(params, &rv.to_string()).await.unwrap().boxed()
}

/// The next item of a watch stream within 5 s; `None` when the stream ended.
async fn next_item<K>(events: &mut Events<K>) -> Option<Result<WatchEvent<K>, kube::Error>> {
    tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("a watch event (or the stream's end) within 5 s")
}

/// Whether nothing at all comes within `wait`.
async fn silent_for<K>(events: &mut Events<K>, wait: Duration) -> bool {
    tokio::time::timeout(wait, events.next()).await.is_err()
}

/// An event as (type, name or message, resourceVersion or code).
fn describe<K: Resource>(event: &WatchEvent<K>) -> (&'static str, String, u64) {
    let rv = |o: &K| o.resource_version().unwrap().parse::<u64>().unwrap();
    match event {
        WatchEvent::Added(o) => ("ADDED", o.name_any(), rv(o)),
        WatchEvent::Modified(o) => ("MODIFIED", o.name_any(), rv(o)),
        WatchEvent::Deleted(o) => ("DELETED", o.name_any(), rv(o)),
        WatchEvent::Bookmark(b) => (
            "BOOKMARK",
            String::new(),
            b.metadata.resource_version.parse().unwrap(),
        ),
        WatchEvent::Error(e) => ("ERROR", e.message.clone(), u64::from(e.code)),
    }
}

/// The next event that is not a bookmark.
async fn next_change<K>(events: &mut Events<K>) -> WatchEvent<K>
where
    K: Resource,
{
    loop {
        match next_item(events).await {
            Some(Ok(WatchEvent::Bookmark(_))) => continue,
            Some(Ok(event)) => return event,
            Some(Err(e)) => panic!("the watch failed: {e:?}"),
            None => panic!("the watch ended"),
        }
    }
}

/// The next `n` events that are not bookmarks, described.
async fn next_changes<K: Resource>(
    events: &mut Events<K>,
    n: usize,
) -> Vec<(&'static str, String, u64)> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(describe(&next_change(events).await));
    }
    out
}

/// Whether the stream ends (cleanly or with an error) within 5 s, skipping bookmarks.
async fn ends<K>(events: &mut Events<K>) -> bool {
    loop {
        match next_item(events).await {
            Some(Ok(WatchEvent::Bookmark(_))) => continue,
            Some(Ok(_)) => return false,
            Some(Err(_)) | None => return true,
        }
    }
}

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn rv_of<K: Resource>(object: &K) -> u64 {
    object.resource_version().unwrap().parse().unwrap()
}

#[tokio::test]
async fn list_then_watch_from_its_revision_sees_later_changes_in_order() {
    let server = FakeApiServer::start().await;
    server.add_pod("default", "a", &[("app", "x")]);
    server.add_pod("default", "b", &[("app", "x")]);
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    let list = api.list(&ListParams::default()).await.unwrap();
    let listed: u64 = list.metadata.resource_version.unwrap().parse().unwrap();
    assert_eq!(listed, server.resource_version());

    // Changes between the listing and the watch are replayed, later ones streamed.
    let mut expected = Vec::new();
    server.add_pod("default", "c", &[]);
    expected.push(("ADDED", "c".to_string(), server.resource_version()));
    server.add_pod("elsewhere", "d", &[]);
    let mut events = watch(&api, &wp(), listed).await;
    server.modify(Kind::Pod, "default", "a", |pod| {
        pod["metadata"]["labels"]["app"] = json!("y");
    });
    expected.push(("MODIFIED", "a".to_string(), server.resource_version()));
    server.set_terminating(Kind::Pod, "default", "b");
    expected.push(("MODIFIED", "b".to_string(), server.resource_version()));
    server.remove(Kind::Pod, "default", "b");
    expected.push(("DELETED", "b".to_string(), server.resource_version()));
    server.remove(Kind::Pod, "elsewhere", "d");

    let mut seen = Vec::new();
    let mut last = listed;
    for _ in 0..4 {
        let event = next_change(&mut events).await;
        let (_, _, rv) = describe(&event);
        assert!(rv > last, "resourceVersions increase: {rv} after {last}");
        last = rv;
        match &event {
            WatchEvent::Modified(pod) if pod.name_any() == "a" => {
                assert_eq!(pod.labels()["app"], "y");
            }
            // A deletion carries the last state, at the deletion's resourceVersion.
            WatchEvent::Deleted(pod) => {
                assert_eq!(pod.labels()["app"], "x");
                assert!(pod.metadata.deletion_timestamp.is_some());
                assert_eq!(pod.spec.as_ref().unwrap().containers.len(), 1);
            }
            _ => {}
        }
        seen.push(describe(&event));
    }
    assert_eq!(seen, expected);

    // A watch across namespaces from the same revision also sees "d" come and go.
    let all: Api<Pod> = Api::all(server.client());
    let mut events = watch(&all, &wp(), listed).await;
    let names: Vec<_> = next_changes(&mut events, 6)
        .await
        .into_iter()
        .map(|(t, name, _)| format!("{t} {name}"))
        .collect();
    assert_eq!(
        names,
        [
            "ADDED c",
            "ADDED d",
            "MODIFIED a",
            "MODIFIED b",
            "DELETED b",
            "DELETED d"
        ]
    );
}

#[tokio::test]
async fn watch_without_a_revision_starts_with_the_current_objects() {
    let server = FakeApiServer::start().await;
    server.add_pod("default", "a", &[]);
    server.add_pod("default", "b", &[]);
    server.add_pod("other", "c", &[]);
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    let now = server.resource_version();

    // resourceVersion=0: synthetic ADDED events for what exists, then changes.
    let mut events = api.watch(&wp(), "0").await.unwrap().boxed();
    let first = next_changes(&mut events, 2).await;
    assert_eq!(first[0].0, "ADDED");
    assert_eq!((first[0].1.as_str(), first[1].1.as_str()), ("a", "b"));
    server.add_pod("default", "e", &[]);
    assert_eq!(
        next_changes(&mut events, 1).await,
        [("ADDED", "e".to_string(), now + 1)]
    );

    // sendInitialEvents: the same, ended by a bookmark annotated initial-events-end.
    server.stop_bookmarks();
    let mut events = api.watch(&wp().initial_events(), "").await.unwrap().boxed();
    let mut names = Vec::new();
    loop {
        match next_item(&mut events).await {
            Some(Ok(WatchEvent::Added(pod))) => names.push(pod.name_any()),
            Some(Ok(WatchEvent::Bookmark(b))) => {
                assert_eq!(b.metadata.annotations[INITIAL_EVENTS_END], "true");
                assert_eq!(b.metadata.resource_version, (now + 1).to_string());
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(names, ["a", "b", "e"]);
}

#[tokio::test]
async fn bookmarks_come_periodically_at_the_current_revision() {
    let server = FakeApiServer::start().await;
    server.set_bookmark_interval(Duration::from_millis(200));
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    let start = server.resource_version();
    let mut events = watch(&api, &wp(), start).await;
    // A change to another kind moves the revision the bookmarks carry.
    server.add_sandbox("v1alpha1", "default", "sb", json!({}));
    let begun = Instant::now();
    for _ in 0..2 {
        match next_item(&mut events).await {
            Some(Ok(WatchEvent::Bookmark(b))) => {
                assert_eq!(
                    (b.types.kind.as_str(), b.types.api_version.as_str()),
                    ("Pod", "v1")
                );
                assert_eq!(
                    b.metadata.resource_version,
                    server.resource_version().to_string()
                );
                assert!(b.metadata.annotations.is_empty());
            }
            other => panic!("expected a bookmark, got {other:?}"),
        }
    }
    let took = begun.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(2),
        "{took:?}"
    );

    // No bookmarks for a watch that does not allow them.
    let mut quiet = watch(&api, &wp().disable_bookmarks(), start).await;
    assert!(silent_for(&mut quiet, Duration::from_millis(700)).await);
    let request = server.requests().pop().unwrap();
    assert_eq!(request.query_param("allowWatchBookmarks"), None);
}

#[tokio::test]
async fn bookmarks_on_request_and_none_once_stopped() {
    let server = FakeApiServer::start().await;
    server.stop_bookmarks();
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    let mut events = watch(&api, &wp(), server.resource_version()).await;
    let mut other = watch(&api, &wp(), server.resource_version()).await;
    assert!(silent_for(&mut events, Duration::from_millis(1500)).await);

    server.add_pod("default", "a", &[]);
    server.send_bookmarks();
    let rv = server.resource_version();
    for stream in [&mut events, &mut other] {
        assert_eq!(
            describe(&next_item(stream).await.unwrap().unwrap()).0,
            "ADDED"
        );
        // Every event up to the bookmark's revision comes before it.
        assert_eq!(
            describe(&next_item(stream).await.unwrap().unwrap()),
            ("BOOKMARK", String::new(), rv)
        );
    }
    assert!(silent_for(&mut events, Duration::from_millis(300)).await);

    // Periodic bookmarks resume with an interval.
    server.set_bookmark_interval(Duration::from_millis(100));
    assert_eq!(
        describe(&next_item(&mut events).await.unwrap().unwrap()).0,
        "BOOKMARK"
    );
}

#[tokio::test]
async fn a_bookmark_comes_just_before_the_timeout_then_the_stream_ends() {
    let server = FakeApiServer::start().await;
    server.set_bookmark_interval(Duration::from_secs(3600));
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    server.add_pod("default", "a", &[]);
    let begun = Instant::now();
    let mut events = watch(&api, &WatchParams::default().timeout(1), 0).await;
    assert_eq!(describe(&next_change(&mut events).await).1, "a");
    assert_eq!(
        describe(&next_item(&mut events).await.unwrap().unwrap()),
        ("BOOKMARK", String::new(), server.resource_version())
    );
    let took = begun.elapsed();
    assert!(took >= Duration::from_millis(950), "{took:?}");
    assert!(
        next_item(&mut events).await.is_none(),
        "the stream ends cleanly"
    );

    // Stopped bookmarks: none before the timeout either.
    server.stop_bookmarks();
    let mut events = watch(
        &api,
        &WatchParams::default().timeout(1),
        server.resource_version(),
    )
    .await;
    assert!(next_item(&mut events).await.is_none());
    wait_until("no watch is open", || server.open_watches() == 0).await;
}

#[tokio::test]
async fn too_old_resource_version_answers_a_410_error_event() {
    let server = FakeApiServer::start().await;
    server.add_pod("default", "a", &[]);
    let old = server.resource_version();
    server.add_pod("default", "b", &[]);
    server.compact();
    let now = server.resource_version();
    assert_eq!(server.watch_history_start(), now);
    let api: Api<Pod> = Api::namespaced(server.client(), "default");

    let mut events = watch(&api, &wp(), old).await;
    match next_item(&mut events).await {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
            assert_eq!(
                status.status,
                Some(kube::core::response::StatusSummary::Failure)
            );
            assert_eq!(
                status.message,
                format!("too old resource version: {old} ({now})")
            );
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        next_item(&mut events).await.is_none(),
        "the stream ends after the error"
    );
    assert_eq!(server.requests().last().unwrap().status, Some(200));

    // From the compaction's revision on, watches work.
    let mut events = watch(&api, &wp(), now).await;
    server.add_pod("default", "c", &[]);
    assert_eq!(next_changes(&mut events, 1).await[0].1, "c");

    // A bounded history drops old events: only the last two are kept.
    server.set_watch_history(2);
    let before = server.resource_version();
    for name in ["d", "e", "f"] {
        server.add_pod("default", name, &[]);
    }
    assert_eq!(server.watch_history_start(), before + 1);
    let mut events = watch(&api, &wp(), before + 1).await;
    let replayed: Vec<_> = next_changes(&mut events, 2)
        .await
        .into_iter()
        .map(|(_, name, _)| name)
        .collect();
    assert_eq!(replayed, ["e", "f"]);
    let mut events = watch(&api, &wp(), before).await;
    assert_eq!(describe(&next_change(&mut events).await).2, 410);

    // An open watch that falls behind the history is expired too.
    let mut slow = watch(&api, &wp(), server.resource_version()).await;
    server.set_watch_history(0);
    server.add_pod("default", "g", &[]);
    let (kind, _, code) = describe(&next_change(&mut slow).await);
    assert_eq!((kind, code), ("ERROR", 410));
    assert!(ends(&mut slow).await);
}

#[tokio::test]
async fn drop_watches_ends_every_open_stream_abruptly() {
    let server = FakeApiServer::start().await;
    server.stop_bookmarks();
    server.register_sandbox_version("v1alpha1");
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");
    let sandboxes: Api<DynamicObject> =
        Api::all_with(server.client(), &sandbox_resource("v1alpha1"));
    let rv = server.resource_version();
    let mut a = watch(&pods, &wp(), rv).await;
    let mut b = watch(&sandboxes, &wp(), rv).await;
    wait_until("both watches are open", || server.open_watches() == 2).await;
    server.add_pod("default", "p", &[]);
    assert_eq!(describe(&next_change(&mut a).await).1, "p");

    server.drop_watches();
    // kube-client reads a stream broken mid-way as its end (not an error), exactly like a
    // server-side timeout: only the missing bookmark, or resuming, tells them apart.
    assert!(next_item(&mut a).await.is_none());
    assert!(next_item(&mut b).await.is_none());
    wait_until("no watch is open", || server.open_watches() == 0).await;

    // Watches started later are not affected; resuming replays what was missed.
    server.add_sandbox("v1alpha1", "default", "sb", json!({}));
    let mut b = watch(&sandboxes, &wp(), rv).await;
    assert_eq!(describe(&next_change(&mut b).await).1, "sb");
}

/// Sends one raw HTTP/1.1 request and reads until the server closes the connection or
/// `stop` says the bytes so far are enough.
async fn raw_http(server: &FakeApiServer, target: &str, during: impl FnOnce()) -> String {
    let mut socket = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let request = format!("GET {target} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the first event arrived.
    while !String::from_utf8_lossy(&seen).contains("\"ADDED\"") {
        let n = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    during();
    tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut seen))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn watch_streams_are_chunked_and_broken_ones_lack_the_last_chunk() {
    let server = FakeApiServer::start().await;
    server.stop_bookmarks();
    server.add_pod("default", "a", &[]);
    let from = server.resource_version() - 1;
    let path = format!("/api/v1/namespaces/default/pods?watch=1&resourceVersion={from}");

    let dropped = raw_http(&server, &path, || server.drop_watches()).await;
    let head = dropped
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(dropped.contains("{\"type\":\"ADDED\",\"object\":{\"apiVersion\":\"v1\""));
    assert!(!dropped.ends_with("0\r\n\r\n"), "{dropped}");

    // A watch the server ends (its timeout) ends with the terminating chunk.
    let timed = raw_http(&server, &format!("{path}&timeoutSeconds=1"), || {}).await;
    assert!(timed.ends_with("\r\n0\r\n\r\n"), "{timed}");

    // CloseWatchAfter breaks a stream after its first event, without the last chunk.
    server.inject(Fault::on_watch("/pods", FaultAction::CloseWatchAfter(1)).once());
    let broken = raw_http(&server, &format!("{path}&timeoutSeconds=5"), || {}).await;
    assert!(!broken.ends_with("0\r\n\r\n"), "{broken}");
}

#[tokio::test]
async fn watch_faults_break_expire_or_refuse_watches() {
    let server = FakeApiServer::start().await;
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    let from = server.resource_version();
    server.add_pod("default", "a", &[]);
    server.add_pod("default", "b", &[]);

    // Mid-stream: the first event arrives, then the connection goes.
    server.inject(Fault::on_watch("/pods", FaultAction::CloseWatchAfter(1)).once());
    let mut events = watch(&api, &wp(), from).await;
    let first = describe(&next_change(&mut events).await);
    assert_eq!(first.1, "a");
    assert!(ends(&mut events).await);
    // Resuming from the last event's revision replays the rest.
    let mut events = watch(&api, &wp(), first.2).await;
    assert_eq!(describe(&next_change(&mut events).await).1, "b");

    // A 410 as the apiserver sends it on a watch: an ERROR event, then the end.
    server.inject(Fault::on_watch("/pods", FaultAction::ExpireWatch).once());
    let mut events = watch(&api, &wp(), from).await;
    let (kind, message, code) = describe(&next_change(&mut events).await);
    assert_eq!((kind, code), ("ERROR", 410));
    assert!(
        message.starts_with(&format!("too old resource version: {from} (")),
        "{message}"
    );
    assert!(ends(&mut events).await);

    // A 410 as a plain HTTP status on the watch request.
    server.inject(Fault::on_watch("/pods", FaultAction::Status(410, None)).once());
    let status = api_status(api.watch(&wp(), &from.to_string()).await.err().unwrap());
    assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
    assert!(
        status.message.starts_with("too old resource version: "),
        "{}",
        status.message
    );

    // A connection dropped before any answer: the watch does not start.
    server.inject(Fault::on_watch("/pods", FaultAction::CloseConnection).once());
    assert!(api.watch(&wp(), &from.to_string()).await.is_err());
    assert_eq!(server.requests().last().unwrap().status, None);

    // A malformed event is a decoding error.
    server.inject(Fault::on_watch("/pods", FaultAction::MalformedJson).once());
    let mut events = watch(&api, &wp(), from).await;
    assert!(matches!(
        next_item(&mut events).await,
        Some(Err(kube::Error::SerdeError(_)))
    ));

    // An event without a name (decoded loosely, as the reconciler's lean types do).
    server.inject(Fault::on_watch("/pods", FaultAction::ItemWithoutName).once());
    let raw: Api<DynamicObject> =
        Api::namespaced_with(server.client(), "default", &ApiResource::erase::<Pod>(&()));
    let mut events = watch(&raw, &wp(), from).await;
    match next_change(&mut events).await {
        WatchEvent::Added(o) => assert_eq!(o.metadata.name, None),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(describe(&next_change(&mut events).await).1, "b");

    // RBAC: a denied watch answers 403 before any stream; lists stay allowed.
    server.deny("watch", "", "pods");
    let status = api_status(api.watch(&wp(), "0").await.err().unwrap());
    assert_eq!(status.code, 403);
    assert!(
        status.message.contains("cannot watch resource \"pods\""),
        "{}",
        status.message
    );
    assert!(api.list(&ListParams::default()).await.is_ok());
}

#[tokio::test]
async fn list_and_get_faults_never_fire_on_watches_nor_watch_faults_on_lists() {
    let server = FakeApiServer::start().await;
    server.add_pod("default", "a", &[]);
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    server.inject(Fault::on_list("/pods", FaultAction::Status(500, None)));
    server.inject(Fault::on_get("/pods", FaultAction::Status(500, None)));
    server.inject(Fault::on_list_page(
        "/pods",
        0,
        FaultAction::Status(500, None),
    ));
    server.inject(Fault {
        matcher: FaultMatch {
            is_list: Some(true),
            ..FaultMatch::default()
        },
        action: FaultAction::Status(500, None),
        times: None,
    });
    let mut events = watch(&api, &wp(), 0).await;
    assert_eq!(describe(&next_change(&mut events).await).1, "a");
    drop(events);
    assert_eq!(
        api_status(api.list(&ListParams::default()).await.unwrap_err()).code,
        500
    );
    assert_eq!(api_status(api.get("a").await.unwrap_err()).code, 500);

    server.clear_faults();
    server.inject(Fault::on_watch("/pods", FaultAction::Status(500, None)));
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    assert_eq!(api.get("a").await.unwrap().name_any(), "a");
    let status = api_status(api.watch(&wp(), "0").await.err().unwrap());
    assert_eq!(status.code, 500);
    // Watch-only actions never fire on other requests.
    server.clear_faults();
    server.inject(Fault::always(FaultAction::ExpireWatch));
    server.inject(Fault::always(FaultAction::CloseWatchAfter(0)));
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    assert_eq!(api.get("a").await.unwrap().name_any(), "a");

    // Each watch is recorded once, when it starts, with 200.
    server.clear_faults();
    server.clear_requests();
    let mut events = watch(&api, &wp(), 0).await;
    server.add_pod("default", "b", &[]);
    next_changes(&mut events, 2).await;
    server.send_bookmarks();
    next_item(&mut events).await;
    let requests = server.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].status, Some(200));
    assert_eq!(requests[0].query_param("watch").as_deref(), Some("true"));
    wait_until("only this watch is open", || server.open_watches() == 1).await;
    drop(events);
    wait_until("the dropped watch is closed", || server.open_watches() == 0).await;
}

#[tokio::test]
async fn metadata_only_watch_events_decode_as_partial_object_meta() {
    let server = FakeApiServer::start().await;
    server.stop_bookmarks();
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    let from = server.resource_version();
    let mut events: Events<PartialObjectMeta<Pod>> = api
        .watch_metadata(&wp(), &from.to_string())
        .await
        .unwrap()
        .boxed();
    server.add_pod("default", "a", &[("app", "x")]);
    server.set_terminating(Kind::Pod, "default", "a");
    server.send_bookmarks();
    match next_item(&mut events).await {
        Some(Ok(WatchEvent::Added(meta))) => {
            let types = meta.types.as_ref().unwrap();
            assert_eq!(
                (types.kind.as_str(), types.api_version.as_str()),
                ("PartialObjectMetadata", "meta.k8s.io/v1")
            );
            assert_eq!(meta.labels()["app"], "x");
            assert!(meta.metadata.uid.is_some());
        }
        other => panic!("unexpected {other:?}"),
    }
    match next_item(&mut events).await {
        Some(Ok(WatchEvent::Modified(meta))) => {
            assert!(meta.metadata.deletion_timestamp.is_some());
        }
        other => panic!("unexpected {other:?}"),
    }
    match next_item(&mut events).await {
        Some(Ok(WatchEvent::Bookmark(b))) => {
            assert_eq!(b.types.kind, "PartialObjectMetadata");
            assert_eq!(b.types.api_version, "meta.k8s.io/v1");
            assert_eq!(
                b.metadata.resource_version,
                server.resource_version().to_string()
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    let request = server.requests().pop().unwrap();
    assert!(request.is_metadata_only());
    assert_eq!(
        request.accept.as_deref(),
        Some("application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1")
    );

    // The raw events carry nothing but metadata, for sandboxes too.
    server.add_sandbox("v1alpha1", "default", "sb", json!({"replicas": 0}));
    let request =
        kube::core::Request::new("/apis/agents.x-k8s.io/v1alpha1/namespaces/default/sandboxes")
            .watch_metadata(&wp(), "0")
            .unwrap();
    let mut raw = server
        .client()
        .request_events::<serde_json::Value>(request)
        .await
        .unwrap()
        .boxed();
    let event = tokio::time::timeout(Duration::from_secs(5), raw.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let WatchEvent::Added(object) = event else {
        panic!("expected ADDED");
    };
    assert_eq!(object["kind"], "PartialObjectMetadata");
    assert_eq!(object["metadata"]["name"], "sb");
    assert!(object.get("spec").is_none(), "{object}");

    // A watch asking for the list form is not acceptable (as on the apiserver).
    let req = http::Request::get("/api/v1/namespaces/default/pods?watch=true")
        .header(
            "Accept",
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        )
        .body(vec![])
        .unwrap();
    let status = api_status(server.client().request_text(req).await.unwrap_err());
    assert_eq!(status.code, 406);
}

#[tokio::test]
async fn deleted_and_recreated_object_is_deleted_then_added_with_a_new_uid() {
    let server = FakeApiServer::start().await;
    server.add_pod("default", "a", &[]);
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    let list = api.list(&ListParams::default()).await.unwrap();
    let old_uid = list.items[0].uid().unwrap();
    let listed: u64 = list.metadata.resource_version.unwrap().parse().unwrap();

    // Between the listing and the watch.
    server.remove(Kind::Pod, "default", "a");
    server.add_pod("default", "a", &[]);
    let mut events = watch(&api, &wp(), listed).await;
    let (deleted, added) = match (
        next_change(&mut events).await,
        next_change(&mut events).await,
    ) {
        (WatchEvent::Deleted(d), WatchEvent::Added(a)) => (d, a),
        other => panic!("expected DELETED then ADDED, got {other:?}"),
    };
    assert_eq!(deleted.uid().unwrap(), old_uid);
    assert_ne!(added.uid().unwrap(), old_uid);
    assert_eq!(rv_of(&deleted), listed + 1);
    assert_eq!(rv_of(&added), listed + 2);

    // While watching.
    server.remove(Kind::Pod, "default", "a");
    server.add_pod("default", "a", &[]);
    let (deleted, again) = match (
        next_change(&mut events).await,
        next_change(&mut events).await,
    ) {
        (WatchEvent::Deleted(d), WatchEvent::Added(a)) => (d, a),
        other => panic!("expected DELETED then ADDED, got {other:?}"),
    };
    assert_eq!(deleted.uid(), added.uid());
    assert_ne!(again.uid(), added.uid());
}

#[tokio::test]
async fn selected_watches_see_only_matching_objects() {
    let server = FakeApiServer::start().await;
    let api: Api<Pod> = Api::all(server.client());
    let from = server.resource_version();
    let mut labelled = watch(&api, &wp().labels("app=x"), from).await;
    let mut named = watch(&api, &wp().fields("metadata.name=c"), from).await;

    server.add_pod("default", "a", &[("app", "x")]);
    server.add_pod("default", "b", &[("app", "y")]);
    server.add_pod("other", "c", &[]);
    // b starts matching: ADDED; a stops matching: DELETED (with its new labels).
    server.modify(Kind::Pod, "default", "b", |p| {
        p["metadata"]["labels"]["app"] = json!("x")
    });
    server.modify(Kind::Pod, "default", "a", |p| {
        p["metadata"]["labels"]["app"] = json!("z")
    });
    server.modify(Kind::Pod, "default", "b", |p| {
        p["status"]["phase"] = json!("Succeeded")
    });
    server.remove(Kind::Pod, "default", "b");
    server.remove(Kind::Pod, "default", "a");
    server.remove(Kind::Pod, "other", "c");

    let seen: Vec<_> = next_changes(&mut labelled, 5)
        .await
        .into_iter()
        .map(|(t, name, _)| format!("{t} {name}"))
        .collect();
    assert_eq!(
        seen,
        ["ADDED a", "ADDED b", "DELETED a", "MODIFIED b", "DELETED b"]
    );
    let seen: Vec<_> = next_changes(&mut named, 2)
        .await
        .into_iter()
        .map(|(t, name, _)| format!("{t} {name}"))
        .collect();
    assert_eq!(seen, ["ADDED c", "DELETED c"]);
    server.send_bookmarks();
    assert_eq!(
        describe(&next_item(&mut labelled).await.unwrap().unwrap()).0,
        "BOOKMARK"
    );

    // A bad selector is refused before the stream starts.
    let status = api_status(
        api.watch(&wp().labels("app in x"), "0")
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(status.code, 400);
}

#[tokio::test]
async fn sandbox_and_namespace_watches() {
    let server = FakeApiServer::start().await;
    server.stop_bookmarks();
    server.register_sandbox_version("v1beta1");
    server.register_sandbox_version("v1alpha1");
    let from = server.resource_version();
    let beta: Api<DynamicObject> = Api::all_with(server.client(), &sandbox_resource("v1beta1"));
    let mut sandboxes = watch(&beta, &wp(), from).await;
    let namespaces: Api<Namespace> = Api::all(server.client());
    let mut ns_events = watch(&namespaces, &wp(), from).await;

    server.add_sandbox("v1alpha1", "one", "old", json!({"replicas": 1}));
    server.add_sandbox("v1beta1", "one", "sb", json!({"operatingMode": "Running"}));
    server.add_sandbox("v1beta1", "two", "sb", json!({"operatingMode": "Running"}));
    server.modify(Kind::Sandbox, "one", "sb", |s| {
        s["spec"]["operatingMode"] = json!("Suspended")
    });
    server.set_namespace_terminating("two");
    server.remove_namespace("two");
    server.send_bookmarks();

    let mut seen = Vec::new();
    for _ in 0..3 {
        match next_change(&mut sandboxes).await {
            WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                let types = o.types.as_ref().unwrap();
                assert_eq!(types.api_version, "agents.x-k8s.io/v1beta1");
                seen.push(format!(
                    "{}/{} {} gen {}",
                    o.namespace().unwrap(),
                    o.name_any(),
                    o.data["spec"]["operatingMode"].as_str().unwrap(),
                    o.metadata.generation.unwrap()
                ));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            "one/sb Running gen 1",
            "two/sb Running gen 1",
            "one/sb Suspended gen 2"
        ]
    );
    match next_item(&mut sandboxes).await {
        Some(Ok(WatchEvent::Bookmark(b))) => {
            assert_eq!(b.types.api_version, "agents.x-k8s.io/v1beta1");
            assert_eq!(b.types.kind, "Sandbox");
        }
        other => panic!("unexpected {other:?}"),
    }

    let seen: Vec<_> = next_changes(&mut ns_events, 4)
        .await
        .into_iter()
        .map(|(t, name, _)| format!("{t} {name}"))
        .collect();
    assert_eq!(
        seen,
        ["ADDED one", "ADDED two", "MODIFIED two", "DELETED two"]
    );
    match next_item(&mut ns_events).await {
        Some(Ok(WatchEvent::Bookmark(b))) => assert_eq!(b.types.kind, "Namespace"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn list_pages_copy_each_object_encoded_once() {
    let server = FakeApiServer::start().await;
    for i in 0..10 {
        server.add_pod("default", &format!("pod-{i}"), &[]);
    }
    let api: Api<Pod> = Api::namespaced(server.client(), "default");
    assert_eq!(server.object_encodings(), 0);
    let pages = all_pages(&api, ListParams::default().limit(4))
        .await
        .unwrap();
    assert_eq!(pages.len(), 3);
    assert_eq!(server.object_encodings(), 10);
    // Listing again encodes nothing; a changed object is encoded again, once.
    all_pages(&api, ListParams::default().limit(4))
        .await
        .unwrap();
    assert_eq!(server.object_encodings(), 10);
    server.add_pod("default", "pod-3", &[("changed", "yes")]);
    let list = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(server.object_encodings(), 11);
    let changed = list.items.iter().find(|p| p.name_any() == "pod-3").unwrap();
    assert_eq!(changed.labels()["changed"], "yes");
    // Built-in list items carry no apiVersion/kind; a GET and watch events share the full form.
    let raw = raw_get(&server, "/api/v1/namespaces/default/pods?limit=1").await;
    assert!(raw["items"][0].get("kind").is_none());
    assert_eq!(raw["kind"], "PodList");
    assert!(raw["metadata"]["continue"].as_str().is_some());
    api.get("pod-0").await.unwrap();
    let encodings = server.object_encodings();
    let mut events = api.watch(&wp(), "0").await.unwrap().boxed();
    next_item(&mut events).await.unwrap().unwrap();
    assert_eq!(
        server.object_encodings(),
        encodings + 9,
        "pod-0's full form was reused"
    );
}
