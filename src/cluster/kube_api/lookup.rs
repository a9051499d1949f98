//! The GETs that prove an object absent ([`KubeCluster::prove_absent_by_get`], rule 2(a))
//! and `explain`'s lookups ([`KubeCluster::lookup`]): absent only on a 404 whose Status
//! names the object ([`names_this_object`]).

use kube::api::ListParams;
use kube::Api;

use super::request::Timing;
use super::{Absence, KubeCluster, LookupAnswer, ObjectLookup};
use crate::cluster::lean;
use crate::cluster::{BackendKind, ClusterError};

impl KubeCluster {
    /// Proves that the backend the row is attributed to has no object named `name`, by a
    /// direct GET in each namespace (or, when listing all namespaces, a list selected by
    /// `metadata.name`); a row of no single backend (`Unknown`) is asked of every enabled
    /// backend. Only a 404 whose Status names the object counts as absent
    /// ([`names_this_object`]); any other answer is an error and the row is left alone.
    ///
    /// One GET per orphan, not one per backend: a backend's distinguishing
    /// `object_name_prefix` says the name is not the other backend's object (an agent-sandbox
    /// Sandbox's pod shares its name, but the Sandbox is what backs the session). The sweep
    /// only asks about names its view found in no backend at all.
    pub async fn prove_absent_by_get(
        &self,
        name: &str,
        backend: BackendKind,
    ) -> Result<Absence, ClusterError> {
        let mut evidence = Vec::new();
        let pods = self.pod && backend != BackendKind::AgentSandbox;
        let sandboxes = self
            .sandbox
            .as_ref()
            .filter(|_| backend != BackendKind::Pod);
        for ns in self.scopes() {
            if pods {
                let api = self.pod_api(ns);
                let seen = self.probe(&api, &ResourceId::PODS, ns, name).await?;
                match seen {
                    Some(e) => return Ok(Absence::Present { evidence: e }),
                    None => evidence.push(probe_text("pods", ns, name)),
                }
            }
            if let Some(sb) = sandboxes {
                let api = self.sandbox_api(sb, ns);
                let id = ResourceId {
                    group: &sb.resource.group,
                    plural: &sb.resource.plural,
                    kind: &sb.resource.kind,
                };
                let seen = self.probe(&api, &id, ns, name).await?;
                match seen {
                    Some(e) => return Ok(Absence::Present { evidence: e }),
                    None => evidence.push(probe_text(&sb.resource.plural, ns, name)),
                }
            }
        }
        Ok(Absence::Absent {
            evidence: evidence.join("; "),
        })
    }

    /// Looks the object named `name` up in every enabled backend and namespace, each with its
    /// own request (a GET, or across all namespaces a LIST selected by `metadata.name`), and
    /// returns every answer, errors included: `explain`'s evidence of rule 2(a). Only reads.
    pub async fn lookup(&self, name: &str) -> Vec<ObjectLookup> {
        let mut out = Vec::new();
        for ns in self.scopes() {
            let verb = if ns.is_some() { "get" } else { "list" };
            let by_name = ListParams::default().fields(&format!("metadata.name={name}"));
            if self.pod {
                let api = self.pod_api(ns);
                let answer = self
                    .lookup_one("pods", ns, name, verb, || async {
                        match ns {
                            Some(_) => match api.get_metadata(name).await {
                                Ok(o) => Ok(Some((o.metadata, false))),
                                Err(kube::Error::Api(status))
                                    if names_this_object(&status, name, &ResourceId::PODS) =>
                                {
                                    Ok(None)
                                }
                                Err(e) => Err(e),
                            },
                            None => {
                                let list = api.list_metadata(&by_name).await?;
                                Ok(list.items.into_iter().next().map(|m| (m.metadata, false)))
                            }
                        }
                    })
                    .await;
                out.push(ObjectLookup {
                    backend: BackendKind::Pod,
                    namespace: ns.map(str::to_string),
                    request: request_text(verb, "pods", ns, name),
                    answer,
                });
            }
            if let Some(sb) = &self.sandbox {
                let api = self.sandbox_api(sb, ns);
                let plural = sb.resource.plural.clone();
                let id = ResourceId {
                    group: &sb.resource.group,
                    plural: &sb.resource.plural,
                    kind: &sb.resource.kind,
                };
                let answer = self
                    .lookup_one(&plural, ns, name, verb, || async {
                        let found = match ns {
                            // Absence decided as the confirming GET decides it.
                            Some(_) => match api.get(name).await {
                                Ok(o) => Some(o),
                                Err(kube::Error::Api(status))
                                    if names_this_object(&status, name, &id) =>
                                {
                                    None
                                }
                                Err(e) => return Err(e),
                            },
                            None => api.list(&by_name).await?.items.into_iter().next(),
                        };
                        Ok(found.map(|o| {
                            let paused = lean::sandbox_is_suspended(&o.data);
                            (o.metadata, paused)
                        }))
                    })
                    .await;
                out.push(ObjectLookup {
                    backend: BackendKind::AgentSandbox,
                    namespace: ns.map(str::to_string),
                    request: request_text(verb, &plural, ns, name),
                    answer,
                });
            }
        }
        out
    }

    /// One request of [`KubeCluster::lookup`], with the retry policy and the deadline.
    async fn lookup_one<Fut>(
        &self,
        resource: &str,
        ns: Option<&str>,
        name: &str,
        verb: &'static str,
        attempt: impl Fn() -> Fut,
    ) -> LookupAnswer
    where
        Fut: std::future::Future<
            Output = kube::Result<
                Option<(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
                    bool,
                )>,
            >,
        >,
    {
        let what = format!(
            "looking up {resource} {}{name}",
            ns.map(|n| format!("{n}/")).unwrap_or_default()
        );
        let counted_as = |found: &Option<_>| absence_code(found.is_none(), ns);
        let answer = self
            .request(verb, &what, resource, Timing::Deadline, attempt, counted_as)
            .await;
        match answer {
            Err(err) => LookupAnswer::Error {
                message: err.to_string(),
            },
            Ok(None) => LookupAnswer::Absent,
            Ok(Some((meta, paused))) => LookupAnswer::Found {
                namespace: meta.namespace.or(ns.map(str::to_string)),
                terminating: meta.deletion_timestamp.is_some(),
                paused,
            },
        }
    }

    /// One probe: `Some(evidence)` when the object exists, `None` on a definitive absence:
    /// a 404 whose Status names this object ([`names_this_object`]), or, across all
    /// namespaces, a complete name-selected list without items. Any other answer is an error,
    /// a 404 for a path the server does not serve included ([`ClusterError::NotServed`]).
    async fn probe<K>(
        &self,
        api: &Api<K>,
        resource: &ResourceId<'_>,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Option<String>, ClusterError>
    where
        K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let what = format!(
            "confirming {} {}{name}",
            resource.plural,
            ns.map(|n| format!("{n}/")).unwrap_or_default()
        );
        let verb = if ns.is_some() { "get" } else { "list" };
        let request = || async {
            match ns {
                Some(_) => match api.get_metadata(name).await {
                    Ok(object) => Ok(Some(object.metadata)),
                    // Decided here, not by kube's `is_not_found`: only the Status naming
                    // this very object is its absence.
                    Err(kube::Error::Api(status)) if names_this_object(&status, name, resource) => {
                        Ok(None)
                    }
                    Err(e) => Err(e),
                },
                // No namespace to GET in: list by name across all namespaces instead.
                None => {
                    let lp = ListParams::default().fields(&format!("metadata.name={name}"));
                    let list = api.list_metadata(&lp).await?;
                    Ok(list.items.into_iter().next().map(|m| m.metadata))
                }
            }
        };
        let counted_as = |found: &Option<_>| absence_code(found.is_none(), ns);
        let qualified = resource.qualified();
        let found = self
            .request(
                verb,
                &what,
                &qualified,
                Timing::Deadline,
                request,
                counted_as,
            )
            .await?;
        Ok(found.map(|meta| {
            format!(
                "{} {}/{name} exists{}",
                resource.plural,
                meta.namespace.as_deref().or(ns).unwrap_or("?"),
                terminating_note(&meta)
            )
        }))
    }
}

/// The code a definitive absence is counted as: a GET's 404, or a name-selected list's 200.
fn absence_code(absent: bool, ns: Option<&str>) -> u16 {
    if absent && ns.is_some() {
        404
    } else {
        200
    }
}

/// A resource as the API server names it in a `NotFound` Status' details.
#[derive(Debug, Clone, Copy)]
struct ResourceId<'a> {
    group: &'a str,
    plural: &'a str,
    kind: &'a str,
}

impl ResourceId<'_> {
    const PODS: ResourceId<'static> = ResourceId {
        group: "",
        plural: "pods",
        kind: "Pod",
    };

    /// "pods", or "sandboxes.agents.x-k8s.io".
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// Rule 2(a): whether a 404 says that this very object does not exist. The API server answers
/// a missing object with a `NotFound` Status whose details name it: `details.name` is the
/// name, `details.kind` the resource's plural (`pods "x" not found`; some servers write the
/// kind) and `details.group` its group. A path it does not serve answers 404 too, naming no
/// object: a Status `the server could not find the requested resource` with empty details
/// (a resource its group/version lacks), or a plain-text `404 page not found` from its mux
/// (a group/version nobody serves: a CRD not installed, a wrong version, a proxy). Those say
/// nothing about the object and are errors, whatever a client library makes of them.
fn names_this_object(status: &kube::core::Status, name: &str, resource: &ResourceId<'_>) -> bool {
    status.code == 404
        && status.reason == "NotFound"
        && status.details.as_ref().is_some_and(|d| {
            d.name == name
                && (d.kind == resource.plural || d.kind == resource.kind)
                && d.group == resource.group
        })
}

fn terminating_note(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> &'static str {
    if meta.deletion_timestamp.is_some() {
        " (terminating)"
    } else {
        ""
    }
}

/// The request a lookup made, as an operator would type it.
fn request_text(verb: &str, resource: &str, ns: Option<&str>, name: &str) -> String {
    match ns {
        Some(ns) => format!("{} {resource} {ns}/{name}", verb.to_uppercase()),
        None => format!(
            "{} {resource} --all-namespaces metadata.name={name}",
            verb.to_uppercase()
        ),
    }
}

fn probe_text(resource: &str, ns: Option<&str>, name: &str) -> String {
    match ns {
        Some(ns) => format!("GET {resource} {ns}/{name}: 404"),
        None => format!("LIST {resource} metadata.name={name}: 0 items"),
    }
}
