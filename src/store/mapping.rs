//! The configured mapping of the session table, and the SQL generated from it.
//!
//! Every identifier is validated and quoted ([`Identifier`]); values (states, scope, keys)
//! are always bound parameters.

use crate::config::Settings;
use crate::sql::{literal, Identifier};

#[derive(Debug, Clone)]
pub struct TableMapping {
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
        })
    }

    /// The table as the user wrote it (unquoted), for messages and audit records.
    pub fn table_display(&self) -> String {
        match self.table.schema() {
            Some(schema) => format!("{schema}.{}", self.table.name()),
            None => self.table.name().to_string(),
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

    /// `AND <scope> = $n`, or nothing.
    fn scope_clause(&self, alias: &str, param: usize) -> String {
        match &self.scope {
            Some((column, _)) => format!(" AND {alias}{column}::text = ${param}"),
            None => String::new(),
        }
    }

    /// `$1` = gone state, `$2` = scope value.
    pub fn count_gone_sql(&self) -> String {
        format!(
            "SELECT count(*) FROM {} WHERE {}::text = $1{}",
            self.table,
            self.state,
            self.scope_clause("", 2)
        )
    }

    /// Every row not in the gone state: key, state, object, updated_at.
    /// `$1` = gone state, `$2` = scope value.
    pub fn select_rows_sql(&self) -> String {
        format!(
            "SELECT {k}::text, {s}::text, {o}::text, {u}::timestamptz FROM {t} \
             WHERE {s}::text IS DISTINCT FROM $1{scope}",
            k = self.key,
            s = self.state,
            o = self.object,
            u = self.updated_at,
            t = self.table,
            scope = self.scope_clause("", 2)
        )
    }

    /// One statement that locks the rows still exactly as read (skipping rows the
    /// application holds), downgrades them, clears the configured columns and writes one
    /// audit record per row with the old values. Returns the keys downgraded.
    ///
    /// `$1` keys, `$2` objects, `$3` updated_at as read, `$4` backends, `$5` evidence (JSON
    /// text), `$6` suspended state, `$7` gone state, `$8` sweep id, `$9` table name,
    /// `$10` scope value.
    pub fn downgrade_sql(&self) -> String {
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
            format!("{} = $7", self.state),
            format!("{} = now()", self.updated_at),
        ];
        set.extend(self.clear.iter().map(|c| format!("{c} = NULL")));
        format!(
            "WITH c AS ( \
               SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[]) \
                 AS c(key, object, updated_at, backend, evidence) \
             ), old AS ( \
               SELECT t.{k}::text AS key, t.{s}::text AS old_state, t.{o}::text AS object, \
                      t.{u}::timestamptz AS old_updated_at, {cleared} AS cleared, \
                      c.backend, c.evidence \
               FROM {t} t JOIN c ON t.{k}::text = c.key \
               WHERE t.{s}::text = $6 AND t.{o}::text = c.object \
                 AND t.{u}::timestamptz = c.updated_at{scope} \
               FOR UPDATE OF t SKIP LOCKED \
             ), upd AS ( \
               UPDATE {t} t SET {set} FROM old WHERE t.{k}::text = old.key \
               RETURNING old.key, old.old_state, old.object, old.old_updated_at, old.cleared, \
                         old.backend, old.evidence, t.{u}::timestamptz AS new_updated_at \
             ) \
             INSERT INTO {a} (sweep_id, action, session_table, session_key, object_name, backend, \
                              old_state, new_state, old_updated_at, new_updated_at, cleared, \
                              reason, evidence) \
             SELECT $8, 'downgrade', $9, key, object, backend, old_state, $7, old_updated_at, \
                    new_updated_at, cleared, 'orphaned_suspended', evidence::jsonb FROM upd \
             RETURNING session_key",
            k = self.key,
            s = self.state,
            o = self.object,
            u = self.updated_at,
            t = self.table,
            a = self.audit,
            set = set.join(", "),
            scope = self.scope_clause("t.", 10),
        )
    }

    /// Restores rows still exactly as a downgrade left them, from their audit records, and
    /// audits the undo. Returns (key, restored state) of each restored row.
    ///
    /// `$1` sweep id or NULL, `$2` session key or NULL, `$3` table name, `$4` undo id,
    /// `$5` scope value.
    pub fn undo_sql(&self) -> String {
        let untouched: String = self
            .clear
            .iter()
            .map(|c| format!(" AND t.{c} IS NULL"))
            .collect();
        let mut set = vec![
            format!("{} = cand.old_state", self.state),
            format!("{} = now()", self.updated_at),
        ];
        set.extend(self.clear.iter().map(|c| {
            format!(
                "{c} = (jsonb_populate_record(NULL::{t}, cand.cleared)).{c}",
                t = self.table
            )
        }));
        format!(
            "WITH a AS ( \
               SELECT DISTINCT ON (session_key) id, session_key, object_name, old_state, \
                      new_state, new_updated_at, cleared \
               FROM {a} d \
               WHERE action = 'downgrade' AND session_table = $3 \
                 AND ($1::uuid IS NULL OR sweep_id = $1) AND ($2::text IS NULL OR session_key = $2) \
                 AND NOT EXISTS (SELECT 1 FROM {a} u WHERE u.undoes = d.id) \
               ORDER BY session_key, at DESC, id DESC \
             ), cand AS ( \
               SELECT a.* FROM {t} t JOIN a ON t.{k}::text = a.session_key \
               WHERE t.{s}::text = a.new_state AND t.{o}::text = a.object_name \
                 AND t.{u}::timestamptz = a.new_updated_at{untouched}{scope} \
               FOR UPDATE OF t SKIP LOCKED \
             ), upd AS ( \
               UPDATE {t} t SET {set} FROM cand WHERE t.{k}::text = cand.session_key \
               RETURNING cand.id, cand.session_key, cand.object_name, cand.old_state, \
                         cand.new_state, cand.new_updated_at, t.{u}::timestamptz AS restored_at \
             ) \
             INSERT INTO {a} (sweep_id, action, undoes, session_table, session_key, object_name, \
                              old_state, new_state, old_updated_at, new_updated_at, reason, evidence) \
             SELECT $4, 'undo', id, $3, session_key, object_name, new_state, old_state, \
                    new_updated_at, restored_at, 'undo', jsonb_build_object('undoes_audit_id', id) \
             FROM upd \
             RETURNING session_key, new_state",
            a = self.audit,
            t = self.table,
            k = self.key,
            s = self.state,
            o = self.object,
            u = self.updated_at,
            set = set.join(", "),
            scope = self.scope_clause("t.", 5),
        )
    }

    /// The downgrades an undo with the same arguments would consider, with the row's current
    /// state (NULL when the row no longer exists). `$1` sweep id or NULL, `$2` session key or
    /// NULL, `$3` table name.
    pub fn undo_candidates_sql(&self) -> String {
        format!(
            "SELECT DISTINCT ON (d.session_key) d.session_key, d.object_name, d.old_state, \
                    t.{s}::text AS current_state, t.{o}::text AS current_object \
             FROM {a} d LEFT JOIN {t} t ON t.{k}::text = d.session_key \
             WHERE d.action = 'downgrade' AND d.session_table = $3 \
               AND ($1::uuid IS NULL OR d.sweep_id = $1) AND ($2::text IS NULL OR d.session_key = $2) \
               AND NOT EXISTS (SELECT 1 FROM {a} u WHERE u.undoes = d.id) \
             ORDER BY d.session_key, d.at DESC, d.id DESC",
            a = self.audit,
            t = self.table,
            k = self.key,
            s = self.state,
            o = self.object,
        )
    }

    /// The advisory-lock key of the writer lock: stable for the same table and scope, so
    /// every reconciler writing the same rows contends for the same lock.
    pub fn lock_key(&self) -> i64 {
        let scope = self
            .scope
            .as_ref()
            .map(|(c, v)| format!("{}={v}", c.name()))
            .unwrap_or_default();
        let text = format!("sandbox-reconciler|{}|{scope}", self.table_display());
        // FNV-1a, 64 bit: stable across releases and platforms.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in text.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_quotes_identifiers_and_binds_values() {
        let mut settings = Settings::default();
        settings.sessions.scope_column = "cluster".into();
        settings.sessions.scope_value = "x'; drop table y; --".into();
        let m = TableMapping::from_settings(&settings).unwrap();
        let sql = m.downgrade_sql();
        assert!(sql.contains("\"sandbox_sessions\""));
        assert!(sql.contains("\"agent_thread_id\" = NULL"));
        assert!(sql.contains("t.\"cluster\"::text = $10"));
        assert!(!sql.contains("drop table"));
        assert_ne!(m.lock_key(), {
            let mut other = settings.clone();
            other.sessions.scope_value = "b".into();
            TableMapping::from_settings(&other).unwrap().lock_key()
        });
    }
}
