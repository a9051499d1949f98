//! The database side: read candidates, conditional downgrade, audit.
//!
//! All SQL touching the session table is generated here from the validated, quoted
//! identifiers of [`TableMapping`]. Rows are streamed into the planner inside one
//! REPEATABLE READ, READ ONLY transaction so the counts are consistent. A downgrade is one
//! statement per batch that locks the rows still exactly as read (state, object name and
//! `updated_at`; rows the application holds are skipped, not waited for), updates them and
//! writes their audit records, inside one transaction: a batch is applied whole or not at all.
//!
//! One writer (docs/DESIGN.md, rule 8): the sweep runs on one dedicated connection that holds a
//! session-level advisory lock keyed by the session table's canonical name and scope (two
//! levels: the table's key, shared by scoped reconcilers, exclusive for an unscoped one; and
//! the scope's key). Reads and writes go through that same connection, and every writing
//! statement checks that its own server session holds the lock, so a write can never happen
//! under a lock that was lost or that a pooler left on another server session.
//!
//! Every call has a client-side deadline (`database.client_deadline_seconds`): after a
//! failover a half-open TCP connection never answers, and a sweep must fail rather than hang.
//! The server is asked to probe each connection with TCP keepalives, so the backend of a
//! reconciler that vanished ends and releases the writer lock.

pub mod mapping;

use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgRow};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Row};

use crate::config::Settings;
use crate::plan::{OrphanedRow, RowSink, SessionRow};
use crate::sql::Identifier;
pub use mapping::{ResolvedTable, TableMapping};

/// Why a database step failed. Messages never contain the connection password.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database.url: {0}")]
    Url(String),
    #[error("cannot connect to PostgreSQL at {target}: {message}")]
    Connect { target: String, message: String },
    #[error("table {table} does not exist; set sessions.table (or create the table)")]
    MissingTable { table: String },
    #[error("table {table} has no column {column}; set {key}")]
    MissingColumn {
        table: String,
        column: String,
        key: String,
    },
    /// The table does not fit the configuration; the message names the key to change.
    #[error("table {table}: {message}")]
    Unfit { table: String, message: String },
    #[error("{what}: {message}")]
    Query { what: &'static str, message: String },
    #[error("{what}: no answer from PostgreSQL within {seconds}s (database.client_deadline_seconds); the connection is dropped")]
    Deadline { what: &'static str, seconds: u64 },
    #[error("another sandbox-reconciler holds the writer lock for {table}; only one writer sweeps at a time")]
    LockBusy { table: String },
    /// A COMMIT got no answer (or its connection failed): it may or may not have taken effect.
    #[error("{what}: the outcome is unknown ({detail}): the COMMIT of {rows} row(s) may or may not have taken effect. Nothing is retried blindly: the next sweep re-reads the rows, and a row already changed is no longer a candidate; the audit table shows what was committed")]
    OutcomeUnknown {
        what: &'static str,
        rows: usize,
        detail: String,
    },
    /// A writing statement ran on a server session that does not hold the writer lock.
    #[error("{what}: this connection's PostgreSQL server session does not hold the writer lock for {table}, so the transaction was rolled back and nothing was written. The lock was lost, or a connection pooler moved this connection to another server session (PgBouncer in transaction or statement mode, or any pooler that shares server sessions between clients); connect database.url directly to PostgreSQL, or through a pooler in session mode that gives each client its own server session")]
    NotWriter { what: &'static str, table: String },
    /// The server session already holds the writer lock, which this connection never took.
    #[error("this connection's PostgreSQL server session already holds the writer lock for {table}, which this sandbox-reconciler has not taken: a connection pooler hands one server session to several clients, so two writers could share one lock; connect database.url directly to PostgreSQL, or through a pooler in session mode that gives each client its own server session")]
    LockShared { table: String },
}

impl StoreError {
    /// Whether this is a configuration error (the table or its columns do not fit the
    /// configuration): exit status 2, not a transient failure.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            StoreError::Url(_)
                | StoreError::MissingTable { .. }
                | StoreError::MissingColumn { .. }
                | StoreError::Unfit { .. }
        )
    }

    fn query(what: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
        move |e| StoreError::Query {
            what,
            message: e.to_string(),
        }
    }
}

/// Connection settings derived from configuration.
#[derive(Clone)]
pub struct Database {
    options: PgConnectOptions,
    target: String,
    connect_timeout: Duration,
    statement_timeout: Duration,
    lock_timeout: Duration,
}

impl Database {
    pub fn new(settings: &Settings) -> Result<Database, StoreError> {
        let d = &settings.database;
        let url = vet_url(&d.url)?;
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e: sqlx::Error| StoreError::Url(redact(&e.to_string(), &d.url)))?;
        let options = options
            .application_name("sandbox-reconciler")
            .log_statements(tracing::log::LevelFilter::Debug);
        let target = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("")
        );
        Ok(Database {
            options,
            target,
            connect_timeout: Duration::from_secs(d.connect_timeout_seconds.max(1)),
            statement_timeout: Duration::from_secs(d.statement_timeout_seconds),
            lock_timeout: Duration::from_secs(d.lock_timeout_seconds),
        })
    }

    /// `host:port/database`, for messages (never the password).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Opens one dedicated connection with the reconciler's timeouts.
    pub async fn connect(&self) -> Result<PgConnection, StoreError> {
        let connecting = PgConnection::connect_with(&self.options);
        let mut conn = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| StoreError::Connect {
                target: self.target.clone(),
                message: format!("no answer within {}s", self.connect_timeout.as_secs()),
            })?
            .map_err(|e| StoreError::Connect {
                target: self.target.clone(),
                message: e.to_string(),
            })?;
        // Keepalives and tcp_user_timeout make the server notice a vanished client within
        // about a minute, ending its session and releasing any advisory lock it held. On a
        // Unix socket the server ignores them.
        let setup = format!(
            "SET statement_timeout = {}; SET lock_timeout = {}; \
             SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; \
             SET tcp_keepalives_count = 3; SET tcp_user_timeout = 60000",
            self.statement_timeout.as_millis(),
            self.lock_timeout.as_millis()
        );
        within(
            self.connect_timeout,
            "setting session parameters",
            sqlx::raw_sql(AssertSqlSafe(setup)).execute(&mut conn),
        )
        .await?;
        Ok(conn)
    }
}

/// The query parameters sqlx's PostgreSQL URL parser understands (besides `options[...]`).
const DRIVER_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// libpq parameters sqlx does not know that change nothing the reconciler relies on (it sets
/// its own connect timeout, keepalives and application name): removed, with a log line that
/// names only the parameter.
const IGNORED_LIBPQ_PARAMETERS: &[&str] = &[
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "fallback_application_name",
];

/// Decodes `%XX` escapes (and `+` as a space, as in a query string); invalid escapes stay.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match bytes[i] {
            b'%' => match (
                bytes.get(i + 1).and_then(|&b| hex(b)),
                bytes.get(i + 2).and_then(|&b| hex(b)),
            ) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `key=value` pairs of a URL's query string, raw.
fn query_pairs(url: &str) -> Vec<(&str, &str)> {
    let Some((_, query)) = url.split_once('?') else {
        return Vec::new();
    };
    let query = query.split('#').next().unwrap_or_default();
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect()
}

/// Checks the query parameters of `database.url` before sqlx sees them: sqlx logs a parameter
/// it does not know *with its value* (a libpq `sslpassword` would be printed in clear) and then
/// ignores it (a `target_session_attrs` ignored could connect to a standby). Parameters sqlx
/// understands are kept; harmless libpq-only ones are removed with a log line naming only the
/// parameter; anything else is a configuration error naming the parameter, never its value.
fn vet_url(url: &str) -> Result<String, StoreError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok(url.to_string());
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let key = percent_decode(pair.split_once('=').map_or(pair, |(k, _)| k));
        if DRIVER_PARAMETERS.contains(&key.as_str()) || key.starts_with("options[") {
            kept.push(pair);
        } else if IGNORED_LIBPQ_PARAMETERS.contains(&key.as_str()) {
            tracing::info!(
                parameter = %key,
                "database.url: ignoring a libpq parameter the PostgreSQL driver does not support (the reconciler sets its own timeouts and keepalives)"
            );
        } else if key == "sslpassword" {
            return Err(StoreError::Url(
                "the parameter sslpassword (the passphrase of an encrypted client key) is not supported by the PostgreSQL driver (its value is not shown); decrypt the key (openssl pkey -in client.key -out client.plain.key), point sslkey at it and remove sslpassword".into(),
            ));
        } else {
            return Err(StoreError::Url(format!(
                "the parameter {key} is not supported by the PostgreSQL driver (its value is not shown); remove it. Supported: {}",
                DRIVER_PARAMETERS.join(", ")
            )));
        }
    }
    let mut vetted = base.to_string();
    if !kept.is_empty() {
        vetted.push('?');
        vetted.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        vetted.push('#');
        vetted.push_str(f);
    }
    Ok(vetted)
}

/// The secrets a PostgreSQL URL can carry, raw and percent-decoded: the password in its
/// userinfo and the values of its `password` and `sslpassword` parameters.
fn url_secrets(url: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    let authority = url.split_once("://").map_or("", |(_, rest)| {
        rest.split(['/', '?', '#']).next().unwrap_or_default()
    });
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if let Some((_, pw)) = userinfo.split_once(':') {
            secrets.push(pw.to_string());
            secrets.push(percent_decode(pw));
        }
    }
    for (key, value) in query_pairs(url) {
        if percent_decode(key).contains("password") {
            secrets.push(value.to_string());
            secrets.push(percent_decode(value));
        }
    }
    secrets.retain(|s| !s.is_empty());
    // Longest first, so a secret containing another is hidden whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();
    secrets
}

/// Hides what `url` carries in secret from `text`: the userinfo password and the values of the
/// `password` and `sslpassword` parameters (raw and percent-decoded), and, where the URL's
/// query string appears whole, every parameter's value.
pub fn redact(text: &str, url: &str) -> String {
    let mut out = text.to_string();
    if let Some((_, query)) = url.split_once('?') {
        if !query.is_empty() && out.contains(query) {
            let hidden: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) => format!("{k}=****"),
                    None => p.to_string(),
                })
                .collect();
            out = out.replace(query, &hidden.join("&"));
        }
    }
    for secret in url_secrets(url) {
        out = out.replace(&secret, "****");
    }
    out
}

/// Runs `fut` under a client-side deadline; a query error or no answer in time is an error
/// naming `what`.
pub async fn within<T>(
    deadline: Duration,
    what: &'static str,
    fut: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(deadline, fut).await {
        Ok(result) => result.map_err(StoreError::query(what)),
        Err(_) => Err(StoreError::Deadline {
            what,
            seconds: deadline.as_secs(),
        }),
    }
}

/// Commits a writing transaction of `rows` changed rows under the client deadline. A COMMIT
/// the server refused (a deferred constraint, a serialization failure) rolled back; one that
/// got no answer in time, or whose connection failed, may have committed all the same:
/// [`StoreError::OutcomeUnknown`], never "nothing written".
async fn commit_writes(
    tx: sqlx::Transaction<'_, sqlx::Postgres>,
    deadline: Duration,
    what: &'static str,
    rows: usize,
) -> Result<(), StoreError> {
    let unknown = |detail: String| StoreError::OutcomeUnknown { what, rows, detail };
    match tokio::time::timeout(deadline, tx.commit()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e @ sqlx::Error::Database(_))) => Err(StoreError::Query {
            what,
            message: format!("{e}; rolled back, nothing was written"),
        }),
        Ok(Err(e)) => Err(unknown(format!("the connection failed during COMMIT: {e}"))),
        Err(_) => Err(unknown(format!(
            "no answer from PostgreSQL within {}s (database.client_deadline_seconds)",
            deadline.as_secs()
        ))),
    }
}

/// The audit table's migrations: version, description and SQL template. `{{audit}}` and the
/// `{{..._idx}}` names are filled in from `audit.table`; the checksum is taken of the
/// template, so it does not depend on how the table name was spelled.
const MIGRATIONS: [(i64, &str, &str); 4] = [
    (
        1,
        "audit table",
        include_str!("../../migrations/0001_audit.sql"),
    ),
    (
        2,
        "undo records",
        include_str!("../../migrations/0002_undo.sql"),
    ),
    (
        3,
        "row scope",
        include_str!("../../migrations/0003_scope.sql"),
    ),
    (
        4,
        "row image",
        include_str!("../../migrations/0004_row_image.sql"),
    ),
];

/// The transaction-level advisory lock the audit migrations run under: one key per database,
/// whatever the audit table is called or however it is spelled (migrations are short, and two
/// spellings of one table must take turns).
pub fn migrations_lock_key() -> i64 {
    mapping::fnv1a("sandbox-reconciler|audit-migrations")
}

/// Runs the reconciler's own migrations (the audit table), once per process at start-up,
/// tracked in a table of its own (`<audit.table>_migrations`, in the layout sqlx uses, so
/// earlier installs carry on), never the application's `_sqlx_migrations`.
///
/// All pending migrations run in one transaction under a transaction-level advisory lock:
/// two replicas starting together take turns, and a failed migration rolls back and releases
/// the lock with the transaction (a session-level lock would outlive the failure).
pub async fn migrate(conn: &mut PgConnection, mapping: &TableMapping) -> Result<(), StoreError> {
    let name = mapping.audit.name();
    let render = |sql: &str| {
        sql.replace("{{audit}}", &mapping.audit.to_string())
            .replace("{{sweep_idx}}", &format!("\"{name}_sweep_idx\""))
            .replace("{{session_idx}}", &format!("\"{name}_session_idx\""))
            .replace("{{undoes_idx}}", &format!("\"{name}_undoes_idx\""))
    };
    let deadline = mapping.deadline;
    let table = mapping.audit.with_suffix("_migrations");
    let mut tx = within(deadline, "starting the audit migrations", conn.begin()).await?;
    let lock = migrations_lock_key();
    within(
        deadline,
        "locking the audit migrations",
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock)
            .execute(&mut *tx),
    )
    .await?;
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {table} (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
         installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), success BOOLEAN NOT NULL, \
         checksum BYTEA NOT NULL, execution_time BIGINT NOT NULL)"
    );
    within(
        deadline,
        "creating the audit migrations table",
        sqlx::raw_sql(AssertSqlSafe(create)).execute(&mut *tx),
    )
    .await?;
    let applied: Vec<i64> = within(
        deadline,
        "reading the applied audit migrations",
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT version FROM {table} WHERE success"
        )))
        .fetch_all(&mut *tx),
    )
    .await?;
    for (version, description, template) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        let started = Instant::now();
        within(
            deadline,
            "running an audit migration",
            sqlx::raw_sql(AssertSqlSafe(render(template))).execute(&mut *tx),
        )
        .await?;
        let record = format!(
            "INSERT INTO {table} (version, description, success, checksum, execution_time) \
             VALUES ($1, $2, true, $3, $4) \
             ON CONFLICT (version) DO UPDATE SET success = true, checksum = $3"
        );
        within(
            deadline,
            "recording an audit migration",
            sqlx::query(AssertSqlSafe(record))
                .bind(version)
                .bind(description)
                .bind(mapping::fnv1a(template).to_be_bytes().to_vec())
                .bind(started.elapsed().as_nanos() as i64)
                .execute(&mut *tx),
        )
        .await?;
        tracing::info!(version, description, "applied an audit-table migration");
    }
    within(deadline, "committing the audit migrations", tx.commit()).await
}

/// Reads what the catalog says about the session table and checks that it fits the
/// configuration; returns the mapping with [`ResolvedTable`] filled in. Errors are
/// configuration errors ([`StoreError::is_configuration`]) that name the key to change:
/// a missing table or column, a state column that is neither text nor an enum, a key (plus
/// scope) that is not unique, a naive `updated_at` without `sessions.updated_at_time_zone`,
/// and a connection through a transaction-mode pooler (which cannot hold the writer lock).
pub async fn resolve(
    conn: &mut PgConnection,
    mapping: &TableMapping,
) -> Result<TableMapping, StoreError> {
    let deadline = mapping.deadline;
    let configured = mapping.table_display();
    let table: Option<(i64, String, String, String)> = within(
        deadline,
        "resolving the session table",
        sqlx::query_as(
            "SELECT c.oid::bigint, n.nspname::text, c.relname::text, c.relkind::text \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass($1)",
        )
        .bind(mapping.table.to_string())
        .fetch_optional(&mut *conn),
    )
    .await?;
    let Some((oid, schema, name, kind)) = table else {
        return Err(StoreError::MissingTable { table: configured });
    };
    let canonical = Identifier::from_catalog(&schema, &name);
    let unfit = |message: String| StoreError::Unfit {
        table: format!("{schema}.{name}"),
        message,
    };
    if kind != "r" && kind != "p" {
        return Err(unfit(
            "is not a table (a view or another relation); set sessions.table to the table itself"
                .into(),
        ));
    }
    let columns: Vec<(String, String, String)> = within(
        deadline,
        "reading the session table's columns",
        sqlx::query_as(
            "SELECT a.attname::text, a.atttypid::regtype::text, \
                    t.typtype::text || coalesce(bt.typcategory::text, t.typcategory::text) \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype \
             WHERE a.attrelid = $1::oid AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .bind(oid)
        .fetch_all(&mut *conn),
    )
    .await?;
    let column = |key: &str, column: &Identifier| {
        columns
            .iter()
            .find(|(n, _, _)| n == column.name())
            .map(|(_, ty, class)| (ty.clone(), class.clone()))
            .ok_or_else(|| StoreError::MissingColumn {
                table: format!("{schema}.{name}"),
                column: column.name().to_string(),
                key: key.to_string(),
            })
    };
    for (key, c) in mapping.columns_with_keys() {
        column(&key, &Identifier::parse(c).map_err(unfit)?)?;
    }
    let (key_type, _) = column("sessions.key_column", &mapping.key)?;
    let (state_type, state_class) = column("sessions.state_column", &mapping.state)?;
    let (object_type, object_class) = column("sessions.object_column", &mapping.object)?;
    let (updated_type, _) = column("sessions.updated_at_column", &mapping.updated_at)?;
    let scope_type = match &mapping.scope {
        Some((c, _)) => Some(column("sessions.scope_column", c)?.0),
        None => None,
    };
    // typtype 'e' = enum; category 'S' = string (text, varchar, char, and domains over them).
    if !(state_class.starts_with('e') || state_class.ends_with('S')) {
        return Err(unfit(format!(
            "column {} is of type {state_type}; sessions.state_column must be text, varchar or an enum",
            mapping.state.name()
        )));
    }
    if !object_class.ends_with('S') {
        return Err(unfit(format!(
            "column {} is of type {object_type}; sessions.object_column must be text or varchar",
            mapping.object.name()
        )));
    }
    if state_class.starts_with('e') {
        enum_has_states(conn, deadline, &state_type, mapping)
            .await
            .map_err(|e| match e {
                StoreError::Unfit { message, .. } => unfit(message),
                other => other,
            })?;
    }
    let naive_updated_at = match updated_type.as_str() {
        "timestamp with time zone" => false,
        "timestamp without time zone" => true,
        other => {
            return Err(unfit(format!(
                "column {} is of type {other}; sessions.updated_at_column must be timestamptz or timestamp",
                mapping.updated_at.name()
            )))
        }
    };
    if naive_updated_at {
        let Some(zone) = &mapping.updated_at_zone else {
            return Err(unfit(format!(
                "column {} is a timestamp without time zone, so its values mean nothing without the zone the application writes them in; set sessions.updated_at_time_zone (e.g. \"UTC\" or \"America/New_York\"), or migrate the column to timestamptz",
                mapping.updated_at.name()
            )));
        };
        let known: bool = within(
            deadline,
            "checking sessions.updated_at_time_zone",
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = $1) \
                 OR EXISTS (SELECT 1 FROM pg_timezone_abbrevs WHERE abbrev = $1)",
            )
            .bind(zone)
            .fetch_one(&mut *conn),
        )
        .await?;
        if !known {
            return Err(unfit(format!(
                "sessions.updated_at_time_zone {zone:?} is not a time zone PostgreSQL knows (see pg_timezone_names)"
            )));
        }
    }
    let mut identity = vec![mapping.key.name().to_string()];
    if let Some((c, _)) = &mapping.scope {
        identity.push(c.name().to_string());
    }
    if !key_is_unique(conn, deadline, oid, &identity).await? {
        return Err(unfit(format!(
            "no unique index or primary key covers {}; a row must be identified by sessions.key_column{} alone. If the table holds several clusters' rows (a key unique per cluster), set sessions.scope_column and sessions.scope_value",
            identity.join(" + "),
            if mapping.scope.is_some() { " (+ sessions.scope_column)" } else { "" }
        )));
    }
    if behind_transaction_pooler(conn, deadline).await? {
        return Err(StoreError::Unfit {
            table: format!("{schema}.{name}"),
            message: "database.url reaches PostgreSQL through a transaction-mode pooler (the server session changes between statements), which cannot hold the writer lock; connect directly or through session pooling".into(),
        });
    }
    let mut resolved = mapping.clone();
    resolved.resolved = Some(ResolvedTable {
        oid: u32::try_from(oid).unwrap_or_default(),
        canonical,
        key_type,
        state_type,
        object_type,
        scope_type,
        naive_updated_at,
    });
    Ok(resolved)
}

/// An enum state column must have the suspended and gone states among its labels, or every
/// downgrade would fail at run time; a configuration error instead.
async fn enum_has_states(
    conn: &mut PgConnection,
    deadline: Duration,
    state_type: &str,
    mapping: &TableMapping,
) -> Result<(), StoreError> {
    let labels: Vec<String> = within(
        deadline,
        "reading the state column's enum labels",
        sqlx::query_scalar(
            "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1::regtype ORDER BY enumsortorder",
        )
        .bind(state_type)
        .fetch_all(&mut *conn),
    )
    .await?;
    for (key, state) in [
        ("sessions.suspended_state", &mapping.suspended_state),
        ("sessions.gone_state", &mapping.gone_state),
    ] {
        if !labels.contains(state) {
            return Err(StoreError::Unfit {
                table: String::new(),
                message: format!(
                    "{key} {state:?} is not a value of the state column's enum {state_type} ({}); fix {key} or add the value to the enum",
                    labels.join(", ")
                ),
            });
        }
    }
    Ok(())
}

/// Whether a valid, non-partial unique index (or the primary key) of the table consists of
/// columns among `identity` and includes the first of them (the key).
async fn key_is_unique(
    conn: &mut PgConnection,
    deadline: Duration,
    oid: i64,
    identity: &[String],
) -> Result<bool, StoreError> {
    within(
        deadline,
        "reading the session table's unique indexes",
        sqlx::query_scalar(
            "SELECT EXISTS ( \
               SELECT 1 FROM pg_index i \
               WHERE i.indrelid = $1::oid AND i.indisunique AND i.indisvalid \
                 AND i.indpred IS NULL AND i.indexprs IS NULL \
                 AND (SELECT array_agg(a.attname::text) FROM unnest(i.indkey) k \
                      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k) <@ $2::text[] \
                 AND $3 = ANY (SELECT a.attname::text FROM unnest(i.indkey) k \
                      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k))",
        )
        .bind(oid)
        .bind(identity)
        .bind(&identity[0])
        .fetch_one(&mut *conn),
    )
    .await
}

/// A transaction-mode pooler (PgBouncer `pool_mode = transaction`) may hand consecutive
/// statements to different server sessions: the backend pid changes.
async fn behind_transaction_pooler(
    conn: &mut PgConnection,
    deadline: Duration,
) -> Result<bool, StoreError> {
    let mut pids = HashSet::new();
    for _ in 0..3 {
        let pid: i32 = within(
            deadline,
            "reading the server session",
            sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *conn),
        )
        .await?;
        pids.insert(pid);
    }
    Ok(pids.len() > 1)
}

/// The database server's clock (`clock_timestamp()`, not the transaction start).
pub async fn database_now(
    conn: &mut PgConnection,
    mapping: &TableMapping,
) -> Result<DateTime<Utc>, StoreError> {
    within(
        mapping.deadline,
        "reading the database clock",
        sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(conn),
    )
    .await
}

/// Tries to take the writer lock on `conn`; `Ok(false)` when another session holds it.
///
/// The writer lock has two levels (docs/DESIGN.md, rule 8): every reconciler of a table takes
/// the table's key, a scoped one shared and then its scope's key exclusively, an unscoped one
/// the table's key exclusively. So two scopes write side by side, while an unscoped reconciler
/// (which writes every scope's rows) and a scoped one exclude each other. A server session
/// that already holds any of these keys is refused ([`StoreError::LockShared`]): this
/// connection never took them, so a pooler shares the server session with another client.
pub async fn try_writer_lock(
    conn: &mut PgConnection,
    mapping: &TableMapping,
) -> Result<bool, StoreError> {
    let taken: Option<bool> = within(
        mapping.deadline,
        "taking the writer lock",
        sqlx::query_scalar(AssertSqlSafe(mapping.try_writer_lock_sql())).fetch_one(conn),
    )
    .await?;
    taken.ok_or_else(|| StoreError::LockShared {
        table: mapping.table_display(),
    })
}

/// Releases the writer lock held by `conn`.
pub async fn release_writer_lock(
    conn: &mut PgConnection,
    mapping: &TableMapping,
) -> Result<(), StoreError> {
    within(
        mapping.deadline,
        "releasing the writer lock",
        sqlx::raw_sql(AssertSqlSafe(mapping.release_writer_lock_sql())).execute(conn),
    )
    .await
    .map(|_| ())
}

/// Whether the server session of `conn` holds the writer lock (every part, in its mode).
pub async fn holds_writer_lock(
    conn: &mut PgConnection,
    mapping: &TableMapping,
) -> Result<bool, StoreError> {
    within(
        mapping.deadline,
        "checking the writer lock",
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT {}",
            mapping.writer_lock_held_sql()
        )))
        .fetch_one(conn),
    )
    .await
}

/// Checks that `conn` still answers (the writer connection, before each sweep).
pub async fn ping(conn: &mut PgConnection, mapping: &TableMapping) -> bool {
    within(
        mapping.deadline,
        "checking the connection",
        sqlx::query("SELECT 1").execute(conn),
    )
    .await
    .is_ok()
}

/// Streams the rows into `planner` from one consistent snapshot of the table. Rows in the
/// gone state are only counted (they claim no object).
pub async fn read_rows(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    planner: &mut impl RowSink,
) -> Result<(), StoreError> {
    let deadline = mapping.deadline;
    let mut tx = within(
        deadline,
        "starting the read transaction",
        conn.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
    )
    .await?;
    let gone: i64 = within(
        deadline,
        "counting gone rows",
        sqlx::query_scalar(AssertSqlSafe(mapping.count_gone_sql()))
            .bind(&mapping.gone_state)
            .bind(mapping.scope_value())
            .fetch_one(&mut *tx),
    )
    .await?;
    planner.count_state(Some(&mapping.gone_state), gone as u64);

    let select_sql = mapping.select_rows_sql();
    let mut stream = sqlx::query(AssertSqlSafe(select_sql))
        .bind(&mapping.gone_state)
        .bind(mapping.scope_value())
        .fetch(&mut *tx);
    // The deadline applies to each wait for the next row: a long table streams for as long
    // as rows keep coming, a connection that stops answering fails.
    while let Some(row) = within(deadline, "reading session rows", stream.try_next()).await? {
        planner.observe(&decode_row(&row));
    }
    drop(stream);
    within(deadline, "ending the read transaction", tx.commit()).await
}

/// One row by its key (in the scope), in a READ ONLY transaction; `None` when there is none.
pub async fn read_row(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    key: &str,
) -> Result<Option<SessionRow>, StoreError> {
    let deadline = mapping.deadline;
    let what = "reading the session row";
    let mut tx = within(
        deadline,
        what,
        conn.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
    )
    .await?;
    let row = within(
        deadline,
        what,
        sqlx::query(AssertSqlSafe(mapping.select_row_sql()))
            .bind(key)
            .bind(mapping.scope_value())
            .fetch_optional(&mut *tx),
    )
    .await?;
    within(deadline, what, tx.commit()).await?;
    Ok(row.as_ref().map(decode_row))
}

fn decode_row(row: &PgRow) -> SessionRow {
    SessionRow {
        key: row
            .try_get::<Option<String>, _>(0)
            .ok()
            .flatten()
            .unwrap_or_default(),
        state: row.try_get(1).ok().flatten(),
        object: row.try_get(2).ok().flatten(),
        updated_at: row.try_get(3).ok().flatten(),
    }
}

/// The check after every writing statement: each row it locked was updated and audited, and
/// each planned key changed at most once. Anything else means the statement touched rows it
/// was not asked to (or skipped an audit record), and the transaction must not commit.
pub fn check_written(
    what: &'static str,
    planned: &HashSet<&str>,
    locked: i64,
    updated: i64,
    audited: &[String],
) -> Result<(), StoreError> {
    let unique: HashSet<&str> = audited.iter().map(String::as_str).collect();
    let consistent = locked == updated
        && usize::try_from(updated).is_ok_and(|n| n == audited.len())
        && unique.len() == audited.len()
        && unique.is_subset(planned);
    if consistent {
        return Ok(());
    }
    Err(StoreError::Query {
        what,
        message: format!(
            "the statement locked {locked} rows, updated {updated} and audited {} ({} distinct keys) for {} planned keys; rolled back, nothing was written. The session table may have rows the reconciler cannot tell apart (a key that is not unique): check sessions.key_column and sessions.scope_column",
            audited.len(),
            unique.len(),
            planned.len()
        ),
    })
}

/// The writing statement's own proof that its server session holds the writer lock; without
/// it the statement wrote nothing, and the transaction is rolled back all the same.
fn writer_proof(what: &'static str, mapping: &TableMapping, held: bool) -> Result<(), StoreError> {
    if held {
        return Ok(());
    }
    tracing::error!(
        table = %mapping.table_display(),
        "{what}: the server session does not hold the writer lock; rolled back, nothing written"
    );
    Err(StoreError::NotWriter {
        what,
        table: mapping.table_display(),
    })
}

/// Rolls `tx` back after a failed check (a connection that fails here has lost the
/// transaction anyway: the server rolls it back).
async fn rollback(tx: sqlx::Transaction<'_, sqlx::Postgres>, deadline: Duration) {
    if let Err(e) = within(deadline, "rolling back", tx.rollback()).await {
        tracing::warn!(error = %e, "rolling back failed; the server rolls back when the connection ends");
    }
}

/// One orphan ready to be written, with its confirmation evidence.
#[derive(Debug, Clone)]
pub struct Downgrade<'a> {
    pub row: &'a OrphanedRow,
    /// Shared by every row a listing or the cache confirmed at once, so that a clean-up of
    /// 100,000 rows builds and serialises it once per batch, not once per row.
    pub evidence: std::sync::Arc<serde_json::Value>,
}

/// What one batch did.
#[derive(Debug, Clone, Default)]
pub struct BatchOutcome {
    /// Keys downgraded (and audited).
    pub downgraded: Vec<String>,
    /// Rows not downgraded because they changed or were locked since they were read.
    pub skipped_changed: usize,
}

/// Downgrades one batch in one transaction: only rows still exactly as read are changed,
/// each with its audit record.
pub async fn apply_batch(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    sweep_id: uuid::Uuid,
    batch: &[Downgrade<'_>],
) -> Result<BatchOutcome, StoreError> {
    let keys: Vec<&str> = batch.iter().map(|d| d.row.key.as_str()).collect();
    let objects: Vec<&str> = batch.iter().map(|d| d.row.object.as_str()).collect();
    let updated: Vec<DateTime<Utc>> = batch.iter().map(|d| d.row.updated_at).collect();
    let backends: Vec<&str> = batch.iter().map(|d| d.row.backend.as_str()).collect();
    // Each distinct evidence document once (rows confirmed together share one), and per row
    // its 1-based index.
    let mut documents: Vec<String> = Vec::new();
    let mut doc_of: Vec<i32> = Vec::with_capacity(batch.len());
    for (i, d) in batch.iter().enumerate() {
        let shared = i > 0 && std::sync::Arc::ptr_eq(&batch[i - 1].evidence, &d.evidence);
        if !shared {
            documents.push(d.evidence.to_string());
        }
        doc_of.push(documents.len() as i32);
    }
    let deadline = mapping.deadline;
    let mut tx = within(deadline, "starting the apply transaction", conn.begin()).await?;
    let sql = mapping.downgrade_sql();
    let (held, locked, updated, downgraded): (bool, i64, i64, Vec<String>) = within(
        deadline,
        "downgrading a batch",
        sqlx::query_as(AssertSqlSafe(sql))
            .bind(&keys)
            .bind(&objects)
            .bind(&updated)
            .bind(&backends)
            .bind(&doc_of)
            .bind(&mapping.suspended_state)
            .bind(&mapping.gone_state)
            .bind(sweep_id)
            .bind(mapping.table_display())
            .bind(mapping.scope_value())
            .bind(&documents)
            .fetch_one(&mut *tx),
    )
    .await?;
    let planned: HashSet<&str> = keys.iter().copied().collect();
    let checked = writer_proof("downgrading a batch", mapping, held).and_then(|()| {
        check_written(
            "downgrading a batch",
            &planned,
            locked,
            updated,
            &downgraded,
        )
    });
    if let Err(e) = checked {
        rollback(tx, deadline).await;
        return Err(e);
    }
    commit_writes(tx, deadline, "committing a batch", downgraded.len()).await?;
    Ok(BatchOutcome {
        skipped_changed: batch.len().saturating_sub(downgraded.len()),
        downgraded,
    })
}

/// Which downgrades an undo considers: those of one sweep, of one session, or both.
#[derive(Debug, Clone, Copy)]
pub struct UndoSelection<'a> {
    pub sweep: Option<uuid::Uuid>,
    pub session: Option<&'a str>,
}

/// One downgrade an undo considers, with its row as it is now.
#[derive(Debug, Clone)]
pub struct UndoCandidate {
    pub key: String,
    pub object: Option<String>,
    /// The state the row goes back to.
    pub restore_to: String,
    /// The row's state now (None: the row no longer exists).
    pub current_state: Option<String>,
    /// The row is still exactly as the downgrade left it, so an undo restores it (unless the
    /// application holds it locked at that moment: an undo skips locked rows).
    pub restorable: bool,
    /// The row no longer exists and its record's row image fits the table: an undo inserts it
    /// back (unless a row with that key is inserted first).
    pub insert: bool,
    /// Why a deleted row cannot be inserted back (no row image, or an image that does not fit
    /// the table as it is now); the candidate is listed and left alone.
    pub unrestorable: Option<String>,
    /// The downgrade's audit record id.
    pub audit_id: i64,
    /// The record's row image, read only for a row that no longer exists.
    row_image: Option<serde_json::Value>,
}

async fn undo_candidates(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    selection: UndoSelection<'_>,
) -> Result<Vec<UndoCandidate>, StoreError> {
    let rows = within(
        mapping.deadline,
        "reading the downgrades to undo",
        sqlx::query(AssertSqlSafe(mapping.undo_candidates_sql()))
            .bind(selection.sweep)
            .bind(selection.session)
            .bind(mapping.table_names())
            .bind(mapping.scope_value())
            .fetch_all(&mut *conn),
    )
    .await?;
    let mut candidates = rows
        .iter()
        .map(|r| {
            Ok(UndoCandidate {
                key: r.try_get(0)?,
                object: r.try_get(1)?,
                restore_to: r.try_get(2)?,
                current_state: r.try_get(3)?,
                restorable: r.try_get(5)?,
                row_image: r.try_get(6)?,
                audit_id: r.try_get(7)?,
                insert: false,
                unrestorable: None,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(StoreError::query("reading the downgrades to undo"))?;
    if candidates.iter().any(|c| c.current_state.is_none()) {
        let columns = table_columns(conn, mapping).await?;
        for c in candidates.iter_mut().filter(|c| c.current_state.is_none()) {
            match image_fits(conn, mapping, &columns, c).await? {
                Ok(()) => c.insert = true,
                Err(why) => {
                    tracing::warn!(key = %c.key, audit_id = c.audit_id, "left alone: {why}");
                    c.unrestorable = Some(why);
                }
            }
        }
    }
    Ok(candidates)
}

/// The session table's columns as the catalog has them now: (name, generated).
async fn table_columns(
    conn: &mut PgConnection,
    mapping: &TableMapping,
) -> Result<Vec<(String, bool)>, StoreError> {
    let oid = mapping.resolved.as_ref().map_or(0, |r| i64::from(r.oid));
    within(
        mapping.deadline,
        "reading the session table's columns",
        sqlx::query_as(
            "SELECT attname::text, attgenerated <> '' FROM pg_attribute \
             WHERE attrelid = $1::oid AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        )
        .bind(oid)
        .fetch_all(&mut *conn),
    )
    .await
}

/// Whether a deleted row can be inserted back from its record's image: the image is a JSON
/// object with exactly the table's columns now (a column added or dropped since means the
/// image no longer says what the row should be), it names the same key (and scope), and
/// PostgreSQL reads every value as its column's type (checked by a SELECT inside a savepoint,
/// so a bad image fails alone). `Err(why)` for the operator; the candidate is left alone.
async fn image_fits(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    columns: &[(String, bool)],
    candidate: &UndoCandidate,
) -> Result<Result<(), String>, StoreError> {
    let Some(image) = &candidate.row_image else {
        return Ok(Err(
            "the row was deleted and its audit record keeps no row image (written before the row image was recorded): restore it by hand from the audit record".into(),
        ));
    };
    let Some(fields) = image.as_object() else {
        return Ok(Err(format!(
            "the row was deleted and its audit record's row image is not a JSON object (audit id {}); restore it by hand",
            candidate.audit_id
        )));
    };
    let mut have: Vec<&str> = fields.keys().map(String::as_str).collect();
    have.sort_unstable();
    let mut want: Vec<&str> = columns.iter().map(|(c, _)| c.as_str()).collect();
    want.sort_unstable();
    if have != want {
        let missing: Vec<&str> = want.iter().filter(|c| !have.contains(c)).copied().collect();
        let extra: Vec<&str> = have.iter().filter(|c| !want.contains(c)).copied().collect();
        return Ok(Err(format!(
            "the row was deleted and the table's columns changed since the downgrade (image lacks [{}], has no longer existing [{}]); restore it by hand from the audit record's row_image (audit id {})",
            missing.join(", "),
            extra.join(", "),
            candidate.audit_id
        )));
    }
    let as_text = |v: Option<&serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    if as_text(fields.get(mapping.key.name())).as_deref() != Some(candidate.key.as_str()) {
        return Ok(Err(format!(
            "the row image of audit id {} names another key; left alone",
            candidate.audit_id
        )));
    }
    if let Some((column, value)) = &mapping.scope {
        if as_text(fields.get(column.name())).as_deref() != Some(value.as_str()) {
            return Ok(Err(format!(
                "the row image of audit id {} belongs to another scope; left alone",
                candidate.audit_id
            )));
        }
    }
    let mut savepoint = within(mapping.deadline, "checking a row image", conn.begin()).await?;
    let check = format!(
        "SELECT 1 FROM jsonb_populate_record(NULL::{}, $1::jsonb)",
        mapping.table_sql()
    );
    let read = tokio::time::timeout(
        mapping.deadline,
        sqlx::query(AssertSqlSafe(check))
            .bind(image)
            .execute(&mut *savepoint),
    )
    .await
    .map_err(|_| StoreError::Deadline {
        what: "checking a row image",
        seconds: mapping.deadline.as_secs(),
    })?;
    rollback(savepoint, mapping.deadline).await;
    Ok(read.map(|_| ()).map_err(|e| {
        format!(
            "the row was deleted and its row image (audit id {}) does not read as the table's row ({e}); restore it by hand",
            candidate.audit_id
        )
    }))
}

/// The columns the selected downgrades cleared, from their audit records (not from today's
/// `sessions.clear_columns`, which may have changed since): each must be a column of the table
/// other than the mapped ones, else the undo stops with nothing written.
async fn cleared_columns(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    selection: UndoSelection<'_>,
) -> Result<Vec<Identifier>, StoreError> {
    let what = "reading the columns the downgrades cleared";
    let names: Vec<String> = within(
        mapping.deadline,
        what,
        sqlx::query_scalar(AssertSqlSafe(mapping.cleared_columns_sql()))
            .bind(selection.sweep)
            .bind(selection.session)
            .bind(mapping.table_names())
            .bind(mapping.scope_value())
            .fetch_all(&mut *conn),
    )
    .await?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let oid = mapping.resolved.as_ref().map_or(0, |r| i64::from(r.oid));
    let existing: Vec<String> = within(
        mapping.deadline,
        what,
        sqlx::query_scalar(
            "SELECT attname::text FROM pg_attribute \
             WHERE attrelid = $1::oid AND attnum > 0 AND NOT attisdropped AND attname = ANY($2)",
        )
        .bind(oid)
        .bind(&names)
        .fetch_all(&mut *conn),
    )
    .await?;
    let unfit = |message: String| StoreError::Unfit {
        table: mapping.table_display(),
        message,
    };
    names
        .iter()
        .map(|name| {
            if !mapping.restorable_column(name) || !existing.contains(name) {
                return Err(unfit(format!(
                    "an audit record cleared column {name:?}, which the table no longer has (or which is a mapped column); nothing was undone: restore those rows by hand from the audit records' cleared values"
                )));
            }
            Identifier::parse(name).map_err(|e| unfit(format!("audit record column {name:?}: {e}")))
        })
        .collect()
}

/// What an undo would do, read in one READ ONLY transaction: no row lock, no write, no
/// trigger fired, so it works beside a running writer and waits for no application lock.
pub async fn preview_undo(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    selection: UndoSelection<'_>,
) -> Result<Vec<UndoCandidate>, StoreError> {
    let deadline = mapping.deadline;
    let mut tx = within(
        deadline,
        "starting the undo preview",
        conn.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
    )
    .await?;
    let candidates = undo_candidates(&mut tx, mapping, selection).await?;
    within(deadline, "ending the undo preview", tx.commit()).await?;
    Ok(candidates)
}

/// Undoes the selected downgrades in one transaction: rows still exactly as the downgrade
/// left them are restored, rows deleted since are inserted back from their row image (when it
/// fits the table, and no row with the key exists), and each is audited (`action = 'undo'`, `undo_id` as the sweep id); the
/// others are left alone. Returns every candidate and the keys restored.
pub async fn apply_undo(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    selection: UndoSelection<'_>,
    undo_id: uuid::Uuid,
) -> Result<(Vec<UndoCandidate>, Vec<String>), StoreError> {
    let deadline = mapping.deadline;
    let what = "undoing downgrades";
    let mut tx = within(deadline, what, conn.begin()).await?;
    let candidates = undo_candidates(&mut tx, mapping, selection).await?;
    let restore = match cleared_columns(&mut tx, mapping, selection).await {
        Ok(columns) => columns,
        Err(e) => {
            rollback(tx, deadline).await;
            return Err(e);
        }
    };
    let inserts: Vec<i64> = candidates
        .iter()
        .filter(|c| c.insert)
        .map(|c| c.audit_id)
        .collect();
    let insert_columns: Vec<Identifier> = if inserts.is_empty() {
        Vec::new()
    } else {
        table_columns(&mut tx, mapping)
            .await?
            .into_iter()
            .filter(|(_, generated)| !generated)
            .map(|(name, _)| {
                Identifier::parse(&name).map_err(|e| StoreError::Unfit {
                    table: mapping.table_display(),
                    message: format!("column {name:?}: {e}"),
                })
            })
            .collect::<Result<_, _>>()?
    };
    let (held, locked, updated, restored, inserted): (bool, i64, i64, Vec<String>, Vec<String>) =
        within(
            deadline,
            what,
            sqlx::query_as(AssertSqlSafe(mapping.undo_sql(&restore, &insert_columns)))
                .bind(selection.sweep)
                .bind(selection.session)
                .bind(mapping.table_names())
                .bind(undo_id)
                .bind(mapping.scope_value())
                .bind(mapping.table_display())
                .bind(&inserts)
                .fetch_one(&mut *tx),
        )
        .await?;
    let planned: HashSet<&str> = candidates.iter().map(|c| c.key.as_str()).collect();
    let checked = writer_proof(what, mapping, held)
        .and_then(|()| check_written(what, &planned, locked, updated, &restored));
    if let Err(e) = checked {
        rollback(tx, deadline).await;
        return Err(e);
    }
    commit_writes(tx, deadline, "committing the undo", restored.len()).await?;
    let mut candidates = candidates;
    for c in &mut candidates {
        // Inserted only if it was still missing when the statement ran.
        c.insert = c.insert && inserted.contains(&c.key);
    }
    Ok((candidates, restored))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "p@ss w/rd";
    const ENCODED: &str = "p%40ss%20w%2Frd";

    #[test]
    fn redact_hides_every_secret_a_url_carries() {
        for url in [
            format!("postgres://u:{ENCODED}@h:5432/db"),
            format!("postgres://u@h/db?sslmode=require&password={ENCODED}"),
            format!("postgres://u@h/db?sslkey=/keys/client.key&sslpassword={ENCODED}"),
        ] {
            let text = format!("failed: {SECRET} / {ENCODED} / {url}");
            let hidden = redact(&text, &url);
            assert!(!hidden.contains(SECRET), "{hidden}");
            assert!(!hidden.contains(ENCODED), "{hidden}");
            assert!(!hidden.contains("p@ss"), "{hidden}");
        }
        // A key path is not a secret; the host and database stay readable.
        let url = "postgres://u@h/db?sslkey=/keys/client.key";
        assert_eq!(redact("at h/db", url), "at h/db");
        assert_eq!(redact("key /keys/client.key", url), "key /keys/client.key");
    }

    #[test]
    fn url_parameters_the_driver_does_not_know_are_refused_without_their_value() {
        let err = vet_url(&format!("postgres://u@h/db?sslpassword={ENCODED}")).unwrap_err();
        let message = err.to_string();
        assert!(message.starts_with("database.url: "), "{message}");
        assert!(message.contains("sslpassword"), "{message}");
        assert!(
            !message.contains(ENCODED) && !message.contains(SECRET),
            "{message}"
        );
        assert!(err.is_configuration());
        let err = vet_url("postgres://u@h/db?target_session_attrs=read-write").unwrap_err();
        assert!(err.to_string().contains("target_session_attrs"), "{err}");
        assert!(!err.to_string().contains("read-write"), "{err}");
        // Harmless libpq-only parameters are dropped, the driver's own kept in order.
        assert_eq!(
            vet_url("postgres://u@h/db?connect_timeout=5&sslmode=require&keepalives=1&sslkey=/k")
                .unwrap(),
            "postgres://u@h/db?sslmode=require&sslkey=/k"
        );
        assert_eq!(
            vet_url("postgres://u@h/db?connect_timeout=5").unwrap(),
            "postgres://u@h/db"
        );
        assert_eq!(vet_url("postgres://u@h/db").unwrap(), "postgres://u@h/db");
        assert_eq!(percent_decode("a%2Fb%zz+c"), "a/b%zz c");
    }
}
