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
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

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
    fn resource(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Sandbox => "sandboxes",
            Kind::Namespace => "namespaces",
        }
    }

    fn group(self) -> &'static str {
        match self {
            Kind::Pod | Kind::Namespace => "",
            Kind::Sandbox => SANDBOX_GROUP,
        }
    }

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

/// A fault rule: when a request matches `matcher`, answer with `action` instead of normally.
///
/// Rules are checked in the order they were injected; the first one that applies fires.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Which requests the rule applies to.
    pub matcher: FaultMatch,
    /// What the server does instead of answering normally.
    pub action: FaultAction,
    /// How many times the rule fires; `None` = forever.
    pub times: Option<usize>,
}

/// Request criteria of a [`Fault`]; `None` fields match anything.
#[derive(Debug, Clone, Default)]
pub struct FaultMatch {
    /// HTTP method, e.g. `"GET"` (case-insensitive).
    pub method: Option<String>,
    /// Substring of the request path (without query), e.g. `"/pods"` or `"sandboxes"`.
    /// Every namespaced path contains `/namespaces/{ns}/`, so `"/namespaces/agents"` also
    /// matches requests for objects in `agents` (and in `agents-2`); use [`resource`] and
    /// [`name`] to target the Namespace itself.
    ///
    /// [`resource`]: FaultMatch::resource
    /// [`name`]: FaultMatch::name
    pub path_contains: Option<String>,
    /// Plural resource of the request as the apiserver parses the path, exactly: `"pods"`,
    /// `"sandboxes"`, `"namespaces"` (`/api/v1/namespaces/x` is a request for the Namespace
    /// `x`; `/api/v1/namespaces/x/pods` one for pods), `"selfsubjectaccessreviews"`.
    /// Discovery requests have no resource and never match.
    pub resource: Option<String>,
    /// Object name of the request, exactly (for a Namespace GET, the namespace's name).
    /// Requests without a name (lists, reviews, discovery) never match.
    pub name: Option<String>,
    /// 0-based page of a paginated listing: 0 = request without `continue`, k = the k-th
    /// continued request of that listing (the page number travels in the continue token).
    pub page: Option<usize>,
    /// `true`: only lists (collection GETs without `watch`); `false`: every other request,
    /// watches included (pair with `is_watch: Some(false)` to exclude them).
    pub is_list: Option<bool>,
    /// `true`: only watches (collection GETs with `watch=true` or `watch=1`); `false`: every
    /// other request.
    pub is_watch: Option<bool>,
    /// Fire only on the nth request (0-based) that matches the other criteria.
    pub nth: Option<usize>,
}

/// What a firing [`Fault`] does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAction {
    /// Answer this HTTP status with a proper `Status` body (reason derived from the code:
    /// 500 InternalError, 429 TooManyRequests, 403 Forbidden, 404 NotFound, 409 Conflict,
    /// 410 Expired, 503 ServiceUnavailable, 504 Timeout, 400 BadRequest, 401 Unauthorized),
    /// optionally with a `Retry-After` header (seconds, also in `details.retryAfterSeconds`).
    ///
    /// kube 5 clients retry 429, 503 and 504 on their own (`Config::default_retry`, up to 15
    /// times, exponential backoff from 5ms, honouring `Retry-After`), so such a fault that fires
    /// forever stalls the client for minutes: limit it with [`Fault::times`].
    Status(u16, Option<u64>),
    /// Answer a continued list request with 410 `Expired` (as after an etcd compaction).
    /// Applies only to requests that carry a `continue` parameter.
    ExpireContinue,
    /// Sleep this long, then answer normally (a long duration = never answer in a test).
    Hang(Duration),
    /// 200 with a truncated JSON body.
    MalformedJson,
    /// 200 with valid JSON of the wrong kind (`ConfigMapList` / `ConfigMap`) whose items have
    /// no metadata at all.
    WrongKind,
    /// Normal answer, but the first list item (or the single object) lacks `metadata.name`.
    ItemWithoutName,
    /// Read the request, then drop the connection without any response (on a watch: the
    /// watch never starts).
    CloseConnection,
    /// Watch requests only (other requests are not matched): start the watch normally, then
    /// drop the connection abruptly, with no terminating chunk, right after the nth object
    /// event (`ADDED`/`MODIFIED`/`DELETED`; bookmarks do not count) was sent; 0 = right
    /// after the response head.
    CloseWatchAfter(usize),
    /// Watch requests only (other requests are not matched): answer 200 with a single
    /// `ERROR` event carrying a 410 `Expired` Status (`too old resource version: ...`), then
    /// end the stream, as the apiserver does for a compacted resourceVersion.
    ExpireWatch,
}

impl Fault {
    /// A rule that fires on every request, forever.
    pub fn always(action: FaultAction) -> Fault {
        Fault {
            matcher: FaultMatch::default(),
            action,
            times: None,
        }
    }

    /// Fires on every request whose path contains `path_contains`, forever.
    pub fn on_path(path_contains: &str, action: FaultAction) -> Fault {
        Fault {
            matcher: FaultMatch {
                path_contains: Some(path_contains.to_string()),
                ..FaultMatch::default()
            },
            action,
            times: None,
        }
    }

    /// Fires on list requests (collection GETs, not watches) whose path contains
    /// `path_contains`, forever.
    pub fn on_list(path_contains: &str, action: FaultAction) -> Fault {
        Fault {
            matcher: FaultMatch {
                method: Some("GET".to_string()),
                path_contains: Some(path_contains.to_string()),
                is_list: Some(true),
                ..FaultMatch::default()
            },
            action,
            times: None,
        }
    }

    /// Fires on page `page` (0-based) of list requests whose path contains `path_contains`.
    pub fn on_list_page(path_contains: &str, page: usize, action: FaultAction) -> Fault {
        let mut fault = Fault::on_list(path_contains, action);
        fault.matcher.page = Some(page);
        fault
    }

    /// Fires on single-object GETs whose path contains `path_contains`, forever. A Namespace
    /// GET is a single-object GET: `on_get("/namespaces/kube-system", ..)` fires on it (and on
    /// GETs of single objects in `kube-system`), never on lists or watches.
    pub fn on_get(path_contains: &str, action: FaultAction) -> Fault {
        Fault {
            matcher: FaultMatch {
                method: Some("GET".to_string()),
                path_contains: Some(path_contains.to_string()),
                is_list: Some(false),
                is_watch: Some(false),
                ..FaultMatch::default()
            },
            action,
            times: None,
        }
    }

    /// Fires on watch requests whose path contains `path_contains`, forever (never on lists).
    pub fn on_watch(path_contains: &str, action: FaultAction) -> Fault {
        Fault {
            matcher: FaultMatch {
                method: Some("GET".to_string()),
                path_contains: Some(path_contains.to_string()),
                is_watch: Some(true),
                ..FaultMatch::default()
            },
            action,
            times: None,
        }
    }

    /// Fires on GETs of the Namespace `name` (`/api/v1/namespaces/{name}`) only, forever:
    /// not on requests for objects in that namespace, nor on other namespaces whose name
    /// starts with `name`.
    pub fn on_namespace_get(name: &str, action: FaultAction) -> Fault {
        Fault {
            matcher: FaultMatch {
                method: Some("GET".to_string()),
                resource: Some("namespaces".to_string()),
                name: Some(name.to_string()),
                is_list: Some(false),
                is_watch: Some(false),
                ..FaultMatch::default()
            },
            action,
            times: None,
        }
    }

    /// Limits the rule to `n` firings.
    pub fn times(mut self, n: usize) -> Fault {
        self.times = Some(n);
        self
    }

    /// Limits the rule to a single firing.
    pub fn once(self) -> Fault {
        self.times(1)
    }

    /// Fires only on the nth (0-based) request matching the other criteria.
    pub fn nth(mut self, n: usize) -> Fault {
        self.matcher.nth = Some(n);
        self
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

    /// Adds (or replaces, keeping uid and creationTimestamp) a running Pod with these labels.
    pub fn add_pod(&self, namespace: &str, name: &str, labels: &[(&str, &str)]) {
        let object = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "labels": labels_json(labels) },
            "spec": {
                "containers": [{ "name": "sandbox", "image": "registry.invalid/sandbox:latest" }],
                "restartPolicy": "Never"
            },
            "status": { "phase": "Running" }
        });
        self.add_object(Kind::Pod, namespace, name, object);
    }

    /// Adds (or replaces) a Sandbox of `agents.x-k8s.io/{version}` with this spec (e.g.
    /// `json!({"replicas": 0})`). Registers `version` as served.
    pub fn add_sandbox(&self, version: &str, namespace: &str, name: &str, spec: Value) {
        self.add_sandbox_with_labels(version, namespace, name, &[], spec);
    }

    /// Like [`add_sandbox`](Self::add_sandbox), with labels.
    pub fn add_sandbox_with_labels(
        &self,
        version: &str,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        spec: Value,
    ) {
        let object = json!({
            "apiVersion": format!("{SANDBOX_GROUP}/{version}"),
            "kind": "Sandbox",
            "metadata": { "labels": labels_json(labels) },
            "spec": spec
        });
        self.add_object(Kind::Sandbox, namespace, name, object);
    }

    /// Adds (or replaces) an arbitrary object. The server fills in `metadata.name`,
    /// `namespace`, `uid`, `resourceVersion`, `creationTimestamp` (and `generation` for
    /// sandboxes); `apiVersion`/`kind` default to `v1`/`Pod`, `agents.x-k8s.io/v1alpha1`/
    /// `Sandbox` or `v1`/`Namespace`. A Sandbox's version is registered as served.
    ///
    /// The object's namespace is created (Active) if it does not exist, unlike on a real API
    /// server, so tests need not set up namespaces; an existing one, even terminating, is
    /// left as it is. A [`Kind::Namespace`] is cluster-scoped: pass `""` as `namespace`
    /// (anything else panics); it gets the label `kubernetes.io/metadata.name`, and
    /// `spec.finalizers: [kubernetes]` and `status.phase: Active` unless given; `kube-system`
    /// always carries [`cluster_uid`](Self::cluster_uid) as its UID.
    pub fn add_object(&self, kind: Kind, namespace: &str, name: &str, mut object: Value) {
        if !object.is_object() {
            panic!("fake API server: add_object needs a JSON object, got {object}");
        }
        if kind == Kind::Namespace && !namespace.is_empty() {
            panic!("fake API server: add_object: Namespaces are cluster-scoped, got namespace {namespace:?} for {name:?}");
        }
        let default_api_version = match kind {
            Kind::Pod | Kind::Namespace => "v1".to_string(),
            Kind::Sandbox => format!("{SANDBOX_GROUP}/v1alpha1"),
        };
        let map = object.as_object_mut().expect("checked above");
        map.entry("apiVersion")
            .or_insert_with(|| Value::String(default_api_version));
        map.entry("kind")
            .or_insert_with(|| Value::String(kind.kind_name().to_string()));
        let meta = map
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        if !meta.is_object() {
            *meta = Value::Object(Map::new());
        }
        let meta = meta.as_object_mut().expect("made an object above");
        if meta.get("labels").is_some_and(is_empty_map) {
            meta.remove("labels");
        }
        meta.insert("name".into(), Value::String(name.to_string()));
        if kind == Kind::Namespace {
            meta.remove("namespace");
            complete_namespace(&mut object, name);
        } else {
            meta.insert("namespace".into(), Value::String(namespace.to_string()));
        }

        let mut state = self.state();
        if kind == Kind::Sandbox {
            let version = api_version_of(&object)
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string();
            state.sandbox_versions.insert(version);
        }
        if kind != Kind::Namespace {
            state.ensure_namespace(namespace);
        }
        state.upsert(kind, namespace, name, object);
    }

    /// Adds an Active Namespace `name` unless it exists (an existing one, even terminating,
    /// is left unchanged). Returns whether it was created.
    pub fn add_namespace(&self, name: &str) -> bool {
        self.state().ensure_namespace(name)
    }

    /// Removes the Namespace `name` (a GET answers 404 `NotFound` afterwards). Only the
    /// Namespace object goes: objects in it stay listed, as no namespace controller runs
    /// here. Adding an object into it, or [`add_namespace`](Self::add_namespace), creates
    /// it again with a new UID (`kube-system` keeps [`cluster_uid`](Self::cluster_uid)).
    /// Returns whether it existed.
    pub fn remove_namespace(&self, name: &str) -> bool {
        self.remove(Kind::Namespace, "", name)
    }

    /// Marks the Namespace `name` as being deleted, as `kubectl delete namespace` does while
    /// its content is being removed: `metadata.deletionTimestamp` set, `status.phase:
    /// Terminating`; GET still answers 200. Panics if there is no such namespace.
    pub fn set_namespace_terminating(&self, name: &str) {
        let found = self.modify(Kind::Namespace, "", name, |object| {
            object["metadata"]["deletionTimestamp"] = Value::String(now_timestamp());
            object["status"]["phase"] = json!("Terminating");
        });
        assert!(
            found,
            "fake API server: set_namespace_terminating: no namespace {name}"
        );
    }

    /// Names of the existing Namespaces, in order.
    pub fn namespaces(&self) -> Vec<String> {
        let state = self.state();
        let rv = state.rv;
        state
            .snapshot(Kind::Namespace, rv, None, "v1", "")
            .map(|(key, _)| key.to_string())
            .collect()
    }

    /// The cluster's identity: the UID of the `kube-system` Namespace (a random UUID v4 per
    /// server unless set with [`set_cluster_uid`](Self::set_cluster_uid)). Stays the same
    /// while `kube-system` is removed and comes back with it.
    pub fn cluster_uid(&self) -> String {
        self.state().cluster_uid.clone()
    }

    /// Changes the cluster's identity, e.g. to a fixed UID or to simulate another cluster
    /// behind the same address: `kube-system` gets `uid` (a new revision, if it exists).
    pub fn set_cluster_uid(&self, uid: &str) {
        let mut state = self.state();
        state.cluster_uid = uid.to_string();
        let key = Kind::Namespace.store_key("", "kube-system");
        if let Some(mut object) = state.current(Kind::Namespace, &key).cloned() {
            object["metadata"]["uid"] = json!(uid);
            state.write(Kind::Namespace, &key, Some(object));
        }
    }

    /// Changes a stored object in place (a new revision with a new resourceVersion).
    /// Returns false if there is no such object.
    pub fn modify(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) -> bool {
        let mut state = self.state();
        let key = kind.store_key(namespace, name);
        let Some(mut object) = state.current(kind, &key).cloned() else {
            return false;
        };
        let old_spec = object.get("spec").cloned();
        change(&mut object);
        if kind == Kind::Sandbox && object.get("spec") != old_spec.as_ref() {
            let generation = object["metadata"]["generation"].as_i64().unwrap_or(1);
            object["metadata"]["generation"] = json!(generation + 1);
        }
        state.write(kind, &key, Some(object));
        true
    }

    /// Deletes an object (any sandbox version; for a [`Kind::Namespace`], pass `""` as
    /// `namespace`). Returns whether it existed.
    pub fn remove(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let mut state = self.state();
        let key = kind.store_key(namespace, name);
        if state.current(kind, &key).is_none() {
            return false;
        }
        state.write(kind, &key, None);
        true
    }

    /// Marks an object as being deleted: sets `metadata.deletionTimestamp` (and
    /// `deletionGracePeriodSeconds`); it is still listed and GET answers 200.
    /// Panics if there is no such object. For a [`Kind::Namespace`] this is
    /// [`set_namespace_terminating`](Self::set_namespace_terminating).
    pub fn set_terminating(&self, kind: Kind, namespace: &str, name: &str) {
        if kind == Kind::Namespace {
            return self.set_namespace_terminating(name);
        }
        let found = self.modify(kind, namespace, name, |object| {
            object["metadata"]["deletionTimestamp"] = Value::String(now_timestamp());
            object["metadata"]["deletionGracePeriodSeconds"] = json!(30);
        });
        assert!(
            found,
            "fake API server: set_terminating: no {kind:?} {namespace}/{name}"
        );
    }

    /// Serves `agents.x-k8s.io/{version}` even while no Sandbox of that version exists.
    pub fn register_sandbox_version(&self, version: &str) {
        self.state().sandbox_versions.insert(version.to_string());
    }

    /// Makes the Sandbox API disappear (CRD not installed): every `sandboxes` path and the
    /// `agents.x-k8s.io` discovery documents answer 404.
    pub fn disable_sandbox_api(&self) {
        self.state().sandbox_api_disabled = true;
    }

    /// Denies `verb` (`"list"`, `"get"`, `"watch"`, `"create"`, or `"*"`) on `resource` in
    /// `group` (`""` for pods and namespaces, `"agents.x-k8s.io"` for sandboxes; `"*"`
    /// matches any), in every namespace and for every object name: requests answer 403 and
    /// access reviews answer `allowed: false`, whatever `resourceAttributes.name` they carry.
    pub fn deny(&self, verb: &str, group: &str, resource: &str) {
        self.state()
            .denied
            .push((verb.to_string(), group.to_string(), resource.to_string()));
    }

    /// Removes every `deny` rule.
    pub fn allow_all(&self) {
        self.state().denied.clear();
    }

    /// Queues a fault rule.
    pub fn inject(&self, fault: Fault) {
        self.state().faults.push(FaultRule {
            fault,
            matched: 0,
            fired: 0,
        });
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    /// Compacts history at the current resourceVersion, as etcd does: every continue token
    /// issued so far answers 410 `Expired`, and so do an `Exact` list and a watch from any
    /// older resourceVersion (a watch from the current one still works). Old revisions and
    /// the watch event history are dropped.
    pub fn compact(&self) {
        let mut state = self.state();
        let rv = state.rv;
        state.compacted_rv = rv;
        state.history.clear();
        state.history_floor = rv;
        // Each object keeps its last revision (all are at or before `rv`); deleted ones go.
        state.objects.retain(|_, revisions| {
            let keep_from = revisions.len().saturating_sub(1);
            revisions.drain(..keep_from);
            revisions.last().is_some_and(|r| r.object.is_some())
        });
        state.changed();
    }

    /// Keeps at most `max_events` watch events (default [`DEFAULT_WATCH_HISTORY`]); older
    /// ones are dropped now and as new ones come, and a watch from before the oldest kept
    /// event answers 410 `Expired` (open watches that fell that far behind too).
    pub fn set_watch_history(&self, max_events: usize) {
        let mut state = self.state();
        state.history_limit = max_events;
        state.trim_history();
        state.changed();
    }

    /// The oldest resourceVersion a watch can start from: every event after it is kept.
    pub fn watch_history_start(&self) -> u64 {
        self.state().history_floor
    }

    /// Sends a periodic `BOOKMARK` to every watch that allows them every `interval` (default
    /// [`DEFAULT_BOOKMARK_INTERVAL`]), and one just before a watch's `timeoutSeconds` ends.
    /// Applies to open watches too (their next periodic bookmark is `interval` after their
    /// last one).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        let mut state = self.state();
        state.bookmark_interval = Some(interval);
        state.changed();
    }

    /// The apiserver stops sending bookmarks: no periodic ones, none before a watch's
    /// timeout (a fault). [`send_bookmarks`](Self::send_bookmarks) still sends;
    /// [`set_bookmark_interval`](Self::set_bookmark_interval) resumes them.
    pub fn stop_bookmarks(&self) {
        let mut state = self.state();
        state.bookmark_interval = None;
        state.changed();
    }

    /// Sends one `BOOKMARK` now to every open watch that allows them, at the current
    /// resourceVersion (after every event up to it).
    pub fn send_bookmarks(&self) {
        let mut state = self.state();
        state.bookmark_requests += 1;
        state.changed();
    }

    /// Ends every open watch stream abruptly: its connection is dropped without the
    /// terminating chunk (events not yet written are lost), as when an apiserver or a load
    /// balancer goes away. Watches started later are not affected.
    pub fn drop_watches(&self) {
        let mut state = self.state();
        state.drop_generation += 1;
        state.changed();
    }

    /// Number of watch streams open now.
    pub fn open_watches(&self) -> usize {
        self.state().open_watches
    }

    /// How many times an object revision has been encoded to JSON (each revision is encoded
    /// at most once per representation: full, list item, metadata-only).
    pub fn object_encodings(&self) -> u64 {
        self.state().encodings.load(Ordering::Relaxed)
    }

    /// The server's current resourceVersion (bumped by every mutation).
    pub fn resource_version(&self) -> u64 {
        self.state().rv
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

// ---------------------------------------------------------------------------------------------
// State

struct Revision {
    rv: u64,
    /// `None` = deleted at `rv`.
    object: Option<Arc<StoredObject>>,
}

/// One revision of an object, with its JSON encodings made on first use (a revision never
/// changes, so they never go stale).
struct StoredObject {
    value: Value,
    /// As a GET, a custom resource's list item or a watch event's object.
    full: OnceLock<Bytes>,
    /// As a built-in kind's list item (no `apiVersion`/`kind`).
    item: OnceLock<Bytes>,
    /// As a `PartialObjectMetadata`.
    partial: OnceLock<Bytes>,
}

impl StoredObject {
    fn new(value: Value) -> Arc<StoredObject> {
        Arc::new(StoredObject {
            value,
            full: OnceLock::new(),
            item: OnceLock::new(),
            partial: OnceLock::new(),
        })
    }

    /// The object's JSON in `representation`, encoded once.
    fn encoded(
        &self,
        representation: Representation,
        kind: Kind,
        in_list: bool,
        encodings: &AtomicU64,
    ) -> Bytes {
        let bare = in_list && kind.is_built_in();
        let cell = match (representation, bare) {
            (Representation::PartialMetadata, _) => &self.partial,
            (Representation::Full, true) => &self.item,
            (Representation::Full, false) => &self.full,
        };
        cell.get_or_init(|| {
            encodings.fetch_add(1, Ordering::Relaxed);
            let text = match (representation, bare) {
                (Representation::Full, false) => serde_json::to_vec(&self.value),
                _ => serde_json::to_vec(&render_object(&self.value, representation, kind, in_list)),
            };
            Bytes::from(text.unwrap_or_default())
        })
        .clone()
    }
}

struct FaultRule {
    fault: Fault,
    matched: usize,
    fired: usize,
}

struct State {
    addr: SocketAddr,
    /// Global resourceVersion counter, bumped on each mutation.
    rv: u64,
    /// Continue tokens older than this are expired.
    compacted_rv: u64,
    /// Every revision of every object, keyed like etcd: (kind, "namespace/name").
    objects: BTreeMap<(Kind, String), Vec<Revision>>,
    sandbox_versions: BTreeSet<String>,
    sandbox_api_disabled: bool,
    /// UID of the `kube-system` Namespace: the cluster's identity.
    cluster_uid: String,
    denied: Vec<(String, String, String)>,
    faults: Vec<FaultRule>,
    requests: Vec<RecordedRequest>,
    /// Watch events, one per revision since `history_floor`, oldest first.
    history: VecDeque<HistoryEvent>,
    /// Every event after this revision is in `history`: the oldest a watch can start from.
    history_floor: u64,
    history_limit: usize,
    /// `None`: no periodic bookmarks and none before a watch's timeout.
    bookmark_interval: Option<Duration>,
    /// Bumped by `send_bookmarks`.
    bookmark_requests: u64,
    /// Bumped by `drop_watches`.
    drop_generation: u64,
    open_watches: usize,
    /// Wakes every open watch after anything it may care about changed.
    changes: tokio::sync::watch::Sender<()>,
    /// Object encodings made (see [`StoredObject::encoded`]).
    encodings: AtomicU64,
}

impl State {
    fn new(addr: SocketAddr) -> State {
        let mut state = State {
            addr,
            rv: 1,
            compacted_rv: 0,
            objects: BTreeMap::new(),
            sandbox_versions: BTreeSet::new(),
            sandbox_api_disabled: false,
            cluster_uid: new_uid(),
            denied: Vec::new(),
            faults: Vec::new(),
            requests: Vec::new(),
            history: VecDeque::new(),
            history_floor: 0,
            history_limit: DEFAULT_WATCH_HISTORY,
            bookmark_interval: Some(DEFAULT_BOOKMARK_INTERVAL),
            bookmark_requests: 0,
            drop_generation: 0,
            open_watches: 0,
            changes: tokio::sync::watch::channel(()).0,
            encodings: AtomicU64::new(0),
        };
        state.ensure_namespace("default");
        state.ensure_namespace("kube-system");
        state
    }

    /// Creates the Namespace `name` (Active) unless it exists; returns whether it did.
    fn ensure_namespace(&mut self, name: &str) -> bool {
        if self.current(Kind::Namespace, name).is_some() {
            return false;
        }
        let mut object = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": name }
        });
        complete_namespace(&mut object, name);
        self.upsert(Kind::Namespace, "", name, object);
        true
    }

    /// Stores `object` (metadata.name and namespace already set) as a new revision: a new
    /// object gets a uid, creationTimestamp (and generation 1 for sandboxes); a replaced one
    /// keeps them (and a sandbox's generation moves on if its spec changed).
    fn upsert(&mut self, kind: Kind, namespace: &str, name: &str, mut object: Value) {
        let key = kind.store_key(namespace, name);
        let previous = self.current(kind, &key).cloned();
        let meta = object["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        match previous {
            Some(old) => {
                for field in ["uid", "creationTimestamp"] {
                    if let Some(v) = old["metadata"].get(field) {
                        meta.insert(field.into(), v.clone());
                    }
                }
                if kind == Kind::Sandbox {
                    let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                    let bump = i64::from(old.get("spec") != object.get("spec"));
                    object["metadata"]["generation"] = json!(generation + bump);
                }
            }
            None => {
                meta.insert("uid".into(), Value::String(new_uid()));
                meta.insert("creationTimestamp".into(), Value::String(now_timestamp()));
                if kind == Kind::Sandbox {
                    meta.insert("generation".into(), json!(1));
                }
            }
        }
        if kind == Kind::Namespace && name == "kube-system" {
            object["metadata"]["uid"] = json!(self.cluster_uid);
        }
        self.write(kind, &key, Some(object));
    }

    fn current(&self, kind: Kind, key: &str) -> Option<&Value> {
        self.current_stored(kind, key).map(|o| &o.value)
    }

    fn current_stored(&self, kind: Kind, key: &str) -> Option<&Arc<StoredObject>> {
        self.objects
            .get(&(kind, key.to_string()))
            .and_then(|revs| revs.last())
            .and_then(|rev| rev.object.as_ref())
    }

    /// Stores a new revision of one object (`None` = deleted) and records its watch event.
    fn write(&mut self, kind: Kind, key: &str, object: Option<Value>) {
        self.rv += 1;
        let rv = self.rv;
        let previous = self.current_stored(kind, key).cloned();
        let object = object.map(|mut o| {
            o["metadata"]["resourceVersion"] = Value::String(rv.to_string());
            StoredObject::new(o)
        });
        let event = match (&object, previous) {
            (Some(new), previous) => Some(HistoryEvent {
                rv,
                kind,
                change: if previous.is_some() {
                    Change::Modified
                } else {
                    Change::Added
                },
                object: new.clone(),
                previous,
            }),
            // A deletion carries the last state, at the deletion's resourceVersion.
            (None, Some(old)) => {
                let mut last = old.value.clone();
                last["metadata"]["resourceVersion"] = Value::String(rv.to_string());
                Some(HistoryEvent {
                    rv,
                    kind,
                    change: Change::Deleted,
                    object: StoredObject::new(last),
                    previous: None,
                })
            }
            (None, None) => None,
        };
        self.objects
            .entry((kind, key.to_string()))
            .or_default()
            .push(Revision { rv, object });
        if let Some(event) = event {
            self.history.push_back(event);
            self.trim_history();
        }
        self.changed();
    }

    fn trim_history(&mut self) {
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.history_floor = dropped.rv;
            }
        }
        if self.history_limit == 0 {
            self.history_floor = self.rv;
        }
    }

    /// Wakes every open watch.
    fn changed(&self) {
        self.changes.send_replace(());
    }

    /// Objects of `kind` as they were at `rv`, in key order from `start` (inclusive),
    /// restricted to `namespace` and (for sandboxes) `api_version`. Lazy, so a page reads only
    /// as far as it needs: the store is ordered like etcd's keys.
    fn snapshot<'a>(
        &'a self,
        kind: Kind,
        rv: u64,
        namespace: Option<&'a str>,
        api_version: &'a str,
        start: &str,
    ) -> impl Iterator<Item = (&'a str, &'a Arc<StoredObject>)> + 'a {
        // Keys are "namespace/name": a namespaced scan starts at its namespace's first key.
        let floor = match namespace {
            Some(ns) => std::cmp::max(format!("{ns}/"), start.to_string()),
            None => start.to_string(),
        };
        self.objects
            .range((kind, floor)..)
            .take_while(move |((k, key), _)| {
                *k == kind && namespace.is_none_or(|ns| key_namespace(key) == ns)
            })
            .filter_map(move |((_, key), revs)| {
                let object = revs.iter().rev().find(|r| r.rv <= rv)?.object.as_ref()?;
                (api_version_of(&object.value) == api_version).then_some((key.as_str(), object))
            })
    }

    fn is_denied(&self, verb: &str, group: &str, resource: &str) -> bool {
        let hit = |rule: &str, actual: &str| rule == "*" || rule == actual;
        self.denied
            .iter()
            .any(|(v, g, r)| hit(v, verb) && hit(g, group) && hit(r, resource))
    }

    fn sandbox_version_served(&self, version: &str) -> bool {
        !self.sandbox_api_disabled && self.sandbox_versions.contains(version)
    }

    /// The first fault rule that fires for this request, updating the rules' counters.
    fn fire_fault(&mut self, req: &RequestFacts) -> Option<FaultAction> {
        let mut chosen = None;
        for rule in &mut self.faults {
            let m = &rule.fault.matcher;
            let matches = m
                .method
                .as_ref()
                .is_none_or(|x| x.eq_ignore_ascii_case(&req.method))
                && m.path_contains
                    .as_ref()
                    .is_none_or(|x| req.path.contains(x.as_str()))
                && m.resource
                    .as_ref()
                    .is_none_or(|x| req.resource.as_deref() == Some(x.as_str()))
                && m.name
                    .as_ref()
                    .is_none_or(|x| req.name.as_deref() == Some(x.as_str()))
                && m.is_list.is_none_or(|x| x == req.is_list)
                && m.is_watch.is_none_or(|x| x == req.is_watch)
                && m.page.is_none_or(|x| req.page == Some(x))
                && (rule.fault.action != FaultAction::ExpireContinue || req.has_continue)
                && (!matches!(
                    rule.fault.action,
                    FaultAction::CloseWatchAfter(_) | FaultAction::ExpireWatch
                ) || req.is_watch);
            if !matches {
                continue;
            }
            let index = rule.matched;
            rule.matched += 1;
            if chosen.is_some()
                || m.nth.is_some_and(|n| n != index)
                || rule.fault.times.is_some_and(|t| rule.fired >= t)
            {
                continue;
            }
            rule.fired += 1;
            chosen = Some(rule.fault.action.clone());
        }
        chosen
    }
}

fn lock(shared: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking test thread must not take every other request down with it.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Serving

async fn accept_loop(listener: TcpListener, shared: Arc<Mutex<State>>) {
    // Connections live in the JoinSet: aborting this task drops it and every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    connections.spawn(serve_connection(stream, shared.clone()));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, shared: Arc<Mutex<State>>) {
    let kill = Arc::new(Notify::new());
    let service_kill = kill.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        let kill = service_kill.clone();
        async move { Ok::<_, Infallible>(handle(shared, kill, req).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = connection => {}
        // Dropping the connection closes the socket without a response.
        _ = kill.notified() => {}
    }
}

/// What fault matching needs to know about a request.
struct RequestFacts {
    method: String,
    path: String,
    /// Plural resource and object name as parsed from the path (`None` for discovery).
    resource: Option<String>,
    name: Option<String>,
    is_list: bool,
    is_watch: bool,
    has_continue: bool,
    page: Option<usize>,
}

async fn handle(
    shared: Arc<Mutex<State>>,
    kill: Arc<Notify>,
    req: Request<Incoming>,
) -> Response<ServerBody> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let header = |name: http::header::HeaderName| {
        parts
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let recorded = RecordedRequest {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        accept: header(http::header::ACCEPT),
        authorization: header(http::header::AUTHORIZATION),
        body: String::from_utf8_lossy(&body).into_owned(),
        status: None,
    };
    let params = parse_query(&recorded.query);
    let continue_token = param(&params, "continue");
    let path = ResourcePath::parse(&recorded.path);
    let is_collection_get = recorded.method == "GET"
        && path
            .as_ref()
            .is_some_and(|p| p.name.is_none() && p.subresource.is_none());
    let is_watch = is_collection_get && is_watch_param(&params);
    let is_list = is_collection_get && !is_watch;
    let facts = RequestFacts {
        method: recorded.method.clone(),
        path: recorded.path.clone(),
        resource: path.as_ref().map(|p| p.resource.clone()),
        name: path.as_ref().and_then(|p| p.name.clone()),
        is_list,
        is_watch,
        has_continue: continue_token.is_some(),
        page: match (is_list, continue_token) {
            (false, _) => None,
            (true, None) => Some(0),
            (true, Some(token)) => ContinueToken::decode(token).ok().map(|t| t.page),
        },
    };

    let (index, fault) = {
        let mut state = lock(&shared);
        state.requests.push(recorded.clone());
        let index = state.requests.len() - 1;
        (index, state.fire_fault(&facts))
    };

    let reply = match fault {
        None => respond(&shared, &recorded, &params, path.as_ref()),
        Some(FaultAction::Hang(duration)) => {
            tokio::time::sleep(duration).await;
            respond(&shared, &recorded, &params, path.as_ref())
        }
        Some(FaultAction::CloseConnection) => {
            kill.notify_one();
            return std::future::pending().await;
        }
        Some(FaultAction::Status(code, retry_after)) => {
            let mut reply = injected_status(code, retry_after, &recorded, path.as_ref());
            if code == 410 && is_watch {
                // The apiserver's answer to a watch from a compacted resourceVersion.
                let rv = lock(&shared).rv;
                let from = param(&params, "resourceVersion").unwrap_or_default();
                reply = status_reply(
                    410,
                    "Expired",
                    &format!("too old resource version: {from} ({rv})"),
                    json!({}),
                );
                reply.retry_after = retry_after;
            }
            reply
        }
        Some(FaultAction::CloseWatchAfter(n)) => {
            respond(&shared, &recorded, &params, path.as_ref()).with_watch_fault(WatchFault::CloseAfter(n))
        }
        Some(FaultAction::ExpireWatch) => {
            respond(&shared, &recorded, &params, path.as_ref()).with_watch_fault(WatchFault::Expire)
        }
        Some(FaultAction::MalformedJson | FaultAction::WrongKind | FaultAction::ItemWithoutName)
            if is_watch =>
        {
            let fault = match fault {
                Some(FaultAction::MalformedJson) => WatchFault::Malformed,
                Some(FaultAction::WrongKind) => WatchFault::WrongKind,
                _ => WatchFault::ItemWithoutName,
            };
            respond(&shared, &recorded, &params, path.as_ref()).with_watch_fault(fault)
        }
        Some(FaultAction::ExpireContinue) => {
            let start = continue_token
                .and_then(|t| ContinueToken::decode(t).ok())
                .map(|t| t.start)
                .unwrap_or_default();
            expired_continue(start, facts.page.unwrap_or(1))
        }
        Some(FaultAction::MalformedJson) => Reply {
            code: 200,
            body: ReplyBody::Raw(format!(
                "{{\"kind\":\"{}\",\"apiVersion\":\"v1\",\"metadata\":{{\"resourceVersion\":\"1\"}},\"items\":[{{\"metadata\":{{\"name\":",
                if is_list { "PodList" } else { "Pod" }
            )),
            retry_after: None,
        },
        Some(FaultAction::WrongKind) => {
            let rv = lock(&shared).rv.to_string();
            let body = if is_list {
                json!({
                    "kind": "ConfigMapList",
                    "apiVersion": "v1",
                    "metadata": { "resourceVersion": rv },
                    "items": [{ "kind": "ConfigMap", "apiVersion": "v1", "data": { "unexpected": "true" } }]
                })
            } else {
                json!({ "kind": "ConfigMap", "apiVersion": "v1", "data": { "unexpected": "true" } })
            };
            Reply::json(200, body)
        }
        Some(FaultAction::ItemWithoutName) => {
            let mut reply = respond(&shared, &recorded, &params, path.as_ref());
            if let ReplyBody::Bytes(bytes) = &reply.body {
                if let Ok(value) = serde_json::from_slice(bytes) {
                    reply.body = ReplyBody::Json(value);
                }
            }
            if let (200, ReplyBody::Json(body)) = (reply.code, &mut reply.body) {
                let target = match body.get_mut("items").and_then(Value::as_array_mut) {
                    Some(items) => items.first_mut(),
                    None => Some(body),
                };
                if let Some(meta) = target
                    .and_then(|t| t.get_mut("metadata"))
                    .and_then(Value::as_object_mut)
                {
                    meta.remove("name");
                }
            }
            reply
        }
    };

    if let Some(r) = lock(&shared).requests.get_mut(index) {
        r.status = Some(reply.code);
    }
    reply.into_response(&shared, &kill)
}

struct Reply {
    code: u16,
    body: ReplyBody,
    retry_after: Option<u64>,
}

enum ReplyBody {
    Json(Value),
    Raw(String),
    Bytes(Bytes),
    /// A watch stream, produced by [`WatchTask::run`] once the response head is sent.
    Watch(Box<WatchSpec>),
}

impl Reply {
    fn json(code: u16, body: Value) -> Reply {
        Reply {
            code,
            body: ReplyBody::Json(body),
            retry_after: None,
        }
    }

    fn bytes(code: u16, body: Bytes) -> Reply {
        Reply {
            code,
            body: ReplyBody::Bytes(body),
            retry_after: None,
        }
    }

    /// Sets a fault on a watch answer (any other answer is left as it is).
    fn with_watch_fault(mut self, fault: WatchFault) -> Reply {
        if let ReplyBody::Watch(spec) = &mut self.body {
            spec.fault = fault;
        }
        self
    }

    fn into_response(self, shared: &Arc<Mutex<State>>, kill: &Arc<Notify>) -> Response<ServerBody> {
        let body = match self.body {
            ReplyBody::Json(v) => ServerBody::Full(Full::new(Bytes::from(v.to_string()))),
            ReplyBody::Raw(s) => ServerBody::Full(Full::new(Bytes::from(s))),
            ReplyBody::Bytes(b) => ServerBody::Full(Full::new(b)),
            ReplyBody::Watch(spec) => ServerBody::Watch(start_watch(shared, kill, *spec)),
        };
        let mut builder = Response::builder()
            .status(self.code)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(seconds) = self.retry_after {
            builder = builder.header(http::header::RETRY_AFTER, seconds.to_string());
        }
        builder
            .body(body)
            .unwrap_or_else(|_| Response::new(ServerBody::Full(Full::new(Bytes::new()))))
    }
}

/// A response body: a whole one, or a watch stream.
enum ServerBody {
    Full(Full<Bytes>),
    Watch(WatchBody),
}

impl Body for ServerBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ServerBody::Full(body) => Pin::new(body).poll_frame(cx),
            ServerBody::Watch(body) => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ServerBody::Full(body) => body.is_end_stream(),
            ServerBody::Watch(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ServerBody::Full(body) => body.size_hint(),
            // Unknown length: hyper sends it chunked.
            ServerBody::Watch(_) => SizeHint::default(),
        }
    }
}

/// A `Status` body as the apiserver writes it.
fn status_reply(code: u16, reason: &str, message: &str, details: Value) -> Reply {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code
    });
    if reason.is_empty() {
        if let Some(map) = body.as_object_mut() {
            map.remove("reason");
        }
    }
    Reply::json(code, body)
}

fn not_found_path() -> Reply {
    status_reply(
        404,
        "NotFound",
        "the server could not find the requested resource",
        json!({}),
    )
}

fn bad_request(message: &str) -> Reply {
    status_reply(400, "BadRequest", message, json!({}))
}

fn details(path: &ResourcePath) -> Value {
    let mut d = Map::new();
    if let Some(name) = &path.name {
        d.insert("name".into(), json!(name));
    }
    if !path.group.is_empty() {
        d.insert("group".into(), json!(path.group));
    }
    d.insert("kind".into(), json!(path.resource));
    Value::Object(d)
}

fn forbidden(path: &ResourcePath, verb: &str) -> Reply {
    let scope = match path.rbac_namespace() {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_string(),
    };
    let subject = match &path.name {
        Some(name) => format!("{} \"{name}\"", path.qualified_resource()),
        None => path.qualified_resource(),
    };
    let message = format!(
        "{subject} is forbidden: User \"{FAKE_USER}\" cannot {verb} resource \"{}\" in API group \"{}\" {scope}",
        path.rbac_resource(), path.group
    );
    status_reply(403, "Forbidden", &message, details(path))
}

fn object_not_found(path: &ResourcePath) -> Reply {
    let message = format!(
        "{} \"{}\" not found",
        path.qualified_resource(),
        path.name.as_deref().unwrap_or_default()
    );
    status_reply(404, "NotFound", &message, details(path))
}

fn expired_continue(start: String, page: usize) -> Reply {
    // Like the apiserver after a compaction: 410 plus a token that continues the list at the
    // latest resourceVersion (rv = -1).
    let token = ContinueToken {
        rv: -1,
        start,
        page,
    }
    .encode();
    let mut reply = status_reply(410, "Expired", EXPIRED_CONTINUE_MESSAGE, json!({}));
    if let ReplyBody::Json(body) = &mut reply.body {
        body["metadata"] = json!({ "continue": token });
        if let Some(map) = body.as_object_mut() {
            map.remove("details");
        }
    }
    reply
}

fn injected_status(
    code: u16,
    retry_after: Option<u64>,
    req: &RecordedRequest,
    path: Option<&ResourcePath>,
) -> Reply {
    let mut reply = match (code, path) {
        (403, Some(p)) => forbidden(
            p,
            &p.verb(&req.method, is_watch_param(&parse_query(&req.query))),
        ),
        (404, Some(p)) if p.name.is_some() => object_not_found(p),
        (404, _) => not_found_path(),
        _ => {
            let (reason, message) = match code {
                400 => ("BadRequest", "injected fault: bad request".to_string()),
                401 => ("Unauthorized", "Unauthorized".to_string()),
                403 => ("Forbidden", "forbidden: injected fault".to_string()),
                409 => (
                    "Conflict",
                    match path {
                        Some(p) => format!(
                            "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                            p.qualified_resource(),
                            p.name.as_deref().unwrap_or_default()
                        ),
                        None => "Operation cannot be fulfilled: conflict".to_string(),
                    },
                ),
                410 => ("Expired", "The resourceVersion for the provided list is too old.".to_string()),
                422 => ("Invalid", "injected fault: invalid".to_string()),
                429 => ("TooManyRequests", "Too many requests, please try again later.".to_string()),
                500 => ("InternalError", "Internal error occurred: injected fault".to_string()),
                503 => ("ServiceUnavailable", "the server is currently unable to handle the request".to_string()),
                504 => ("Timeout", "Timeout: request did not complete within the allotted timeout".to_string()),
                _ => ("", format!("injected fault: HTTP {code}")),
            };
            let mut d = Map::new();
            if code == 500 {
                d.insert("causes".into(), json!([{ "message": "injected fault" }]));
            }
            if let Some(seconds) = retry_after {
                d.insert("retryAfterSeconds".into(), json!(seconds));
            }
            status_reply(code, reason, &message, Value::Object(d))
        }
    };
    reply.retry_after = retry_after;
    reply
}

/// The normal answer to a request.
fn respond(
    shared: &Mutex<State>,
    req: &RecordedRequest,
    params: &[(String, String)],
    path: Option<&ResourcePath>,
) -> Reply {
    let state = lock(shared);
    let Some(path) = path else {
        return discovery(&state, req);
    };
    let watch = is_watch_param(params);
    let verb = path.verb(&req.method, watch);
    // Authorization comes before routing, as in the apiserver's handler chain.
    if state.is_denied(&verb, &path.group, &path.rbac_resource()) {
        return forbidden(path, &verb);
    }
    let kind = match (
        path.group.as_str(),
        path.version.as_str(),
        path.resource.as_str(),
    ) {
        ("", "v1", "pods") => Kind::Pod,
        // Cluster-scoped: /api/v1/namespaces/x/namespaces does not exist.
        ("", "v1", "namespaces") if path.namespace.is_none() => Kind::Namespace,
        (SANDBOX_GROUP, version, "sandboxes") if state.sandbox_version_served(version) => {
            Kind::Sandbox
        }
        ("authorization.k8s.io", "v1", "selfsubjectaccessreviews")
            if path.namespace.is_none() && path.name.is_none() =>
        {
            if req.method != "POST" {
                return method_not_allowed();
            }
            return access_review(&state, &req.body);
        }
        _ => return not_found_path(),
    };
    if path.subresource.is_some() {
        return not_found_path();
    }
    if req.method != "GET" {
        return method_not_allowed();
    }
    // A watch streams single objects: its metadata-only form is `PartialObjectMetadata`.
    let wanted_partial = if path.name.is_none() && !watch {
        "PartialObjectMetadataList"
    } else {
        "PartialObjectMetadata"
    };
    let representation = match negotiate(req.accept.as_deref(), wanted_partial) {
        Some(r) => r,
        None => return not_acceptable(),
    };
    let api_version = match kind {
        Kind::Pod | Kind::Namespace => "v1".to_string(),
        Kind::Sandbox => format!("{SANDBOX_GROUP}/{}", path.version),
    };
    match &path.name {
        Some(name) => {
            let key = match (kind, &path.namespace) {
                (Kind::Namespace, _) => kind.store_key("", name),
                (_, Some(namespace)) => kind.store_key(namespace, name),
                // e.g. /api/v1/pods/x: pods are namespaced.
                (_, None) => return not_found_path(),
            };
            match state.current_stored(kind, &key) {
                Some(object) if api_version_of(&object.value) == api_version => Reply::bytes(
                    200,
                    object.encoded(representation, kind, false, &state.encodings),
                ),
                _ => object_not_found(path),
            }
        }
        None => {
            if watch {
                return watch_request(
                    kind,
                    &api_version,
                    path.namespace.as_deref(),
                    params,
                    representation,
                );
            }
            list(
                &state,
                kind,
                &api_version,
                path.namespace.as_deref(),
                params,
                representation,
            )
        }
    }
}

fn method_not_allowed() -> Reply {
    status_reply(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
        json!({}),
    )
}

fn not_acceptable() -> Reply {
    status_reply(
        406,
        "NotAcceptable",
        "only the following media types are accepted: application/json, application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1, application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        json!({}),
    )
}

fn list(
    state: &State,
    kind: Kind,
    api_version: &str,
    namespace: Option<&str>,
    params: &[(String, String)],
    representation: Representation,
) -> Reply {
    let labels = match param(params, "labelSelector").map(LabelSelector::parse) {
        None => LabelSelector::default(),
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            return bad_request(&format!("unable to parse requested label selector: {e}"))
        }
    };
    let fields = match param(params, "fieldSelector").map(|s| FieldSelector::parse(s, kind)) {
        None => FieldSelector::default(),
        Some(Ok(s)) => s,
        Some(Err(e)) => return bad_request(&e),
    };
    let limit = match param(params, "limit").map(str::parse::<i64>) {
        None => 0,
        Some(Ok(n)) => n.max(0) as usize,
        Some(Err(_)) => return bad_request("invalid value for limit: must be an integer"),
    };
    let resource_version = param(params, "resourceVersion").filter(|rv| !rv.is_empty());
    let version_match = param(params, "resourceVersionMatch").filter(|m| !m.is_empty());
    let continue_token = param(params, "continue").filter(|c| !c.is_empty());

    // Which snapshot to read, where to start, which page this is.
    let (rv, start, page) = match continue_token {
        Some(raw) => {
            if resource_version.is_some_and(|rv| rv != "0") || version_match.is_some() {
                return bad_request(
                    "specifying resource version is not allowed when using continue",
                );
            }
            let token = match ContinueToken::decode(raw) {
                Ok(t) => t,
                Err(e) => return bad_request(&format!("continue key is not valid: {e}")),
            };
            if token.rv == -1 {
                (state.rv, token.start, token.page)
            } else if token.rv <= 0 || token.rv as u64 > state.rv {
                return bad_request("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)");
            } else if (token.rv as u64) < state.compacted_rv {
                return expired_continue(token.start, token.page);
            } else {
                (token.rv as u64, token.start, token.page)
            }
        }
        None => {
            let rv =
                match (resource_version, version_match) {
                    (None, Some(_)) => {
                        return bad_request(
                            "resourceVersionMatch is forbidden unless resourceVersion is provided",
                        )
                    }
                    (Some(rv), Some("Exact")) => match rv.parse::<u64>() {
                        Ok(0) => return bad_request(
                            "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"",
                        ),
                        Ok(n) if n < state.compacted_rv => {
                            return status_reply(
                                410,
                                "Expired",
                                &format!("too old resource version: {n} ({})", state.compacted_rv),
                                json!({}),
                            )
                        }
                        Ok(n) if n > state.rv => {
                            return status_reply(
                                504,
                                "Timeout",
                                &format!("Too large resource version: {n}, current: {}", state.rv),
                                json!({}),
                            )
                        }
                        Ok(n) => n,
                        Err(_) => return bad_request(&format!("invalid resource version: {rv}")),
                    },
                    (Some(rv), Some("NotOlderThan") | None) => match rv.parse::<u64>() {
                        Ok(_) => state.rv,
                        Err(_) => return bad_request(&format!("invalid resource version: {rv}")),
                    },
                    (Some(_), Some(other)) => {
                        return bad_request(&format!(
                            "resourceVersionMatch: Unsupported value: \"{other}\""
                        ))
                    }
                    (None, None) => state.rv,
                };
            (rv, String::new(), 0)
        }
    };

    // Scan like the apiserver's etcd store: in key order, from `start`, stop once `limit`
    // matching objects are collected; there is "more" if any key (matching or not) follows.
    let mut scope = state.snapshot(kind, rv, namespace, api_version, &start);
    let mut items = Vec::new();
    let mut last_key = None;
    let mut more = false;
    for (key, object) in scope.by_ref() {
        if limit > 0 && items.len() >= limit {
            more = true;
            break;
        }
        last_key = Some(key);
        if labels.matches(&object.value) && fields.matches(&object.value) {
            items.push(object);
        }
    }
    // The apiserver only knows the count when nothing is filtered; count only then.
    let unfiltered = labels.is_empty() && fields.is_empty();
    let remaining = if more && unfiltered {
        1 + scope.count()
    } else {
        usize::from(more)
    };
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if remaining > 0 {
        let token = ContinueToken {
            rv: rv as i64,
            start: format!("{}\u{0}", last_key.unwrap_or_default()),
            page: page + 1,
        };
        metadata["continue"] = json!(token.encode());
        if unfiltered {
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    let (list_kind, list_api_version) = match (representation, kind) {
        (Representation::PartialMetadata, _) => ("PartialObjectMetadataList", "meta.k8s.io/v1"),
        (Representation::Full, Kind::Pod) => ("PodList", "v1"),
        (Representation::Full, Kind::Namespace) => ("NamespaceList", "v1"),
        (Representation::Full, Kind::Sandbox) => ("SandboxList", api_version),
    };
    // The list's own fields, then the items' cached encodings copied in.
    let head = json!({
        "kind": list_kind,
        "apiVersion": list_api_version,
        "metadata": metadata
    })
    .to_string();
    let encoded: Vec<Bytes> = items
        .into_iter()
        .map(|o| o.encoded(representation, kind, true, &state.encodings))
        .collect();
    let size = head.len() + 12 + encoded.iter().map(|b| b.len() + 1).sum::<usize>();
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
    body.extend_from_slice(b",\"items\":[");
    for (i, item) in encoded.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item);
    }
    body.extend_from_slice(b"]}");
    Reply::bytes(200, Bytes::from(body))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Representation {
    Full,
    PartialMetadata,
}

/// Picks the representation from the `Accept` header; `wanted` is the metadata-only kind the
/// request can be answered with (`PartialObjectMetadata[List]`). `None` = nothing acceptable
/// (406).
fn negotiate(accept: Option<&str>, wanted: &str) -> Option<Representation> {
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

fn render_object(
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

fn access_review(state: &State, body: &str) -> Reply {
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
fn discovery(state: &State, req: &RecordedRequest) -> Reply {
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
            _ => return not_found_path(),
        },
    };
    if req.method != "GET" {
        return method_not_allowed();
    }
    Reply::json(200, body)
}

/// Orders Kubernetes version strings by priority (v1 > v1beta2 > v1beta1 > v1alpha1).
fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn rank(v: &str) -> (u8, u64, u64) {
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

// ---------------------------------------------------------------------------------------------
// Watch

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Added,
    Modified,
    Deleted,
}

/// One change in the watch history.
struct HistoryEvent {
    rv: u64,
    kind: Kind,
    change: Change,
    /// The new state; for a deletion, the last state at the deletion's resourceVersion.
    object: Arc<StoredObject>,
    /// The state before a modification (selectors decide ADDED/MODIFIED/DELETED from both).
    previous: Option<Arc<StoredObject>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchStart {
    /// Synthetic `ADDED` events for the current objects first (`resourceVersion` unset or
    /// `0`, or `sendInitialEvents=true`, which ends them with a bookmark when `end_bookmark`).
    Current { end_bookmark: bool },
    /// Every event after this resourceVersion.
    After(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchFault {
    None,
    CloseAfter(usize),
    Expire,
    Malformed,
    WrongKind,
    ItemWithoutName,
}

/// What one watch request asked for.
struct WatchSpec {
    kind: Kind,
    api_version: String,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    representation: Representation,
    start: WatchStart,
    bookmarks: bool,
    timeout: Option<Duration>,
    fault: WatchFault,
}

impl WatchSpec {
    fn selects(&self, object: &Value) -> bool {
        api_version_of(object) == self.api_version
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns))
            && self.labels.matches(object)
            && self.fields.matches(object)
    }

    /// The event type this watch sees for `event`, if any: like the watch cache, an object
    /// that starts matching the selectors is ADDED and one that stops matching is DELETED.
    fn event_type(&self, event: &HistoryEvent) -> Option<&'static str> {
        if event.kind != self.kind {
            return None;
        }
        let now = self.selects(&event.object.value);
        match event.change {
            Change::Added => now.then_some("ADDED"),
            Change::Deleted => now.then_some("DELETED"),
            Change::Modified => {
                let before = event
                    .previous
                    .as_ref()
                    .is_some_and(|p| self.selects(&p.value));
                match (before, now) {
                    (true, true) => Some("MODIFIED"),
                    (false, true) => Some("ADDED"),
                    (true, false) => Some("DELETED"),
                    (false, false) => None,
                }
            }
        }
    }

    fn event_line(&self, event_type: &str, object: &StoredObject, encodings: &AtomicU64) -> Bytes {
        let encoded = object.encoded(self.representation, self.kind, false, encodings);
        let mut line = Vec::with_capacity(encoded.len() + 32);
        line.extend_from_slice(b"{\"type\":\"");
        line.extend_from_slice(event_type.as_bytes());
        line.extend_from_slice(b"\",\"object\":");
        line.extend_from_slice(&encoded);
        line.extend_from_slice(b"}\n");
        Bytes::from(line)
    }

    fn bookmark_line(&self, rv: u64, initial_events_end: bool) -> Bytes {
        let (kind, api_version) = match self.representation {
            Representation::PartialMetadata => ("PartialObjectMetadata", "meta.k8s.io/v1"),
            Representation::Full => (self.kind.kind_name(), self.api_version.as_str()),
        };
        let mut metadata = json!({ "resourceVersion": rv.to_string(), "creationTimestamp": null });
        if initial_events_end {
            metadata["annotations"] = json!({ INITIAL_EVENTS_END: "true" });
        }
        json_line(&json!({
            "type": "BOOKMARK",
            "object": { "kind": kind, "apiVersion": api_version, "metadata": metadata }
        }))
    }
}

fn json_line(value: &Value) -> Bytes {
    let mut line = value.to_string().into_bytes();
    line.push(b'\n');
    Bytes::from(line)
}

/// The `ERROR` event of a watch from a resourceVersion older than the history.
fn expired_line(from: u64, oldest: u64) -> Bytes {
    json_line(&json!({
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("too old resource version: {from} ({oldest})"),
            "reason": "Expired",
            "code": 410
        }
    }))
}

/// Validates a watch request; the stream itself starts in [`start_watch`].
fn watch_request(
    kind: Kind,
    api_version: &str,
    namespace: Option<&str>,
    params: &[(String, String)],
    representation: Representation,
) -> Reply {
    let labels = match param(params, "labelSelector").map(LabelSelector::parse) {
        None => LabelSelector::default(),
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            return bad_request(&format!("unable to parse requested label selector: {e}"))
        }
    };
    let fields = match param(params, "fieldSelector").map(|s| FieldSelector::parse(s, kind)) {
        None => FieldSelector::default(),
        Some(Ok(s)) => s,
        Some(Err(e)) => return bad_request(&e),
    };
    let timeout = match param(params, "timeoutSeconds").map(str::parse::<u64>) {
        None | Some(Ok(0)) => None,
        Some(Ok(n)) => Some(Duration::from_secs(n)),
        Some(Err(_)) => return bad_request("invalid value for timeoutSeconds: must be an integer"),
    };
    let bookmarks = param(params, "allowWatchBookmarks") == Some("true");
    let initial_events = param(params, "sendInitialEvents") == Some("true");
    let version_match = param(params, "resourceVersionMatch").filter(|m| !m.is_empty());
    if initial_events && version_match != Some("NotOlderThan") {
        return bad_request("sendInitialEvents is forbidden for watch unless resourceVersionMatch is set to NotOlderThan");
    }
    if initial_events && !bookmarks {
        return bad_request(
            "allowWatchBookmarks must be set to true when sendInitialEvents is set",
        );
    }
    if version_match.is_some() && !initial_events {
        return bad_request(
            "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        );
    }
    let start = match param(params, "resourceVersion").filter(|rv| !rv.is_empty()) {
        _ if initial_events => WatchStart::Current { end_bookmark: true },
        None | Some("0") => WatchStart::Current {
            end_bookmark: false,
        },
        Some(rv) => match rv.parse::<u64>() {
            Ok(n) => WatchStart::After(n),
            Err(_) => return bad_request(&format!("invalid resource version: {rv}")),
        },
    };
    Reply {
        code: 200,
        body: ReplyBody::Watch(Box::new(WatchSpec {
            kind,
            api_version: api_version.to_string(),
            namespace: namespace.map(str::to_string),
            labels,
            fields,
            representation,
            start,
            bookmarks,
            timeout,
            fault: WatchFault::None,
        })),
        retry_after: None,
    }
}

/// One piece of a watch stream.
enum WatchChunk {
    Data(Bytes),
    /// Drop the connection once every chunk before this one is written.
    Abort,
}

/// The body of a watch response, fed by a [`WatchTask`] (aborted when the body goes).
struct WatchBody {
    chunks: mpsc::Receiver<WatchChunk>,
    producer: JoinHandle<()>,
    kill: Arc<Notify>,
    aborted: bool,
}

impl WatchBody {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.aborted {
            return Poll::Pending;
        }
        match self.chunks.poll_recv(cx) {
            Poll::Ready(Some(WatchChunk::Data(bytes))) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            Poll::Ready(Some(WatchChunk::Abort)) => {
                // hyper flushes what it has written while this is pending; then the
                // connection task drops the socket, without the terminating chunk.
                self.aborted = true;
                self.kill.notify_one();
                Poll::Pending
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for WatchBody {
    fn drop(&mut self) {
        self.producer.abort();
    }
}

/// Counts an open watch while its producer lives.
struct OpenWatch(Arc<Mutex<State>>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        let mut state = lock(&self.0);
        state.open_watches = state.open_watches.saturating_sub(1);
    }
}

fn start_watch(shared: &Arc<Mutex<State>>, kill: &Arc<Notify>, spec: WatchSpec) -> WatchBody {
    let (sender, chunks) = mpsc::channel(64);
    // Taken now, before the client sees the response head: a `send_bookmarks` or
    // `drop_watches` after that reaches this watch.
    let (open, changes, cursor) = {
        let mut state = lock(shared);
        state.open_watches += 1;
        let cursor = WatchCursor {
            sent_rv: match spec.start {
                WatchStart::After(rv) => Some(rv),
                WatchStart::Current { .. } => None,
            },
            object_events: 0,
            bookmark_requests: state.bookmark_requests,
            drop_generation: state.drop_generation,
            last_bookmark: Instant::now(),
            current_rv: state.rv,
        };
        (OpenWatch(shared.clone()), state.changes.subscribe(), cursor)
    };
    let watch = WatchTask {
        shared: shared.clone(),
        kill: kill.clone(),
        spec,
        sender,
        changes,
        cursor,
        _open: open,
    };
    let producer = tokio::spawn(watch.run());
    WatchBody {
        chunks,
        producer,
        kill: kill.clone(),
        aborted: false,
    }
}

/// Where one watch stands.
struct WatchCursor {
    /// Every event up to here was considered; `None` before the initial events.
    sent_rv: Option<u64>,
    object_events: usize,
    bookmark_requests: u64,
    drop_generation: u64,
    last_bookmark: Instant,
    /// The server's resourceVersion when the watch started.
    current_rv: u64,
}

/// One watch stream's producer.
struct WatchTask {
    shared: Arc<Mutex<State>>,
    kill: Arc<Notify>,
    spec: WatchSpec,
    sender: mpsc::Sender<WatchChunk>,
    changes: tokio::sync::watch::Receiver<()>,
    cursor: WatchCursor,
    _open: OpenWatch,
}

enum WatchEnd {
    /// Keep streaming; wake up at this time at the latest.
    Continue(Option<Instant>),
    /// End the stream cleanly (terminating chunk).
    Finish,
    /// Drop the connection now (`drop_watches`).
    Drop,
}

impl State {
    /// Under the lock: the lines a watch sends next (with whether each is an object event),
    /// and what happens then.
    fn watch_batch(
        &self,
        spec: &WatchSpec,
        cursor: &mut WatchCursor,
        now: Instant,
        deadline: Option<Instant>,
    ) -> (Vec<(Bytes, bool)>, WatchEnd) {
        if self.drop_generation != cursor.drop_generation {
            return (Vec::new(), WatchEnd::Drop);
        }
        let mut lines = Vec::new();
        match cursor.sent_rv {
            None => {
                let ns = spec.namespace.as_deref();
                for (_, object) in self.snapshot(spec.kind, self.rv, ns, &spec.api_version, "") {
                    if spec.labels.matches(&object.value) && spec.fields.matches(&object.value) {
                        lines.push((spec.event_line("ADDED", object, &self.encodings), true));
                    }
                }
                cursor.sent_rv = Some(self.rv);
                if spec.start == (WatchStart::Current { end_bookmark: true }) && spec.bookmarks {
                    lines.push((spec.bookmark_line(self.rv, true), false));
                    cursor.last_bookmark = now;
                }
            }
            Some(rv) if rv < self.history_floor => {
                lines.push((expired_line(rv, self.history_floor), false));
                return (lines, WatchEnd::Finish);
            }
            Some(rv) => {
                let first = self.history.partition_point(|e| e.rv <= rv);
                for event in self.history.range(first..) {
                    if let Some(event_type) = spec.event_type(event) {
                        let line = spec.event_line(event_type, &event.object, &self.encodings);
                        lines.push((line, true));
                    }
                }
                cursor.sent_rv = Some(rv.max(self.rv));
            }
        }
        let sent_rv = cursor.sent_rv.unwrap_or(self.rv);
        let periodic = self.bookmark_interval.filter(|_| spec.bookmarks);
        let timed_out = deadline.is_some_and(|d| now >= d);
        let requested = self.bookmark_requests != cursor.bookmark_requests;
        cursor.bookmark_requests = self.bookmark_requests;
        let due = periodic.is_some_and(|interval| now >= cursor.last_bookmark + interval);
        if spec.bookmarks && (requested || due || (timed_out && periodic.is_some())) {
            lines.push((spec.bookmark_line(sent_rv, false), false));
            cursor.last_bookmark = now;
        }
        if timed_out {
            return (lines, WatchEnd::Finish);
        }
        let next_bookmark = periodic.map(|interval| cursor.last_bookmark + interval);
        let wake = match (next_bookmark, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        (lines, WatchEnd::Continue(wake))
    }
}

impl WatchTask {
    /// Produces the stream: replays and follows the history, sends bookmarks, ends at the
    /// timeout, breaks on `drop_watches` and on faults.
    async fn run(mut self) {
        let started = self.cursor.last_bookmark;
        let deadline = self.spec.timeout.map(|t| started + t);
        match self.spec.fault {
            WatchFault::Expire => {
                let rv = self.cursor.current_rv;
                let from = self.cursor.sent_rv.unwrap_or(rv);
                let _ = self.send(expired_line(from, rv.max(from + 1))).await;
                return;
            }
            WatchFault::Malformed => {
                let line = b"{\"type\":\"ADDED\",\"object\":{\"metadata\":{\"name\":}}}\n";
                let _ = self.send(Bytes::from_static(line)).await;
                return;
            }
            WatchFault::CloseAfter(0) => return self.abort().await,
            WatchFault::WrongKind => {
                let line = json_line(&json!({
                    "type": "ADDED",
                    "object": { "kind": "ConfigMap", "apiVersion": "v1", "data": { "unexpected": "true" } }
                }));
                if self.send(line).await.is_err() {
                    return;
                }
            }
            WatchFault::None | WatchFault::CloseAfter(_) | WatchFault::ItemWithoutName => {}
        }
        let mut strip_name = self.spec.fault == WatchFault::ItemWithoutName;
        loop {
            self.changes.borrow_and_update();
            let (lines, end) = lock(&self.shared).watch_batch(
                &self.spec,
                &mut self.cursor,
                Instant::now(),
                deadline,
            );
            for (mut line, object_event) in lines {
                if object_event && strip_name {
                    strip_name = false;
                    line = without_name(&line);
                }
                if self.send(line).await.is_err() {
                    return;
                }
                if object_event {
                    self.cursor.object_events += 1;
                    if self.spec.fault == WatchFault::CloseAfter(self.cursor.object_events) {
                        return self.abort().await;
                    }
                }
            }
            let wake = match end {
                WatchEnd::Continue(wake) => wake,
                // Dropping the sender ends the body: hyper writes the terminating chunk.
                WatchEnd::Finish => return,
                WatchEnd::Drop => {
                    // Keep the sender, or the body could end cleanly before the socket goes.
                    self.kill.notify_one();
                    return std::future::pending().await;
                }
            };
            tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = sleep_until(wake) => {}
                _ = self.sender.closed() => return,
            }
        }
    }

    async fn send(&self, line: Bytes) -> Result<(), mpsc::error::SendError<WatchChunk>> {
        self.sender.send(WatchChunk::Data(line)).await
    }

    /// Breaks the stream once what was sent is written; keeps the sender until then.
    async fn abort(self) {
        if self.sender.send(WatchChunk::Abort).await.is_ok() {
            std::future::pending::<()>().await;
        }
    }
}

/// A watch event line without `object.metadata.name`.
fn without_name(line: &Bytes) -> Bytes {
    match serde_json::from_slice::<Value>(line) {
        Ok(mut event) => {
            if let Some(meta) = event["object"]["metadata"].as_object_mut() {
                meta.remove("name");
            }
            json_line(&event)
        }
        Err(_) => line.clone(),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------------------------------------
// Request paths

/// A resource request path: `/api/{v}/...` or `/apis/{group}/{v}/...`, then
/// `[namespaces/{ns}/]{resource}[/{name}[/{subresource}]]`.
#[derive(Debug, Clone)]
struct ResourcePath {
    group: String,
    version: String,
    namespace: Option<String>,
    resource: String,
    name: Option<String>,
    subresource: Option<String>,
}

impl ResourcePath {
    fn parse(path: &str) -> Option<ResourcePath> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match segments.as_slice() {
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => return None,
        };
        // As the apiserver's RequestInfoFactory: `namespaces/{ns}/{resource}...` is a request
        // in namespace `ns`, except the Namespace's own subresources (`namespaces/{ns}/status`,
        // `namespaces/{ns}/finalize`); `namespaces/{ns}` is the Namespace `ns` itself.
        let (namespace, rest) = match rest {
            ["namespaces", _, sub] if matches!(*sub, "status" | "finalize") => (None, rest),
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            _ => (None, rest),
        };
        let (resource, name, subresource) = match rest {
            [resource] => (*resource, None, None),
            [resource, name] => (*resource, Some(name.to_string()), None),
            [resource, name, sub] => (*resource, Some(name.to_string()), Some(sub.to_string())),
            _ => return None,
        };
        if resource.is_empty() || name.as_deref() == Some("") {
            return None;
        }
        Some(ResourcePath {
            group: group.to_string(),
            version: version.to_string(),
            namespace,
            resource: resource.to_string(),
            name,
            subresource,
        })
    }

    fn qualified_resource(&self) -> String {
        if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    /// The resource RBAC authorizes: `pods`, or `namespaces/status` for a subresource.
    fn rbac_resource(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.clone(),
        }
    }

    /// The namespace RBAC authorizes the request in: the path's namespace or, for a request
    /// on a Namespace object, that namespace itself (so a RoleBinding in `x` can grant
    /// `get` on the Namespace `x`).
    fn rbac_namespace(&self) -> Option<&str> {
        match (&self.namespace, self.group.as_str(), self.resource.as_str()) {
            (Some(ns), _, _) => Some(ns),
            (None, "", "namespaces") => self.name.as_deref(),
            (None, _, _) => None,
        }
    }

    /// The RBAC verb of a request on this path.
    fn verb(&self, method: &str, watch: bool) -> String {
        match (method, self.name.is_some()) {
            ("GET", false) if watch => "watch",
            ("GET", false) => "list",
            ("GET", true) => "get",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", false) => "deletecollection",
            ("DELETE", true) => "delete",
            (other, _) => return other.to_ascii_lowercase(),
        }
        .to_string()
    }
}

fn object_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

fn key_namespace(key: &str) -> &str {
    key.split_once('/').map(|(ns, _)| ns).unwrap_or(key)
}

fn api_version_of(object: &Value) -> &str {
    object["apiVersion"].as_str().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Continue tokens: base64url(JSON), like the apiserver's {"v","rv","start"} plus the page.

struct ContinueToken {
    /// Snapshot resourceVersion; -1 = continue at the latest one.
    rv: i64,
    /// Key to start at (inclusive), "namespace/name\0" = just after that object.
    start: String,
    /// 0-based page number of the page this token fetches.
    page: usize,
}

impl ContinueToken {
    fn encode(&self) -> String {
        let json =
            json!({ "v": "meta.k8s.io/v1", "rv": self.rv, "start": self.start, "page": self.page });
        base64url_encode(json.to_string().as_bytes())
    }

    fn decode(raw: &str) -> Result<ContinueToken, String> {
        let bytes = base64url_decode(raw).ok_or("illegal base64 data")?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if value["v"] != "meta.k8s.io/v1" {
            return Err("server does not recognize this encoded version".to_string());
        }
        Ok(ContinueToken {
            rv: value["rv"].as_i64().ok_or("missing rv")?,
            start: value["start"].as_str().ok_or("missing start")?.to_string(),
            page: value["page"].as_u64().unwrap_or(1) as usize,
        })
    }
}

const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64url_encode(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(BASE64URL[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn base64url_decode(input: &str) -> Option<Vec<u8>> {
    let input = input.trim_end_matches('=');
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in input.bytes() {
        let v = BASE64URL.iter().position(|&b| b == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Selectors

#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

/// A parsed `labelSelector`: requirements ANDed.
#[derive(Debug, Clone, Default)]
struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    fn parse(text: &str) -> Result<LabelSelector, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(text)? {
            let part = part.trim();
            if part.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err(format!("found '', expected: identifier in {text:?}"));
            }
            requirements.push(parse_requirement(part)?);
        }
        Ok(LabelSelector(requirements))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::DoesNotExist(k) => get(k).is_none(),
            Requirement::GreaterThan(k, n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x > *n),
            Requirement::LessThan(k, n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x < *n),
        })
    }
}

/// Splits on commas outside parentheses.
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("found ')', expected: identifier in {text:?}"));
                }
            }
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("found end of string, expected: ')' in {text:?}"));
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        validate_key(key)?;
        return Ok(Requirement::DoesNotExist(key.to_string()));
    }
    let key_len = part
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')))
        .unwrap_or(part.len());
    let key = &part[..key_len];
    validate_key(key)?;
    let rest = part[key_len..].trim_start();
    let key = key.to_string();
    if rest.is_empty() {
        return Ok(Requirement::Exists(key));
    }
    let value = |v: &str| -> Result<String, String> {
        let v = v.trim();
        validate_value(v)?;
        Ok(v.to_string())
    };
    let number = |v: &str| -> Result<i64, String> {
        v.trim()
            .parse::<i64>()
            .map_err(|_| format!("for 'Gt', 'Lt' operators, the value must be an integer: {v:?}"))
    };
    if let Some(v) = rest.strip_prefix("!=") {
        return Ok(Requirement::NotEquals(key, value(v)?));
    }
    if let Some(v) = rest.strip_prefix("==") {
        return Ok(Requirement::Equals(key, value(v)?));
    }
    if let Some(v) = rest.strip_prefix('=') {
        return Ok(Requirement::Equals(key, value(v)?));
    }
    if let Some(v) = rest.strip_prefix('>') {
        return Ok(Requirement::GreaterThan(key, number(v)?));
    }
    if let Some(v) = rest.strip_prefix('<') {
        return Ok(Requirement::LessThan(key, number(v)?));
    }
    let set = |v: &str| -> Result<Vec<String>, String> {
        let inner = v
            .trim()
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or_else(|| format!("found {v:?}, expected: '(' ... ')'"))?;
        let values = inner
            .split(',')
            .map(&value)
            .collect::<Result<Vec<_>, _>>()?;
        if inner.trim().is_empty() {
            return Err("for 'in', 'notin' operators, values set can't be empty".to_string());
        }
        Ok(values)
    };
    if let Some(v) = rest.strip_prefix("notin") {
        if v.starts_with([' ', '(']) {
            return Ok(Requirement::NotIn(key, set(v)?));
        }
    }
    if let Some(v) = rest.strip_prefix("in") {
        if v.starts_with([' ', '(']) {
            return Ok(Requirement::In(key, set(v)?));
        }
    }
    Err(format!(
        "found '{rest}', expected: in, notin, =, ==, !=, gt, lt"
    ))
}

fn is_name_part(s: &str, max: usize) -> bool {
    let bytes = s.as_bytes();
    !s.is_empty()
        && s.len() <= max
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|label| {
                is_name_part(label, 63)
                    && label.bytes().all(|b| b != b'_' && !b.is_ascii_uppercase())
            })
    });
    if prefix_ok && is_name_part(name, 63) {
        Ok(())
    } else {
        Err(format!("invalid label key {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"))
    }
}

fn validate_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_name_part(value, 63) {
        Ok(())
    } else {
        Err(format!("invalid label value: {value:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"))
    }
}

/// A parsed `fieldSelector`: (JSON pointer, value, negated) requirements ANDed.
#[derive(Debug, Clone, Default)]
struct FieldSelector(Vec<(&'static str, String, bool)>);

impl FieldSelector {
    fn parse(text: &str, kind: Kind) -> Result<FieldSelector, String> {
        let mut requirements = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, value, negated) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, false)
            } else {
                return Err(format!(
                    "invalid selector: '{part}'; can't understand '{part}'"
                ));
            };
            let field = field.trim();
            let pointer = match (field, kind) {
                ("metadata.name", _) => "/metadata/name",
                // Cluster-scoped kinds have no metadata.namespace field to select on.
                ("metadata.namespace", Kind::Pod | Kind::Sandbox) => "/metadata/namespace",
                ("status.phase", Kind::Namespace) => "/status/phase",
                ("spec.nodeName", Kind::Pod) => "/spec/nodeName",
                ("spec.restartPolicy", Kind::Pod) => "/spec/restartPolicy",
                ("status.phase", Kind::Pod) => "/status/phase",
                _ => return Err(format!("field label not supported: {field}")),
            };
            requirements.push((pointer, value.trim().to_string(), negated));
        }
        Ok(FieldSelector(requirements))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(pointer, value, negated)| {
            let actual = object
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or_default();
            (actual == value) != *negated
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/// Whether a request asks to watch (`watch=true` or `watch=1`).
fn is_watch_param(params: &[(String, String)]) -> bool {
    param(params, "watch").is_some_and(|w| w == "true" || w == "1")
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Parses an `application/x-www-form-urlencoded` query string.
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn labels_json(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect(),
    )
}

/// Fills in what the apiserver sets on every Namespace: the `kubernetes.io/metadata.name`
/// label, and `spec.finalizers: [kubernetes]` and `status.phase: Active` unless present.
fn complete_namespace(object: &mut Value, name: &str) {
    let meta = &mut object["metadata"];
    if !meta["labels"].is_object() {
        meta["labels"] = json!({});
    }
    meta["labels"]["kubernetes.io/metadata.name"] = json!(name);
    if !object["spec"].is_object() {
        object["spec"] = json!({});
    }
    if object["spec"].get("finalizers").is_none() {
        object["spec"]["finalizers"] = json!(["kubernetes"]);
    }
    if !object["status"].is_object() {
        object["status"] = json!({});
    }
    if object["status"].get("phase").is_none() {
        object["status"]["phase"] = json!("Active");
    }
}

fn is_empty_map(v: &Value) -> bool {
    v.as_object().is_some_and(Map::is_empty) || v.is_null()
}

fn now_timestamp() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn new_uid() -> String {
    let n: u128 = rand::random();
    // RFC 4122 version 4, variant 1.
    let n = (n & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}
