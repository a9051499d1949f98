//! Serving and routing: connections, the request record, faults first, then authorization,
//! the resource path and the verb.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::discovery::{access_review, discovery};
use super::faults::{answer_with_fault, FaultAction};
use super::listing::{list, ContinueToken};
use super::negotiation::negotiate;
use super::status::{
    forbidden, method_not_allowed, not_acceptable, not_found_path, object_not_found,
    page_not_found, Reply, ServerBody,
};
use super::store::{api_version_of, lock, State};
use super::watch::watch_request;
use super::{Kind, RecordedRequest, SANDBOX_GROUP};

pub(super) async fn accept_loop(listener: TcpListener, shared: Arc<Mutex<State>>) {
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
pub(super) struct RequestFacts {
    pub(super) method: String,
    pub(super) path: String,
    /// Plural resource and object name as parsed from the path (`None` for discovery).
    pub(super) resource: Option<String>,
    pub(super) name: Option<String>,
    pub(super) is_list: bool,
    pub(super) is_watch: bool,
    pub(super) has_continue: bool,
    pub(super) page: Option<usize>,
}

impl RequestFacts {
    /// What the request is, as fault rules match it.
    fn new(
        recorded: &RecordedRequest,
        params: &[(String, String)],
        path: Option<&ResourcePath>,
    ) -> RequestFacts {
        let continue_token = param(params, "continue");
        let is_collection_get = recorded.method == "GET"
            && path.is_some_and(|p| p.name.is_none() && p.subresource.is_none());
        let is_watch = is_collection_get && is_watch_param(params);
        let is_list = is_collection_get && !is_watch;
        RequestFacts {
            method: recorded.method.clone(),
            path: recorded.path.clone(),
            resource: path.map(|p| p.resource.clone()),
            name: path.and_then(|p| p.name.clone()),
            is_list,
            is_watch,
            has_continue: continue_token.is_some(),
            page: match (is_list, continue_token) {
                (false, _) => None,
                (true, None) => Some(0),
                (true, Some(token)) => ContinueToken::decode(token).ok().map(|t| t.page),
            },
        }
    }
}

/// One request: recorded, matched against the fault rules, answered.
async fn handle(
    shared: Arc<Mutex<State>>,
    kill: Arc<Notify>,
    req: Request<Incoming>,
) -> Response<ServerBody> {
    let recorded = record(req).await;
    let params = parse_query(&recorded.query);
    let path = ResourcePath::parse(&recorded.path);
    let facts = RequestFacts::new(&recorded, &params, path.as_ref());
    let (index, fault) = {
        let mut state = lock(&shared);
        state.requests.push(recorded.clone());
        let index = state.requests.len() - 1;
        (index, state.fire_fault(&facts))
    };
    let reply = match fault {
        None => respond(&shared, &recorded, &params, path.as_ref()),
        Some(FaultAction::CloseConnection) => {
            kill.notify_one();
            return std::future::pending().await;
        }
        Some(action) => {
            answer_with_fault(action, &shared, &recorded, &params, path.as_ref(), &facts).await
        }
    };
    if let Some(r) = lock(&shared).requests.get_mut(index) {
        r.status = Some(reply.code);
    }
    reply.into_response(&shared, &kill)
}

/// The request as tests see it in [`FakeApiServer::requests`](super::FakeApiServer::requests).
async fn record(req: Request<Incoming>) -> RecordedRequest {
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
    RecordedRequest {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        accept: header(http::header::ACCEPT),
        authorization: header(http::header::AUTHORIZATION),
        body: String::from_utf8_lossy(&body).into_owned(),
        status: None,
    }
}

/// The normal answer to a request.
pub(super) fn respond(
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
        // A resource the group/version does not have: a Status naming no object.
        (group, version, _) if state.serves_group_version(group, version) => {
            return not_found_path()
        }
        // No handler for that group/version at all: the mux's plain-text 404.
        _ => return page_not_found(),
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

/// A resource request path: `/api/{v}/...` or `/apis/{group}/{v}/...`, then
/// `[namespaces/{ns}/]{resource}[/{name}[/{subresource}]]`.
#[derive(Debug, Clone)]
pub(super) struct ResourcePath {
    pub(super) group: String,
    pub(super) version: String,
    pub(super) namespace: Option<String>,
    pub(super) resource: String,
    pub(super) name: Option<String>,
    pub(super) subresource: Option<String>,
}

impl ResourcePath {
    pub(super) fn parse(path: &str) -> Option<ResourcePath> {
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

    pub(super) fn qualified_resource(&self) -> String {
        if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    /// The resource RBAC authorizes: `pods`, or `namespaces/status` for a subresource.
    pub(super) fn rbac_resource(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.clone(),
        }
    }

    /// The namespace RBAC authorizes the request in: the path's namespace or, for a request
    /// on a Namespace object, that namespace itself (so a RoleBinding in `x` can grant
    /// `get` on the Namespace `x`).
    pub(super) fn rbac_namespace(&self) -> Option<&str> {
        match (&self.namespace, self.group.as_str(), self.resource.as_str()) {
            (Some(ns), _, _) => Some(ns),
            (None, "", "namespaces") => self.name.as_deref(),
            (None, _, _) => None,
        }
    }

    /// The RBAC verb of a request on this path.
    pub(super) fn verb(&self, method: &str, watch: bool) -> String {
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

/// Whether a request asks to watch (`watch=true` or `watch=1`).
pub(super) fn is_watch_param(params: &[(String, String)]) -> bool {
    param(params, "watch").is_some_and(|w| w == "true" || w == "1")
}

pub(super) fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Parses an `application/x-www-form-urlencoded` query string.
pub(super) fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub(super) fn percent_decode(s: &str) -> String {
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
