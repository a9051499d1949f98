//! The Kubernetes API as the reconciler used it: every request by verb and status, and the
//! objects whose fields could not be decoded (read as absent, counted once per object).

use prometheus::IntCounterVec;

use super::Registrar;
use crate::backends::Backends;
use crate::snapshot::BackendKind;

/// The API request metrics.
pub struct KubeMetrics {
    pub kube_requests_total: IntCounterVec,
    pub objects_undecodable_total: IntCounterVec,
}

impl KubeMetrics {
    /// Registers the API metrics; with the agent-sandbox backend enabled, its undecodable
    /// fields' series start at zero.
    pub(super) fn new(r: &mut Registrar, backends: &Backends) -> KubeMetrics {
        let m = KubeMetrics {
            kube_requests_total: r.int_counter_vec(
                "kube_requests_total",
                "Kubernetes API requests by verb and HTTP status (0: no answer).",
                &["verb", "code"],
            ),
            objects_undecodable_total: r.int_counter_vec(
                "objects_undecodable_total",
                "Objects with a field of the wrong type (e.g. a Sandbox's spec.replicas \"0\"), read as absent: the object is present and not paused. Each object and field once per process.",
                &["backend", "field"],
            ),
        };
        if backends.is_enabled(BackendKind::AgentSandbox) {
            for field in crate::cluster::lean::UNDECODABLE_FIELDS {
                m.objects_undecodable_total
                    .with_label_values(&[BackendKind::AgentSandbox.as_str(), field]);
            }
        }
        m
    }

    /// Counts one request (`code` 0: no answer).
    pub fn request(&self, verb: &'static str, code: u16) {
        self.kube_requests_total
            .with_label_values(&[verb, code.to_string().as_str()])
            .inc();
    }

    /// Counts one object whose `field` could not be decoded.
    pub fn undecodable(&self, backend: BackendKind, field: &str) {
        self.objects_undecodable_total
            .with_label_values(&[backend.as_str(), field])
            .inc();
    }
}
