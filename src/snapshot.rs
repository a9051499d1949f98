//! The data both sides of a sweep share: what the cluster looked like, as plain values.
//!
//! [`ClusterSnapshot`] is produced by the cluster side (`cluster::KubeCluster`, or a
//! `kubectl` dump) and consumed by the pure planner (`plan`). Keeping these types here, apart
//! from the module that talks to the API server, lets the decision depend on data only.

use chrono::{DateTime, Utc};

crate::label::labelled! {
    /// Which kind of object backs a session; its label is the one reports and metrics use.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub enum BackendKind {
        /// One bare Pod per session.
        Pod = "pod",
        /// One agent-sandbox `Sandbox` custom resource per session.
        AgentSandbox = "agent-sandbox",
        /// A row whose object is missing and whose name no single backend claims (both
        /// backends enabled without distinguishing `object_name_prefix`es). Never a listing of
        /// its own.
        Unknown = "unknown",
    }
}

impl BackendKind {
    /// The configuration section of the backend (`backends.<section>`).
    pub fn config_section(self) -> &'static str {
        match self {
            BackendKind::Pod => "pod",
            BackendKind::AgentSandbox => "agent_sandbox",
            BackendKind::Unknown => "unknown",
        }
    }
}

/// What the reconciler keeps about one object name (merged over namespaces).
///
/// Presence is by name, whatever the labels: an object that lost (or never had) the
/// backend's label still protects its row, exactly as a direct GET would find it. The label
/// selector only says which objects are the platform's (`managed`), for the untracked count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectFacts {
    /// `metadata.deletionTimestamp` is set: not absent yet.
    pub terminating: bool,
    /// A Sandbox paused on purpose (`spec.replicas: 0` or `spec.operatingMode: Suspended`).
    pub suspended: bool,
    /// Selected by the backend's label selector.
    pub managed: bool,
}

impl Default for ObjectFacts {
    /// A live, unpaused object of the platform's.
    fn default() -> Self {
        ObjectFacts {
            terminating: false,
            suspended: false,
            managed: true,
        }
    }
}

/// Maps keyed by object name. A sweep looks up every row's name (a million and more per
/// sweep): foldhash is several times cheaper than the standard SipHash on such short keys and
/// is still seeded per process.
pub type NameMap<V> = std::collections::HashMap<Box<str>, V, foldhash::fast::RandomState>;

/// All objects of one backend, by name.
#[derive(Debug, Clone)]
pub struct BackendView {
    pub kind: BackendKind,
    /// Rows with a missing object whose name starts with this are counted under this backend.
    pub name_prefix: String,
    /// Each object's facts and its slot: 0, 1, … in insertion order, so that a planner can
    /// mark objects in a plain vector instead of a second hash set. A view only grows (a
    /// listing or a copy of the cache), so the slots are exactly `0..len()`.
    objects: NameMap<(u32, ObjectFacts)>,
    /// Requests the listing took (pages, including a restarted listing).
    pub requests: u64,
}

impl BackendView {
    pub fn new(kind: BackendKind, name_prefix: &str) -> BackendView {
        BackendView {
            kind,
            name_prefix: name_prefix.to_string(),
            objects: NameMap::default(),
            requests: 0,
        }
    }

    /// Room for `n` more objects without rehashing.
    pub fn reserve(&mut self, n: usize) {
        self.objects.reserve(n);
    }

    /// Adds an object; a name seen in several namespaces is kept once.
    pub fn insert(&mut self, name: &str, facts: ObjectFacts) {
        match self.objects.get_mut(name) {
            Some((_, entry)) => {
                entry.terminating |= facts.terminating;
                entry.suspended |= facts.suspended;
                entry.managed |= facts.managed;
            }
            None => {
                let slot = self.objects.len() as u32;
                self.objects.insert(name.into(), (slot, facts));
            }
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.objects.contains_key(name)
    }

    /// The slot of the object named `name` (in `0..len()`), if present.
    pub fn slot_of(&self, name: &str) -> Option<usize> {
        self.objects.get(name).map(|(slot, _)| *slot as usize)
    }

    /// The slot and facts of the object named `name`, with one lookup.
    pub fn entry(&self, name: &str) -> Option<(usize, ObjectFacts)> {
        self.objects
            .get(name)
            .map(|(slot, facts)| (*slot as usize, *facts))
    }

    pub fn facts(&self, name: &str) -> Option<ObjectFacts> {
        self.objects.get(name).map(|(_, facts)| *facts)
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Objects that are terminating / deliberately suspended / managed.
    pub fn count(&self, pred: impl Fn(&ObjectFacts) -> bool) -> usize {
        self.objects.values().filter(|(_, f)| pred(f)).count()
    }

    /// Every object, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ObjectFacts)> {
        self.objects.iter().map(|(k, (_, v))| (&**k, v))
    }

    /// Every object's slot and facts.
    pub fn slots(&self) -> impl Iterator<Item = (usize, &ObjectFacts)> {
        self.objects.values().map(|(slot, v)| (*slot as usize, v))
    }
}

/// A complete view of every enabled backend.
#[derive(Debug, Clone)]
pub struct ClusterSnapshot {
    /// The database's clock (`now()`), read before the view was taken: the base of the
    /// grace-period cutoff, and the `listing_started_at` of the evidence. A time of the
    /// database's clock, never this host's.
    pub database_clock: DateTime<Utc>,
    pub backends: Vec<BackendView>,
    /// Where the view came from ("api" or the dump file's path).
    pub source: String,
    /// The cluster's identity (the `kube-system` Namespace's UID), when read from the API.
    pub cluster_uid: Option<String>,
}

impl ClusterSnapshot {
    pub fn new(database_clock: DateTime<Utc>) -> ClusterSnapshot {
        ClusterSnapshot {
            database_clock,
            backends: Vec::new(),
            source: "api".into(),
            cluster_uid: None,
        }
    }

    pub fn total_objects(&self) -> usize {
        self.backends.iter().map(BackendView::len).sum()
    }
}
