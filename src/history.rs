//! `sandbox-reconciler history`: the audit records as a table or JSON, so the audit is readable
//! without a database login or SQL.
//!
//! Read-only: one READ ONLY transaction, no lock, no migration, no DDL. Records are read whole
//! (`to_jsonb` of each audit row) and decoded leniently, so an audit table of an older release
//! (without `row_image`, without `session_scope`) is read as it is, and a malformed record is
//! listed with what can be read of it and counted, never a failure. `explain` reads the records
//! of one session through the same function.

use std::fmt::Write;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::AssertSqlSafe;

use crate::store::{self, StoreError, TableMapping};

/// Which records to read.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    /// Only records younger than this (by the database clock).
    pub since: Option<chrono::Duration>,
    pub session: Option<String>,
    pub sweep: Option<uuid::Uuid>,
    /// At most this many, newest first.
    pub limit: i64,
}

/// One audit record, as far as it could be read.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditRecord {
    pub id: Option<i64>,
    pub at: Option<DateTime<Utc>>,
    /// `downgrade` or `undo`.
    pub action: String,
    pub sweep_id: Option<String>,
    pub key: Option<String>,
    pub scope: Option<String>,
    pub object: Option<String>,
    pub backend: Option<String>,
    pub old_state: Option<String>,
    pub new_state: Option<String>,
    pub old_updated_at: Option<String>,
    pub new_updated_at: Option<String>,
    pub reason: Option<String>,
    /// The cluster's identity recorded with the evidence (the kube-system Namespace's UID).
    pub cluster: Option<String>,
    /// How the absence was established (downgrade) or what was undone (undo).
    pub evidence: String,
    /// The downgrade's audit id an undo reverses.
    pub undoes: Option<i64>,
    /// Whether the record keeps the whole row as it was (an undo can insert it back).
    pub row_image: bool,
    /// The record lacks fields every record has (key, action, states): shown as read.
    pub malformed: bool,
}

/// What `history` read.
#[derive(Debug, Clone, Serialize)]
pub struct History {
    pub audit_table: String,
    pub audit_table_exists: bool,
    pub records: Vec<AuditRecord>,
    pub malformed: usize,
    pub limit: i64,
}

/// Parses `90m`, `24h`, `7d`, `30s` (a positive whole number and a unit).
pub fn parse_since(text: &str) -> Result<chrono::Duration, String> {
    let text = text.trim();
    let bad =
        || format!("{text:?} is not a duration; write a number and a unit: 90m, 24h, 7d, 30s");
    let unit = text.chars().last().ok_or_else(bad)?;
    let number: i64 = text[..text.len() - unit.len_utf8()]
        .parse()
        .map_err(|_| bad())?;
    if number <= 0 {
        return Err(bad());
    }
    let seconds = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        'w' => 7 * 86_400,
        _ => return Err(bad()),
    };
    number
        .checked_mul(seconds)
        .filter(|s| *s <= 100 * 365 * 86_400)
        .map(chrono::Duration::seconds)
        .ok_or_else(bad)
}

/// Whether the audit table exists (nothing creates it here).
pub async fn audit_table_exists(
    conn: &mut sqlx::PgConnection,
    mapping: &TableMapping,
) -> Result<bool, StoreError> {
    store::within(
        mapping.deadline,
        "looking for the audit table",
        sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(mapping.audit.to_string())
            .fetch_one(conn),
    )
    .await
}

/// Reads the audit records of this session table (any of its names) and scope, newest first,
/// in one READ ONLY transaction.
pub async fn read(
    conn: &mut sqlx::PgConnection,
    mapping: &TableMapping,
    filter: &HistoryFilter,
) -> Result<History, StoreError> {
    let mut history = History {
        audit_table: mapping.audit.to_string(),
        audit_table_exists: false,
        records: Vec::new(),
        malformed: 0,
        limit: filter.limit,
    };
    let deadline = mapping.deadline;
    let what = "reading the audit records";
    let mut tx = store::begin_snapshot_read(&mut *conn, deadline, what).await?;
    history.audit_table_exists = audit_table_exists(&mut tx, mapping).await?;
    if !history.audit_table_exists {
        store::within(deadline, what, tx.commit()).await?;
        return Ok(history);
    }
    // Columns are read through to_jsonb, so a record of any release (with or without the later
    // columns) is read the same way.
    let scoped = if mapping.scope.is_some() {
        " AND (to_jsonb(a) ->> 'session_scope' IS NULL OR to_jsonb(a) ->> 'session_scope' = $6)"
    } else {
        ""
    };
    let sql = format!(
        "SELECT to_jsonb(a) FROM {audit} a \
         WHERE a.session_table = ANY($1) \
           AND ($2::text IS NULL OR a.session_key = $2) \
           AND ($3::uuid IS NULL OR a.sweep_id = $3) \
           AND ($4::float8 IS NULL OR a.at >= now() - make_interval(secs => $4)){scoped} \
         ORDER BY a.at DESC, a.id DESC LIMIT $5",
        audit = mapping.audit,
    );
    let since = filter.since.map(|d| d.num_seconds() as f64);
    let docs: Vec<serde_json::Value> = store::within(
        deadline,
        what,
        sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(mapping.table_names())
            .bind(filter.session.as_deref())
            .bind(filter.sweep)
            .bind(since)
            .bind(filter.limit.max(0))
            .bind(mapping.scope_value())
            .fetch_all(&mut *tx),
    )
    .await?;
    store::within(deadline, what, tx.commit()).await?;
    history.records = docs.iter().map(decode).collect();
    history.malformed = history.records.iter().filter(|r| r.malformed).count();
    Ok(history)
}

/// One record from its `to_jsonb` document; anything missing or of the wrong type is `None`.
pub fn decode(doc: &serde_json::Value) -> AuditRecord {
    let text = |field: &str| doc.get(field).and_then(|v| v.as_str()).map(str::to_string);
    let evidence = doc.get("evidence");
    let summary = evidence
        .and_then(|e| e.get("absence"))
        .and_then(|a| a.as_str())
        .map(str::to_string)
        .or_else(|| {
            evidence.and_then(|e| e.get("undoes_audit_id")).map(|id| {
                let how = evidence
                    .and_then(|e| e.get("restored"))
                    .and_then(|r| r.as_str())
                    .unwrap_or("updated in place");
                format!("undoes audit record {id} ({how})")
            })
        })
        .unwrap_or_default();
    let record = AuditRecord {
        id: doc.get("id").and_then(|v| v.as_i64()),
        at: text("at").and_then(|t| DateTime::parse_from_rfc3339(&t).ok().map(|d| d.to_utc())),
        action: text("action").unwrap_or_default(),
        sweep_id: text("sweep_id"),
        key: text("session_key"),
        scope: text("session_scope"),
        object: text("object_name"),
        backend: text("backend"),
        old_state: text("old_state"),
        new_state: text("new_state"),
        old_updated_at: text("old_updated_at"),
        new_updated_at: text("new_updated_at"),
        reason: text("reason"),
        cluster: evidence
            .and_then(|e| e.get("cluster_uid"))
            .and_then(|c| c.as_str())
            .map(str::to_string),
        evidence: summary,
        undoes: doc.get("undoes").and_then(|v| v.as_i64()),
        row_image: doc.get("row_image").is_some_and(|i| i.is_object()),
        malformed: false,
    };
    let malformed = record.key.is_none()
        || record.at.is_none()
        || !matches!(record.action.as_str(), "downgrade" | "undo")
        || record.old_state.is_none()
        || record.new_state.is_none();
    AuditRecord {
        malformed,
        ..record
    }
}

fn or_dash(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

/// The records as a table, newest first.
pub fn text(h: &History) -> String {
    let mut out = String::new();
    if !h.audit_table_exists {
        let _ = writeln!(
            out,
            "no audit records: the audit table {} does not exist (no sweep has written yet, or audit.table names another table)",
            h.audit_table
        );
        return out;
    }
    let _ = writeln!(
        out,
        "{} audit record(s) in {}, newest first{}{}",
        h.records.len(),
        h.audit_table,
        if h.records.len() as i64 >= h.limit {
            format!(" (at most {}: --limit)", h.limit)
        } else {
            String::new()
        },
        if h.malformed > 0 {
            format!("; {} malformed (shown as read)", h.malformed)
        } else {
            String::new()
        }
    );
    if h.records.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "{:<20}  {:<9}  {:<36}  {:<24}  {:<13}  {:<22}  {:<20}  {:<36}  evidence",
        "time", "action", "sweep", "session", "backend", "state", "reason", "cluster"
    );
    for r in &h.records {
        let _ = writeln!(out, "{}", line(r));
    }
    out
}

/// One record as one line of the table (also used by `explain`).
pub fn line(r: &AuditRecord) -> String {
    let at =
        r.at.map(|a| a.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| "-".into());
    let states = format!("{} -> {}", or_dash(&r.old_state), or_dash(&r.new_state));
    let session = match &r.object {
        Some(o) => format!("{} ({o})", or_dash(&r.key)),
        None => or_dash(&r.key).to_string(),
    };
    let mut evidence = r.evidence.clone();
    if r.row_image {
        evidence.push_str(" [row image kept]");
    }
    if r.malformed {
        evidence.push_str(" [malformed record]");
    }
    format!(
        "{at:<20}  {:<9}  {:<36}  {session:<24}  {:<13}  {states:<22}  {:<20}  {:<36}  {evidence}",
        if r.action.is_empty() { "?" } else { &r.action },
        or_dash(&r.sweep_id),
        or_dash(&r.backend),
        or_dash(&r.reason),
        or_dash(&r.cluster),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_minutes_hours_days() {
        assert_eq!(parse_since("90m").unwrap(), chrono::Duration::minutes(90));
        assert_eq!(parse_since("24h").unwrap(), chrono::Duration::hours(24));
        assert_eq!(parse_since("7d").unwrap(), chrono::Duration::days(7));
        for bad in ["", "7", "d", "-1h", "0m", "1y", "1.5h", "99999999999999d"] {
            assert!(parse_since(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_malformed_record_is_decoded_as_far_as_it_goes() {
        let r = decode(&serde_json::json!({"id": 3, "action": "downgrade", "evidence": "text"}));
        assert!(r.malformed);
        assert_eq!(r.id, Some(3));
        assert!(!r.row_image);
        let r = decode(&serde_json::json!("not an object"));
        assert!(r.malformed);
        assert!(line(&r).contains("[malformed record]"));
    }
}
