//! Issue 9, items 2, 3, 5, 7 and 8: the session table and its rows are identified completely
//! (scope + key, the locked row itself; the table by its catalog identity, not its spelling),
//! SQL is typed from the catalog (uuid/bigint keys keep their index, enum states work), naive
//! timestamps are read in their configured zone, migrations run once without a lingering lock,
//! and `undo` works beside a running writer.
//!
//! Every test names, in a comment, why it fails on the code before the fix (git HEAD at the
//! time of writing: `git show HEAD:src/store/mapping.rs`, `HEAD:src/undo.rs`, ...).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::*;
use chrono::{DateTime, Utc};
use sandbox_reconciler::cluster::BackendKind;
use sandbox_reconciler::config::Settings;
use sandbox_reconciler::plan::OrphanedRow;
use sandbox_reconciler::store::{self, Database, Downgrade, TableMapping};
use sandbox_reconciler::sweep::{SweepOptions, SweepResult};
use sandbox_reconciler::undo::{self, UndoRequest};
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection, Row};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

async fn exec(db: &TestDb, sql: &str) {
    sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
        .execute(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// `database_url()` with one more query parameter.
fn url_with(param: &str) -> String {
    let url = database_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// A database URL whose sessions have `search_path = schema` (libpq's `options` parameter,
/// which sqlx's `PgConnectOptions` parses: `-c search_path=<schema>`).
fn search_path_url(schema: &str) -> String {
    url_with(&format!("options=-c%20search_path%3D{schema}"))
}

/// An API server with the namespace the settings name and the Sandbox API served.
async fn api() -> FakeApiServer {
    let api = FakeApiServer::start().await;
    api.register_sandbox_version("v1alpha1");
    api.add_namespace("agents");
    api
}

/// The test settings of `db` for another session table.
fn settings_for(db: &TestDb, table: &str) -> Settings {
    let mut s = db.settings();
    s.sessions.table = table.to_string();
    s.validate().expect("valid settings");
    s
}

/// A configuration file for the binary, like `TestDb::write_config` but for any table, URL
/// and audit table, with extra lines in `[database]` and `[sessions]`.
fn write_config(
    dir: &Path,
    url: &str,
    table: &str,
    audit: &str,
    database_extra: &str,
    sessions_extra: &str,
) -> PathBuf {
    let path = dir.join(format!("config-{}.toml", uuid::Uuid::new_v4().simple()));
    let text = format!(
        "[database]\nurl = \"{url}\"\n{database_extra}\n\
         [sessions]\ntable = \"{table}\"\nclear_columns = [\"agent_thread_id\"]\n{sessions_extra}\n\
         [audit]\ntable = \"{audit}\"\n\
         [cluster]\nnamespaces = [\"agents\"]\npage_size = 2\nrequest_timeout_seconds = 5\n\
         [backends.agent_sandbox]\nenabled = true\nobject_name_prefix = \"sb-\"\n\
         [guard]\nmin_live_missing = 1\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn output(out: &std::process::Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn connect(settings: &Settings) -> PgConnection {
    Database::new(settings).unwrap().connect().await.unwrap()
}

/// The mapping of `settings`, resolved through the catalog.
async fn resolved(settings: &Settings) -> TableMapping {
    let mut conn = connect(settings).await;
    store::resolve(&mut conn, &TableMapping::from_settings(settings).unwrap())
        .await
        .unwrap()
}

/// A plain connection (not named sandbox-reconciler) holding the advisory lock `key`.
async fn hold_lock(key: i64) -> PgConnection {
    let mut conn = PgConnection::connect(&database_url()).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(key)
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

async fn exists(db: &TestDb, relation: &str) -> bool {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(relation)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// (action, session_table, session_scope, session_key) of every audit record, oldest first.
async fn audit_records(db: &TestDb, audit: &str) -> Vec<(String, String, Option<String>, String)> {
    let sql = format!(
        "SELECT action, session_table, session_scope, session_key FROM {audit} ORDER BY id"
    );
    sqlx::query(AssertSqlSafe(sql))
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

fn once() -> SweepOptions {
    SweepOptions {
        dry_run: false,
        max_downgrades: None,
    }
}

// ---------------------------------------------------------------------------------------
// 1. Two scopes, same key
// ---------------------------------------------------------------------------------------

/// A table shared by two clusters: the key is unique per cluster only.
async fn shared_table(db: &TestDb) -> String {
    let table = format!("{}.shared_sessions", db.schema);
    exec(
        db,
        &format!(
            "CREATE TABLE {table} (cluster text NOT NULL, thread_key text NOT NULL, \
             sandbox_id text NOT NULL, state text NOT NULL, updated_at timestamptz NOT NULL, \
             agent_thread_id text, PRIMARY KEY (cluster, thread_key))"
        ),
    )
    .await;
    table
}

/// (state, agent_thread_id, updated_at) of one row of the shared table.
async fn shared_row(
    db: &TestDb,
    table: &str,
    cluster: &str,
    key: &str,
) -> (String, Option<String>, DateTime<Utc>) {
    let sql = format!(
        "SELECT state, agent_thread_id, updated_at FROM {table} WHERE cluster = $1 AND thread_key = $2"
    );
    let r = sqlx::query(AssertSqlSafe(sql))
        .bind(cluster)
        .bind(key)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// Cluster a's row and cluster b's row share the key `k1`, the object name and even
/// `updated_at`; only a's row may be downgraded (and undone).
///
/// Fails on HEAD: the downgrade's UPDATE joined on `key::text` alone (`UPDATE t ... FROM old
/// WHERE t.key::text = old.key`), so b's row went to `gone` too and the statement returned two
/// keys for one planned row, `batch.len() - downgraded.len()` underflowed (a panic in a debug
/// build); the audit table had no `session_scope` column (migration 0003 is new); undo's
/// UPDATE also joined on key alone; and nothing refused a composite-key table without a
/// configured scope (HEAD's `verify_table` only checked that the columns exist).
#[tokio::test]
async fn scoped_rows_with_the_same_key_are_downgraded_and_undone_by_scope_only() {
    let db = TestDb::new().await;
    let api = api().await;
    let table = shared_table(&db).await;
    exec(
        &db,
        &format!(
            "INSERT INTO {table} VALUES \
             ('a', 'k1', 'pod-k1', 'suspended', now() - interval '1 hour', 'agent-a'), \
             ('b', 'k1', 'pod-k1', 'suspended', now() - interval '1 hour', 'agent-b')"
        ),
    )
    .await;
    let b_before = shared_row(&db, &table, "b", "k1").await;
    let dir = tempfile::tempdir().unwrap();

    // Without a scope the key alone does not identify a row: a configuration error that
    // names the key to set, before anything is written.
    let unscoped = write_config(
        dir.path(),
        &database_url(),
        &table,
        &db.audit_table(),
        "",
        "",
    );
    let out = run_binary(
        dir.path(),
        Some(&api),
        &["--config", unscoped.to_str().unwrap(), "--once"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", output(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sessions.scope_column"),
        "{}",
        output(&out)
    );
    assert_eq!(shared_row(&db, &table, "a", "k1").await.0, "suspended");
    assert_eq!(shared_row(&db, &table, "b", "k1").await, b_before);

    // Scoped to cluster a: only a's row changes.
    let mut settings = settings_for(&db, &table);
    settings.sessions.scope_column = "cluster".into();
    settings.sessions.scope_value = "a".into();
    settings.validate().unwrap();
    let report = sweep(settings.clone(), &api, false).await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert_eq!(report.downgraded, 1);
    assert_eq!(
        report.skipped.values().sum::<u64>(),
        0,
        "{:?}",
        report.skipped
    );
    let a = shared_row(&db, &table, "a", "k1").await;
    assert_eq!((a.0.as_str(), a.1.as_deref()), ("gone", None));
    assert_eq!(shared_row(&db, &table, "b", "k1").await, b_before);
    let records = audit_records(&db, &db.audit_table()).await;
    assert_eq!(
        records,
        vec![(
            "downgrade".to_string(),
            table.clone(),
            Some("a".to_string()),
            "k1".to_string()
        )]
    );

    // Make b's row look exactly like a's row as the downgrade left it (state, object,
    // updated_at, cleared column): only the scope tells them apart now.
    exec(
        &db,
        &format!(
            "UPDATE {table} SET state = 'gone', agent_thread_id = NULL, \
             updated_at = (SELECT updated_at FROM {table} WHERE cluster = 'a' AND thread_key = 'k1') \
             WHERE cluster = 'b' AND thread_key = 'k1'"
        ),
    )
    .await;
    let b_lookalike = shared_row(&db, &table, "b", "k1").await;
    let scoped = write_config(
        dir.path(),
        &database_url(),
        &table,
        &db.audit_table(),
        "",
        "scope_column = \"cluster\"\nscope_value = \"a\"",
    );
    let sweep_id = report.sweep_id.to_string();
    let out = run_binary(
        dir.path(),
        None,
        &[
            "--config",
            scoped.to_str().unwrap(),
            "undo",
            "--sweep",
            &sweep_id,
            "--output",
            "json",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", output(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["restored"], 1, "{}", output(&out));
    let a = shared_row(&db, &table, "a", "k1").await;
    assert_eq!(
        (a.0.as_str(), a.1.as_deref()),
        ("suspended", Some("agent-a"))
    );
    assert_eq!(shared_row(&db, &table, "b", "k1").await, b_lookalike);
    let records = audit_records(&db, &db.audit_table()).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(
        records[1],
        (
            "undo".to_string(),
            table.clone(),
            Some("a".to_string()),
            "k1".to_string()
        )
    );
}

// ---------------------------------------------------------------------------------------
// 2 + 3. Typed keys and an enum state column
// ---------------------------------------------------------------------------------------

/// Creates `<schema>.<name>` with a key and a state of the given SQL types, one live row with
/// its pod and one orphan; sweeps, checks the downgrade, undoes it through
/// `sandbox_reconciler::undo::run`, checks the restore. Returns the table.
async fn typed_roundtrip(
    db: &TestDb,
    api: &FakeApiServer,
    name: &str,
    key_type: &str,
    state_type: &str,
    live_key: &str,
    orphan_key: &str,
) -> String {
    let table = format!("{}.{name}", db.schema);
    // Object names are DNS-1123 names: no underscores.
    let object = name.replace('_', "-");
    exec(
        db,
        &format!(
            "CREATE TABLE {table} (thread_key {key_type} PRIMARY KEY, sandbox_id text NOT NULL, \
             state {state_type} NOT NULL, updated_at timestamptz NOT NULL, agent_thread_id text); \
             INSERT INTO {table} VALUES \
             ('{live_key}', 'pod-{object}-live', 'running', now() - interval '1 hour', 'agent-live'), \
             ('{orphan_key}', 'pod-{object}-gone', 'suspended', now() - interval '1 hour', 'agent-orphan')"
        ),
    )
    .await;
    api.add_pod("agents", &format!("pod-{object}-live"), MANAGED);
    let row = |key: &str| {
        let sql =
            format!("SELECT state::text, agent_thread_id FROM {table} WHERE thread_key::text = $1");
        let key = key.to_string();
        let pool = db.pool.clone();
        async move {
            let r = sqlx::query(AssertSqlSafe(sql))
                .bind(key)
                .fetch_one(&pool)
                .await
                .unwrap();
            (r.get::<String, _>(0), r.get::<Option<String>, _>(1))
        }
    };
    let settings = settings_for(db, &table);
    let report = sweep(settings.clone(), api, false).await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert_eq!(report.downgraded, 1, "{table}");
    assert_eq!(row(orphan_key).await, ("gone".to_string(), None));
    assert_eq!(
        row(live_key).await,
        ("running".to_string(), Some("agent-live".to_string()))
    );
    let records = audit_records(db, &db.audit_table()).await;
    let downgrades: Vec<_> = records
        .iter()
        .filter(|r| r.0 == "downgrade" && r.1 == table)
        .collect();
    assert_eq!(downgrades.len(), 1, "{records:?}");
    assert_eq!(downgrades[0].3, orphan_key);

    let undone = undo::run(
        &Database::new(&settings).unwrap(),
        &TableMapping::from_settings(&settings).unwrap(),
        &UndoRequest {
            sweep: Some(report.sweep_id),
            session: None,
            dry_run: false,
        },
        Duration::ZERO,
    )
    .await
    .unwrap();
    assert_eq!((undone.restored, undone.left_alone), (1, 0), "{table}");
    assert_eq!(
        row(orphan_key).await,
        ("suspended".to_string(), Some("agent-orphan".to_string()))
    );
    table
}

/// A uuid key and a bigint key: downgraded and undone.
///
/// These pass on HEAD too (HEAD compared `key::text = $n`, slow but correct); they guard the
/// typed SQL that replaced it (`t.key = c.key::uuid`, `::bigint`), whose casts come from the
/// catalog. The index test below is the one that fails on HEAD.
#[tokio::test]
async fn uuid_and_bigint_keys_are_downgraded_and_undone() {
    let db = TestDb::new().await;
    let api = api().await;
    typed_roundtrip(
        &db,
        &api,
        "uuid_sessions",
        "uuid",
        "text",
        "0b3b5f9e-6f7e-4b8a-9a0e-2f1d3c4b5a69",
        "7c9e6679-7425-40de-944b-e07fc1f90ae7",
    )
    .await;
    typed_roundtrip(
        &db,
        &api,
        "bigint_sessions",
        "bigint",
        "text",
        "41",
        "9007199254740993",
    )
    .await;
}

/// A state column of a PostgreSQL enum type: downgraded and undone.
///
/// Fails on HEAD: HEAD's downgrade wrote `state = $7` with `$7` bound as text, and undo
/// `state = cand.old_state` (text): PostgreSQL refuses ("column "state" is of type
/// session_state but expression is of type text"), so the sweep failed (and HEAD's `check`
/// rejected the column outright). Now the value is cast to the column's regtype.
#[tokio::test]
async fn enum_state_column_is_downgraded_and_undone() {
    let db = TestDb::new().await;
    let api = api().await;
    exec(
        &db,
        &format!(
            "CREATE TYPE {}.session_state AS ENUM ('creating', 'running', 'idle', 'error', \
             'stopped', 'gone', 'delivering', 'suspended')",
            db.schema
        ),
    )
    .await;
    let state_type = format!("{}.session_state", db.schema);
    typed_roundtrip(
        &db,
        &api,
        "enum_sessions",
        "text",
        &state_type,
        "live",
        "orphan",
    )
    .await;
}

/// A table with a `NOT NULL` domain column (besides the mapped ones): downgraded and undone,
/// the cleared column restored and the domain column untouched.
///
/// Fails on the code before the fix: undo restored the cleared columns with
/// `jsonb_populate_record(NULL::table, cleared)`, which builds a whole row of the table's type
/// with every other column NULL, and PostgreSQL refuses it ("domain nonempty_text does not allow
/// null values"), so no undo of such a table could run. Now the record is populated from the
/// locked row itself.
#[tokio::test]
async fn a_not_null_domain_column_does_not_stop_undo() {
    let db = TestDb::new().await;
    let api = api().await;
    let table = format!("{}.domain_sessions", db.schema);
    exec(
        &db,
        &format!(
            "CREATE DOMAIN {s}.nonempty_text AS text NOT NULL CHECK (VALUE <> ''); \
             CREATE TABLE {table} (thread_key text PRIMARY KEY, sandbox_id text NOT NULL, \
             state text NOT NULL, updated_at timestamptz NOT NULL, agent_thread_id text, \
             owner {s}.nonempty_text); \
             INSERT INTO {table} VALUES \
             ('orphan', 'pod-domain-gone', 'suspended', now() - interval '1 hour', 'agent-orphan', 'team-x'), \
             ('live', 'pod-domain-live', 'running', now() - interval '1 hour', 'agent-live', 'team-y')",
            s = db.schema
        ),
    )
    .await;
    api.add_pod("agents", "pod-domain-live", MANAGED);
    let row = |key: &'static str| {
        let sql = format!(
            "SELECT state, agent_thread_id, owner::text FROM {table} WHERE thread_key = $1"
        );
        let pool = db.pool.clone();
        async move {
            let r = sqlx::query(AssertSqlSafe(sql))
                .bind(key)
                .fetch_one(&pool)
                .await
                .unwrap();
            (
                r.get::<String, _>(0),
                r.get::<Option<String>, _>(1),
                r.get::<String, _>(2),
            )
        }
    };
    let live = row("live").await;
    let settings = settings_for(&db, &table);
    let report = sweep(settings.clone(), &api, false).await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert_eq!(report.downgraded, 1);
    assert_eq!(row("orphan").await, ("gone".into(), None, "team-x".into()));

    let undone = undo::run(
        &Database::new(&settings).unwrap(),
        &TableMapping::from_settings(&settings).unwrap(),
        &UndoRequest {
            sweep: Some(report.sweep_id),
            session: None,
            dry_run: false,
        },
        Duration::ZERO,
    )
    .await
    .unwrap_or_else(|e| panic!("undo failed: {e}"));
    assert_eq!((undone.restored, undone.left_alone), (1, 0));
    assert_eq!(
        row("orphan").await,
        (
            "suspended".into(),
            Some("agent-orphan".into()),
            "team-x".into()
        )
    );
    assert_eq!(row("live").await, live);
    let records = audit_records(&db, &db.audit_table()).await;
    assert_eq!(
        records.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        vec!["downgrade", "undo"]
    );
}

/// An enum state column without the configured gone state is a configuration error at
/// start-up (exit 2, naming the key), not a failure of every sweep at run time.
#[tokio::test]
async fn enum_without_the_gone_state_is_a_configuration_error() {
    let db = TestDb::new().await;
    let table = format!("{}.enum_no_gone", db.schema);
    exec(
        &db,
        &format!(
            "CREATE TYPE {s}.short_state AS ENUM ('running', 'suspended', 'dead'); \
             CREATE TABLE {table} (thread_key text PRIMARY KEY, sandbox_id text NOT NULL, \
             state {s}.short_state NOT NULL, updated_at timestamptz NOT NULL, agent_thread_id text)",
            s = db.schema
        ),
    )
    .await;
    let settings = settings_for(&db, &table);
    let mut conn = connect(&settings).await;
    let err = store::resolve(&mut conn, &TableMapping::from_settings(&settings).unwrap())
        .await
        .unwrap_err();
    assert!(err.is_configuration(), "{err}");
    assert!(err.to_string().contains("sessions.gone_state"), "{err}");
}

/// The downgrade statement over a bound batch, as `store::apply_batch` binds it, EXPLAINed.
async fn explain_downgrade(conn: &mut PgConnection, mapping: &TableMapping, key: &str) -> String {
    let sql = format!("EXPLAIN {}", mapping.downgrade_sql());
    let lines: Vec<String> = sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(vec![key.to_string()])
        .bind(vec!["pod-x".to_string()])
        .bind(vec![Utc::now()])
        .bind(vec!["pod".to_string()])
        .bind(vec![1i32])
        .bind(&mapping.suspended_state)
        .bind(&mapping.gone_state)
        .bind(uuid::Uuid::new_v4())
        .bind(mapping.table_display())
        .bind(mapping.scope_value())
        .bind(vec!["{}".to_string()])
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    lines.join("\n")
}

/// With 5000 rows and sequential scans disabled, the downgrade of a uuid- or bigint-keyed
/// table probes the primary key's index with the key (an Index Cond on the key column).
///
/// Fails on HEAD: HEAD joined `t.key::text = c.key`, an expression no index covers, so the
/// only plan is a sequential scan of the whole table per batch. The control below EXPLAINs
/// that old join shape on the same table and connection and finds no Index Cond, so this
/// test tells the two apart.
#[tokio::test]
async fn typed_keys_use_the_primary_key_index() {
    let db = TestDb::new().await;
    for (name, key_type, generate, probe) in [
        ("bigint_keyed", "bigint", "g", "2500".to_string()),
        (
            "uuid_keyed",
            "uuid",
            "md5(g::text)::uuid",
            "9bf31c7f-f062-936a-96d3-c8bd1f8f2ff3".to_string(),
        ),
    ] {
        let table = format!("{}.{name}", db.schema);
        exec(
            &db,
            &format!(
                "CREATE TABLE {table} (thread_key {key_type} PRIMARY KEY, sandbox_id text NOT NULL, \
                 state text NOT NULL, updated_at timestamptz NOT NULL, agent_thread_id text); \
                 INSERT INTO {table} SELECT {generate}, 'pod-' || g, 'suspended', \
                   now() - interval '1 hour', 'agent' FROM generate_series(1, 5000) g; \
                 ANALYZE {table}"
            ),
        )
        .await;
        let settings = settings_for(&db, &table);
        let mut conn = connect(&settings).await;
        let mapping = store::resolve(&mut conn, &TableMapping::from_settings(&settings).unwrap())
            .await
            .unwrap();
        store::migrate(&mut conn, &mapping).await.unwrap();
        sqlx::query("SET enable_seqscan = off")
            .execute(&mut conn)
            .await
            .unwrap();
        let plan = explain_downgrade(&mut conn, &mapping, &probe).await;
        let pkey = format!("{name}_pkey");
        assert!(
            plan.lines()
                .any(|l| l.contains("Index Scan using") && l.contains(&pkey)),
            "{key_type} key: no index scan on {pkey}:\n{plan}"
        );
        assert!(
            plan.lines()
                .any(|l| l.contains("Index Cond:") && l.contains("thread_key")),
            "{key_type} key: the key is not an index condition:\n{plan}"
        );
        // The batch's evidence documents are parsed once per statement, not once per row.
        assert!(
            plan.lines().any(|l| l.trim_start().starts_with("InitPlan")),
            "{key_type} key: the evidence documents are not an InitPlan:\n{plan}"
        );

        // Control: HEAD's join shape cannot use the index, whatever the planner settings.
        let old = format!(
            "EXPLAIN SELECT t.ctid FROM {table} t \
             JOIN unnest($1::text[]) AS c(key) ON t.thread_key::text = c.key"
        );
        let old_plan: Vec<String> = sqlx::query_scalar(AssertSqlSafe(old))
            .bind(vec![probe.clone()])
            .fetch_all(&mut conn)
            .await
            .unwrap();
        let old_plan = old_plan.join("\n");
        assert!(
            !old_plan.contains("Index Cond"),
            "the control (HEAD's key::text join) unexpectedly uses an index:\n{old_plan}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 4. One table, two spellings
// ---------------------------------------------------------------------------------------

/// With `search_path` set to the test schema, `sandbox_sessions` and
/// `<schema>.sandbox_sessions` are the same table: one canonical name, one writer lock, one
/// name in the audit records, one set of migrations whichever way the audit table is spelled.
///
/// Fails on HEAD: HEAD keyed the lock and the audit's `session_table` on the name as typed
/// (`table_display()` = `sandbox_sessions` vs `<schema>.sandbox_sessions`: two lock keys, so
/// both spellings could write at once, and two names in the audit), and sqlx's migrator
/// checksummed the *rendered* migration SQL, which contains the audit table as spelled, so
/// the second spelling failed with "migration 1 was previously applied but has been
/// modified".
#[tokio::test]
async fn two_spellings_of_one_table_share_lock_audit_name_and_migrations() {
    let db = TestDb::new().await;
    let api = api().await;
    let schema = db.schema.clone();
    db.insert("x", "suspended", "pod-x", minutes(90)).await;
    db.insert("y", "suspended", "pod-y", minutes(60)).await;
    let url = search_path_url(&schema);
    let canonical = format!("{schema}.sandbox_sessions");

    let mut bare = db.settings();
    bare.database.url = url.clone();
    bare.sessions.table = "sandbox_sessions".into();
    bare.audit.table = "reconciler_audit".into();
    bare.sweep.max_downgrades_per_sweep = 1;
    bare.validate().unwrap();
    let mut qualified = bare.clone();
    qualified.sessions.table = canonical.clone();
    qualified.audit.table = db.audit_table();

    let mut conn = connect(&bare).await;
    let search_path: String = sqlx::query_scalar("SHOW search_path")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        search_path, schema,
        "the options URL parameter sets search_path"
    );
    let a = store::resolve(&mut conn, &TableMapping::from_settings(&bare).unwrap())
        .await
        .unwrap();
    let b = store::resolve(&mut conn, &TableMapping::from_settings(&qualified).unwrap())
        .await
        .unwrap();
    assert_eq!(a.table_display(), canonical);
    assert_eq!(b.table_display(), canonical);
    assert_eq!(a.lock_key(), b.lock_key());
    assert_eq!(
        a.resolved.as_ref().map(|r| r.oid),
        b.resolved.as_ref().map(|r| r.oid)
    );
    // The configured spellings alone (unresolved) would differ: the catalog makes them one.
    assert_ne!(
        TableMapping::from_settings(&bare).unwrap().lock_key(),
        TableMapping::from_settings(&qualified).unwrap().lock_key()
    );

    // The audit migrations, with the audit table spelled both ways: one table, no mismatch.
    store::migrate(&mut conn, &a).await.unwrap();
    store::migrate(&mut conn, &b).await.unwrap();
    store::migrate(&mut conn, &a).await.unwrap();
    let versions: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT version FROM {schema}.reconciler_audit_migrations WHERE success ORDER BY version"
    )))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(versions, vec![1, 2, 3, 4]);
    drop(conn);

    // A writer holding the lock taken with one spelling keeps out a --once run with the other.
    let before = db.fingerprint().await;
    let holder = hold_lock(a.lock_key()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &url, &canonical, &db.audit_table(), "", "");
    let out = run_binary(
        dir.path(),
        Some(&api),
        &["--config", config.to_str().unwrap(), "--once"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", output(&out));
    assert!(
        output(&out).contains("holds the writer lock"),
        "{}",
        output(&out)
    );
    assert_eq!(db.fingerprint().await, before);
    holder.close().await.unwrap();

    // Each spelling downgrades one row (cap 1, oldest first); both audit records carry the
    // canonical name.
    let r = sweep(bare.clone(), &api, false).await;
    assert_eq!(r.result, SweepResult::Success, "{:?}", r.error);
    assert_eq!(r.downgraded, 1);
    assert_eq!(r.table.as_deref(), Some(canonical.as_str()));
    let r = sweep(qualified.clone(), &api, false).await;
    assert_eq!(r.result, SweepResult::Success, "{:?}", r.error);
    assert_eq!(r.downgraded, 1);
    assert_eq!(db.state("x").await, "gone");
    assert_eq!(db.state("y").await, "gone");
    let records = audit_records(&db, &db.audit_table()).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(
        records.iter().all(|r| r.1 == canonical),
        "audit records must carry the canonical name: {records:?}"
    );

    // An undo configured with the bare spelling finds the record the qualified one wrote.
    let undone = undo::run(
        &Database::new(&bare).unwrap(),
        &TableMapping::from_settings(&bare).unwrap(),
        &UndoRequest {
            sweep: None,
            session: Some("y".into()),
            dry_run: true,
        },
        Duration::ZERO,
    )
    .await
    .unwrap();
    assert_eq!(undone.restored, 1);
}

// ---------------------------------------------------------------------------------------
// 5. Naive timestamps
// ---------------------------------------------------------------------------------------

/// An `updated_at` of type `timestamp without time zone`, written in New York local time.
///
/// Fails on HEAD: HEAD read the column as `updated_at::timestamptz` in the session's zone
/// (always UTC: sqlx sends `TimeZone=UTC` at connect), so a row written 5 minutes ago in New
/// York looked 4-5 hours old and was downgraded inside the grace period; HEAD wrote
/// `updated_at = now()` (UTC wall time) instead of local time; and nothing refused such a
/// column without a configured zone (`sessions.updated_at_time_zone` did not exist).
///
/// The reconciler's own sessions are always UTC (sqlx's startup `TimeZone=UTC` overrides the
/// server's, the role's and even the URL's `options`), so the part of the reconciler that must
/// not depend on the session's zone is also exercised on a session set to Asia/Tokyo: the
/// read of the rows and a downgrade batch.
#[tokio::test]
async fn naive_updated_at_is_read_and_written_in_the_configured_zone() {
    let db = TestDb::new().await;
    let api = api().await;
    let table = format!("{}.naive_sessions", db.schema);
    let ny = "now() AT TIME ZONE 'America/New_York'";
    exec(
        &db,
        &format!(
            "CREATE TABLE {table} (thread_key text PRIMARY KEY, sandbox_id text NOT NULL, \
             state text NOT NULL, updated_at timestamp without time zone NOT NULL, \
             agent_thread_id text); \
             INSERT INTO {table} VALUES \
             ('fresh', 'pod-fresh', 'suspended', {ny} - interval '5 minutes', 'agent-fresh'), \
             ('old', 'pod-old', 'suspended', {ny} - interval '3 hours', 'agent-old')"
        ),
    )
    .await;
    let state = |key: &'static str| {
        let sql = format!("SELECT state FROM {table} WHERE thread_key = $1");
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(AssertSqlSafe(sql))
                .bind(key)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    // Seconds between a row's updated_at and New York's wall clock now.
    let local_lag = |key: &'static str| {
        let sql = format!(
            "SELECT abs(extract(epoch FROM (updated_at - ({ny}))))::float8 FROM {table} WHERE thread_key = $1"
        );
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, f64>(AssertSqlSafe(sql))
                .bind(key)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let dir = tempfile::tempdir().unwrap();

    // No zone configured: refused as a configuration error naming the key.
    let config = write_config(
        dir.path(),
        &database_url(),
        &table,
        &db.audit_table(),
        "",
        "",
    );
    let out = run_binary(
        dir.path(),
        Some(&api),
        &["--config", config.to_str().unwrap(), "--once"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", output(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sessions.updated_at_time_zone"),
        "{}",
        output(&out)
    );
    assert_eq!(state("fresh").await, "suspended");
    assert_eq!(state("old").await, "suspended");

    // With the zone: the row written 5 minutes ago (local) is within the 600 s grace period,
    // the one written 3 hours ago is downgraded, and its new updated_at is local time.
    let config = write_config(
        dir.path(),
        &database_url(),
        &table,
        &db.audit_table(),
        "",
        "updated_at_time_zone = \"America/New_York\"",
    );
    let out = run_binary(
        dir.path(),
        Some(&api),
        &["--config", config.to_str().unwrap(), "--once"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", output(&out));
    assert_eq!(state("fresh").await, "suspended", "{}", output(&out));
    assert_eq!(state("old").await, "gone", "{}", output(&out));
    let lag = local_lag("old").await;
    assert!(
        lag < 120.0,
        "new updated_at is {lag}s away from New York's now"
    );

    // The same, on a session whose TimeZone is neither UTC nor New York.
    exec(
        &db,
        &format!(
            "INSERT INTO {table} VALUES ('old2', 'pod-old2', 'suspended', {ny} - interval '3 hours', 'agent-old2')"
        ),
    )
    .await;
    let mut settings = settings_for(&db, &table);
    settings.sessions.updated_at_time_zone = "America/New_York".into();
    settings.validate().unwrap();
    let mut tokyo = connect(&settings).await;
    sqlx::query("SET TimeZone = 'Asia/Tokyo'")
        .execute(&mut tokyo)
        .await
        .unwrap();
    let mapping = store::resolve(&mut tokyo, &TableMapping::from_settings(&settings).unwrap())
        .await
        .unwrap();
    assert!(mapping.resolved.as_ref().unwrap().naive_updated_at);
    let rows: Vec<(String, DateTime<Utc>)> = sqlx::query(AssertSqlSafe(mapping.select_rows_sql()))
        .bind(&mapping.gone_state)
        .bind(mapping.scope_value())
        .fetch_all(&mut tokyo)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(3)))
        .collect();
    let read = |key: &str| rows.iter().find(|r| r.0 == key).unwrap().1;
    let fresh_age = (Utc::now() - read("fresh")).num_seconds();
    assert!(
        (240..=420).contains(&fresh_age),
        "the fresh row reads as {fresh_age}s old, not about 300s"
    );
    let old2_age = (Utc::now() - read("old2")).num_seconds();
    assert!(
        (3 * 3600 - 120..=3 * 3600 + 120).contains(&old2_age),
        "old2 reads as {old2_age}s old"
    );
    let orphan = OrphanedRow {
        key: "old2".into(),
        object: "pod-old2".into(),
        state: "suspended".into(),
        updated_at: read("old2"),
        backend: BackendKind::Pod,
    };
    // A batch is written only by the session holding the writer lock.
    assert!(store::try_writer_lock(&mut tokyo, &mapping).await.unwrap());
    let outcome = store::apply_batch(
        &mut tokyo,
        &mapping,
        uuid::Uuid::new_v4(),
        &[Downgrade {
            row: &orphan,
            evidence: std::sync::Arc::new(serde_json::json!({})),
        }],
    )
    .await
    .unwrap();
    assert_eq!(outcome.downgraded, vec!["old2".to_string()]);
    assert_eq!(state("old2").await, "gone");
    let lag = local_lag("old2").await;
    assert!(
        lag < 120.0,
        "new updated_at is {lag}s away from New York's now"
    );
}

// ---------------------------------------------------------------------------------------
// 6. Migrations once, no lingering lock
// ---------------------------------------------------------------------------------------

/// After `prepare_at_start(true)` a sweep runs no migration: the migrations table, dropped
/// after the start-up, is not created again.
///
/// Fails on HEAD: HEAD ran `store::migrate` at the start of every non-dry sweep (`run` called
/// `verify_table` then `migrate`), which would have created the table again.
#[tokio::test]
async fn migrations_run_once_at_start_not_in_every_sweep() {
    let (db, api) = seeded(1, 1).await;
    let settings = db.settings();
    let migrations = format!("{}_migrations", db.audit_table());
    let r = reconciler(settings, &api);
    let mapping = r.prepare_at_start(true).await.unwrap();
    assert_eq!(mapping.table_display(), db.table());
    assert!(exists(&db, &migrations).await);
    exec(&db, &format!("DROP TABLE {migrations}")).await;
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let report = r.sweep(&once(), &rx).await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert_eq!(report.downgraded, 1);
    assert!(
        !exists(&db, &migrations).await,
        "the sweep ran the migrations again"
    );
}

/// Advisory locks held by the backend `pid`.
async fn advisory_locks(db: &TestDb, pid: i32) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.pid = $1 \
           AND a.application_name = 'sandbox-reconciler'",
    )
    .bind(pid)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// sandbox-reconciler sessions holding the advisory lock `key` (a bigint key is stored as
/// classid = high 32 bits, objid = low 32 bits, objsubid = 1).
async fn migration_lock_holders(db: &TestDb, key: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND a.application_name = 'sandbox-reconciler' \
           AND l.classid::bigint = $1 AND l.objid::bigint = $2 AND l.objsubid = 1",
    )
    .bind((key >> 32) & 0xffff_ffff)
    .bind(key & 0xffff_ffff)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// A failing migration (the audit table's name taken by a view, so CREATE INDEX fails)
/// returns an error and leaves no advisory lock behind on the connection that ran it, even
/// when that connection lives on (as the daemon's writer connection does); once fixed,
/// preparing succeeds.
///
/// Fails on HEAD: HEAD ran sqlx's `Migrator`, which takes a database-wide *session-level*
/// advisory lock and returns early on a failed migration without releasing it, so the
/// connection kept the lock (and every other reconciler's migration waited on it).
#[tokio::test]
async fn a_failed_migration_leaves_no_lock_and_can_be_retried() {
    let db = TestDb::new().await;
    let api = api().await;
    db.insert("x", "suspended", "pod-x", minutes(60)).await;
    exec(
        &db,
        &format!("CREATE VIEW {} AS SELECT 1::bigint AS id", db.audit_table()),
    )
    .await;
    let r = reconciler(db.settings(), &api);

    // On a connection that stays open.
    let mut conn = r.database.connect().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let err = r.prepare(&mut conn, true).await.unwrap_err();
    assert!(
        err.to_string().contains("migration"),
        "unexpected error: {err}"
    );
    // The next statement on the connection (the daemon's ping) ends the failed transaction.
    sqlx::query("SELECT 1").execute(&mut conn).await.unwrap();
    assert_eq!(
        advisory_locks(&db, pid).await,
        0,
        "the connection kept an advisory lock after the failed migration"
    );
    // Control: the query does see an advisory lock this connection holds.
    let probe = store::mapping::fnv1a(&db.schema);
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(probe)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(advisory_locks(&db, pid).await, 1);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(probe)
        .execute(&mut conn)
        .await
        .unwrap();

    // At start-up, on a short-lived connection: an error, not a hang, and no sandbox-reconciler
    // session keeps the audit migrations' lock (its short-lived connection is gone).
    let key = store::migrations_lock_key();
    // Control: the query sees that lock when a sandbox-reconciler session holds it.
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(key)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(migration_lock_holders(&db, key).await, 1);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut conn)
        .await
        .unwrap();
    assert!(r.prepare_at_start(true).await.is_err());
    let deadline = Instant::now() + Duration::from_secs(5);
    while migration_lock_holders(&db, key).await > 0 {
        assert!(
            Instant::now() < deadline,
            "a sandbox-reconciler session still holds the migrations lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Fixed: preparing succeeds (the failure was not remembered) and a sweep writes.
    exec(&db, &format!("DROP VIEW {}", db.audit_table())).await;
    r.prepare_at_start(true).await.unwrap();
    let kind: String =
        sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)")
            .bind(db.audit_table())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(kind, "r");
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let report = r.sweep(&once(), &rx).await;
    assert_eq!(report.result, SweepResult::Success, "{:?}", report.error);
    assert_eq!(report.downgraded, 1);
    drop(conn);
}

// ---------------------------------------------------------------------------------------
// 7. undo beside a running writer
// ---------------------------------------------------------------------------------------

/// While a daemon holds the writer lock: `undo --dry-run` works, takes no lock and runs no
/// DDL; a real undo waits `database.writer_lock_wait_seconds` and then says how to pause the
/// daemon.
///
/// Fails on HEAD: HEAD's `undo::run` took the writer lock first (`try_writer_lock`, no wait)
/// even for `--dry-run`, so the dry run failed with "holds the writer lock" (exit 1); it
/// then ran `store::migrate` (DDL) for a dry run too; and the real undo failed at once,
/// without waiting and without naming sweep.dry_run.
#[tokio::test]
async fn undo_beside_a_running_writer() {
    let db = TestDb::new().await;
    let api = api().await;
    db.insert("x", "suspended", "pod-x", minutes(60)).await;
    let settings = db.settings();
    let mapping = resolved(&settings).await;
    let migrations = format!("{}_migrations", db.audit_table());
    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(dir.path(), "");
    let cfg = config.to_str().unwrap();

    // No audit table yet: the dry run creates none.
    let holder = hold_lock(mapping.lock_key()).await;
    let any_sweep = uuid::Uuid::new_v4().to_string();
    let out = run_binary(
        dir.path(),
        None,
        &["--config", cfg, "undo", "--dry-run", "--sweep", &any_sweep],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", output(&out));
    assert!(!exists(&db, &db.audit_table()).await, "a dry run ran DDL");
    assert!(!exists(&db, &migrations).await, "a dry run ran DDL");
    holder.close().await.unwrap();

    // A downgrade to undo, then the daemon holds the lock again.
    let report = sweep(settings.clone(), &api, false).await;
    assert_eq!(report.downgraded, 1, "{:?}", report.error);
    let sweep_id = report.sweep_id.to_string();
    let holder = hold_lock(mapping.lock_key()).await;
    let before = db.fingerprint().await;
    let audit_before = db.audit_count().await;

    let out = run_binary(
        dir.path(),
        None,
        &["--config", cfg, "undo", "--dry-run", "--sweep", &sweep_id],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", output(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 would restore"),
        "{}",
        output(&out)
    );
    assert_eq!(db.fingerprint().await, before);
    assert_eq!(db.audit_count().await, audit_before);

    let started = Instant::now();
    let out = run_binary(
        dir.path(),
        None,
        &["--config", cfg, "undo", "--sweep", &sweep_id],
        &[(
            "SANDBOX_RECONCILER__DATABASE__WRITER_LOCK_WAIT_SECONDS",
            "1",
        )],
    )
    .await;
    let waited = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", output(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("holds the writer lock"), "{}", output(&out));
    assert!(stderr.contains("sweep.dry_run"), "{}", output(&out));
    assert!(
        waited >= Duration::from_secs(1),
        "gave up after {waited:?}, before database.writer_lock_wait_seconds = 1"
    );
    assert!(waited < Duration::from_secs(30), "waited {waited:?}");
    assert_eq!(db.fingerprint().await, before);
    assert_eq!(db.audit_count().await, audit_before);

    // Once the daemon lets go, the same undo goes through.
    holder.close().await.unwrap();
    let out = run_binary(
        dir.path(),
        None,
        &["--config", cfg, "undo", "--sweep", &sweep_id],
        &[(
            "SANDBOX_RECONCILER__DATABASE__WRITER_LOCK_WAIT_SECONDS",
            "1",
        )],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", output(&out));
    assert_eq!(db.state("x").await, "suspended");
}

// ---------------------------------------------------------------------------------------
// 8. Batch arithmetic
// ---------------------------------------------------------------------------------------

/// One batch, scoped to cluster a: k1 (whose key cluster b's identical row shares) is still
/// as read, k2 changed meanwhile (only its `updated_at`). Exactly k1 of cluster a is
/// downgraded and `skipped_changed` is 1.
///
/// Fails on HEAD: HEAD's UPDATE joined on key alone, so it changed both clusters' k1 and
/// returned `["k1", "k1"]`; `skipped_changed = 2 - 2 = 0` instead of 1, and b's row was gone.
#[tokio::test]
async fn skipped_changed_counts_rows_changed_meanwhile() {
    let db = TestDb::new().await;
    let table = shared_table(&db).await;
    exec(
        &db,
        &format!(
            "INSERT INTO {table} VALUES \
             ('a', 'k1', 'pod-k1', 'suspended', now() - interval '1 hour', 'agent-a1'), \
             ('b', 'k1', 'pod-k1', 'suspended', now() - interval '1 hour', 'agent-b1'), \
             ('a', 'k2', 'pod-k2', 'suspended', now() - interval '1 hour', 'agent-a2')"
        ),
    )
    .await;
    let mut settings = settings_for(&db, &table);
    settings.sessions.scope_column = "cluster".into();
    settings.sessions.scope_value = "a".into();
    settings.validate().unwrap();
    let mut conn = connect(&settings).await;
    let mapping = store::resolve(&mut conn, &TableMapping::from_settings(&settings).unwrap())
        .await
        .unwrap();
    store::migrate(&mut conn, &mapping).await.unwrap();
    let read_at = shared_row(&db, &table, "a", "k1").await.2;
    let b_before = shared_row(&db, &table, "b", "k1").await;
    exec(
        &db,
        &format!("UPDATE {table} SET updated_at = now() WHERE cluster = 'a' AND thread_key = 'k2'"),
    )
    .await;
    let rows: Vec<OrphanedRow> = ["k1", "k2"]
        .iter()
        .map(|k| OrphanedRow {
            key: k.to_string(),
            object: format!("pod-{k}"),
            state: "suspended".into(),
            updated_at: read_at,
            backend: BackendKind::Pod,
        })
        .collect();
    let batch: Vec<Downgrade<'_>> = rows
        .iter()
        .map(|row| Downgrade {
            row,
            evidence: std::sync::Arc::new(serde_json::json!({"absence": "test"})),
        })
        .collect();
    assert!(store::try_writer_lock(&mut conn, &mapping).await.unwrap());
    let outcome = store::apply_batch(&mut conn, &mapping, uuid::Uuid::new_v4(), &batch)
        .await
        .unwrap();
    assert_eq!(outcome.downgraded, vec!["k1".to_string()]);
    assert_eq!(outcome.skipped_changed, 1);
    assert_eq!(shared_row(&db, &table, "a", "k1").await.0, "gone");
    assert_eq!(shared_row(&db, &table, "a", "k2").await.0, "suspended");
    assert_eq!(shared_row(&db, &table, "b", "k1").await, b_before);
    assert_eq!(audit_records(&db, &db.audit_table()).await.len(), 1);
}

/// Defence in depth: should the statement ever change more rows than were planned (here a
/// table without a unique key, reached with a mapping that skipped the catalog check), the
/// batch is rolled back with an error instead of committing and miscounting.
///
/// Fails on HEAD: HEAD committed both rows and computed `1 - 2` in `usize` (a panic in a
/// debug build, a wrapped count in release).
#[tokio::test]
async fn a_batch_that_changes_more_rows_than_planned_is_rolled_back() {
    let db = TestDb::new().await;
    let table = format!("{}.dup_sessions", db.schema);
    exec(
        &db,
        &format!(
            "CREATE TABLE {table} (thread_key text NOT NULL, sandbox_id text NOT NULL, \
             state text NOT NULL, updated_at timestamptz NOT NULL, agent_thread_id text); \
             INSERT INTO {table} VALUES \
             ('k1', 'pod-k1', 'suspended', date_trunc('second', now()) - interval '1 hour', 'one'), \
             ('k1', 'pod-k1', 'suspended', date_trunc('second', now()) - interval '1 hour', 'two')"
        ),
    )
    .await;
    let settings = settings_for(&db, &table);
    let mapping = TableMapping::from_settings(&settings).unwrap();
    let mut conn = connect(&settings).await;
    store::migrate(&mut conn, &mapping).await.unwrap();
    let read_at: DateTime<Utc> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT updated_at FROM {table} LIMIT 1"
    )))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let row = OrphanedRow {
        key: "k1".into(),
        object: "pod-k1".into(),
        state: "suspended".into(),
        updated_at: read_at,
        backend: BackendKind::Pod,
    };
    assert!(store::try_writer_lock(&mut conn, &mapping).await.unwrap());
    let err = store::apply_batch(
        &mut conn,
        &mapping,
        uuid::Uuid::new_v4(),
        &[Downgrade {
            row: &row,
            evidence: std::sync::Arc::new(serde_json::json!({})),
        }],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("rolled back"), "{err}");
    assert!(err.to_string().contains("locked 2 rows"), "{err}");
    drop(conn);
    let states: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT state FROM {table} ORDER BY agent_thread_id"
    )))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(states, vec!["suspended", "suspended"]);
    assert_eq!(db.audit_count().await, 0);
}

/// A deleted row is inserted back from its row image on a table with a NOT NULL domain column,
/// a stored generated column (recomputed, never named in the INSERT) and an identity column
/// GENERATED ALWAYS (the image's value kept). Test fails on the old code: the audit record kept
/// no row image and the undo left the deleted row alone.
#[tokio::test]
async fn a_deleted_row_is_inserted_back_past_domain_generated_and_identity_columns() {
    let db = TestDb::new().await;
    let api = api().await;
    let table = format!("{}.image_sessions", db.schema);
    exec(
        &db,
        &format!(
            "CREATE DOMAIN {s}.owner_text AS text NOT NULL CHECK (VALUE <> ''); \
             CREATE TABLE {table} (seq bigint GENERATED ALWAYS AS IDENTITY, \
             thread_key text PRIMARY KEY, sandbox_id text NOT NULL, \
             state text NOT NULL, updated_at timestamptz NOT NULL, agent_thread_id text, \
             owner {s}.owner_text, shout text GENERATED ALWAYS AS (upper(thread_key)) STORED); \
             INSERT INTO {table} (thread_key, sandbox_id, state, updated_at, agent_thread_id, owner) VALUES \
             ('orphan', 'pod-image-gone', 'suspended', now() - interval '1 hour', 'agent-orphan', 'team-x'), \
             ('live', 'pod-image-live', 'running', now() - interval '1 hour', 'agent-live', 'team-y')",
            s = db.schema
        ),
    )
    .await;
    api.add_pod("agents", "pod-image-live", MANAGED);
    let image = |key: &'static str| {
        let sql = format!("SELECT to_jsonb(t) - 'updated_at' FROM {table} t WHERE thread_key = $1");
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, serde_json::Value>(AssertSqlSafe(sql))
                .bind(key)
                .fetch_optional(&pool)
                .await
                .unwrap()
        }
    };
    let before = image("orphan").await.unwrap();
    let settings = settings_for(&db, &table);
    let report = sweep(settings.clone(), &api, false).await;
    assert_eq!(report.downgraded, 1, "{:?}", report.error);
    exec(
        &db,
        &format!("DELETE FROM {table} WHERE thread_key = 'orphan'"),
    )
    .await;
    let undone = undo::run(
        &Database::new(&settings).unwrap(),
        &TableMapping::from_settings(&settings).unwrap(),
        &UndoRequest {
            sweep: None,
            session: Some("orphan".into()),
            dry_run: false,
        },
        Duration::ZERO,
    )
    .await
    .unwrap_or_else(|e| panic!("undo failed: {e}"));
    assert_eq!((undone.restored, undone.inserted), (1, 1), "{undone:?}");
    // Every column as before, the cleared agent_thread_id included; state suspended.
    assert_eq!(image("orphan").await.unwrap(), before);
    let records = audit_records(&db, &db.audit_table()).await;
    assert_eq!(
        records.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        vec!["downgrade", "undo"]
    );
}

/// Scoped: a row deleted in scope a is inserted back although scope b has a row with the same
/// key; a row re-created in scope a meanwhile is left alone.
#[tokio::test]
async fn a_deleted_row_is_inserted_back_in_its_own_scope_only() {
    let db = TestDb::new().await;
    let api = api().await;
    let table = format!("{}.scoped_images", db.schema);
    exec(
        &db,
        &format!(
            "CREATE TABLE {table} (cluster text NOT NULL, thread_key text NOT NULL, \
             sandbox_id text NOT NULL, state text NOT NULL, updated_at timestamptz NOT NULL, \
             agent_thread_id text, PRIMARY KEY (cluster, thread_key)); \
             INSERT INTO {table} VALUES \
             ('a', 'k1', 'pod-k1', 'suspended', now() - interval '1 hour', 'agent-a1'), \
             ('a', 'k2', 'pod-k2', 'suspended', now() - interval '1 hour', 'agent-a2'), \
             ('b', 'k1', 'pod-k1', 'suspended', now() - interval '1 hour', 'agent-b1'), \
             ('a', 'live', 'pod-scoped-live', 'running', now() - interval '1 hour', NULL)"
        ),
    )
    .await;
    api.add_pod("agents", "pod-scoped-live", MANAGED);
    let mut settings = settings_for(&db, &table);
    settings.sessions.scope_column = "cluster".into();
    settings.sessions.scope_value = "a".into();
    settings.validate().unwrap();
    let report = sweep(settings.clone(), &api, false).await;
    assert_eq!(report.downgraded, 2, "{:?}", report.error);
    exec(
        &db,
        &format!(
            "DELETE FROM {table} WHERE cluster = 'a' AND state = 'gone'; \
             INSERT INTO {table} VALUES ('a', 'k2', 'pod-new', 'creating', now(), NULL)"
        ),
    )
    .await;
    let undone = undo::run(
        &Database::new(&settings).unwrap(),
        &TableMapping::from_settings(&settings).unwrap(),
        &UndoRequest {
            sweep: Some(report.sweep_id),
            session: None,
            dry_run: false,
        },
        Duration::ZERO,
    )
    .await
    .unwrap_or_else(|e| panic!("undo failed: {e}"));
    assert_eq!(
        (undone.restored, undone.inserted, undone.left_alone),
        (1, 1, 1),
        "{undone:?}"
    );
    let rows: Vec<(String, String, String, Option<String>)> = sqlx::query_as(AssertSqlSafe(
        format!("SELECT cluster, thread_key, state, agent_thread_id FROM {table} ORDER BY 1, 2"),
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (
                "a".into(),
                "k1".into(),
                "suspended".into(),
                Some("agent-a1".into())
            ),
            ("a".into(), "k2".into(), "creating".into(), None),
            ("a".into(), "live".into(), "running".into(), None),
            (
                "b".into(),
                "k1".into(),
                "suspended".into(),
                Some("agent-b1".into())
            ),
        ]
    );
}

/// A bigint key and an enum state: the deleted row is inserted back (the image's number read
/// as the key, the old state cast to the enum), and `explain` of a key that is not a number
/// finds no row instead of failing.
#[tokio::test]
async fn a_deleted_row_with_a_bigint_key_and_an_enum_state_is_inserted_back() {
    let db = TestDb::new().await;
    let api = api().await;
    let table = format!("{}.typed_images", db.schema);
    exec(
        &db,
        &format!(
            "CREATE TYPE {s}.image_state AS ENUM ('running', 'suspended', 'gone'); \
             CREATE TABLE {table} (thread_key bigint PRIMARY KEY, sandbox_id text NOT NULL, \
             state {s}.image_state NOT NULL, updated_at timestamptz NOT NULL, agent_thread_id text); \
             INSERT INTO {table} VALUES \
             (9007199254740993, 'pod-typed-gone', 'suspended', now() - interval '1 hour', 'agent-big'), \
             (41, 'pod-typed-live', 'running', now() - interval '1 hour', 'agent-live')",
            s = db.schema
        ),
    )
    .await;
    api.add_pod("agents", "pod-typed-live", MANAGED);
    let mut settings = settings_for(&db, &table);
    settings.sessions.other_states = Vec::new();
    settings.sessions.live_states = vec!["running".into()];
    settings.validate().unwrap();
    let report = sweep(settings.clone(), &api, false).await;
    assert_eq!(report.downgraded, 1, "{:?}", report.error);
    exec(&db, &format!("DELETE FROM {table} WHERE state = 'gone'")).await;
    let undone = undo::run(
        &Database::new(&settings).unwrap(),
        &TableMapping::from_settings(&settings).unwrap(),
        &UndoRequest {
            sweep: Some(report.sweep_id),
            session: None,
            dry_run: false,
        },
        Duration::ZERO,
    )
    .await
    .unwrap_or_else(|e| panic!("undo failed: {e}"));
    assert_eq!((undone.restored, undone.inserted), (1, 1), "{undone:?}");
    let row: (String, Option<String>) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT state::text, agent_thread_id FROM {table} WHERE thread_key = 9007199254740993"
    )))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(row, ("suspended".into(), Some("agent-big".into())));
    let e = sandbox_reconciler::explain::run(&reconciler(settings, &api), "not-a-number")
        .await
        .unwrap_or_else(|e| panic!("explain failed: {e}"));
    assert!(e.row.is_none());
}
