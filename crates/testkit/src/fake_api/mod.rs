//! A fake Kubernetes API server for integration tests.
//!
//! No real API server can run on the test machines, so the cluster side of the reconciler is
//! exercised against this one: a real HTTP/1.1 server (hyper 1) on `127.0.0.1` that the real
//! `kube::Client` talks to, in-process or from a child process through a kubeconfig file.
//! It serves only what the reconciler reads and follows the Kubernetes API's own rules for it:
//!
//! - Pods (`/api/v1/[namespaces/{ns}/]pods[/{name}]`) and agent-sandbox `Sandbox` objects
//!   (`/apis/agents.x-k8s.io/{version}/[namespaces/{ns}/]sandboxes[/{name}]`), GET only;
//! - Namespaces (`/api/v1/namespaces[/{name}]`, cluster-scoped, GET only): a new server has
//!   `default` and `kube-system`, whose UID is the cluster's identity ([`cluster_uid`], random
//!   per server, [`set_cluster_uid`] to pin or change it). Adding a pod, sandbox or other
//!   object into a namespace creates that namespace if it does not exist (a test convenience;
//!   a real API server answers 404 instead); [`add_namespace`], [`remove_namespace`] and
//!   [`set_namespace_terminating`] control them explicitly. Removing a namespace removes only
//!   the Namespace object, not what is in it (no namespace controller runs here);
//! - list semantics: key order (namespace, then name), `labelSelector` (equality, set and
//!   existence requirements), `fieldSelector` (`metadata.name`, `metadata.namespace`, a few pod
//!   fields, `status.phase` of namespaces), `limit`/`continue` pagination over a consistent
//!   snapshot (every page of one listing reports the resourceVersion at which the listing
//!   started and shows the objects as they were then), `remainingItemCount`, 410 `Expired`
//!   for compacted continue tokens; one resourceVersion counter for every kind, like etcd's
//!   revision;
//! - watch (`?watch=true` or `watch=1`) on every collection above, namespaced or across
//!   namespaces, with the same `labelSelector`/`fieldSelector` and content negotiation: `200`
//!   with a chunked stream of newline-delimited events `{"type":"ADDED"|"MODIFIED"|"DELETED"|
//!   "BOOKMARK"|"ERROR","object":{..}}` (see [Watch](#watch) below);
//! - content negotiation for `as=PartialObjectMetadataList` / `as=PartialObjectMetadata`
//!   (lists, GETs and watch events alike);
//! - `Status` error bodies with the real reasons and messages (404, 403, 400, 405, 406, 410);
//!   like the apiserver, a path under a group/version nobody serves (an unregistered group, a
//!   Sandbox version not registered, the Sandbox API disabled) answers its HTTP mux's
//!   plain-text `404 page not found`, while a resource its served group/version lacks answers
//!   a `NotFound` Status naming no object (`the server could not find the requested
//!   resource`, empty `details`), and a missing object a `NotFound` Status naming it;
//! - RBAC as seen by a client: `deny(verb, group, resource)` makes requests answer 403 and
//!   `SelfSubjectAccessReview`s answer `allowed: false` (whatever the resource name). Like
//!   the apiserver, a request for the Namespace `x` is authorized in namespace `x`, so its
//!   403 says `... cannot get resource "namespaces" in API group "" in the namespace "x"`;
//! - legacy discovery (`/version`, `/api`, `/api/v1`, `/apis`, `/apis/{group}[/{version}]`).
//!
//! Tests change the cluster while a client runs (`add_pod`, `remove`, `set_terminating`, ...)
//! and inject faults (`inject`) that fire on matching requests: error statuses, expired
//! continue tokens, hangs, malformed or wrong-kind bodies, dropped connections, broken or
//! expired watches. Every request is recorded (`requests`) so a test can assert what the
//! client actually sent; a watch is recorded once, when it starts, with status 200.
//!
//! Each stored revision keeps its JSON encodings (full, list item, metadata-only), made once
//! on first use: a revision never changes (a change is a new revision), so list pages, GETs
//! and watch events copy bytes instead of re-encoding objects ([`object_encodings`] counts
//! the encodings made).
//!
//! # Watch
//!
//! Every change made through the control methods (`add_*`, `modify`, `remove`,
//! `set_terminating`, the namespace methods, `set_cluster_uid`) is one event at its own new
//! resourceVersion, kept in a bounded history ([`set_watch_history`], default
//! [`DEFAULT_WATCH_HISTORY`] events; [`compact`] drops it all). A `DELETED` event carries the
//! object's last state with the deletion's resourceVersion. As on the apiserver:
//!
//! - `resourceVersion=X` (X > 0) replays every event after X, then streams new ones; a LIST
//!   reports the revision it was served at, so a watch from a list's resourceVersion sees
//!   exactly the later changes. X older than the retained history (after [`compact`], or
//!   trimmed) answers `200` with one `ERROR` event carrying a 410 `Expired` Status
//!   (`too old resource version: X (Y)`, Y = the oldest revision a watch can start from), and
//!   the stream ends;
//! - `resourceVersion` unset or `0` starts with synthetic `ADDED` events of the current
//!   objects; `sendInitialEvents=true` (with `resourceVersionMatch=NotOlderThan`) does the
//!   same and then sends a `BOOKMARK` annotated `k8s.io/initial-events-end: "true"`;
//! - selectors filter like the watch cache: an object that starts matching is `ADDED`, one
//!   that stops matching is `DELETED` (with its new state), one that never matches is silent;
//! - with `allowWatchBookmarks=true`, a `BOOKMARK` (an object of the watched kind, or a
//!   `PartialObjectMetadata`, with only `metadata.resourceVersion`: the server's revision,
//!   after every event up to it was sent) comes every [`set_bookmark_interval`] (default
//!   [`DEFAULT_BOOKMARK_INTERVAL`]; real servers send one about every minute), on
//!   [`send_bookmarks`], and just before `timeoutSeconds` runs out, when the server ends the
//!   stream cleanly. [`stop_bookmarks`] stops the periodic and the timeout bookmarks (an
//!   apiserver that stops sending them); `send_bookmarks` still works;
//! - [`drop_watches`] drops every open watch's connection abruptly (no terminating chunk);
//!   faults act on watch requests too: [`FaultAction::CloseWatchAfter`] breaks a stream
//!   after some events, [`FaultAction::ExpireWatch`] answers the 410 `ERROR` event,
//!   [`FaultAction::FreezeWatch`] sends no event but bookmarks at a frozen revision,
//!   `Status(410, _)` answers a plain HTTP 410, `CloseConnection` drops the request unanswered.
//!   A watch is not a list: `on_list` rules never fire on watches and `on_get` rules neither;
//!   [`Fault::on_watch`] and [`FaultMatch::is_watch`] target them.
//!
//! kube-client reads a watch stream that breaks mid-way (`unexpected EOF during chunk`) as
//! its end, exactly like one the server ended: a client can only tell them apart by the
//! missing bookmark (or by resuming from its last resourceVersion, which replays what it
//! missed).
//!
//! Faults match the request path by substring, so mind that every namespaced path contains
//! `/namespaces/{ns}/`: `Fault::on_get("/namespaces/agents", ..)` fires on the GET of the
//! Namespace `agents` *and* on GETs of single objects in it (`.../namespaces/agents/pods/x`),
//! and also in `agents-2`. A Namespace GET is a single-object GET, never a list, so `on_list`
//! rules do not fire on it, and `on_get` rules do not fire on pod lists in that namespace.
//! [`Fault::on_namespace_get`] targets exactly the GET of one Namespace (it matches the
//! parsed resource and name, see [`FaultMatch::resource`] and [`FaultMatch::name`]).
//!
//! The module depends only on crates the project already uses (tokio, hyper, hyper-util,
//! http-body-util, serde_json, kube, chrono, rand), so a non-test binary can reuse it.
//!
//! # Modules
//!
//! This module holds the control API ([`FakeApiServer`], [`Kind`], [`RecordedRequest`]);
//! `routing` serves connections and routes requests (authorization, paths, verbs); `listing`
//! answers lists (snapshots, `limit`/`continue` tokens); `selectors` parses and matches label
//! and field selectors; `negotiation` picks full or metadata-only bodies; `watch` keeps the
//! event history and streams watches; `faults` holds the fault rules and what a fired rule
//! answers; `status` the `Status` error bodies; `namespaces` the Namespaces and the cluster's
//! identity; `store` every revision of every object; `discovery` the discovery documents and
//! access reviews.
//!
//! [`cluster_uid`]: FakeApiServer::cluster_uid
//! [`object_encodings`]: FakeApiServer::object_encodings
//! [`set_watch_history`]: FakeApiServer::set_watch_history
//! [`compact`]: FakeApiServer::compact
//! [`set_bookmark_interval`]: FakeApiServer::set_bookmark_interval
//! [`send_bookmarks`]: FakeApiServer::send_bookmarks
//! [`stop_bookmarks`]: FakeApiServer::stop_bookmarks
//! [`drop_watches`]: FakeApiServer::drop_watches
//! [`set_cluster_uid`]: FakeApiServer::set_cluster_uid
//! [`add_namespace`]: FakeApiServer::add_namespace
//! [`remove_namespace`]: FakeApiServer::remove_namespace
//! [`set_namespace_terminating`]: FakeApiServer::set_namespace_terminating

mod discovery;
mod faults;
mod listing;
mod namespaces;
mod negotiation;
mod routing;
mod selectors;
mod status;
mod store;
mod watch;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use faults::{Fault, FaultAction, FaultMatch};

use routing::{accept_loop, parse_query};
use store::{lock, object_key, State};

/// API group of the agent-sandbox `Sandbox` custom resource.
pub const SANDBOX_GROUP: &str = "agents.x-k8s.io";
/// The user every request is authenticated as; appears in `Forbidden` messages.
pub const FAKE_USER: &str = "system:serviceaccount:default:sandbox-reconciler";
/// The bearer token written into kubeconfig files by [`FakeApiServer::write_kubeconfig`].
pub const FAKE_TOKEN: &str = "fake-api-server-token";

/// Message of a 410 `Expired` answer to a continued list request (verbatim from the apiserver).
pub const EXPIRED_CONTINUE_MESSAGE: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";

/// Events a new server keeps for watches to replay ([`FakeApiServer::set_watch_history`]).
pub const DEFAULT_WATCH_HISTORY: usize = 100_000;
/// Interval of periodic bookmarks on a new server ([`FakeApiServer::set_bookmark_interval`]).
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// Annotation of the bookmark that ends a watch's initial events (`sendInitialEvents=true`).
pub const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// Kind of object the fake server stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// core/v1 Pod (`pods`).
    Pod,
    /// agents.x-k8s.io Sandbox (`sandboxes`), any version.
    Sandbox,
    /// core/v1 Namespace (`namespaces`), cluster-scoped: pass `""` as its namespace.
    Namespace,
}

impl Kind {
    fn kind_name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Sandbox => "Sandbox",
            Kind::Namespace => "Namespace",
        }
    }

    /// Built-in kinds' list items carry no `apiVersion`/`kind`; custom resources' do.
    fn is_built_in(self) -> bool {
        self != Kind::Sandbox
    }

    /// The key an object is stored under, ordered like etcd's: "namespace/name" for
    /// namespaced kinds, the name for cluster-scoped ones.
    fn store_key(self, namespace: &str, name: &str) -> String {
        match self {
            Kind::Namespace => name.to_string(),
            Kind::Pod | Kind::Sandbox => object_key(namespace, name),
        }
    }
}

/// One request the server received, with what it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `"GET"`.
    pub method: String,
    /// Path without the query, e.g. `/api/v1/namespaces/default/pods`.
    pub path: String,
    /// Raw (still percent-encoded) query string; empty when there was none.
    pub query: String,
    /// The `Accept` header, if sent.
    pub accept: Option<String>,
    /// The `Authorization` header, if sent.
    pub authorization: Option<String>,
    /// Request body (UTF-8, lossy).
    pub body: String,
    /// Status code answered; `None` while pending, or if the connection was dropped
    /// (`CloseConnection`) or the client gave up during a `Hang`.
    pub status: Option<u16>,
}

impl RecordedRequest {
    /// Decoded value of query parameter `name` (first occurrence).
    pub fn query_param(&self, name: &str) -> Option<String> {
        parse_query(&self.query)
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// Whether the request asked for metadata only (`as=PartialObjectMetadata[List]`).
    pub fn is_metadata_only(&self) -> bool {
        self.accept
            .as_deref()
            .is_some_and(|a| a.contains("as=PartialObjectMetadata"))
    }
}

/// The fake API server. Starts on [`FakeApiServer::start`], stops on
/// [`FakeApiServer::shutdown`] or drop. All methods take `&self`; tests may change the
/// cluster while clients are talking to it.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl FakeApiServer {
    /// Binds `127.0.0.1:0` and serves on a task of the caller's tokio runtime.
    pub async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake API server: bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("fake API server: local address");
        let shared = Arc::new(Mutex::new(State::new(addr)));
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        FakeApiServer { addr, shared, task }
    }

    /// Base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Socket address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A `kube::Config` for this server (default namespace `default`, no credentials), to
    /// adjust before building a client, e.g. `default_retry = false` or a `read_timeout`.
    pub fn config(&self) -> kube::Config {
        let uri = self.url().parse().expect("fake API server: url parses");
        kube::Config::new(uri)
    }

    /// A real `kube::Client` for this server built from [`config`](Self::config), with kube's
    /// default retry policy (429/503/504 are retried, see [`FaultAction::Status`]). Must be
    /// called inside a tokio runtime.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config()).expect("fake API server: build kube::Client")
    }

    /// Writes a kubeconfig (cluster server = [`url`](Self::url), namespace `default`, a user
    /// with bearer token [`FAKE_TOKEN`]) for a child process's `KUBECONFIG`.
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    namespace: default\n    user: fake\n\
             current-context: fake\n\
             users:\n\
             - name: fake\n  user:\n    token: {token}\n\
             preferences: {{}}\n",
            url = self.url(),
            token = FAKE_TOKEN
        );
        std::fs::write(path, text).expect("fake API server: write kubeconfig");
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state().requests.clone()
    }

    /// Number of requests received so far.
    pub fn request_count(&self) -> usize {
        self.state().requests.len()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.state().requests.clear();
    }

    /// Stops accepting and drops every open connection.
    pub fn shutdown(&self) {
        self.task.abort();
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.shared)
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
