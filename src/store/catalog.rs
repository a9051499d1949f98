//! What the catalog says about the session table: its name, columns, types, enum labels and
//! unique indexes, and whether the connection reaches one server session; [`resolve`] checks
//! that all of it fits the configuration.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::postgres::PgConnection;

use super::{within, ResolvedTable, StoreError, TableMapping};
use crate::sql::Identifier;

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
    let table = find_table(conn, mapping).await?;
    let columns = read_columns(conn, deadline, &table).await?;
    let types = mapped_column_types(mapping, &table, &columns)?;
    check_state_and_object_types(conn, mapping, &table, &types).await?;
    let naive_updated_at = updated_at_is_naive(mapping, &table, &types.updated)?;
    if naive_updated_at {
        check_time_zone(conn, mapping, &table).await?;
    }
    check_key_is_unique(conn, mapping, &table).await?;
    check_one_server_session(conn, deadline, &table).await?;
    let mut resolved = mapping.clone();
    resolved.resolved = Some(ResolvedTable {
        oid: u32::try_from(table.oid).unwrap_or_default(),
        canonical: Identifier::from_catalog(&table.schema, &table.name),
        key_type: types.key,
        state_type: types.state,
        object_type: types.object,
        scope_type: types.scope,
        naive_updated_at,
    });
    Ok(resolved)
}

/// The session table as the catalog names it.
struct CatalogTable {
    oid: i64,
    schema: String,
    name: String,
}

impl CatalogTable {
    fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// The table does not fit the configuration: `message` names the key to change.
    fn unfit(&self, message: String) -> StoreError {
        StoreError::Unfit {
            table: self.display(),
            message,
        }
    }
}

/// The mapped columns' types: `regtype` text, and for the state and object columns the
/// type's class (typtype and category, see [`read_columns`]).
struct MappedTypes {
    key: String,
    state: String,
    state_class: String,
    object: String,
    object_class: String,
    updated: String,
    scope: Option<String>,
}

/// The configured table, found by `to_regclass` (so the search path and quoting apply as in
/// the application's own statements); it must be a table, plain or partitioned.
async fn find_table(
    conn: &mut PgConnection,
    mapping: &TableMapping,
) -> Result<CatalogTable, StoreError> {
    let found: Option<(i64, String, String, String)> = within(
        mapping.deadline,
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
    let Some((oid, schema, name, kind)) = found else {
        return Err(StoreError::MissingTable {
            table: mapping.table_display(),
        });
    };
    let table = CatalogTable { oid, schema, name };
    if kind != "r" && kind != "p" {
        return Err(table.unfit(
            "is not a table (a view or another relation); set sessions.table to the table itself"
                .into(),
        ));
    }
    Ok(table)
}

/// Every column of the table: name, type (`regtype` text) and class (typtype followed by the
/// type's category, a domain's taken from its base type).
async fn read_columns(
    conn: &mut PgConnection,
    deadline: Duration,
    table: &CatalogTable,
) -> Result<Vec<(String, String, String)>, StoreError> {
    within(
        deadline,
        "reading the session table's columns",
        sqlx::query_as(
            "SELECT a.attname::text, a.atttypid::regtype::text, \
                    t.typtype::text || coalesce(bt.typcategory::text, t.typcategory::text) \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype \
             WHERE a.attrelid = $1::oid AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .bind(table.oid)
        .fetch_all(&mut *conn),
    )
    .await
}

/// Every configured column must be a column of the table; returns the mapped ones' types.
fn mapped_column_types(
    mapping: &TableMapping,
    table: &CatalogTable,
    columns: &[(String, String, String)],
) -> Result<MappedTypes, StoreError> {
    let column = |key: &str, column: &Identifier| {
        columns
            .iter()
            .find(|(n, _, _)| n == column.name())
            .map(|(_, ty, class)| (ty.clone(), class.clone()))
            .ok_or_else(|| StoreError::MissingColumn {
                table: table.display(),
                column: column.name().to_string(),
                key: key.to_string(),
            })
    };
    for (key, c) in mapping.columns_with_keys() {
        column(&key, &Identifier::parse(c).map_err(|m| table.unfit(m))?)?;
    }
    let (key, _) = column("sessions.key_column", &mapping.key)?;
    let (state, state_class) = column("sessions.state_column", &mapping.state)?;
    let (object, object_class) = column("sessions.object_column", &mapping.object)?;
    let (updated, _) = column("sessions.updated_at_column", &mapping.updated_at)?;
    let scope = match &mapping.scope {
        Some((c, _)) => Some(column("sessions.scope_column", c)?.0),
        None => None,
    };
    Ok(MappedTypes {
        key,
        state,
        state_class,
        object,
        object_class,
        updated,
        scope,
    })
}

/// The state column must be text (or varchar, or a domain over them) or an enum that has the
/// configured states among its labels; the object column must be text.
async fn check_state_and_object_types(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    table: &CatalogTable,
    types: &MappedTypes,
) -> Result<(), StoreError> {
    // typtype 'e' = enum; category 'S' = string (text, varchar, char, and domains over them).
    let state_is_enum = types.state_class.starts_with('e');
    if !(state_is_enum || types.state_class.ends_with('S')) {
        return Err(table.unfit(format!(
            "column {} is of type {}; sessions.state_column must be text, varchar or an enum",
            mapping.state.name(),
            types.state
        )));
    }
    if !types.object_class.ends_with('S') {
        return Err(table.unfit(format!(
            "column {} is of type {}; sessions.object_column must be text or varchar",
            mapping.object.name(),
            types.object
        )));
    }
    if state_is_enum {
        enum_has_states(conn, mapping.deadline, &types.state, mapping)
            .await
            .map_err(|e| match e {
                StoreError::Unfit { message, .. } => table.unfit(message),
                other => other,
            })?;
    }
    Ok(())
}

/// Whether `updated_at` is a `timestamp without time zone` (read in
/// `sessions.updated_at_time_zone`, which it then needs); any type but the two timestamps is
/// refused.
fn updated_at_is_naive(
    mapping: &TableMapping,
    table: &CatalogTable,
    updated_type: &str,
) -> Result<bool, StoreError> {
    let naive = match updated_type {
        "timestamp with time zone" => false,
        "timestamp without time zone" => true,
        other => {
            return Err(table.unfit(format!(
                "column {} is of type {other}; sessions.updated_at_column must be timestamptz or timestamp",
                mapping.updated_at.name()
            )))
        }
    };
    if naive && mapping.updated_at_zone.is_none() {
        return Err(table.unfit(format!(
            "column {} is a timestamp without time zone, so its values mean nothing without the zone the application writes them in; set sessions.updated_at_time_zone (e.g. \"UTC\" or \"America/New_York\"), or migrate the column to timestamptz",
            mapping.updated_at.name()
        )));
    }
    Ok(naive)
}

/// `sessions.updated_at_time_zone` must be a zone name or abbreviation PostgreSQL knows.
async fn check_time_zone(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    table: &CatalogTable,
) -> Result<(), StoreError> {
    let zone = mapping.updated_at_zone.as_deref().unwrap_or_default();
    let known: bool = within(
        mapping.deadline,
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
        return Err(table.unfit(format!(
            "sessions.updated_at_time_zone {zone:?} is not a time zone PostgreSQL knows (see pg_timezone_names)"
        )));
    }
    Ok(())
}

/// A row must be identified by its key (plus the scope column, when scoped): some unique
/// index or the primary key must cover it.
async fn check_key_is_unique(
    conn: &mut PgConnection,
    mapping: &TableMapping,
    table: &CatalogTable,
) -> Result<(), StoreError> {
    let mut identity = vec![mapping.key.name().to_string()];
    if let Some((c, _)) = &mapping.scope {
        identity.push(c.name().to_string());
    }
    if !key_is_unique(conn, mapping.deadline, table.oid, &identity).await? {
        return Err(table.unfit(format!(
            "no unique index or primary key covers {}; a row must be identified by sessions.key_column{} alone. If the table holds several clusters' rows (a key unique per cluster), set sessions.scope_column and sessions.scope_value",
            identity.join(" + "),
            if mapping.scope.is_some() { " (+ sessions.scope_column)" } else { "" }
        )));
    }
    Ok(())
}

/// The connection must keep one server session: a transaction-mode pooler cannot hold the
/// writer lock.
async fn check_one_server_session(
    conn: &mut PgConnection,
    deadline: Duration,
    table: &CatalogTable,
) -> Result<(), StoreError> {
    if behind_transaction_pooler(conn, deadline).await? {
        return Err(table.unfit(
            "database.url reaches PostgreSQL through a transaction-mode pooler (the server session changes between statements), which cannot hold the writer lock; connect directly or through session pooling".into(),
        ));
    }
    Ok(())
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

/// The session table's columns as the catalog has them now: (name, generated).
pub(super) async fn table_columns(
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
