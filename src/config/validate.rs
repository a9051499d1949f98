//! [`Settings::validate`]: every value checked, section by section, before anything runs;
//! each error names the key and what to do. (Values with a type of their own are checked as
//! they are parsed, in `values`.)

use super::{
    invalid, is_dns_label, ConfigError, Settings, MAX_AUDIT_NAME, MAX_GRACE_PERIOD_SECONDS,
};
use crate::sql::Identifier;

impl Settings {
    /// Checks every value, section by section; the error names the key and what to do.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_session_columns()?;
        self.validate_session_states()?;
        self.validate_audit()?;
        self.validate_cluster()?;
        self.validate_backends()?;
        self.validate_sweep()?;
        self.validate_guard()?;
        self.validate_database()?;
        self.validate_server()
    }

    /// `[sessions]`: the table's and columns' names and the columns cleared on downgrade.
    fn validate_session_columns(&self) -> Result<(), ConfigError> {
        let s = &self.sessions;
        Identifier::parse_qualified(&s.table).map_err(|e| invalid("sessions.table", e))?;
        for (key, value) in [
            ("sessions.key_column", &s.key_column),
            ("sessions.state_column", &s.state_column),
            ("sessions.object_column", &s.object_column),
            ("sessions.updated_at_column", &s.updated_at_column),
        ] {
            Identifier::parse(value).map_err(|e| invalid(key, e))?;
        }
        let mapped = [
            ("sessions.key_column", &s.key_column),
            ("sessions.state_column", &s.state_column),
            ("sessions.object_column", &s.object_column),
            ("sessions.updated_at_column", &s.updated_at_column),
            ("sessions.scope_column", &s.scope_column),
        ];
        for (i, column) in s.clear_columns.iter().enumerate() {
            let key = format!("sessions.clear_columns[{i}]");
            Identifier::parse(column).map_err(|e| invalid(&key, e))?;
            if let Some((other, _)) = mapped.iter().find(|(_, c)| *c == column) {
                return Err(invalid(
                    &key,
                    format!("{column:?} is the column of {other} and cannot be cleared; remove it from the list"),
                ));
            }
            if s.clear_columns[..i].contains(column) {
                return Err(invalid(
                    &key,
                    format!("{column:?} is listed twice; list each column once"),
                ));
            }
        }
        Ok(())
    }

    /// `[sessions]`: the suspended, gone, live and other states, each with one meaning.
    fn validate_session_states(&self) -> Result<(), ConfigError> {
        let s = &self.sessions;
        if s.scope_column.is_empty() != s.scope_value.is_empty() {
            return Err(invalid(
                "sessions.scope_column",
                "scope_column and scope_value go together: set both (e.g. cluster = 'us-east-1') or neither",
            ));
        }
        if !s.scope_column.is_empty() {
            Identifier::parse(&s.scope_column).map_err(|e| invalid("sessions.scope_column", e))?;
        }
        for (key, value) in [
            ("sessions.suspended_state", &s.suspended_state),
            ("sessions.gone_state", &s.gone_state),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if s.suspended_state == s.gone_state {
            return Err(invalid(
                "sessions.gone_state",
                "must differ from sessions.suspended_state",
            ));
        }
        if s.live_states.is_empty() {
            return Err(invalid(
                "sessions.live_states",
                "must list at least one state whose rows have a running object (e.g. [\"running\"]); the misconfiguration guard depends on it",
            ));
        }
        let mut seen: Vec<(&str, &str)> = vec![
            ("sessions.suspended_state", s.suspended_state.as_str()),
            ("sessions.gone_state", s.gone_state.as_str()),
        ];
        for (key, list) in [
            ("sessions.live_states", &s.live_states),
            ("sessions.other_states", &s.other_states),
        ] {
            for state in list {
                if state.trim().is_empty() {
                    return Err(invalid(key, "contains an empty state name"));
                }
                if let Some((other, _)) = seen.iter().find(|(_, v)| *v == state) {
                    return Err(invalid(
                        key,
                        format!(
                            "state {state:?} is also given by {other}; each state has one meaning"
                        ),
                    ));
                }
                seen.push((key, state));
            }
        }
        Ok(())
    }

    /// `[audit]`: a valid name, short enough for its derived names, not the session table.
    fn validate_audit(&self) -> Result<(), ConfigError> {
        let audit = Identifier::parse_qualified(&self.audit.table)
            .map_err(|e| invalid("audit.table", e))?;
        // The migrations derive names from it ("<name>_migrations", "<name>_session_idx");
        // PostgreSQL would silently cut longer ones at 63 bytes, and two could collide.
        if audit.name().len() > MAX_AUDIT_NAME {
            return Err(invalid(
                "audit.table",
                format!(
                    "{:?} is longer than {MAX_AUDIT_NAME} bytes; names derived from it (\"{}_session_idx\") must fit PostgreSQL's 63-byte limit",
                    audit.name(),
                    audit.name()
                ),
            ));
        }
        if Identifier::parse_qualified(&self.audit.table).ok()
            == Identifier::parse_qualified(&self.sessions.table).ok()
        {
            return Err(invalid("audit.table", "must differ from sessions.table"));
        }

        Ok(())
    }

    /// `[cluster]`: namespaces, paging, deadlines, the pinned identity.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        if c.namespaces.is_empty() {
            return Err(invalid(
                "cluster.namespaces",
                "is empty; list the namespaces the sessions live in, or [\"*\"] for all namespaces",
            ));
        }
        for ns in &c.namespaces {
            if ns == "*" {
                if c.namespaces.len() > 1 {
                    return Err(invalid(
                        "cluster.namespaces",
                        "\"*\" (all namespaces) cannot be combined with named namespaces",
                    ));
                }
            } else if !is_dns_label(ns) {
                return Err(invalid(
                    "cluster.namespaces",
                    format!("{ns:?} is not a valid namespace name (lowercase letters, digits and '-', at most 63)"),
                ));
            }
        }
        if c.page_size == 0 {
            return Err(invalid(
                "cluster.page_size",
                "must be at least 1 (500 is typical)",
            ));
        }
        if c.request_timeout.is_zero() {
            return Err(invalid(
                "cluster.request_timeout_seconds",
                "must be at least 1",
            ));
        }
        if c.confirm_concurrency == 0 {
            return Err(invalid("cluster.confirm_concurrency", "must be at least 1"));
        }
        if c.cache_fresh_wait.is_zero() {
            return Err(invalid(
                "cluster.cache_fresh_wait_seconds",
                "must be at least 1 (API servers send a bookmark about once a minute: 90 is typical)",
            ));
        }
        Ok(())
    }

    /// `[backends]`: at least one enabled, selectors and API names.
    fn validate_backends(&self) -> Result<(), ConfigError> {
        let b = &self.backends;
        if !b.pod.enabled && !b.agent_sandbox.enabled {
            return Err(invalid(
                "backends",
                "no backend is enabled; set backends.pod.enabled or backends.agent_sandbox.enabled to true",
            ));
        }
        for (key, value) in [
            ("backends.agent_sandbox.group", &b.agent_sandbox.group),
            ("backends.agent_sandbox.version", &b.agent_sandbox.version),
            ("backends.agent_sandbox.plural", &b.agent_sandbox.plural),
            ("backends.agent_sandbox.kind", &b.agent_sandbox.kind),
        ] {
            if value.is_empty() || value.contains('/') || value.contains(char::is_whitespace) {
                return Err(invalid(key, format!("{value:?} is not a valid API name")));
            }
        }

        Ok(())
    }

    /// `[sweep]`: schedule, grace period, batches.
    fn validate_sweep(&self) -> Result<(), ConfigError> {
        let w = &self.sweep;
        if w.grace_period.as_secs() > MAX_GRACE_PERIOD_SECONDS {
            return Err(invalid(
                "sweep.grace_period_seconds",
                format!("must be at most {MAX_GRACE_PERIOD_SECONDS} (100 years); use sweep.dry_run = true to stop downgrades"),
            ));
        }
        if w.batch_size == 0 {
            return Err(invalid(
                "sweep.batch_size",
                "must be at least 1 (500 is typical)",
            ));
        }
        if w.batch_size > 10_000 {
            return Err(invalid("sweep.batch_size", "must be at most 10000"));
        }
        Ok(())
    }

    /// `[guard]`: ratios are fractions.
    fn validate_guard(&self) -> Result<(), ConfigError> {
        let g = &self.guard;
        if !(0.0..=1.0).contains(&g.max_live_missing_ratio) || g.max_live_missing_ratio.is_nan() {
            return Err(invalid(
                "guard.max_live_missing_ratio",
                "must be a fraction between 0 and 1 (0.5 = refuse when most live rows have no object)",
            ));
        }
        if !(0.0..=1.0).contains(&g.max_suspended_missing_ratio)
            || g.max_suspended_missing_ratio.is_nan()
        {
            return Err(invalid(
                "guard.max_suspended_missing_ratio",
                "must be a fraction between 0 and 1 (0.5 = refuse when most of the agent-sandbox backend's suspended rows have no Sandbox; 1 = off)",
            ));
        }
        Ok(())
    }

    /// `[database]`: a URL and deadlines that nest.
    fn validate_database(&self) -> Result<(), ConfigError> {
        let d = &self.database;
        if d.client_deadline.is_zero() {
            return Err(invalid(
                "database.client_deadline_seconds",
                "must be at least 1 (90 is typical)",
            ));
        }
        if !d.statement_timeout.is_zero() && d.client_deadline <= d.statement_timeout {
            return Err(invalid(
                "database.client_deadline_seconds",
                format!(
                    "must be longer than database.statement_timeout_seconds ({}), so the server's own timeout fires first",
                    d.statement_timeout.as_secs()
                ),
            ));
        }
        Ok(())
    }

    /// `[server]`: the listen address and liveness.
    fn validate_server(&self) -> Result<(), ConfigError> {
        if self.server.liveness_sweep_periods == 0 {
            return Err(invalid(
                "server.liveness_sweep_periods",
                "must be at least 1 (3 is typical)",
            ));
        }
        if self.database.url.trim().is_empty() {
            return Err(invalid(
                "database.url",
                "is empty; set DATABASE_URL or SANDBOX_RECONCILER__DATABASE__URL",
            ));
        }
        Ok(())
    }
}
