//! Faults: rules injected by tests that make matching requests answer otherwise (an error
//! status, a hang, a dropped connection, a broken body or watch), and the RBAC denials.

use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::listing::ContinueToken;
use super::routing::{is_watch_param, param, parse_query, respond, RequestFacts, ResourcePath};
use super::status::{
    expired_continue, forbidden, not_found_path, object_not_found, page_not_found, status_reply,
    Reply, ReplyBody,
};
use super::store::{lock, State};
use super::watch::WatchFault;
use super::{FakeApiServer, RecordedRequest};

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
    /// Watch requests only (other requests are not matched): start the watch normally, then
    /// send no event at all while bookmarks keep coming (periodic, requested and before the
    /// timeout, as usual), every one at the revision the watch started from: an apiserver
    /// whose watch cache stopped following etcd. The stream ends at its timeout.
    FreezeWatch,
    /// 404 with the `Status` an apiserver answers for a resource its group/version does not
    /// have: reason `NotFound`, message `the server could not find the requested resource`,
    /// empty `details` (it names no object).
    UnknownResource,
    /// 404 with the plain-text body `404 page not found` (`text/plain`), as the apiserver's
    /// HTTP mux answers a path under no group/version it serves (or a proxy in between).
    PageNotFound,
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

impl FakeApiServer {
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
}

pub(super) struct FaultRule {
    pub(super) fault: Fault,
    pub(super) matched: usize,
    pub(super) fired: usize,
}

impl State {
    /// The first fault rule that fires for this request, updating the rules' counters.
    pub(super) fn fire_fault(&mut self, req: &RequestFacts) -> Option<FaultAction> {
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
                    FaultAction::CloseWatchAfter(_)
                        | FaultAction::ExpireWatch
                        | FaultAction::FreezeWatch
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

pub(super) fn injected_status(
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

/// The answer to a request a fault rule fired on: `action` instead of (or on top of) the
/// normal answer. `CloseConnection` never gets here: its connection is dropped unanswered.
pub(super) async fn answer_with_fault(
    action: FaultAction,
    shared: &Mutex<State>,
    req: &RecordedRequest,
    params: &[(String, String)],
    path: Option<&ResourcePath>,
    facts: &RequestFacts,
) -> Reply {
    match action {
        FaultAction::Hang(duration) => {
            tokio::time::sleep(duration).await;
            respond(shared, req, params, path)
        }
        FaultAction::CloseConnection => unreachable!("the connection is dropped unanswered"),
        FaultAction::Status(code, retry_after) => {
            let mut reply = injected_status(code, retry_after, req, path);
            if code == 410 && facts.is_watch {
                // The apiserver's answer to a watch from a compacted resourceVersion.
                let rv = lock(shared).rv;
                let from = param(params, "resourceVersion").unwrap_or_default();
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
        FaultAction::CloseWatchAfter(n) => {
            respond(shared, req, params, path).with_watch_fault(WatchFault::CloseAfter(n))
        }
        FaultAction::ExpireWatch => {
            respond(shared, req, params, path).with_watch_fault(WatchFault::Expire)
        }
        FaultAction::FreezeWatch => {
            respond(shared, req, params, path).with_watch_fault(WatchFault::Freeze)
        }
        FaultAction::UnknownResource => not_found_path(),
        FaultAction::PageNotFound => page_not_found(),
        FaultAction::MalformedJson | FaultAction::WrongKind | FaultAction::ItemWithoutName
            if facts.is_watch =>
        {
            let fault = match action {
                FaultAction::MalformedJson => WatchFault::Malformed,
                FaultAction::WrongKind => WatchFault::WrongKind,
                _ => WatchFault::ItemWithoutName,
            };
            respond(shared, req, params, path).with_watch_fault(fault)
        }
        FaultAction::ExpireContinue => {
            let start = param(params, "continue")
                .and_then(|t| ContinueToken::decode(t).ok())
                .map(|t| t.start)
                .unwrap_or_default();
            expired_continue(start, facts.page.unwrap_or(1))
        }
        FaultAction::MalformedJson => Reply {
            code: 200,
            body: ReplyBody::Raw(format!(
                "{{\"kind\":\"{}\",\"apiVersion\":\"v1\",\"metadata\":{{\"resourceVersion\":\"1\"}},\"items\":[{{\"metadata\":{{\"name\":",
                if facts.is_list { "PodList" } else { "Pod" }
            )),
            retry_after: None,
        },
        FaultAction::WrongKind => {
            let rv = lock(shared).rv.to_string();
            let body = if facts.is_list {
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
        FaultAction::ItemWithoutName => {
            let mut reply = respond(shared, req, params, path);
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
    }
}
