//! The soak's database: a private schema with the session table, and what the oracle reads
//! back from it (the audit records, the rows as they ended).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool, Row};

use super::sim::Version;
use super::SCOPE_COLUMN;
use crate::pg;

/// The soak's private schema.
pub(crate) struct SoakDb {
    pub(crate) pool: PgPool,
    pub(crate) schema: String,
}

/// One `downgrade` audit record.
#[derive(Debug, Clone)]
pub(crate) struct AuditDowngrade {
    pub(crate) id: i64,
    pub(crate) sweep_id: String,
    pub(crate) at: DateTime<Utc>,
    pub(crate) session_key: String,
    pub(crate) object: String,
    pub(crate) backend: String,
    pub(crate) old_state: String,
    pub(crate) new_state: String,
    pub(crate) old_updated_at: Option<DateTime<Utc>>,
    pub(crate) new_updated_at: Option<DateTime<Utc>>,
    pub(crate) cleared: Value,
    pub(crate) evidence: Value,
}

/// The scope of one audit record, of any action.
#[derive(Debug, Clone)]
pub(crate) struct AuditScope {
    pub(crate) id: i64,
    pub(crate) action: String,
    pub(crate) session_key: String,
    pub(crate) scope: Option<String>,
}

impl SoakDb {
    /// A private schema with the centaur table; `shared`: with a scope column and the primary
    /// key `(cluster, thread_key)`, as when several clusters share one table.
    pub(crate) async fn create(url: &str, connections: usize, shared: bool) -> Result<SoakDb> {
        let pool = PgPoolOptions::new()
            .max_connections(connections as u32)
            .acquire_timeout(Duration::from_secs(30))
            .connect(url)
            .await
            .with_context(|| format!("connecting to PostgreSQL at {}", pg::describe(url)))?;
        let shared_sql = if shared {
            format!(
                "ALTER TABLE sandbox_sessions ADD COLUMN {SCOPE_COLUMN} TEXT NOT NULL; \
                 ALTER TABLE sandbox_sessions DROP CONSTRAINT sandbox_sessions_pkey; \
                 ALTER TABLE sandbox_sessions ADD PRIMARY KEY ({SCOPE_COLUMN}, thread_key)"
            )
        } else {
            String::new()
        };
        let schema = pg::create_sessions_schema(&pool, "soak", &shared_sql)
            .await
            .context("creating the soak schema")?;
        Ok(SoakDb { pool, schema })
    }

    pub(crate) fn table(&self) -> String {
        format!("{}.sandbox_sessions", self.schema)
    }

    pub(crate) fn audit_table(&self) -> String {
        format!("{}.reconciler_audit", self.schema)
    }

    async fn audit_exists(&self) -> bool {
        sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
            .bind(self.audit_table())
            .fetch_one(&self.pool)
            .await
            .unwrap_or(false)
    }

    pub(crate) async fn downgrade_count(&self) -> i64 {
        if !self.audit_exists().await {
            return 0;
        }
        let sql = format!(
            "SELECT count(*) FROM {} WHERE action = 'downgrade'",
            self.audit_table()
        );
        sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await
            .unwrap_or(0)
    }

    pub(crate) async fn downgrades(&self) -> Result<Vec<AuditDowngrade>> {
        if !self.audit_exists().await {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT id, sweep_id::text, at, session_key, coalesce(object_name, ''), \
                    coalesce(backend, ''), old_state, new_state, old_updated_at, new_updated_at, \
                    cleared, evidence \
             FROM {} WHERE action = 'downgrade' ORDER BY id",
            self.audit_table()
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .context("reading the audit table")?;
        rows.iter()
            .map(|r| {
                Ok(AuditDowngrade {
                    id: r.try_get(0)?,
                    sweep_id: r.try_get(1)?,
                    at: r.try_get(2)?,
                    session_key: r.try_get(3)?,
                    object: r.try_get(4)?,
                    backend: r.try_get(5)?,
                    old_state: r.try_get(6)?,
                    new_state: r.try_get(7)?,
                    old_updated_at: r.try_get(8)?,
                    new_updated_at: r.try_get(9)?,
                    cleared: r.try_get(10)?,
                    evidence: r.try_get(11)?,
                })
            })
            .collect()
    }

    /// Every audit record's scope.
    pub(crate) async fn audit_scopes(&self) -> Result<Vec<AuditScope>> {
        if !self.audit_exists().await {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT id, action, session_key, session_scope FROM {} ORDER BY id",
            self.audit_table()
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .context("reading the audit table's scopes")?;
        rows.iter()
            .map(|r| {
                Ok(AuditScope {
                    id: r.try_get(0)?,
                    action: r.try_get(1)?,
                    session_key: r.try_get(2)?,
                    scope: r.try_get(3)?,
                })
            })
            .collect()
    }

    /// The rows as they are now, by key; only those of `scope` in a shared table.
    pub(crate) async fn final_rows(&self, scope: Option<&str>) -> Result<HashMap<String, Version>> {
        let filter = match scope {
            Some(scope) => format!(" WHERE {SCOPE_COLUMN} = '{scope}'"),
            None => String::new(),
        };
        let sql = format!(
            "SELECT thread_key, state, sandbox_id, updated_at, agent_thread_id FROM {}{filter}",
            self.table()
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .context("reading the session table")?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>(0)?,
                    Version {
                        state: r.try_get(1)?,
                        object: r.try_get(2)?,
                        updated_at: r.try_get(3)?,
                        agent_thread_id: r.try_get(4)?,
                    },
                ))
            })
            .collect()
    }

    pub(crate) async fn drop_schema(&self) {
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema);
        let _ = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&self.pool).await;
    }
}
