//! The backends, decided once from `[backends]`: which are enabled, and for each its API
//! resource, label selector and name prefix. The listing and the watch cache list what
//! [`Backends::enabled`] names, the dump reader keeps the objects it recognises, `check` asks
//! the API server to serve each, the metrics pre-create its label values and the permissions
//! list grants its verbs; none of them decides again which backends exist.

use crate::config::BackendSettings;
use crate::selector::LabelSelector;
use crate::snapshot::BackendKind;

/// One backend's resource and how its objects are selected and attributed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub kind: BackendKind,
    /// The API group: empty for the core group (pods).
    pub group: String,
    pub version: String,
    pub plural: String,
    /// The object kind: "Pod", or `backends.agent_sandbox.kind`.
    pub object_kind: String,
    /// Which listed objects are the platform's (presence is by name regardless).
    pub selector: LabelSelector,
    /// `object_name_prefix`: the names a missing object is attributed to this backend by.
    pub prefix: String,
}

impl Backend {
    fn pod(s: &BackendSettings) -> Backend {
        Backend {
            kind: BackendKind::Pod,
            group: String::new(),
            version: "v1".into(),
            plural: "pods".into(),
            object_kind: "Pod".into(),
            selector: s.pod.label_selector.clone(),
            prefix: s.pod.object_name_prefix.clone(),
        }
    }

    fn agent_sandbox(s: &BackendSettings) -> Backend {
        let a = &s.agent_sandbox;
        Backend {
            kind: BackendKind::AgentSandbox,
            group: a.group.clone(),
            version: a.version.clone(),
            plural: a.plural.clone(),
            object_kind: a.kind.clone(),
            selector: a.label_selector.clone(),
            prefix: a.object_name_prefix.clone(),
        }
    }

    /// The resource as RBAC and messages name it: "pods", "sandboxes.agents.x-k8s.io".
    pub fn resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The resource with its version: "pods", "sandboxes.agents.x-k8s.io/v1alpha1".
    pub fn versioned_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}/{}", self.resource(), self.version)
        }
    }

    /// `apiVersion` of its objects: "v1", "agents.x-k8s.io/v1alpha1".
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The path its resources are served under: "/api/v1", "/apis/{group}/{version}".
    pub fn base_path(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }

    /// Whether an object of `kind` and `api_version` (as a dump shows it) is this backend's:
    /// pods of `v1` exactly; Sandboxes of the configured kind in any version of the group.
    pub fn recognises(&self, kind: &str, api_version: &str) -> bool {
        kind == self.object_kind
            && if self.group.is_empty() {
                api_version == self.version
            } else {
                api_version
                    .strip_prefix(self.group.as_str())
                    .is_some_and(|v| v.starts_with('/'))
            }
    }
}

/// The backends of one configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backends {
    enabled: Vec<Backend>,
    /// The agent-sandbox resource, enabled or not: with bare pods alone the listing probes it,
    /// because a paused Sandbox keeps no pod.
    sandbox_api: Backend,
}

impl Backends {
    /// The enabled backends of `[backends]`, bare pods first.
    pub fn from_settings(s: &BackendSettings) -> Backends {
        let mut enabled = Vec::new();
        if s.pod.enabled {
            enabled.push(Backend::pod(s));
        }
        if s.agent_sandbox.enabled {
            enabled.push(Backend::agent_sandbox(s));
        }
        Backends {
            enabled,
            sandbox_api: Backend::agent_sandbox(s),
        }
    }

    /// Every backend as if enabled (manifests that serve any profile grant this).
    pub fn all(s: &BackendSettings) -> Backends {
        Backends {
            enabled: vec![Backend::pod(s), Backend::agent_sandbox(s)],
            sandbox_api: Backend::agent_sandbox(s),
        }
    }

    /// Only the backend of `kind`, if enabled (to check one at a time).
    pub fn only(&self, kind: BackendKind) -> Backends {
        Backends {
            enabled: self.get(kind).cloned().into_iter().collect(),
            sandbox_api: self.sandbox_api.clone(),
        }
    }

    pub fn enabled(&self) -> &[Backend] {
        &self.enabled
    }

    pub fn get(&self, kind: BackendKind) -> Option<&Backend> {
        self.enabled.iter().find(|b| b.kind == kind)
    }

    pub fn is_enabled(&self, kind: BackendKind) -> bool {
        self.get(kind).is_some()
    }

    /// The Sandbox resource probed (`LIST ?limit=1`) when bare pods are enabled and the
    /// agent-sandbox backend is not.
    pub fn sandbox_probe(&self) -> Option<&Backend> {
        (self.is_enabled(BackendKind::Pod) && !self.is_enabled(BackendKind::AgentSandbox))
            .then_some(&self.sandbox_api)
    }

    /// The backends a row whose object is missing can be counted under: every enabled one,
    /// and `unknown` when two are enabled (a name either could have).
    pub fn attributions(&self) -> Vec<BackendKind> {
        let mut kinds: Vec<BackendKind> = self.enabled.iter().map(|b| b.kind).collect();
        if self.enabled.len() > 1 {
            kinds.push(BackendKind::Unknown);
        }
        kinds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn settings(pod: bool, sandbox: bool) -> BackendSettings {
        let mut s = Settings::default().backends;
        s.pod.enabled = pod;
        s.agent_sandbox.enabled = sandbox;
        s
    }

    #[test]
    fn bare_pods_list_pods_and_probe_sandboxes() {
        let b = Backends::from_settings(&settings(true, false));
        assert_eq!(b.attributions(), vec![BackendKind::Pod]);
        assert_eq!(b.enabled()[0].base_path(), "/api/v1");
        assert_eq!(b.enabled()[0].resource(), "pods");
        assert_eq!(
            b.sandbox_probe().map(Backend::resource).as_deref(),
            Some("sandboxes.agents.x-k8s.io")
        );
    }

    #[test]
    fn both_backends_attribute_to_unknown_too_and_probe_nothing() {
        let b = Backends::from_settings(&settings(true, true));
        assert_eq!(
            b.attributions(),
            vec![
                BackendKind::Pod,
                BackendKind::AgentSandbox,
                BackendKind::Unknown
            ]
        );
        assert!(b.sandbox_probe().is_none());
        let sandbox = b.get(BackendKind::AgentSandbox).unwrap();
        assert_eq!(sandbox.base_path(), "/apis/agents.x-k8s.io/v1alpha1");
        assert_eq!(
            sandbox.versioned_resource(),
            "sandboxes.agents.x-k8s.io/v1alpha1"
        );
        assert_eq!(b.only(BackendKind::Pod).enabled().len(), 1);
    }

    #[test]
    fn a_dump_object_is_recognised_by_kind_and_api_version() {
        let b = Backends::all(&settings(false, false));
        let (pod, sandbox) = (&b.enabled()[0], &b.enabled()[1]);
        assert!(pod.recognises("Pod", "v1"));
        assert!(!pod.recognises("Pod", "v2"));
        assert!(sandbox.recognises("Sandbox", "agents.x-k8s.io/v1beta1"));
        assert!(!sandbox.recognises("Sandbox", "agents.x-k8s.io.evil/v1"));
        assert!(!sandbox.recognises("Pod", "agents.x-k8s.io/v1alpha1"));
    }
}
