//! Lists and gets: pagination from one snapshot, uids and resourceVersions, selectors,
//! metadata-only content negotiation, terminating objects, reads at an exact
//! resourceVersion and the cached encoding of list pages.

use std::collections::BTreeSet;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::ResourceExt;
use serde_json::json;
use testkit::fake_api::{FakeApiServer, Kind};

use crate::support::*;

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
