//! Replies: the body kinds (JSON, cached bytes, a watch stream), and the `Status` error
//! bodies with the apiserver's reasons and messages.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http_body_util::Full;
use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::Response;
use serde_json::{json, Map, Value};
use tokio::sync::Notify;

use super::listing::ContinueToken;
use super::routing::ResourcePath;
use super::store::State;
use super::watch::{start_watch, WatchBody, WatchFault, WatchSpec};
use super::{EXPIRED_CONTINUE_MESSAGE, FAKE_USER};

pub(super) struct Reply {
    pub(super) code: u16,
    pub(super) body: ReplyBody,
    pub(super) retry_after: Option<u64>,
}

pub(super) enum ReplyBody {
    Json(Value),
    Raw(String),
    /// A plain-text body (`text/plain; charset=utf-8`), as the apiserver's mux writes it.
    Text(&'static str),
    Bytes(Bytes),
    /// A watch stream, produced by [`WatchTask::run`] once the response head is sent.
    Watch(Box<WatchSpec>),
}

impl Reply {
    pub(super) fn json(code: u16, body: Value) -> Reply {
        Reply {
            code,
            body: ReplyBody::Json(body),
            retry_after: None,
        }
    }

    pub(super) fn bytes(code: u16, body: Bytes) -> Reply {
        Reply {
            code,
            body: ReplyBody::Bytes(body),
            retry_after: None,
        }
    }

    /// Sets a fault on a watch answer (any other answer is left as it is).
    pub(super) fn with_watch_fault(mut self, fault: WatchFault) -> Reply {
        if let ReplyBody::Watch(spec) = &mut self.body {
            spec.fault = fault;
        }
        self
    }

    pub(super) fn into_response(
        self,
        shared: &Arc<Mutex<State>>,
        kill: &Arc<Notify>,
    ) -> Response<ServerBody> {
        let content_type = match self.body {
            ReplyBody::Text(_) => "text/plain; charset=utf-8",
            _ => "application/json",
        };
        let body = match self.body {
            ReplyBody::Json(v) => ServerBody::Full(Full::new(Bytes::from(v.to_string()))),
            ReplyBody::Text(s) => ServerBody::Full(Full::new(Bytes::from_static(s.as_bytes()))),
            ReplyBody::Raw(s) => ServerBody::Full(Full::new(Bytes::from(s))),
            ReplyBody::Bytes(b) => ServerBody::Full(Full::new(b)),
            ReplyBody::Watch(spec) => ServerBody::Watch(start_watch(shared, kill, *spec)),
        };
        let mut builder = Response::builder()
            .status(self.code)
            .header(http::header::CONTENT_TYPE, content_type);
        if content_type.starts_with("text/") {
            builder = builder.header("X-Content-Type-Options", "nosniff");
        }
        if let Some(seconds) = self.retry_after {
            builder = builder.header(http::header::RETRY_AFTER, seconds.to_string());
        }
        builder
            .body(body)
            .unwrap_or_else(|_| Response::new(ServerBody::Full(Full::new(Bytes::new()))))
    }
}

/// A response body: a whole one, or a watch stream.
pub(super) enum ServerBody {
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
pub(super) fn status_reply(code: u16, reason: &str, message: &str, details: Value) -> Reply {
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

/// The apiserver's answer for a path under no group/version it serves (an unregistered
/// group, a version no CRD serves, a CRD that is not installed): its HTTP mux has no handler
/// and answers in plain text, not with a `Status`.
pub(super) fn page_not_found() -> Reply {
    Reply {
        code: 404,
        body: ReplyBody::Text("404 page not found\n"),
        retry_after: None,
    }
}

/// The apiserver's answer for a resource its group/version does not have (a wrong plural, a
/// subresource it lacks): a `Status` that names no object (`details` empty).
pub(super) fn not_found_path() -> Reply {
    status_reply(
        404,
        "NotFound",
        "the server could not find the requested resource",
        json!({}),
    )
}

pub(super) fn bad_request(message: &str) -> Reply {
    status_reply(400, "BadRequest", message, json!({}))
}

pub(super) fn details(path: &ResourcePath) -> Value {
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

pub(super) fn forbidden(path: &ResourcePath, verb: &str) -> Reply {
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

pub(super) fn object_not_found(path: &ResourcePath) -> Reply {
    let message = format!(
        "{} \"{}\" not found",
        path.qualified_resource(),
        path.name.as_deref().unwrap_or_default()
    );
    status_reply(404, "NotFound", &message, details(path))
}

pub(super) fn expired_continue(start: String, page: usize) -> Reply {
    // Like the apiserver after a compaction: 410 plus a token that continues the list at the
    // latest resourceVersion (rv = -1).
    let token = ContinueToken {
        rv: -1,
        start,
        page,
        left: None,
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

pub(super) fn method_not_allowed() -> Reply {
    status_reply(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
        json!({}),
    )
}

pub(super) fn not_acceptable() -> Reply {
    status_reply(
        406,
        "NotAcceptable",
        "only the following media types are accepted: application/json, application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1, application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        json!({}),
    )
}
