//! The configured mapping of the session table, and the SQL generated from it.
//!
//! Every identifier is validated and quoted ([`Identifier`]); values (states, scope, keys)
//! are always bound parameters. Once [`super::resolve`] has read the catalog, the SQL names the
//! table by its canonical `schema.table` (whatever the spelling in the configuration) and
//! casts bound values to each column's own type, so a `uuid` or `bigint` key is compared with
//! its index and an enum state column works. Rows are changed by the physical identity of
//! the row that the same statement locked, never by key alone, so another scope's row with
//! the same key can never be touched. That identity is the pair (`tableoid`, `ctid`): a `ctid`
//! is unique only within one relation, and each partition of a partitioned table (or child of
//! an inherited one) numbers its rows from `(0,1)` again.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, Postgres};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Execute};

use crate::config::Settings;
use crate::sql::{literal, Identifier};

/// A statement with its arguments bound, ready to run: the function that writes its SQL
/// binds its `$1..$n` too, so the numbers and the order of the values live in one place.
pub type Statement = Query<'static, Postgres, PgArguments>;

/// The SQL text of a statement (for `EXPLAIN`, and for tests that read the text).
fn sql_of(statement: Statement) -> String {
    statement.sql().as_str().to_string()
}

/// One batch of downgrades as the downgrade statement takes them, one array per column.
#[derive(Debug, Clone, Default)]
pub struct DowngradeBatch<'a> {
    pub keys: Vec<&'a str>,
    pub objects: Vec<&'a str>,
    /// `updated_at` as read.
    pub updated_at: Vec<DateTime<Utc>>,
    pub backends: Vec<&'a str>,
    /// Each row's evidence as a 1-based index into `documents`.
    pub evidence_of: Vec<i32>,
    /// The batch's distinct evidence documents (JSON text).
    pub documents: Vec<String>,
    pub sweep_id: uuid::Uuid,
}

/// Which downgrades an undo considers: those of one sweep, of one session, or both.
#[derive(Debug, Clone, Copy)]
pub struct UndoSelection<'a> {
    pub sweep: Option<uuid::Uuid>,
    pub session: Option<&'a str>,
}

/// What the catalog says about the session table (see [`super::resolve`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTable {
    /// `pg_class.oid`.
    pub oid: u32,
    /// The canonical name: the schema and name the table really has.
    pub canonical: Identifier,
    /// Each mapped column's type as `regtype` text (quoted and qualified as needed).
    pub key_type: String,
    pub state_type: String,
    pub object_type: String,
    pub scope_type: Option<String>,
    /// `timestamp without time zone`: read in `sessions.updated_at_time_zone`.
    pub naive_updated_at: bool,
}

#[derive(Debug, Clone)]
pub struct TableMapping {
    /// The table as configured (possibly unqualified).
    pub table: Identifier,
    pub key: Identifier,
    pub state: Identifier,
    pub object: Identifier,
    pub updated_at: Identifier,
    pub clear: Vec<Identifier>,
    /// Optional row scope: column and value.
    pub scope: Option<(Identifier, String)>,
    pub suspended_state: String,
    pub gone_state: String,
    pub audit: Identifier,
    /// The zone a `timestamp without time zone` updated_at column is written in.
    pub updated_at_zone: Option<String>,
    /// Client-side deadline of every database call (a half-open connection never answers).
    pub deadline: Duration,
    /// Filled from the catalog by [`super::resolve`]; `None` until then.
    pub resolved: Option<ResolvedTable>,
}

impl TableMapping {
    /// Builds the mapping from validated settings.
    pub fn from_settings(settings: &Settings) -> Result<TableMapping, String> {
        let s = &settings.sessions;
        let scope = if s.scope_column.is_empty() {
            None
        } else {
            Some((Identifier::parse(&s.scope_column)?, s.scope_value.clone()))
        };
        Ok(TableMapping {
            table: Identifier::parse_qualified(&s.table)?,
            key: Identifier::parse(&s.key_column)?,
            state: Identifier::parse(&s.state_column)?,
            object: Identifier::parse(&s.object_column)?,
            updated_at: Identifier::parse(&s.updated_at_column)?,
            clear: s
                .clear_columns
                .iter()
                .map(|c| Identifier::parse(c))
                .collect::<Result<_, _>>()?,
            scope,
            suspended_state: s.suspended_state.clone(),
            gone_state: s.gone_state.clone(),
            audit: Identifier::parse_qualified(&settings.audit.table)?,
            updated_at_zone: Some(s.updated_at_time_zone.trim().to_string())
                .filter(|z| !z.is_empty()),
            deadline: settings
                .database
                .client_deadline
                .max(Duration::from_secs(1)),
            resolved: None,
        })
    }

    /// The table for messages, audit records and the writer lock: the canonical
    /// `schema.table` once resolved, else as configured (unquoted).
    pub fn table_display(&self) -> String {
        let t = self.resolved.as_ref().map_or(&self.table, |r| &r.canonical);
        match t.schema() {
            Some(schema) => format!("{schema}.{}", t.name()),
            None => t.name().to_string(),
        }
    }

    /// Every name audit records of this table may carry: the canonical name and the
    /// configured spelling (records written before the table was resolved by catalog).
    pub fn table_names(&self) -> Vec<String> {
        let configured = match self.table.schema() {
            Some(schema) => format!("{schema}.{}", self.table.name()),
            None => self.table.name().to_string(),
        };
        let mut names = vec![self.table_display()];
        if !names.contains(&configured) {
            names.push(configured);
        }
        names
    }

    /// The scope value, if the rows are scoped.
    pub fn scope_value(&self) -> Option<&str> {
        self.scope.as_ref().map(|(_, v)| v.as_str())
    }

    /// The table in SQL: canonical and quoted once resolved.
    pub fn table_sql(&self) -> String {
        self.t()
    }

    /// The table in SQL: canonical and quoted once resolved.
    fn t(&self) -> String {
        self.resolved
            .as_ref()
            .map_or(&self.table, |r| &r.canonical)
            .to_string()
    }

    /// A cast of a text value to the column's type (`::text` until resolved).
    fn cast(&self, column: Column) -> String {
        let r = self.resolved.as_ref();
        let ty = match column {
            Column::Key => r.map(|r| r.key_type.as_str()),
            Column::State => r.map(|r| r.state_type.as_str()),
            Column::Object => r.map(|r| r.object_type.as_str()),
            Column::Scope => r.and_then(|r| r.scope_type.as_deref()),
        };
        format!("::{}", ty.unwrap_or("text"))
    }

    fn naive(&self) -> bool {
        self.resolved.as_ref().is_some_and(|r| r.naive_updated_at)
    }

    /// `updated_at` of `alias` as a timestamptz: a naive column is read in its configured
    /// zone, so ages are compared in the application's own terms.
    fn updated_at_expr(&self, alias: &str) -> String {
        match (&self.updated_at_zone, self.naive()) {
            (Some(zone), true) => format!(
                "({alias}{} AT TIME ZONE {})",
                self.updated_at,
                literal(zone)
            ),
            _ => format!("{alias}{}::timestamptz", self.updated_at),
        }
    }

    /// The value written to `updated_at`: now, in the column's own terms.
    fn now_expr(&self) -> String {
        match (&self.updated_at_zone, self.naive()) {
            (Some(zone), true) => format!("(now() AT TIME ZONE {})", literal(zone)),
            _ => "now()".to_string(),
        }
    }

    /// Every mapped column with the config key that names it.
    pub fn columns_with_keys(&self) -> Vec<(String, &str)> {
        let mut out = vec![
            ("sessions.key_column".to_string(), self.key.name()),
            ("sessions.state_column".to_string(), self.state.name()),
            ("sessions.object_column".to_string(), self.object.name()),
            (
                "sessions.updated_at_column".to_string(),
                self.updated_at.name(),
            ),
        ];
        for (i, c) in self.clear.iter().enumerate() {
            out.push((format!("sessions.clear_columns[{i}]"), c.name()));
        }
        if let Some((c, _)) = &self.scope {
            out.push(("sessions.scope_column".to_string(), c.name()));
        }
        out
    }

    /// `AND <alias><scope> = $n`, or nothing.
    fn scope_clause(&self, alias: &str, param: usize) -> String {
        match &self.scope {
            Some((column, _)) => format!(
                " AND {alias}{column} = ${param}{}",
                self.cast(Column::Scope)
            ),
            None => String::new(),
        }
    }

    /// The text of [`Self::count_gone`].
    pub fn count_gone_sql(&self) -> String {
        sql_of(self.count_gone())
    }

    /// How many rows (in the scope) are in the gone state.
    pub fn count_gone(&self) -> Statement {
        let sql = format!(
            "SELECT count(*) FROM {} WHERE {} = $1{}{}",
            self.t(),
            self.state,
            self.cast(Column::State),
            self.scope_clause("", 2)
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(&self.gone_state)
            .bind(self.scope_value())
    }

    /// The text of [`Self::select_rows`].
    pub fn select_rows_sql(&self) -> String {
        sql_of(self.select_rows())
    }

    /// Every row (in the scope) not in the gone state: key, state, object, updated_at.
    pub fn select_rows(&self) -> Statement {
        let sql = format!(
            "SELECT {k}::text, {s}::text, {o}::text, {u} FROM {t} \
             WHERE {s} IS DISTINCT FROM $1{scast}{scope}",
            k = self.key,
            s = self.state,
            o = self.object,
            u = self.updated_at_expr(""),
            t = self.t(),
            scast = self.cast(Column::State),
            scope = self.scope_clause("", 2)
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(&self.gone_state)
            .bind(self.scope_value())
    }

    /// One row by its key (in the scope): key, state, object, updated_at, as
    /// [`Self::select_rows`] reads them. The key is compared as text, as the sweep reports
    /// it, so a key that is not of the column's type (a typo for a uuid key) finds no row
    /// instead of failing.
    pub fn select_row(&self, key: &str) -> Statement {
        let sql = format!(
            "SELECT {k}::text, {s}::text, {o}::text, {u} FROM {t} WHERE {k}::text = $1{scope}",
            k = self.key,
            s = self.state,
            o = self.object,
            u = self.updated_at_expr(""),
            t = self.t(),
            scope = self.scope_clause("", 2)
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(key)
            .bind(self.scope_value())
    }

    /// One statement that locks the rows still exactly as read (skipping rows the
    /// application holds), downgrades exactly those rows (by the locked row's `tableoid` and
    /// `ctid`), clears the configured columns and writes one audit record per row with the old
    /// values and the whole row as it was (`row_image`, `to_jsonb` of the locked row before the
    /// update), only if this server session holds the writer lock. Returns one row: whether it
    /// holds the lock, the number of rows locked, the number updated, and the keys audited
    /// (the caller checks that they agree before committing).
    ///
    /// The batch's evidence documents are sent once (`$11`), each row naming its own by index:
    /// a listing or the cache confirms a whole batch with one document, so it is sent and
    /// parsed once, not once per row (an uncorrelated subquery, which PostgreSQL runs once per
    /// statement as an InitPlan).
    pub fn downgrade(&self, batch: &DowngradeBatch<'_>) -> Statement {
        let (cleared, set) = self.downgrade_changes();
        let sql = format!(
            "WITH proof AS (SELECT {held} AS held), c AS ( \
               SELECT c.key, c.object, c.updated_at, c.backend, \
                      (SELECT array_agg(d.doc::jsonb ORDER BY d.n) \
                       FROM unnest($11::text[]) WITH ORDINALITY AS d(doc, n))[c.doc] AS evidence \
               FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::int4[]) \
                 AS c(key, object, updated_at, backend, doc) \
             ), old AS ( \
               SELECT t.tableoid AS row_rel, t.ctid AS row_id, t.{k}::text AS key, \
                      t.{s}::text AS old_state, \
                      t.{o}::text AS object, {tu} AS old_updated_at, {cleared} AS cleared, \
                      to_jsonb(t) AS row_image, c.backend, c.evidence \
               FROM {t} t JOIN c ON t.{k} = c.key{kcast} \
               WHERE t.{s} = $6{scast} AND t.{o} = c.object{ocast} \
                 AND {tu} = c.updated_at{scope} AND (SELECT held FROM proof) \
               FOR UPDATE OF t SKIP LOCKED \
             ), upd AS ( \
               UPDATE {t} t SET {set} FROM old \
               WHERE t.tableoid = old.row_rel AND t.ctid = old.row_id \
               RETURNING old.key, old.old_state, old.object, old.old_updated_at, old.cleared, \
                         old.row_image, old.backend, old.evidence, {tu} AS new_updated_at \
             ), audited AS ( \
               INSERT INTO {a} (sweep_id, action, session_table, session_scope, session_key, \
                                object_name, backend, old_state, new_state, old_updated_at, \
                                new_updated_at, cleared, reason, evidence, row_image) \
               SELECT $8, 'downgrade', $9, $10, key, object, backend, old_state, $7, \
                      old_updated_at, new_updated_at, cleared, 'orphaned_suspended', evidence, \
                      row_image \
               FROM upd \
               RETURNING session_key \
             ) \
             SELECT (SELECT held FROM proof), (SELECT count(*) FROM old), \
                    (SELECT count(*) FROM upd), \
                    coalesce((SELECT array_agg(session_key) FROM audited), '{{}}'::text[])",
            k = self.key,
            s = self.state,
            o = self.object,
            tu = self.updated_at_expr("t."),
            t = self.t(),
            a = self.audit,
            kcast = self.cast(Column::Key),
            scast = self.cast(Column::State),
            ocast = self.cast(Column::Object),
            set = set,
            scope = self.scope_clause("t.", 10),
            held = self.writer_lock_held_sql(),
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(&batch.keys) // $1
            .bind(&batch.objects) // $2
            .bind(&batch.updated_at) // $3
            .bind(&batch.backends) // $4
            .bind(&batch.evidence_of) // $5
            .bind(&self.suspended_state) // $6
            .bind(&self.gone_state) // $7
            .bind(batch.sweep_id) // $8
            .bind(self.table_display()) // $9
            .bind(self.scope_value()) // $10
            .bind(&batch.documents) // $11
    }

    /// The text of [`Self::downgrade`].
    pub fn downgrade_sql(&self) -> String {
        sql_of(self.downgrade(&DowngradeBatch::default()))
    }

    /// What a downgrade writes: the cleared columns' old values (a JSON object) for the audit
    /// record, and the `SET` list (the gone state `$7`, `updated_at` now, cleared columns NULL).
    fn downgrade_changes(&self) -> (String, String) {
        let cleared = if self.clear.is_empty() {
            "'{}'::jsonb".to_string()
        } else {
            let pairs: Vec<String> = self
                .clear
                .iter()
                .map(|c| format!("{}, to_jsonb(t.{c})", literal(c.name())))
                .collect();
            format!("jsonb_build_object({})", pairs.join(", "))
        };
        let mut set = vec![
            format!("{} = $7{}", self.state, self.cast(Column::State)),
            format!("{} = {}", self.updated_at, self.now_expr()),
        ];
        set.extend(self.clear.iter().map(|c| format!("{c} = NULL")));
        (cleared, set.join(", "))
    }

    /// The columns the records an undo considers cleared (the keys of their `cleared`
    /// documents), sorted.
    pub fn cleared_columns(&self, selection: UndoSelection<'_>) -> Statement {
        let sql = format!(
            "SELECT DISTINCT c FROM ({records}) r CROSS JOIN LATERAL jsonb_object_keys(r.cleared) c \
             ORDER BY c",
            records = self.undo_records("$1", "$2", "$3", "$4"),
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(selection.sweep)
            .bind(selection.session)
            .bind(self.table_names())
            .bind(self.scope_value())
    }

    /// Whether a column may be restored by an undo: any column but the mapped ones.
    pub fn restorable_column(&self, name: &str) -> bool {
        let mapped = [&self.key, &self.state, &self.object, &self.updated_at];
        !mapped.iter().any(|c| c.name() == name)
            && self.scope.as_ref().is_none_or(|(c, _)| c.name() != name)
    }

    /// The audit records an undo considers: the latest not-yet-undone downgrade of each
    /// session of this table (any of its names) and scope.
    fn undo_records(&self, sweep: &str, key: &str, tables: &str, scope: &str) -> String {
        let scoped = match &self.scope {
            Some(_) => format!(" AND (d.session_scope IS NULL OR d.session_scope = {scope})"),
            None => String::new(),
        };
        format!(
            "SELECT DISTINCT ON (d.session_key) d.id, d.session_key, d.object_name, d.old_state, \
                    d.new_state, d.new_updated_at, d.cleared, \
                    nullif(to_jsonb(d) -> 'row_image', 'null'::jsonb) AS row_image \
             FROM {a} d \
             WHERE d.action = 'downgrade' AND d.session_table = ANY({tables}) \
               AND ({sweep}::uuid IS NULL OR d.sweep_id = {sweep}) \
               AND ({key}::text IS NULL OR d.session_key = {key}){scoped} \
               AND NOT EXISTS (SELECT 1 FROM {a} u WHERE u.undoes = d.id) \
             ORDER BY d.session_key, d.at DESC, d.id DESC",
            a = self.audit,
        )
    }

    /// Restores rows still exactly as a downgrade left them, from their audit records, and
    /// audits the undo, only if this server session holds the writer lock; rows are changed by
    /// the locked row's `tableoid` and `ctid`. Returns one row: whether it holds the lock, the
    /// number of rows locked, the number updated, and the keys audited (the caller checks that
    /// they agree before committing).
    ///
    /// A row the application deleted since is inserted back from its record's `row_image`
    /// (the whole row as it was, with the old state, the cleared columns' old values and
    /// `updated_at` now), only for the records in `$7` (checked by the caller: the image fits
    /// the table as it is now) and only if no row with that key (and scope) exists (`ON
    /// CONFLICT DO NOTHING` also for one inserted concurrently). `insert_columns` are the
    /// table's columns an INSERT may name (not generated ones); identity columns take the
    /// image's value (`OVERRIDING SYSTEM VALUE`). Returns, after the others, the keys inserted.
    ///
    /// `inserts` are the audit ids whose rows are inserted back.
    // structure: sql-text
    pub fn undo(
        &self,
        restore: &[Identifier],
        insert_columns: &[Identifier],
        selection: UndoSelection<'_>,
        undo_id: uuid::Uuid,
        inserts: &[i64],
    ) -> Statement {
        let untouched = UNTOUCHED_CLEARED;
        let mut set = vec![
            format!(
                "{} = cand.old_state{}",
                self.state,
                self.cast(Column::State)
            ),
            format!("{} = {}", self.updated_at, self.now_expr()),
        ];
        // Populated over the locked row itself, not `NULL::table`: a record of the table's type
        // with every other column NULL violates any NOT NULL domain column.
        // `restore` is every column any selected record cleared (its audit record's keys,
        // not today's sessions.clear_columns: the configuration may have changed since); a
        // column a record did not clear keeps the row's value, since populating over the row
        // changes only the record's keys.
        set.extend(
            restore
                .iter()
                .map(|c| format!("{c} = (jsonb_populate_record(t, cand.cleared)).{c}")),
        );
        let sql = format!(
            "WITH proof AS (SELECT {held} AS held), a AS ({records}), cand AS ( \
               SELECT t.tableoid AS row_rel, t.ctid AS row_id, a.* \
               FROM {t} t JOIN a ON t.{k} = a.session_key{kcast} \
               WHERE t.{s} = a.new_state{scast} AND t.{o} = a.object_name{ocast} \
                 AND {tu} = a.new_updated_at{untouched}{scope} AND (SELECT held FROM proof) \
               FOR UPDATE OF t SKIP LOCKED \
             ), upd AS ( \
               UPDATE {t} t SET {set} FROM cand \
               WHERE t.tableoid = cand.row_rel AND t.ctid = cand.row_id \
               RETURNING cand.id, cand.session_key, cand.object_name, cand.old_state, \
                         cand.new_state, cand.new_updated_at, {tu} AS restored_at \
             ), ins AS ( \
               INSERT INTO {t} AS t ({cols}) OVERRIDING SYSTEM VALUE \
               SELECT {rcols} FROM a CROSS JOIN LATERAL jsonb_populate_record(NULL::{t}, \
                 a.row_image || a.cleared || jsonb_build_object({sname}, a.old_state, \
                 {uname}, to_jsonb({now}))) r \
               WHERE a.id = ANY($7::bigint[]) AND jsonb_typeof(a.row_image) = 'object' \
                 AND (SELECT held FROM proof) \
                 AND NOT EXISTS (SELECT 1 FROM {t} x WHERE x.{k} = a.session_key{kcast}{xscope}) \
               ON CONFLICT DO NOTHING \
               RETURNING t.{k}::text AS session_key, {tu} AS restored_at \
             ), audited AS ( \
               INSERT INTO {a} (sweep_id, action, undoes, session_table, session_scope, \
                                session_key, object_name, old_state, new_state, old_updated_at, \
                                new_updated_at, reason, evidence) \
               SELECT $4, 'undo', id, $6, $5, session_key, object_name, new_state, old_state, \
                      new_updated_at, restored_at, 'undo', \
                      jsonb_build_object('undoes_audit_id', id) \
               FROM upd \
               UNION ALL \
               SELECT $4, 'undo', a.id, $6, $5, a.session_key, a.object_name, 'deleted', \
                      a.old_state, NULL, ins.restored_at, 'undo', \
                      jsonb_build_object('undoes_audit_id', a.id, 'restored', \
                        'inserted from the row image (the row had been deleted)') \
               FROM ins JOIN a ON a.session_key = ins.session_key \
               RETURNING session_key \
             ) \
             SELECT (SELECT held FROM proof), \
                    (SELECT count(*) FROM cand) + (SELECT count(*) FROM ins), \
                    (SELECT count(*) FROM upd) + (SELECT count(*) FROM ins), \
                    coalesce((SELECT array_agg(session_key) FROM audited), '{{}}'::text[]), \
                    coalesce((SELECT array_agg(session_key) FROM ins), '{{}}'::text[])",
            records = self.undo_records("$1", "$2", "$3", "$5"),
            a = self.audit,
            t = self.t(),
            k = self.key,
            s = self.state,
            o = self.object,
            tu = self.updated_at_expr("t."),
            kcast = self.cast(Column::Key),
            scast = self.cast(Column::State),
            ocast = self.cast(Column::Object),
            set = set.join(", "),
            scope = self.scope_clause("t.", 5),
            xscope = self.scope_clause("x.", 5),
            held = self.writer_lock_held_sql(),
            cols = if insert_columns.is_empty() {
                self.key.to_string()
            } else {
                insert_columns
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            rcols = if insert_columns.is_empty() {
                format!("r.{}", self.key)
            } else {
                insert_columns
                    .iter()
                    .map(|c| format!("r.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            sname = literal(self.state.name()),
            uname = literal(self.updated_at.name()),
            now = self.now_expr(),
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(selection.sweep) // $1
            .bind(selection.session) // $2
            .bind(self.table_names()) // $3
            .bind(undo_id) // $4
            .bind(self.scope_value()) // $5
            .bind(self.table_display()) // $6
            .bind(inserts) // $7
    }

    /// The text of [`Self::undo`].
    pub fn undo_sql(&self, restore: &[Identifier], insert_columns: &[Identifier]) -> String {
        let selection = UndoSelection {
            sweep: None,
            session: None,
        };
        sql_of(self.undo(restore, insert_columns, selection, uuid::Uuid::nil(), &[]))
    }

    /// The downgrades an undo with the same arguments would consider, with the row's current
    /// state (NULL when the row no longer exists) and whether the row is still exactly as the
    /// downgrade left it (what the undo statement restores). A plain read: no row lock, so an
    /// `undo --dry-run` waits for nothing and changes nothing.
    pub fn undo_candidates(&self, selection: UndoSelection<'_>) -> Statement {
        let untouched = UNTOUCHED_CLEARED;
        let sql = format!(
            "SELECT a.session_key, a.object_name, a.old_state, \
                    t.{s}::text AS current_state, t.{o}::text AS current_object, \
                    coalesce(t.{s} = a.new_state{scast} AND t.{o} = a.object_name{ocast} \
                             AND {tu} = a.new_updated_at{untouched}, false) AS restorable, \
                    CASE WHEN t.{k} IS NULL THEN a.row_image END AS row_image, a.id \
             FROM ({records}) a LEFT JOIN {t} t ON t.{k} = a.session_key{kcast}{scope} \
             ORDER BY a.session_key",
            records = self.undo_records("$1", "$2", "$3", "$4"),
            t = self.t(),
            k = self.key,
            s = self.state,
            o = self.object,
            tu = self.updated_at_expr("t."),
            kcast = self.cast(Column::Key),
            scast = self.cast(Column::State),
            ocast = self.cast(Column::Object),
            scope = self.scope_clause("t.", 4),
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(selection.sweep)
            .bind(selection.session)
            .bind(self.table_names())
            .bind(self.scope_value())
    }

    /// The advisory-lock key this reconciler holds exclusively: stable for the same table (by
    /// its canonical name once resolved, however it was spelled) and scope, so every
    /// reconciler writing the same rows contends for the same lock. Unscoped, it is
    /// [`TableMapping::table_lock_key`].
    pub fn lock_key(&self) -> i64 {
        let scope = self
            .scope
            .as_ref()
            .map(|(c, v)| format!("{}={v}", c.name()))
            .unwrap_or_default();
        fnv1a(&format!(
            "sandbox-reconciler|{}|{scope}",
            self.table_display()
        ))
    }

    /// The table's own key, which every reconciler of the table takes: a scoped one shared
    /// (scopes write side by side), an unscoped one exclusively (it writes every scope's rows,
    /// so it excludes every scoped reconciler and they exclude it).
    pub fn table_lock_key(&self) -> i64 {
        fnv1a(&format!("sandbox-reconciler|{}|", self.table_display()))
    }

    /// The advisory locks that make up the writer lock: (key, shared).
    pub fn writer_locks(&self) -> Vec<(i64, bool)> {
        match &self.scope {
            Some(_) => vec![(self.table_lock_key(), true), (self.lock_key(), false)],
            None => vec![(self.table_lock_key(), false)],
        }
    }

    /// `pg_locks` rows of this server session's granted advisory locks on `keys` (a bigint key
    /// is shown as classid = its high 32 bits, objid = its low 32 bits, objsubid = 1), with
    /// the mode when given.
    fn advisory_locks_held(keys: &[(i64, Option<bool>)]) -> String {
        let split = |key: i64| ((key as u64) >> 32, (key as u64) & 0xffff_ffff);
        let with_mode: Vec<String> = keys
            .iter()
            .map(|&(key, shared)| {
                let (hi, lo) = split(key);
                match shared {
                    Some(true) => format!("({hi}, {lo}, 'ShareLock')"),
                    Some(false) => format!("({hi}, {lo}, 'ExclusiveLock')"),
                    None => format!("({hi}, {lo}, l.mode)"),
                }
            })
            .collect();
        format!(
            "FROM pg_locks l WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() \
             AND l.granted AND l.objsubid = 1 \
             AND (l.classid::bigint, l.objid::bigint, l.mode) IN ({})",
            with_mode.join(", ")
        )
    }

    /// A boolean: this server session holds every lock of the writer lock, in its mode. Part
    /// of each writing statement, so a write can only happen on the session holding the lock.
    pub fn writer_lock_held_sql(&self) -> String {
        let locks: Vec<(i64, Option<bool>)> = self
            .writer_locks()
            .into_iter()
            .map(|(k, shared)| (k, Some(shared)))
            .collect();
        format!(
            "((SELECT count(DISTINCT (l.classid, l.objid, l.mode)) {}) = {})",
            Self::advisory_locks_held(&locks),
            locks.len()
        )
    }

    /// Takes the writer lock without waiting: true when taken, false when another session
    /// holds it, NULL when this server session already holds part of it (a pooler handing
    /// one server session to several clients; taking it again would succeed, advisory locks
    /// being re-entrant). Scoped: the table key shared, then the scope's key; if the latter is
    /// taken, the former is let go again, all in one statement.
    pub fn try_writer_lock_sql(&self) -> String {
        let keys: Vec<(i64, Option<bool>)> = self
            .writer_locks()
            .into_iter()
            .map(|(k, _)| (k, None))
            .collect();
        let held = format!("EXISTS (SELECT 1 {})", Self::advisory_locks_held(&keys));
        let table = self.table_lock_key();
        match &self.scope {
            Some(_) => format!(
                "SELECT CASE WHEN {held} THEN NULL \
                   WHEN NOT pg_try_advisory_lock_shared({table}) THEN false \
                   WHEN pg_try_advisory_lock({scope}) THEN true \
                   ELSE NOT pg_advisory_unlock_shared({table}) END",
                scope = self.lock_key()
            ),
            None => {
                format!("SELECT CASE WHEN {held} THEN NULL ELSE pg_try_advisory_lock({table}) END")
            }
        }
    }

    /// Lets go of the writer lock.
    pub fn release_writer_lock_sql(&self) -> String {
        match &self.scope {
            Some(_) => format!(
                "SELECT pg_advisory_unlock({}), pg_advisory_unlock_shared({})",
                self.lock_key(),
                self.table_lock_key()
            ),
            None => format!("SELECT pg_advisory_unlock({})", self.table_lock_key()),
        }
    }
}

/// A mapped column whose type matters for casts.
#[derive(Debug, Clone, Copy)]
enum Column {
    Key,
    State,
    Object,
    Scope,
}

/// FNV-1a, 64 bit: stable across releases and platforms.
pub fn fnv1a(text: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash as i64
}

/// A row is still as the downgrade left it only if every column its audit record cleared is
/// still NULL (`cand`/`a` is the audit record, `t` the row). Judged per record from its own
/// `cleared` document, so records written under another `sessions.clear_columns` are undone
/// exactly.
const UNTOUCHED_CLEARED: &str = " AND NOT EXISTS (SELECT 1 FROM jsonb_object_keys(a.cleared) c \
     WHERE to_jsonb(t) -> c <> 'null'::jsonb)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_quotes_identifiers_and_binds_values() {
        let mut settings = Settings::default();
        settings.sessions.clear_columns = vec!["agent_thread_id".into()];
        settings.sessions.scope_column = "cluster".into();
        settings.sessions.scope_value = "x'; drop table y; --".into();
        let m = TableMapping::from_settings(&settings).unwrap();
        let sql = m.downgrade_sql();
        assert!(sql.contains("\"sandbox_sessions\""));
        assert!(sql.contains("\"agent_thread_id\" = NULL"));
        assert!(sql.contains("t.\"cluster\" = $10::text"));
        assert!(sql.contains("WHERE t.tableoid = old.row_rel AND t.ctid = old.row_id"));
        assert!(m
            .undo_sql(&m.clear, &[])
            .contains("WHERE t.tableoid = cand.row_rel AND t.ctid = cand.row_id"));
        assert!(!sql.contains("drop table"));
        assert_ne!(m.lock_key(), {
            let mut other = settings.clone();
            other.sessions.scope_value = "b".into();
            TableMapping::from_settings(&other).unwrap().lock_key()
        });
    }
}
