//! Injected faults on lists and gets (a frozen watch, a 500 on a later page, broken bodies,
//! 429 retries) and how the client sees them.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, WatchEvent};
use kube::ResourceExt;
use testkit::fake_api::{FakeApiServer, Fault, FaultAction, Kind};

use crate::support::*;

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
