//! The object store: every revision of every object under one resourceVersion counter, like
//! etcd's; the server's whole state behind one lock; and the control methods that change
//! objects.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use hyper::body::Bytes;
use serde_json::{json, Map, Value};

use super::faults::FaultRule;
use super::namespaces::complete_namespace;
use super::negotiation::{render_object, Representation};
use super::watch::{Change, HistoryEvent};
use super::{
    FakeApiServer, Kind, RecordedRequest, DEFAULT_BOOKMARK_INTERVAL, DEFAULT_WATCH_HISTORY,
    SANDBOX_GROUP,
};

pub(super) struct Revision {
    pub(super) rv: u64,
    /// `None` = deleted at `rv`.
    pub(super) object: Option<Arc<StoredObject>>,
}

/// One revision of an object, with its JSON encodings made on first use (a revision never
/// changes, so they never go stale).
pub(super) struct StoredObject {
    pub(super) value: Value,
    /// As a GET, a custom resource's list item or a watch event's object.
    pub(super) full: OnceLock<Bytes>,
    /// As a built-in kind's list item (no `apiVersion`/`kind`).
    pub(super) item: OnceLock<Bytes>,
    /// As a `PartialObjectMetadata`.
    pub(super) partial: OnceLock<Bytes>,
}

impl StoredObject {
    pub(super) fn new(value: Value) -> Arc<StoredObject> {
        Arc::new(StoredObject {
            value,
            full: OnceLock::new(),
            item: OnceLock::new(),
            partial: OnceLock::new(),
        })
    }

    /// The object's JSON in `representation`, encoded once.
    pub(super) fn encoded(
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

pub(super) struct State {
    pub(super) addr: SocketAddr,
    /// Global resourceVersion counter, bumped on each mutation.
    pub(super) rv: u64,
    /// Continue tokens older than this are expired.
    pub(super) compacted_rv: u64,
    /// Every revision of every object, keyed like etcd: (kind, "namespace/name").
    pub(super) objects: BTreeMap<(Kind, String), Vec<Revision>>,
    pub(super) sandbox_versions: BTreeSet<String>,
    pub(super) sandbox_api_disabled: bool,
    /// UID of the `kube-system` Namespace: the cluster's identity.
    pub(super) cluster_uid: String,
    pub(super) denied: Vec<(String, String, String)>,
    pub(super) faults: Vec<FaultRule>,
    pub(super) requests: Vec<RecordedRequest>,
    /// Watch events, one per revision since `history_floor`, oldest first.
    pub(super) history: VecDeque<HistoryEvent>,
    /// Every event after this revision is in `history`: the oldest a watch can start from.
    pub(super) history_floor: u64,
    pub(super) history_limit: usize,
    /// `None`: no periodic bookmarks and none before a watch's timeout.
    pub(super) bookmark_interval: Option<Duration>,
    /// Bumped by `send_bookmarks`.
    pub(super) bookmark_requests: u64,
    /// Bumped by `drop_watches`.
    pub(super) drop_generation: u64,
    pub(super) open_watches: usize,
    /// Wakes every open watch after anything it may care about changed.
    pub(super) changes: tokio::sync::watch::Sender<()>,
    /// Object encodings made (see [`StoredObject::encoded`]).
    pub(super) encodings: AtomicU64,
}

impl State {
    pub(super) fn new(addr: SocketAddr) -> State {
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

    /// Stores `object` (metadata.name and namespace already set) as a new revision: a new
    /// object gets a uid, creationTimestamp (and generation 1 for sandboxes); a replaced one
    /// keeps them (and a sandbox's generation moves on if its spec changed).
    pub(super) fn upsert(&mut self, kind: Kind, namespace: &str, name: &str, mut object: Value) {
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

    pub(super) fn current(&self, kind: Kind, key: &str) -> Option<&Value> {
        self.current_stored(kind, key).map(|o| &o.value)
    }

    pub(super) fn current_stored(&self, kind: Kind, key: &str) -> Option<&Arc<StoredObject>> {
        self.objects
            .get(&(kind, key.to_string()))
            .and_then(|revs| revs.last())
            .and_then(|rev| rev.object.as_ref())
    }

    /// Stores a new revision of one object (`None` = deleted) and records its watch event.
    pub(super) fn write(&mut self, kind: Kind, key: &str, object: Option<Value>) {
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

    pub(super) fn trim_history(&mut self) {
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
    pub(super) fn changed(&self) {
        self.changes.send_replace(());
    }

    /// Objects of `kind` as they were at `rv`, in key order from `start` (inclusive),
    /// restricted to `namespace` and (for sandboxes) `api_version`. Lazy, so a page reads only
    /// as far as it needs: the store is ordered like etcd's keys.
    pub(super) fn snapshot<'a>(
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

    pub(super) fn is_denied(&self, verb: &str, group: &str, resource: &str) -> bool {
        let hit = |rule: &str, actual: &str| rule == "*" || rule == actual;
        self.denied
            .iter()
            .any(|(v, g, r)| hit(v, verb) && hit(g, group) && hit(r, resource))
    }

    pub(super) fn sandbox_version_served(&self, version: &str) -> bool {
        !self.sandbox_api_disabled && self.sandbox_versions.contains(version)
    }

    /// Whether a group/version is served at all (`""` is the core group).
    pub(super) fn serves_group_version(&self, group: &str, version: &str) -> bool {
        match group {
            "" | "authorization.k8s.io" => version == "v1",
            SANDBOX_GROUP => self.sandbox_version_served(version),
            _ => false,
        }
    }
}

pub(super) fn lock(shared: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking test thread must not take every other request down with it.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FakeApiServer {
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

    /// How many times an object revision has been encoded to JSON (each revision is encoded
    /// at most once per representation: full, list item, metadata-only).
    pub fn object_encodings(&self) -> u64 {
        self.state().encodings.load(Ordering::Relaxed)
    }

    /// The server's current resourceVersion (bumped by every mutation).
    pub fn resource_version(&self) -> u64 {
        self.state().rv
    }
}

pub(super) fn object_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

pub(super) fn key_namespace(key: &str) -> &str {
    key.split_once('/').map(|(ns, _)| ns).unwrap_or(key)
}

pub(super) fn api_version_of(object: &Value) -> &str {
    object["apiVersion"].as_str().unwrap_or_default()
}

pub(super) fn labels_json(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect(),
    )
}

pub(super) fn is_empty_map(v: &Value) -> bool {
    v.as_object().is_some_and(Map::is_empty) || v.is_null()
}

pub(super) fn now_timestamp() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub(super) fn new_uid() -> String {
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
