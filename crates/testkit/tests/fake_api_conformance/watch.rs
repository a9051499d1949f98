//! Watches: replay from a resourceVersion, the current objects without one, bookmarks, 410
//! for a compacted revision and streams ended by the server.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, ListParams, WatchEvent, WatchParams};
use kube::ResourceExt;
use serde_json::json;
use testkit::fake_api::{FakeApiServer, Kind, INITIAL_EVENTS_END};

use crate::support::*;

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
