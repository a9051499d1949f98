//! Watch streams on the wire and their events: chunked encoding, broken streams, watch faults
//! (apart from list and get faults), metadata-only events, re-created objects, selected
//! watches and watches of Sandboxes and Namespaces.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, WatchEvent};
use kube::core::PartialObjectMeta;
use kube::ResourceExt;
use serde_json::json;
use testkit::fake_api::{FakeApiServer, Fault, FaultAction, FaultMatch, Kind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

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
