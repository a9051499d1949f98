//! `sandbox-reconciler check`: a preflight an operator runs before trusting a deployment.
//!
//! Loads the configuration, connects to PostgreSQL, verifies the session table and every
//! mapped column exist with usable types and that the reconciler may read and update them,
//! and asks the API server (SelfSubjectAccessReview) whether the reconciler may list and get
//! each backend's resource in each namespace. Prints a pass/fail table.

use std::fmt::Write;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};
use sqlx::Row;

use crate::config::Settings;
use crate::store::{self, Database, TableMapping};

/// One line of the preflight table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckLine {
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

fn line(check: impl Into<String>, ok: bool, detail: impl Into<String>) -> CheckLine {
    CheckLine {
        check: check.into(),
        ok,
        detail: detail.into(),
    }
}

/// Runs every check; never stops at the first failure.
pub async fn run(settings: &Settings, client: Result<Client, String>) -> Vec<CheckLine> {
    let mut lines = vec![line("configuration", true, "loaded and valid")];
    lines.extend(database_checks(settings).await);
    match client {
        Ok(client) => lines.extend(cluster_checks(settings, client).await),
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
    match store::verify_table(&mut conn, &mapping).await {
        Ok(()) => out.push(line(
            "session table and columns",
            true,
            format!("{} has every mapped column", mapping.table_display()),
        )),
        Err(e) => {
            out.push(line("session table and columns", false, e.to_string()));
            return out;
        }
    }
    // Column types the queries rely on.
    let types = sqlx::query(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(mapping.table.to_string())
    .fetch_all(&mut conn)
    .await
    .map(|rows| {
        rows.iter()
            .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
            .collect::<Vec<_>>()
    });
    match types {
        Ok(types) => {
            let type_of = |c: &str| {
                types
                    .iter()
                    .find(|(n, _)| n == c)
                    .map(|(_, t)| t.clone())
                    .unwrap_or_default()
            };
            let textual = |t: &str| {
                t == "text" || t.starts_with("character varying") || t.starts_with("character(")
            };
            let u = type_of(mapping.updated_at.name());
            let ok = u.starts_with("timestamp");
            out.push(line(
                format!("{} column type", mapping.updated_at.name()),
                ok,
                if ok {
                    u.clone()
                } else {
                    format!("{u}; it must be timestamp or timestamptz (sessions.updated_at_column)")
                },
            ));
            for (key, column) in [
                ("sessions.state_column", mapping.state.name()),
                ("sessions.object_column", mapping.object.name()),
            ] {
                let t = type_of(column);
                let ok = textual(&t);
                out.push(line(
                    format!("{column} column type"),
                    ok,
                    if ok {
                        t.clone()
                    } else {
                        format!("{t}; it must be text or varchar ({key})")
                    },
                ));
            }
        }
        Err(e) => out.push(line("column types", false, e.to_string())),
    }
    let privileges: Result<(bool, bool), sqlx::Error> = sqlx::query_as(
        "SELECT has_table_privilege(to_regclass($1), 'SELECT'), has_table_privilege(to_regclass($1), 'UPDATE')",
    )
    .bind(mapping.table.to_string())
    .fetch_one(&mut conn)
    .await;
    match privileges {
        Ok((select, update)) => out.push(line(
            "session table privileges",
            select && update,
            format!("SELECT {}, UPDATE {}", yes(select), yes(update)),
        )),
        Err(e) => out.push(line("session table privileges", false, e.to_string())),
    }
    match store::try_writer_lock(&mut conn, &mapping).await {
        Ok(true) => {
            let _ = store::release_writer_lock(&mut conn, &mapping).await;
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

async fn cluster_checks(settings: &Settings, client: Client) -> Vec<CheckLine> {
    let mut resources: Vec<(&str, String)> = Vec::new();
    if settings.backends.pod.enabled {
        resources.push(("", "pods".to_string()));
    }
    let sb = &settings.backends.agent_sandbox;
    if sb.enabled {
        resources.push((sb.group.as_str(), sb.plural.clone()));
    }
    let namespaces: Vec<Option<String>> = match settings.namespaces() {
        Some(list) => list.iter().cloned().map(Some).collect(),
        None => vec![None],
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(client);
    let mut out = Vec::new();
    for (group, resource) in &resources {
        for ns in &namespaces {
            for verb in ["list", "get"] {
                let review = SelfSubjectAccessReview {
                    spec: SelfSubjectAccessReviewSpec {
                        resource_attributes: Some(ResourceAttributes {
                            group: Some(group.to_string()),
                            resource: Some(resource.clone()),
                            verb: Some(verb.to_string()),
                            namespace: ns.clone(),
                            ..ResourceAttributes::default()
                        }),
                        ..SelfSubjectAccessReviewSpec::default()
                    },
                    ..SelfSubjectAccessReview::default()
                };
                let full = if group.is_empty() {
                    resource.clone()
                } else {
                    format!("{resource}.{group}")
                };
                let scope = ns
                    .as_deref()
                    .map(|n| format!("namespace {n}"))
                    .unwrap_or_else(|| "all namespaces".into());
                let name = format!("{verb} {full} in {scope}");
                let answer = tokio::time::timeout(
                    std::time::Duration::from_secs(settings.cluster.request_timeout_seconds),
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
                                "forbidden{}; grant {verb} on {full} to the reconciler's service account",
                                status.reason.map(|r| format!(" ({r})")).unwrap_or_default()
                            )
                        };
                        line(name, status.allowed, detail)
                    }
                    Ok(Err(e)) => line(name, false, format!("access review failed: {e}")),
                    Err(_) => line(name, false, "the API server did not answer in time"),
                });
            }
        }
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
        let _ = writeln!(
            out,
            "{:<width$}  {:<6}  {}",
            l.check,
            if l.ok { "pass" } else { "FAIL" },
            l.detail
        );
    }
    let failed = lines.iter().filter(|l| !l.ok).count();
    if failed == 0 {
        let _ = writeln!(out, "all {} checks passed", lines.len());
    } else {
        let _ = writeln!(out, "{failed} of {} checks failed", lines.len());
    }
    out
}
