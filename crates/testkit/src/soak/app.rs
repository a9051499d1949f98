//! The application's behaviour: which session it acts on next, and what it does to it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use chrono::Utc;
use rand::rngs::StdRng;
use rand::Rng;
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::watch;

use super::sim::{Backend, Sim};
use super::{nap, pick};
use crate::fake_api::Kind;

impl Sim {
    /// Takes a random idle session for one operation; a fifth of the time one the application
    /// last left suspended longer ago than the grace period — a row the reconciler is about to
    /// downgrade, where the platform's changes race it (a user writing to a paused thread).
    pub(crate) fn claim(&self, rng: &mut StdRng) -> Option<(usize, String, Backend)> {
        let mut st = self.lock();
        let n = st.sessions.len();
        if n == 0 {
            return None;
        }
        if rng.random_bool(0.2) {
            let aged = Utc::now() - self.grace;
            let start = rng.random_range(0..n);
            let hot = (0..n).map(|k| (start + k) % n).find(|&i| {
                let s = &st.sessions[i];
                !s.busy
                    && st
                        .writes
                        .get(&s.key)
                        .and_then(|w| w.last())
                        .is_some_and(|w| w.new.state == "suspended" && w.committed < aged)
            });
            if let Some(i) = hot {
                let s = &mut st.sessions[i];
                s.busy = true;
                return Some((i, s.key.clone(), s.backend));
            }
        }
        for _ in 0..8 {
            let i = rng.random_range(0..n);
            let s = &mut st.sessions[i];
            if !s.busy {
                s.busy = true;
                return Some((i, s.key.clone(), s.backend));
            }
        }
        None
    }

    pub(crate) fn release(&self, i: usize) {
        if let Some(s) = self.lock().sessions.get_mut(i) {
            s.busy = false;
        }
    }

    /// One application step: create a session, or act on one.
    pub(crate) async fn step(self: &Arc<Self>, rng: &mut StdRng) -> Result<()> {
        let n = self.lock().sessions.len();
        if n < self.target_sessions
            && rng.random_bool(if n < self.target_sessions / 2 {
                0.5
            } else {
                0.1
            })
        {
            return self.create_session(rng).await;
        }
        let Some((i, key, backend)) = self.claim(rng) else {
            return Ok(());
        };
        let result = self.act(&key, backend, rng).await;
        self.release(i);
        result
    }

    pub(crate) async fn act(
        self: &Arc<Self>,
        key: &str,
        backend: Backend,
        rng: &mut StdRng,
    ) -> Result<()> {
        let sql = format!(
            "SELECT state, sandbox_id FROM {} WHERE thread_key = $1{}",
            self.table,
            self.scope_filter()
        );
        let Some(row) = sqlx::query(AssertSqlSafe(sql))
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
        else {
            bail!("session {key}: its row is missing");
        };
        let state: String = row.try_get(0)?;
        let object: String = row.try_get(1)?;
        let usable = self.object_usable(&object);
        let sandbox = backend == Backend::Sandbox;
        let choices: Vec<(&'static str, u32)> = match state.as_str() {
            "running" | "idle" if !usable => vec![("mark_error", 1)],
            "running" | "idle" => vec![
                ("suspend", 30),
                ("toggle_idle", 10),
                ("touch", 8),
                ("stop", 3),
                ("evict_pod", if sandbox { 0 } else { 2 }),
                ("delete_live_sandbox", if sandbox { 1 } else { 0 }),
                ("nothing", 10),
            ],
            "suspended" => vec![
                ("resume", 25),
                ("touch", 6),
                ("stop", 3),
                ("orphan_sandbox", if sandbox && usable { 12 } else { 0 }),
                ("terminate_sandbox", if sandbox && usable { 4 } else { 0 }),
                ("hold_row_lock", 4),
                ("nothing", 15),
            ],
            "gone" | "stopped" | "error" => vec![("respawn", 20), ("nothing", 8)],
            _ => vec![("nothing", 1)],
        };
        let op = pick(rng, &choices).unwrap_or("nothing");
        let slow = rng
            .random_bool(0.2)
            .then(|| Duration::from_millis(rng.random_range(50..1000)));
        let kind = backend.kind();
        match op {
            "nothing" => {}
            "mark_error" => self.write(key, op, &state, "error", &object, slow).await?,
            "toggle_idle" => {
                let to = if state == "running" {
                    "idle"
                } else {
                    "running"
                };
                self.write(key, op, &state, to, &object, slow).await?;
            }
            "touch" => self.write(key, op, &state, &state, &object, slow).await?,
            "suspend" => match backend {
                Backend::Pod => {
                    // Pause deletes the pod: it terminates, and is gone a moment later.
                    self.terminate_object(kind, &object);
                    self.write(key, op, &state, "suspended", &object, slow)
                        .await?;
                    let delay = Duration::from_millis(rng.random_range(50..1500));
                    let sim = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        sim.remove_object(Kind::Pod, &object);
                    });
                }
                Backend::Sandbox => {
                    if self.set_replicas(&object, 0) {
                        self.write(key, op, &state, "suspended", &object, slow)
                            .await?;
                    } else {
                        self.write(key, "mark_error", &state, "error", &object, slow)
                            .await?;
                    }
                }
            },
            "resume" => {
                if sandbox && usable && self.set_replicas(&object, 1) {
                    self.write(key, op, &state, "running", &object, slow)
                        .await?;
                } else {
                    // A pod-backed session's pod is gone by design; a Sandbox deleted behind
                    // the platform's back is replaced. New object, new name, one UPDATE.
                    let fresh = self.new_object_name(backend);
                    self.create_object(backend, &fresh, key);
                    self.write(key, "resume_new_object", &state, "running", &fresh, slow)
                        .await?;
                }
            }
            "respawn" => {
                let fresh = self.new_object_name(backend);
                self.create_object(backend, &fresh, key);
                self.write(key, op, &state, "running", &fresh, slow).await?;
            }
            "stop" => {
                self.remove_object(kind, &object);
                self.write(key, op, &state, "stopped", &object, slow)
                    .await?;
            }
            "evict_pod" | "delete_live_sandbox" | "orphan_sandbox" => {
                // Behind the platform's back: the object goes, the row stays.
                if self.remove_object(kind, &object) {
                    self.count(op);
                }
            }
            "terminate_sandbox" => {
                // Deleted behind the platform's back, with a finalizer that takes a while.
                if self.terminate_object(kind, &object) {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(300..2500))).await;
                    self.remove_object(kind, &object);
                    self.count(op);
                }
            }
            "hold_row_lock" => {
                self.hold_row(key, Duration::from_millis(rng.random_range(300..1500)))
                    .await?
            }
            other => bail!("unknown operation {other}"),
        }
        Ok(())
    }
}

pub(crate) async fn app_worker(sim: Arc<Sim>, stop: watch::Receiver<bool>, mut rng: StdRng) {
    while !*stop.borrow() {
        if let Err(e) = sim.step(&mut rng).await {
            sim.error(format!("{e:#}"));
        }
        let think = Duration::from_millis(rng.random_range(30..250));
        if nap(&stop, think).await {
            break;
        }
    }
}
