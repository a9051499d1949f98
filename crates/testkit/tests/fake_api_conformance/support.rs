//! The helpers the topics share: the Sandbox resource, Status errors, raw GETs, paged lists
//! and the reading of watch streams.

use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, WatchEvent, WatchParams};
use kube::core::{ObjectList, Status};
use kube::{Resource, ResourceExt};
use testkit::fake_api::FakeApiServer;

pub(crate) fn sandbox_resource(version: &str) -> ApiResource {
    ApiResource {
        group: "agents.x-k8s.io".into(),
        version: version.into(),
        api_version: format!("agents.x-k8s.io/{version}"),
        kind: "Sandbox".into(),
        plural: "sandboxes".into(),
    }
}

pub(crate) fn sandboxes(server: &FakeApiServer, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(server.client(), ns, &sandbox_resource("v1alpha1"))
}

pub(crate) fn api_status(err: kube::Error) -> Status {
    match err {
        kube::Error::Api(status) => *status,
        other => panic!("expected kube::Error::Api, got {other:?}"),
    }
}

pub(crate) async fn raw_get(server: &FakeApiServer, uri: &str) -> serde_json::Value {
    let req = http::Request::get(uri).body(vec![]).unwrap();
    let text = server.client().request_text(req).await.unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Lists every page with `limit`, returning the pages.
pub(crate) async fn all_pages<K>(
    api: &Api<K>,
    lp: ListParams,
) -> Result<Vec<ObjectList<K>>, kube::Error>
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

pub(crate) fn namespaces(server: &FakeApiServer) -> Api<Namespace> {
    Api::all(server.client())
}

pub(crate) fn phase(ns: &Namespace) -> Option<&str> {
    ns.status.as_ref().and_then(|s| s.phase.as_deref())
}

pub(crate) type Events<K> = BoxStream<'static, Result<WatchEvent<K>, kube::Error>>;

/// A watch with a server-side timeout of 30 s (bookmarks allowed, as kube's default).
pub(crate) fn wp() -> WatchParams {
    WatchParams::default().timeout(30)
}

pub(crate) async fn watch<K>(api: &Api<K>, params: &WatchParams, rv: u64) -> Events<K>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    api.watch(params, &rv.to_string()).await.unwrap().boxed()
}

/// The next item of a watch stream within 5 s; `None` when the stream ended.
pub(crate) async fn next_item<K>(
    events: &mut Events<K>,
) -> Option<Result<WatchEvent<K>, kube::Error>> {
    tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("a watch event (or the stream's end) within 5 s")
}

/// Whether nothing at all comes within `wait`.
pub(crate) async fn silent_for<K>(events: &mut Events<K>, wait: Duration) -> bool {
    tokio::time::timeout(wait, events.next()).await.is_err()
}

/// An event as (type, name or message, resourceVersion or code).
pub(crate) fn describe<K: Resource>(event: &WatchEvent<K>) -> (&'static str, String, u64) {
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
pub(crate) async fn next_change<K>(events: &mut Events<K>) -> WatchEvent<K>
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
pub(crate) async fn next_changes<K: Resource>(
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
pub(crate) async fn ends<K>(events: &mut Events<K>) -> bool {
    loop {
        match next_item(events).await {
            Some(Ok(WatchEvent::Bookmark(_))) => continue,
            Some(Ok(_)) => return false,
            Some(Err(_)) | None => return true,
        }
    }
}

pub(crate) async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(crate) fn rv_of<K: Resource>(object: &K) -> u64 {
    object.resource_version().unwrap().parse().unwrap()
}
