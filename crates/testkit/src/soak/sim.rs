//! The simulated agent platform: what it knows (sessions, every object's life, every row
//! version it wrote) and its primitive actions on objects (through the fake API server) and
//! on rows (as the platform writes them: unconditional by key, under a row lock).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::Rng;
use serde_json::{json, Value};
use sqlx::{AssertSqlSafe, PgPool, Row};

use super::clock::ClockOffset;
use super::db::SoakDb;
use super::{lock, MANAGED, NAMESPACE, SCOPE_COLUMN};
use crate::fake_api::{FakeApiServer, Kind};

/// Which backend a session lives on (fixed for its life).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Pod,
    Sandbox,
}

impl Backend {
    pub(crate) fn kind(self) -> Kind {
        match self {
            Backend::Pod => Kind::Pod,
            Backend::Sandbox => Kind::Sandbox,
        }
    }
}

pub(crate) struct SimSession {
    pub(crate) key: String,
    pub(crate) backend: Backend,
    /// An operation is in progress on this session.
    pub(crate) busy: bool,
}

/// One row version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Version {
    pub(crate) state: String,
    pub(crate) object: String,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) agent_thread_id: Option<String>,
}

impl Version {
    /// A version the application writes: it always sets a fresh `agent_thread_id`.
    pub(crate) fn written(
        state: &str,
        object: &str,
        updated_at: DateTime<Utc>,
        agent_thread_id: String,
    ) -> Version {
        Version {
            state: state.to_string(),
            object: object.to_string(),
            updated_at,
            agent_thread_id: Some(agent_thread_id),
        }
    }

    pub(crate) fn show(&self) -> String {
        format!(
            "{}/{} updated_at={} agent_thread_id={}",
            self.state,
            self.object,
            self.updated_at.format("%H:%M:%S%.6f"),
            self.agent_thread_id.as_deref().unwrap_or("NULL")
        )
    }
}

/// One row version the application wrote.
#[derive(Debug, Clone)]
pub(crate) struct AppWrite {
    pub(crate) op: &'static str,
    /// The state the application read when it decided on `op` (before taking the lock).
    pub(crate) seen_state: Option<String>,
    pub(crate) new: Version,
    /// The version it overwrote (read under the row lock); `None` for the INSERT.
    pub(crate) prev: Option<Version>,
    pub(crate) started: DateTime<Utc>,
    /// When the COMMIT returned: the version certainly existed from then on.
    pub(crate) committed: DateTime<Utc>,
}

/// One object's life in wall-clock time.
#[derive(Debug, Clone)]
pub(crate) struct ObjectLife {
    pub(crate) kind: Kind,
    pub(crate) session: String,
    /// Just after the fake server stored it.
    pub(crate) created_after: DateTime<Utc>,
    pub(crate) terminating_after: Option<DateTime<Utc>>,
    /// Just before it was removed.
    pub(crate) removed_before: Option<DateTime<Utc>>,
}

impl ObjectLife {
    /// Whether the object certainly existed at `t`, a PostgreSQL timestamp (which may lag the
    /// instant it stands for by up to a microsecond), given the database clock's offset.
    pub(crate) fn existed_at_db(&self, t: DateTime<Utc>, clock: &ClockOffset) -> bool {
        clock.latest_db(self.created_after) <= t
            && self
                .removed_before
                .is_none_or(|r| t + chrono::Duration::microseconds(1) <= clock.earliest_db(r))
    }

    pub(crate) fn show(&self, name: &str) -> String {
        let ts = |t: &DateTime<Utc>| t.format("%H:%M:%S%.6f").to_string();
        format!(
            "{:?} {name} of {}: created {}, terminating {}, removed {}",
            self.kind,
            self.session,
            ts(&self.created_after),
            self.terminating_after
                .as_ref()
                .map_or("never".to_string(), ts),
            self.removed_before.as_ref().map_or("never".to_string(), ts)
        )
    }
}

#[derive(Default)]
pub(crate) struct SimState {
    pub(crate) sessions: Vec<SimSession>,
    pub(crate) next_session: u64,
    pub(crate) ops: BTreeMap<&'static str, u64>,
    pub(crate) errors: Vec<String>,
    pub(crate) objects: HashMap<String, ObjectLife>,
    pub(crate) writes: HashMap<String, Vec<AppWrite>>,
    /// Keys whose last COMMIT failed: whether it happened is unknown.
    pub(crate) uncertain: HashSet<String>,
}

/// What became of a row the application wrote, at the end of the run.
pub(crate) enum RowFate<'a> {
    /// In the table, as it is now.
    Present(&'a Version),
    /// Missing from the table.
    Lost,
    /// A COMMIT of the application failed: whether it happened is unknown, so the row's
    /// history cannot be checked.
    Unknown,
}

/// Why a row's history was not checked.
pub(crate) const UNKNOWN_HISTORY: &str = "an application COMMIT failed; history not checked";

impl SimState {
    /// Every row this application wrote, in key order, with its writes and its fate.
    pub(crate) fn written_rows<'a>(
        &'a self,
        rows: &'a HashMap<String, Version>,
    ) -> impl Iterator<Item = (&'a str, &'a [AppWrite], RowFate<'a>)> + 'a {
        let mut keys: Vec<&String> = self.writes.keys().collect();
        keys.sort();
        keys.into_iter().map(move |key| {
            let fate = match rows.get(key.as_str()) {
                None => RowFate::Lost,
                Some(_) if self.uncertain.contains(key.as_str()) => RowFate::Unknown,
                Some(row) => RowFate::Present(row),
            };
            (key.as_str(), self.writes[key].as_slice(), fate)
        })
    }
}

pub(crate) struct Sim {
    pub(crate) api: Arc<FakeApiServer>,
    pub(crate) pool: PgPool,
    pub(crate) table: String,
    /// The value of the scope column (`SCOPE_COLUMN`) of the rows this application owns, in a
    /// shared table; `None` for the centaur table, which has no such column.
    pub(crate) scope: Option<&'static str>,
    /// Name pods and Sandboxes alike, from centaur's one scheme
    /// (`centaur-centaur-sandbox-<slug>-<sha10>`), so that no prefix tells them apart.
    pub(crate) names_alike: bool,
    pub(crate) target_sessions: usize,
    /// The daemons' grace period: suspended rows older than this are the ones being downgraded.
    pub(crate) grace: chrono::Duration,
    /// Object names and agent_thread_ids are numbered from here, never reused.
    pub(crate) seq: AtomicU64,
    pub(crate) state: Mutex<SimState>,
}

impl Sim {
    /// An application writing `db`'s session table (only rows of `scope` in a shared table),
    /// numbering its object names and agent_thread_ids from `first_seq`.
    pub(crate) fn new(
        api: Arc<FakeApiServer>,
        db: &SoakDb,
        scope: Option<&'static str>,
        names_alike: bool,
        target_sessions: usize,
        grace: chrono::Duration,
        first_seq: u64,
    ) -> Sim {
        Sim {
            api,
            pool: db.pool.clone(),
            table: db.table(),
            scope,
            names_alike,
            target_sessions,
            grace,
            seq: AtomicU64::new(first_seq),
            state: Mutex::new(SimState::default()),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SimState> {
        lock(&self.state)
    }

    pub(crate) fn count(&self, op: &'static str) {
        *self.lock().ops.entry(op).or_default() += 1;
    }

    pub(crate) fn next(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn new_object_name(&self, backend: Backend) -> String {
        match backend {
            _ if self.names_alike => format!("centaur-centaur-sandbox-soak-{:010x}", self.next()),
            Backend::Pod => format!("p-{}", self.next()),
            Backend::Sandbox => format!("sb-{}", self.next()),
        }
    }

    /// The condition that confines a statement to this application's rows, after the key's:
    /// `" AND cluster = 'cluster-a'"` in a shared table, else nothing.
    pub(crate) fn scope_filter(&self) -> String {
        match self.scope {
            Some(scope) => format!(" AND {SCOPE_COLUMN} = '{scope}'"),
            None => String::new(),
        }
    }

    /// Creates a running object (pod, or Sandbox with one replica) and records its birth.
    pub(crate) fn create_object(&self, backend: Backend, name: &str, session: &str) {
        match backend {
            Backend::Pod => {
                self.api
                    .add_pod(NAMESPACE, name, &[MANAGED, ("centaur.ai/sandbox-id", name)])
            }
            Backend::Sandbox => {
                self.api
                    .add_sandbox("v1alpha1", NAMESPACE, name, json!({ "replicas": 1 }))
            }
        }
        let created_after = Utc::now();
        self.lock().objects.insert(
            name.to_string(),
            ObjectLife {
                kind: backend.kind(),
                session: session.to_string(),
                created_after,
                terminating_after: None,
                removed_before: None,
            },
        );
    }

    /// Removes an object; returns whether it existed.
    pub(crate) fn remove_object(&self, kind: Kind, name: &str) -> bool {
        let before = Utc::now();
        let removed = self.api.remove(kind, NAMESPACE, name);
        if removed {
            if let Some(life) = self.lock().objects.get_mut(name) {
                life.removed_before = Some(before);
            }
        }
        removed
    }

    /// Marks an object terminating (deletionTimestamp); returns whether it exists.
    pub(crate) fn terminate_object(&self, kind: Kind, name: &str) -> bool {
        let stamp = Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let found = self.api.modify(kind, NAMESPACE, name, |o| {
            o["metadata"]["deletionTimestamp"] = Value::String(stamp);
            o["metadata"]["deletionGracePeriodSeconds"] = json!(30);
        });
        if found {
            let after = Utc::now();
            if let Some(life) = self.lock().objects.get_mut(name) {
                life.terminating_after.get_or_insert(after);
            }
        }
        found
    }

    pub(crate) fn set_replicas(&self, name: &str, replicas: i64) -> bool {
        self.api.modify(Kind::Sandbox, NAMESPACE, name, |o| {
            o["spec"]["replicas"] = json!(replicas);
        })
    }

    /// Whether the platform would find the object (not removed, not terminating).
    pub(crate) fn object_usable(&self, name: &str) -> bool {
        self.lock()
            .objects
            .get(name)
            .is_some_and(|l| l.removed_before.is_none() && l.terminating_after.is_none())
    }

    pub(crate) fn error(&self, message: String) {
        self.lock().errors.push(message);
    }

    /// Creates a session: its object first, then the row `running` (as the platform does).
    pub(crate) async fn create_session(&self, rng: &mut StdRng) -> Result<()> {
        let backend = if rng.random_bool(0.5) {
            Backend::Pod
        } else {
            Backend::Sandbox
        };
        let key = {
            let mut st = self.lock();
            st.next_session += 1;
            format!("thread-{}", st.next_session)
        };
        let object = self.new_object_name(backend);
        self.create_object(backend, &object, &key);
        self.insert_row(&key, "create", "running", &object).await?;
        self.lock().sessions.push(SimSession {
            key,
            backend,
            busy: false,
        });
        Ok(())
    }

    /// The platform's INSERT of a new session's row (in its own scope), recorded as the row's
    /// first version.
    pub(crate) async fn insert_row(
        &self,
        key: &str,
        op: &'static str,
        state: &str,
        object: &str,
    ) -> Result<()> {
        let agent_thread_id = format!("at-{}", self.next());
        let started = Utc::now();
        let (scope_column, scope_value) = match self.scope {
            Some(scope) => (format!(", {SCOPE_COLUMN}"), format!(", '{scope}'")),
            None => (String::new(), String::new()),
        };
        let sql = format!(
            "INSERT INTO {} (thread_key, sandbox_id, state, agent_thread_id, updated_at{scope_column}) \
             VALUES ($1, $2, $3, $4, now(){scope_value}) RETURNING updated_at",
            self.table
        );
        let updated_at: DateTime<Utc> = sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(key)
            .bind(object)
            .bind(state)
            .bind(&agent_thread_id)
            .fetch_one(&self.pool)
            .await
            .with_context(|| format!("inserting session {key}"))?;
        let new = Version::written(state, object, updated_at, agent_thread_id);
        self.record(key, op, None, None, new, started);
        Ok(())
    }

    /// The platform's UPDATE: unconditional by key, `updated_at = now()`, a fresh
    /// agent_thread_id. It locks the row first to learn which version it overwrites; with
    /// `slow` it holds the lock that long before writing (a long transaction).
    pub(crate) async fn write(
        &self,
        key: &str,
        op: &'static str,
        seen_state: &str,
        state: &str,
        object: &str,
        slow: Option<Duration>,
    ) -> Result<()> {
        let agent_thread_id = format!("at-{}", self.next());
        let started = Utc::now();
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "SELECT state, sandbox_id, updated_at, agent_thread_id FROM {} \
             WHERE thread_key = $1{} FOR UPDATE",
            self.table,
            self.scope_filter()
        );
        let Some(row) = sqlx::query(AssertSqlSafe(sql))
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?
        else {
            bail!("{op} {key}: the row is gone");
        };
        let prev = Version {
            state: row.try_get(0)?,
            object: row.try_get(1)?,
            updated_at: row.try_get(2)?,
            agent_thread_id: row.try_get(3)?,
        };
        if let Some(d) = slow {
            tokio::time::sleep(d).await;
        }
        let sql = format!(
            "UPDATE {} SET state = $2, sandbox_id = $3, agent_thread_id = $4, updated_at = now() \
             WHERE thread_key = $1{} RETURNING updated_at",
            self.table,
            self.scope_filter()
        );
        let updated_at: DateTime<Utc> = sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(key)
            .bind(state)
            .bind(object)
            .bind(&agent_thread_id)
            .fetch_one(&mut *tx)
            .await?;
        if let Err(e) = tx.commit().await {
            self.lock().uncertain.insert(key.to_string());
            bail!("{op} {key}: COMMIT failed, outcome unknown: {e}");
        }
        let new = Version::written(state, object, updated_at, agent_thread_id);
        self.record(key, op, Some(seen_state), Some(prev), new, started);
        Ok(())
    }

    /// Records a row version the application has just committed (its COMMIT returned now),
    /// with the version it overwrote (`None` for the INSERT).
    fn record(
        &self,
        key: &str,
        op: &'static str,
        seen_state: Option<&str>,
        prev: Option<Version>,
        new: Version,
        started: DateTime<Utc>,
    ) {
        let committed = Utc::now();
        let mut st = self.lock();
        st.writes
            .entry(key.to_string())
            .or_default()
            .push(AppWrite {
                op,
                seen_state: seen_state.map(str::to_string),
                new,
                prev,
                started,
                committed,
            });
        *st.ops.entry(op).or_default() += 1;
    }

    /// Holds the row locked for a while without changing it (a transaction in progress).
    pub(crate) async fn hold_row(&self, key: &str, d: Duration) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "SELECT 1 FROM {} WHERE thread_key = $1{} FOR UPDATE",
            self.table,
            self.scope_filter()
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(key)
            .execute(&mut *tx)
            .await?;
        tokio::time::sleep(d).await;
        tx.commit().await?;
        self.count("hold_row_lock");
        Ok(())
    }

    /// The usable objects of sessions the application last left running or idle.
    pub(crate) fn live_objects(&self) -> Vec<(Kind, String)> {
        let st = self.lock();
        st.sessions
            .iter()
            .filter_map(|s| Some((s.backend.kind(), st.writes.get(&s.key)?.last()?)))
            .filter(|(_, w)| matches!(w.new.state.as_str(), "running" | "idle"))
            .filter(|(_, w)| {
                st.objects
                    .get(&w.new.object)
                    .is_some_and(|l| l.removed_before.is_none() && l.terminating_after.is_none())
            })
            .map(|(kind, w)| (kind, w.new.object.clone()))
            .collect()
    }

    /// Pauses session `i` at once (set-up, before the daemons start).
    pub(crate) async fn pause(&self, i: usize) -> Result<()> {
        let (key, backend) = {
            let st = self.lock();
            let s = &st.sessions[i];
            (s.key.clone(), s.backend)
        };
        let Some(object) = self
            .lock()
            .writes
            .get(&key)
            .and_then(|w| w.last())
            .map(|w| w.new.object.clone())
        else {
            return Ok(());
        };
        match backend {
            Backend::Pod => {
                self.terminate_object(Kind::Pod, &object);
                self.write(&key, "suspend", "running", "suspended", &object, None)
                    .await?;
                self.remove_object(Kind::Pod, &object);
            }
            Backend::Sandbox => {
                self.set_replicas(&object, 0);
                self.write(&key, "suspend", "running", "suspended", &object, None)
                    .await?;
            }
        }
        Ok(())
    }
}
