//! Watch: the event history, and one stream per watch request (initial events, replay from a
//! resourceVersion, bookmarks, 410 for a too-old revision, faults that break it).

use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Bytes, Frame};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::negotiation::Representation;
use super::routing::param;
use super::selectors::{selectors_of, FieldSelector, LabelSelector};
use super::status::{bad_request, Reply, ReplyBody};
use super::store::{api_version_of, lock, State, StoredObject};
use super::{FakeApiServer, Kind, INITIAL_EVENTS_END};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    Added,
    Modified,
    Deleted,
}

/// One change in the watch history.
pub(super) struct HistoryEvent {
    pub(super) rv: u64,
    pub(super) kind: Kind,
    pub(super) change: Change,
    /// The new state; for a deletion, the last state at the deletion's resourceVersion.
    pub(super) object: Arc<StoredObject>,
    /// The state before a modification (selectors decide ADDED/MODIFIED/DELETED from both).
    pub(super) previous: Option<Arc<StoredObject>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WatchStart {
    /// Synthetic `ADDED` events for the current objects first (`resourceVersion` unset or
    /// `0`, or `sendInitialEvents=true`, which ends them with a bookmark when `end_bookmark`).
    Current { end_bookmark: bool },
    /// Every event after this resourceVersion.
    After(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WatchFault {
    None,
    CloseAfter(usize),
    Expire,
    Malformed,
    WrongKind,
    ItemWithoutName,
    /// No events; bookmarks keep coming, all at the revision the watch started from.
    Freeze,
}

/// What one watch request asked for.
pub(super) struct WatchSpec {
    pub(super) kind: Kind,
    pub(super) api_version: String,
    pub(super) namespace: Option<String>,
    pub(super) labels: LabelSelector,
    pub(super) fields: FieldSelector,
    pub(super) representation: Representation,
    pub(super) start: WatchStart,
    pub(super) bookmarks: bool,
    pub(super) timeout: Option<Duration>,
    pub(super) fault: WatchFault,
}

impl WatchSpec {
    pub(super) fn selects(&self, object: &Value) -> bool {
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
    pub(super) fn event_type(&self, event: &HistoryEvent) -> Option<&'static str> {
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

    pub(super) fn event_line(
        &self,
        event_type: &str,
        object: &StoredObject,
        encodings: &AtomicU64,
    ) -> Bytes {
        let encoded = object.encoded(self.representation, self.kind, false, encodings);
        let mut line = Vec::with_capacity(encoded.len() + 32);
        line.extend_from_slice(b"{\"type\":\"");
        line.extend_from_slice(event_type.as_bytes());
        line.extend_from_slice(b"\",\"object\":");
        line.extend_from_slice(&encoded);
        line.extend_from_slice(b"}\n");
        Bytes::from(line)
    }

    pub(super) fn bookmark_line(&self, rv: u64, initial_events_end: bool) -> Bytes {
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

pub(super) fn json_line(value: &Value) -> Bytes {
    let mut line = value.to_string().into_bytes();
    line.push(b'\n');
    Bytes::from(line)
}

/// The `ERROR` event of a watch from a resourceVersion older than the history.
pub(super) fn expired_line(from: u64, oldest: u64) -> Bytes {
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
pub(super) fn watch_request(
    kind: Kind,
    api_version: &str,
    namespace: Option<&str>,
    params: &[(String, String)],
    representation: Representation,
) -> Reply {
    let (labels, fields) = match selectors_of(params, kind) {
        Ok(s) => s,
        Err(reply) => return reply,
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
pub(super) enum WatchChunk {
    Data(Bytes),
    /// Drop the connection once every chunk before this one is written.
    Abort,
}

/// The body of a watch response, fed by a [`WatchTask`] (aborted when the body goes).
pub(super) struct WatchBody {
    pub(super) chunks: mpsc::Receiver<WatchChunk>,
    pub(super) producer: JoinHandle<()>,
    pub(super) kill: Arc<Notify>,
    pub(super) aborted: bool,
}

impl WatchBody {
    pub(super) fn poll_frame(
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
pub(super) struct OpenWatch(pub(super) Arc<Mutex<State>>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        let mut state = lock(&self.0);
        state.open_watches = state.open_watches.saturating_sub(1);
    }
}

pub(super) fn start_watch(
    shared: &Arc<Mutex<State>>,
    kill: &Arc<Notify>,
    spec: WatchSpec,
) -> WatchBody {
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
pub(super) struct WatchCursor {
    /// Every event up to here was considered; `None` before the initial events.
    pub(super) sent_rv: Option<u64>,
    pub(super) object_events: usize,
    pub(super) bookmark_requests: u64,
    pub(super) drop_generation: u64,
    pub(super) last_bookmark: Instant,
    /// The server's resourceVersion when the watch started.
    pub(super) current_rv: u64,
}

/// One watch stream's producer.
pub(super) struct WatchTask {
    pub(super) shared: Arc<Mutex<State>>,
    pub(super) kill: Arc<Notify>,
    pub(super) spec: WatchSpec,
    pub(super) sender: mpsc::Sender<WatchChunk>,
    pub(super) changes: tokio::sync::watch::Receiver<()>,
    pub(super) cursor: WatchCursor,
    pub(super) _open: OpenWatch,
}

pub(super) enum WatchEnd {
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
    pub(super) fn watch_batch(
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
    pub(super) async fn run(mut self) {
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
            WatchFault::Freeze => return self.frozen(deadline).await,
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

    /// A frozen watch ([`FaultAction::FreezeWatch`](super::FaultAction::FreezeWatch)): no
    /// event at all, but bookmarks as usual (periodic, requested, before the timeout), each at
    /// the revision the watch started from; ends at the timeout, breaks on `drop_watches`.
    async fn frozen(mut self, deadline: Option<Instant>) {
        let rv = self.cursor.sent_rv.unwrap_or(self.cursor.current_rv);
        loop {
            self.changes.borrow_and_update();
            let (interval, requested, dropped) = {
                let state = lock(&self.shared);
                let requested = state.bookmark_requests != self.cursor.bookmark_requests;
                self.cursor.bookmark_requests = state.bookmark_requests;
                (
                    state.bookmark_interval,
                    requested,
                    state.drop_generation != self.cursor.drop_generation,
                )
            };
            if dropped {
                self.kill.notify_one();
                return std::future::pending().await;
            }
            let now = Instant::now();
            let timed_out = deadline.is_some_and(|d| now >= d);
            let due = interval.is_some_and(|i| now >= self.cursor.last_bookmark + i);
            if self.spec.bookmarks && (requested || due || (timed_out && interval.is_some())) {
                if self.send(self.spec.bookmark_line(rv, false)).await.is_err() {
                    return;
                }
                self.cursor.last_bookmark = now;
            }
            if timed_out {
                return;
            }
            let next = interval
                .filter(|_| self.spec.bookmarks)
                .map(|i| self.cursor.last_bookmark + i);
            let wake = match (next, deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
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

    pub(super) async fn send(&self, line: Bytes) -> Result<(), mpsc::error::SendError<WatchChunk>> {
        self.sender.send(WatchChunk::Data(line)).await
    }

    /// Breaks the stream once what was sent is written; keeps the sender until then.
    pub(super) async fn abort(self) {
        if self.sender.send(WatchChunk::Abort).await.is_ok() {
            std::future::pending::<()>().await;
        }
    }
}

/// A watch event line without `object.metadata.name`.
pub(super) fn without_name(line: &Bytes) -> Bytes {
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

pub(super) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl FakeApiServer {
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
}
