//! `sandbox-reconciler check`: a preflight an operator runs before trusting a deployment.
//!
//! Loads the configuration, connects to PostgreSQL, resolves the session table through the
//! catalog (its canonical name, that every mapped column exists with a usable type, that the
//! key (+ scope) is unique, that a naive timestamp has a zone, that no transaction pooler sits
//! in between) and that the reconciler may read and update it; then reads the cluster's
//! identity, checks that each configured namespace exists and that the API server serves each
//! enabled backend's resource, and asks the API server (SelfSubjectAccessReview) for exactly
//! the permissions the binary declares for the mode (`crate::permissions`: get, list and, for
//! the daemon, watch on each backend's resource in each namespace; get on those Namespaces and
//! kube-system). Prints a pass/warn/fail table; warnings (such as both backends enabled
//! without name prefixes) do not fail it.

use std::fmt::Write;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};

use crate::backends::Backends;
use crate::config::Settings;
use crate::permissions::Mode;
use crate::store::{self, Database, TableMapping};

/// One line of the preflight table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckLine {
    pub check: String,
    pub ok: bool,
    /// Passed, but deserves attention.
    pub warning: bool,
    pub detail: String,
}

fn line(check: impl Into<String>, ok: bool, detail: impl Into<String>) -> CheckLine {
    CheckLine {
        check: check.into(),
        ok,
        warning: false,
        detail: detail.into(),
    }
}

fn warn(check: impl Into<String>, detail: impl Into<String>) -> CheckLine {
    CheckLine {
        warning: true,
        ..line(check, true, detail)
    }
}

/// Configuration that is valid but probably not what was meant.
fn configuration_warnings(settings: &Settings) -> Vec<CheckLine> {
    let backends = Backends::from_settings(&settings.backends);
    let mut out = Vec::new();
    if matches!(backends.enabled(), [first, second] if first.prefix == second.prefix) {
        out.push(warn(
            "backend attribution",
            "both backends are enabled with the same object_name_prefix, so a row whose object is missing cannot be attributed: it is reported as backend \"unknown\", asks both backends' listings to be anchored, and counts in no backend's missing-share (centaur names pods and Sandboxes alike, so this is expected during a migration); set distinct prefixes where the names allow",
        ));
    }
    if settings.cluster.expected_uid.is_none() {
        out.push(warn(
            "cluster pin",
            "cluster.expected_uid is empty: a wrong kubeconfig context with the same namespaces would be swept; pin the cluster (see the cluster identity line)",
        ));
    }
    out
}

/// Runs every check; never stops at the first failure.
pub async fn run(
    settings: &Settings,
    mode: Mode,
    client: Result<(Client, crate::cluster::client::ClientOrigin), String>,
) -> Vec<CheckLine> {
    let mut lines = vec![line("configuration", true, "loaded and valid")];
    lines.extend(configuration_warnings(settings));
    lines.extend(database_checks(settings).await);
    match client {
        Ok((client, origin)) => {
            lines.push(line(
                "kubernetes client",
                true,
                format!("{} ({})", origin.server, origin.source),
            ));
            lines.extend(cluster_checks(settings, mode, client).await);
        }
        Err(e) => lines.push(line("kubernetes client", false, e)),
    }
    lines
}

async fn database_checks(settings: &Settings) -> Vec<CheckLine> {
    let mut out = Vec::new();
    let redact = |s: String| store::redact(&s, &settings.database.url);
    let mapping = match TableMapping::from_settings(settings) {
        Ok(m) => m,
        Err(e) => return vec![line("session table mapping", false, e)],
    };
    let database = match Database::new(settings) {
        Ok(d) => d,
        Err(e) => return vec![line("database connection", false, redact(e.to_string()))],
    };
    let mut conn = match database.connect().await {
        Ok(c) => {
            out.push(line(
                "database connection",
                true,
                database.target().to_string(),
            ));
            c
        }
        Err(e) => {
            out.push(line("database connection", false, redact(e.to_string())));
            return out;
        }
    };
    let mapping = match store::resolve(&mut conn, &mapping).await {
        Ok(resolved) => {
            out.push(line(
                "session table",
                true,
                format!(
                    "{} (configured as {}): every mapped column, types usable, key unique",
                    resolved.table_display(),
                    mapping.table_display()
                ),
            ));
            if let Some(r) = &resolved.resolved {
                out.push(line(
                    "column types",
                    true,
                    format!(
                        "key {}, state {}, object {}{}, updated_at {}",
                        r.key_type,
                        r.state_type,
                        r.object_type,
                        r.scope_type
                            .as_ref()
                            .map(|t| format!(", scope {t}"))
                            .unwrap_or_default(),
                        if r.naive_updated_at {
                            format!(
                                "timestamp without time zone, read in {}",
                                resolved.updated_at_zone.as_deref().unwrap_or("?")
                            )
                        } else {
                            "timestamptz".to_string()
                        }
                    ),
                ));
            }
            resolved
        }
        Err(e) => {
            out.push(line("session table", false, redact(e.to_string())));
            return out;
        }
    };
    out.extend(write_checks(&mut conn, &mapping).await);
    out
}

/// What writing needs: table privileges and the writer lock (free, or held by a writer).
async fn write_checks(conn: &mut sqlx::PgConnection, mapping: &TableMapping) -> Vec<CheckLine> {
    let mut out = Vec::new();
    let privileges: Result<(bool, bool), sqlx::Error> = sqlx::query_as(
        "SELECT has_table_privilege($1::oid, 'SELECT'), has_table_privilege($1::oid, 'UPDATE')",
    )
    .bind(mapping.resolved.as_ref().map_or(0, |r| i64::from(r.oid)))
    .fetch_one(&mut *conn)
    .await;
    match privileges {
        Ok((select, update)) => out.push(line(
            "session table privileges",
            select && update,
            format!("SELECT {}, UPDATE {}", yes(select), yes(update)),
        )),
        Err(e) => out.push(line("session table privileges", false, e.to_string())),
    }
    match store::try_writer_lock(conn, mapping).await {
        Ok(true) => {
            let _ = store::release_writer_lock(conn, mapping).await;
            out.push(line("writer lock", true, "free"));
        }
        Ok(false) => out.push(line(
            "writer lock",
            true,
            "held by another sandbox-reconciler (a running writer)",
        )),
        Err(e) => out.push(line("writer lock", false, e.to_string())),
    }
    out
}

fn yes(b: bool) -> &'static str {
    if b {
        "granted"
    } else {
        "DENIED"
    }
}

async fn cluster_checks(settings: &Settings, mode: Mode, client: Client) -> Vec<CheckLine> {
    let mut out = scope_checks(settings, client.clone()).await;
    out.extend(served_checks(settings, client.clone()).await);
    out.extend(access_checks(settings, mode, client).await);
    out
}

/// The cluster's identity and the configured namespaces, as a sweep checks them.
async fn scope_checks(settings: &Settings, client: Client) -> Vec<CheckLine> {
    let cluster = crate::cluster::KubeCluster::with_client(client, settings);
    match cluster.verify_scope(settings.cluster.expected_uid).await {
        Ok(crate::cluster::ScopeVerdict::Proceed { cluster_uid }) => vec![
            line(
                "cluster identity",
                true,
                format!(
                    "kube-system UID {cluster_uid}{}",
                    if settings.cluster.expected_uid.is_some() {
                        " (matches cluster.expected_uid)"
                    } else {
                        "; set cluster.expected_uid to it to pin this cluster"
                    }
                ),
            ),
            line(
                "namespaces",
                true,
                match settings.namespaces() {
                    Some(list) => format!("{} exist", list.join(", ")),
                    None => "all namespaces".to_string(),
                },
            ),
        ],
        Ok(crate::cluster::ScopeVerdict::Refuse {
            reason,
            detail,
            cluster_uid,
        }) => vec![
            line(
                "cluster identity",
                true,
                format!("kube-system UID {cluster_uid}"),
            ),
            line(format!("scope ({})", reason.as_str()), false, detail),
        ],
        Err(e) => vec![line("cluster identity", false, e.to_string())],
    }
}

/// One access review: a verb on a resource, in a namespace or on one object.
struct Permission {
    group: String,
    resource: String,
    verb: &'static str,
    namespace: Option<String>,
    name: Option<String>,
}

impl Permission {
    fn describe(&self) -> (String, String) {
        let full = if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        };
        let scope = match (&self.namespace, &self.name) {
            (_, Some(name)) => name.clone(),
            (Some(n), None) => format!("in namespace {n}"),
            (None, None) => "in all namespaces".into(),
        };
        (format!("{} {full} {scope}", self.verb), full)
    }
}

/// The reviews of exactly the permissions the binary declares for `mode`
/// ([`crate::permissions::required`]): each verb in each namespace, each named object.
fn permissions(settings: &Settings, mode: Mode) -> Vec<Permission> {
    let mut out = Vec::new();
    for rule in crate::permissions::required(settings, mode, false) {
        for verb in &rule.verbs {
            if !rule.resource_names.is_empty() {
                for name in &rule.resource_names {
                    // The API server checks a GET of Namespace N against bindings in N (a
                    // Role in each watched namespace) and cluster-wide ones (the ClusterRole
                    // for kube-system), so the review names N as both object and namespace,
                    // as the real request does.
                    out.push(Permission {
                        group: rule.api_group.clone(),
                        resource: rule.resource.clone(),
                        verb,
                        namespace: Some(name.clone()),
                        name: Some(name.clone()),
                    });
                }
                continue;
            }
            for ns in &rule.namespaces {
                out.push(Permission {
                    group: rule.api_group.clone(),
                    resource: rule.resource.clone(),
                    verb,
                    namespace: (ns != "*").then(|| ns.clone()),
                    name: None,
                });
            }
        }
    }
    out
}

/// Whether the API server serves each enabled backend's resource: one that is not would fail
/// every sweep (a configuration error, exit 2).
async fn served_checks(settings: &Settings, client: Client) -> Vec<CheckLine> {
    let mut out = Vec::new();
    let backends = Backends::from_settings(&settings.backends);
    for backend in backends.enabled() {
        let only = backends.only(backend.kind);
        let cluster = crate::cluster::KubeCluster::with_backends(client.clone(), settings, only);
        let name = format!("backends.{} resource", backend.kind.config_section());
        out.push(match cluster.verify_served().await {
            Ok(()) => line(
                name,
                true,
                format!("{} is served", backend.versioned_resource()),
            ),
            Err(e) => line(name, false, e.to_string()),
        });
    }
    out
}

/// SelfSubjectAccessReviews of every permission a sweep needs.
async fn access_checks(settings: &Settings, mode: Mode, client: Client) -> Vec<CheckLine> {
    let api: Api<SelfSubjectAccessReview> = Api::all(client);
    let mut out = Vec::new();
    for p in permissions(settings, mode) {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(p.group.clone()),
                    resource: Some(p.resource.clone()),
                    verb: Some(p.verb.to_string()),
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let (name, full) = p.describe();
        let answer = tokio::time::timeout(
            settings.cluster.request_timeout,
            api.create(&PostParams::default(), &review),
        )
        .await;
        out.push(match answer {
            Ok(Ok(r)) => {
                let status = r.status.unwrap_or_default();
                let detail = if status.allowed {
                    "allowed".to_string()
                } else {
                    format!(
                        "forbidden{}; grant {} on {full} to the reconciler's service account{}",
                        status.reason.map(|r| format!(" ({r})")).unwrap_or_default(),
                        p.verb,
                        if p.resource == "namespaces" {
                            " (deploy/common: the Role in each watched namespace, the ClusterRole for kube-system)"
                        } else {
                            ""
                        }
                    )
                };
                line(name, status.allowed, detail)
            }
            Ok(Err(e)) => line(name, false, format!("access review failed: {e}")),
            Err(_) => line(name, false, "the API server did not answer in time"),
        });
    }
    out
}

/// Renders the table; the last line says whether everything passed.
pub fn render(lines: &[CheckLine]) -> String {
    let width = lines
        .iter()
        .map(|l| l.check.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = String::new();
    let _ = writeln!(out, "{:<width$}  RESULT  DETAIL", "CHECK");
    for l in lines {
        let result = match (l.ok, l.warning) {
            (false, _) => "FAIL",
            (true, true) => "warn",
            (true, false) => "pass",
        };
        let _ = writeln!(out, "{:<width$}  {:<6}  {}", l.check, result, l.detail);
    }
    let failed = lines.iter().filter(|l| !l.ok).count();
    if failed == 0 {
        let _ = writeln!(out, "all {} checks passed", lines.len());
    } else {
        let _ = writeln!(out, "{failed} of {} checks failed", lines.len());
    }
    out
}
