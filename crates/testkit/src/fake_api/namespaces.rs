//! Namespaces: cluster-scoped objects, created on demand for the objects put into them;
//! `kube-system`'s UID is the cluster's identity.

use serde_json::{json, Value};

use super::store::{now_timestamp, State};
use super::{FakeApiServer, Kind};

impl FakeApiServer {
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
}

impl State {
    /// Creates the Namespace `name` (Active) unless it exists; returns whether it did.
    pub(super) fn ensure_namespace(&mut self, name: &str) -> bool {
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
}

/// Fills in what the apiserver sets on every Namespace: the `kubernetes.io/metadata.name`
/// label, and `spec.finalizers: [kubernetes]` and `status.phase: Active` unless present.
pub(super) fn complete_namespace(object: &mut Value, name: &str) {
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
