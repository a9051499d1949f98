//! Lists: a consistent snapshot at one resourceVersion, paginated with `limit` and continue
//! tokens, filtered by selectors, encoded from the objects' cached encodings.

use hyper::body::Bytes;
use serde_json::{json, Value};

use super::negotiation::Representation;
use super::routing::param;
use super::selectors::{selectors_of, FieldSelector, LabelSelector};
use super::status::{bad_request, expired_continue, status_reply, Reply};
use super::store::{State, StoredObject};
use super::Kind;
use std::sync::Arc;

/// Answers a list request: which snapshot and where to start (a fresh listing or a continued
/// one), one page of it, encoded.
pub(super) fn list(
    state: &State,
    kind: Kind,
    api_version: &str,
    namespace: Option<&str>,
    params: &[(String, String)],
    representation: Representation,
) -> Reply {
    let mut query = match ListQuery::parse(params, kind) {
        Ok(q) => q,
        Err(reply) => return reply,
    };
    let start = match query.continue_token {
        Some(raw) => continued(state, &query, raw),
        None => fresh_revision(state, &query).map(|rv| (rv, String::new(), 0)),
    };
    let (rv, start, page_number) = match start {
        Ok(s) => s,
        Err(reply) => return reply,
    };
    // A consistent continuation knows how many keys follow its start (counted once, on the
    // first page), so a listing costs O(objects), not O(objects²/limit).
    query.known_left = query
        .continue_token
        .and_then(|raw| ContinueToken::decode(raw).ok())
        .filter(|token| token.rv != -1)
        .and_then(|token| token.left);
    let page = scan(state, kind, rv, namespace, api_version, &start, &query);
    encode(
        state,
        kind,
        api_version,
        representation,
        rv,
        page_number,
        page,
    )
}

/// A list request's parameters.
struct ListQuery<'a> {
    labels: LabelSelector,
    fields: FieldSelector,
    /// 0: no limit.
    limit: usize,
    resource_version: Option<&'a str>,
    version_match: Option<&'a str>,
    continue_token: Option<&'a str>,
    /// Keys from the continuation's start on, carried by its token.
    known_left: Option<usize>,
}

impl<'a> ListQuery<'a> {
    /// Parses the parameters; a malformed one is a 400 answer.
    fn parse(params: &'a [(String, String)], kind: Kind) -> Result<ListQuery<'a>, Reply> {
        let (labels, fields) = selectors_of(params, kind)?;
        let limit = match param(params, "limit").map(str::parse::<i64>) {
            None => 0,
            Some(Ok(n)) => n.max(0) as usize,
            Some(Err(_)) => return Err(bad_request("invalid value for limit: must be an integer")),
        };
        Ok(ListQuery {
            labels,
            fields,
            limit,
            resource_version: param(params, "resourceVersion").filter(|rv| !rv.is_empty()),
            version_match: param(params, "resourceVersionMatch").filter(|m| !m.is_empty()),
            continue_token: param(params, "continue").filter(|c| !c.is_empty()),
            known_left: None,
        })
    }
}

/// A continued listing reads the token's snapshot (or, for an inconsistent token, `-1`, the
/// current one) from just after the last key of the previous page: (revision, first key,
/// page number). A token older than the compaction is 410 `Expired`.
fn continued(state: &State, query: &ListQuery, raw: &str) -> Result<(u64, String, usize), Reply> {
    if query.resource_version.is_some_and(|rv| rv != "0") || query.version_match.is_some() {
        return Err(bad_request(
            "specifying resource version is not allowed when using continue",
        ));
    }
    let token = ContinueToken::decode(raw)
        .map_err(|e| bad_request(&format!("continue key is not valid: {e}")))?;
    if token.rv == -1 {
        Ok((state.rv, token.start, token.page))
    } else if token.rv <= 0 || token.rv as u64 > state.rv {
        Err(bad_request("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)"))
    } else if (token.rv as u64) < state.compacted_rv {
        Err(expired_continue(token.start, token.page))
    } else {
        Ok((token.rv as u64, token.start, token.page))
    }
}

/// The revision a fresh listing reads, from `resourceVersion` and `resourceVersionMatch` as
/// the apiserver reads them: unset, `0` or `NotOlderThan` read the current revision, `Exact`
/// reads that one (410 once compacted, 504 if it is in the future).
fn fresh_revision(state: &State, query: &ListQuery) -> Result<u64, Reply> {
    let invalid = |rv: &str| bad_request(&format!("invalid resource version: {rv}"));
    match (query.resource_version, query.version_match) {
        (None, Some(_)) => Err(bad_request(
            "resourceVersionMatch is forbidden unless resourceVersion is provided",
        )),
        (Some(rv), Some("Exact")) => match rv.parse::<u64>() {
            Ok(0) => Err(bad_request(
                "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"",
            )),
            Ok(n) if n < state.compacted_rv => Err(status_reply(
                410,
                "Expired",
                &format!("too old resource version: {n} ({})", state.compacted_rv),
                json!({}),
            )),
            Ok(n) if n > state.rv => Err(status_reply(
                504,
                "Timeout",
                &format!("Too large resource version: {n}, current: {}", state.rv),
                json!({}),
            )),
            Ok(n) => Ok(n),
            Err(_) => Err(invalid(rv)),
        },
        (Some(rv), Some("NotOlderThan") | None) => match rv.parse::<u64>() {
            Ok(_) => Ok(state.rv),
            Err(_) => Err(invalid(rv)),
        },
        (Some(_), Some(other)) => Err(bad_request(&format!(
            "resourceVersionMatch: Unsupported value: \"{other}\""
        ))),
        (None, None) => Ok(state.rv),
    }
}

/// One page of a listing.
struct Page<'a> {
    items: Vec<&'a Arc<StoredObject>>,
    /// The last key looked at (matching or not): the next page starts after it.
    last_key: Option<&'a str>,
    /// Keys after this page: the exact count when nothing is filtered, else 1 if any.
    remaining: usize,
    /// No selector: the apiserver then reports `remainingItemCount`.
    unfiltered: bool,
}

/// Scans like the apiserver's etcd store: in key order, from `start`, stops once `limit`
/// matching objects are collected; there is more if any key (matching or not) follows.
fn scan<'a>(
    state: &'a State,
    kind: Kind,
    rv: u64,
    namespace: Option<&'a str>,
    api_version: &'a str,
    start: &str,
    query: &ListQuery,
) -> Page<'a> {
    let mut scope = state.snapshot(kind, rv, namespace, api_version, start);
    let mut items = Vec::new();
    let mut last_key = None;
    let mut more = false;
    let mut scanned = 0;
    for (key, object) in scope.by_ref() {
        if query.limit > 0 && items.len() >= query.limit {
            more = true;
            break;
        }
        scanned += 1;
        last_key = Some(key);
        if query.labels.matches(&object.value) && query.fields.matches(&object.value) {
            items.push(object);
        }
    }
    // The apiserver only knows the count when nothing is filtered; count only then.
    let unfiltered = query.labels.is_empty() && query.fields.is_empty();
    let remaining = if more && unfiltered {
        match query.known_left {
            Some(left) if left > scanned => left - scanned,
            _ => 1 + scope.count(),
        }
    } else {
        usize::from(more)
    };
    Page {
        items,
        last_key,
        remaining,
        unfiltered,
    }
}

/// The list object: its own fields (with the continue token of the next page), then the
/// items' cached encodings copied in.
fn encode(
    state: &State,
    kind: Kind,
    api_version: &str,
    representation: Representation,
    rv: u64,
    page_number: usize,
    page: Page,
) -> Reply {
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if page.remaining > 0 {
        let token = ContinueToken {
            rv: rv as i64,
            start: format!("{}\u{0}", page.last_key.unwrap_or_default()),
            page: page_number + 1,
            left: page.unfiltered.then_some(page.remaining),
        };
        metadata["continue"] = json!(token.encode());
        if page.unfiltered {
            metadata["remainingItemCount"] = json!(page.remaining);
        }
    }
    let (list_kind, list_api_version) = match (representation, kind) {
        (Representation::PartialMetadata, _) => ("PartialObjectMetadataList", "meta.k8s.io/v1"),
        (Representation::Full, Kind::Pod) => ("PodList", "v1"),
        (Representation::Full, Kind::Namespace) => ("NamespaceList", "v1"),
        (Representation::Full, Kind::Sandbox) => ("SandboxList", api_version),
    };
    let head = json!({
        "kind": list_kind,
        "apiVersion": list_api_version,
        "metadata": metadata
    })
    .to_string();
    let encoded: Vec<Bytes> = page
        .items
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

// ---------------------------------------------------------------------------------------------
// Continue tokens: base64url(JSON), like the apiserver's {"v","rv","start"} plus the page.

pub(super) struct ContinueToken {
    /// Snapshot resourceVersion; -1 = continue at the latest one.
    pub(super) rv: i64,
    /// Key to start at (inclusive), "namespace/name\0" = just after that object.
    pub(super) start: String,
    /// 0-based page number of the page this token fetches.
    pub(super) page: usize,
    /// Keys from `start` on in the token's snapshot, when the listing is unfiltered (the
    /// apiserver's `remainingItemCount` of the previous page); not part of a real token.
    pub(super) left: Option<usize>,
}

impl ContinueToken {
    pub(super) fn encode(&self) -> String {
        let mut json =
            json!({ "v": "meta.k8s.io/v1", "rv": self.rv, "start": self.start, "page": self.page });
        if let Some(left) = self.left {
            json["left"] = json!(left);
        }
        base64url_encode(json.to_string().as_bytes())
    }

    pub(super) fn decode(raw: &str) -> Result<ContinueToken, String> {
        let bytes = base64url_decode(raw).ok_or("illegal base64 data")?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if value["v"] != "meta.k8s.io/v1" {
            return Err("server does not recognize this encoded version".to_string());
        }
        Ok(ContinueToken {
            rv: value["rv"].as_i64().ok_or("missing rv")?,
            start: value["start"].as_str().ok_or("missing start")?.to_string(),
            page: value["page"].as_u64().unwrap_or(1) as usize,
            left: value["left"].as_u64().map(|n| n as usize),
        })
    }
}

pub(super) const BASE64URL: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

pub(super) fn base64url_encode(input: &[u8]) -> String {
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

pub(super) fn base64url_decode(input: &str) -> Option<Vec<u8>> {
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
