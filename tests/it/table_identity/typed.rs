//! Typed keys and an enum state column: SQL typed from the catalog, so uuid and bigint keys
//! keep their index and enum states are written and restored.

use crate::support::*;
use chrono::Utc;
use sandbox_reconciler::store::{self, TableMapping};
use sandbox_reconciler::sweep::SweepResult;
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Row};

use super::*;

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

    let undone = undo_sweep(&settings, report.sweep_id).await.unwrap();
    assert_eq!((undone.restored, undone.left_alone), (1, 0), "{table}");
    assert_eq!(
        row(orphan_key).await,
        ("suspended".to_string(), Some("agent-orphan".to_string()))
    );
    table
}

/// A uuid key and a bigint key: downgraded and undone.
///
/// These guard the typed SQL (`t.key = c.key::uuid`, `::bigint`), whose casts come from the
/// catalog; a `key::text = $n` comparison would pass them too (slow but correct), which the
/// index test below tells apart.
#[tokio::test]
async fn uuid_and_bigint_keys_are_downgraded_and_undone() {
    let db = TestDb::new().await;
    let api = fake_api().await;
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
/// The value is cast to the column's regtype: a downgrade writing `state = $7` with `$7`
/// bound as text, or an undo writing `state = cand.old_state` (text), is refused by
/// PostgreSQL ("column "state" is of type session_state but expression is of type text"), and
/// `check` accepts such a column.
#[tokio::test]
async fn enum_state_column_is_downgraded_and_undone() {
    let db = TestDb::new().await;
    let api = fake_api().await;
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
/// Undo populates the record of the cleared columns from the locked row itself:
/// `jsonb_populate_record(NULL::table, cleared)` would build a whole row of the table's type
/// with every other column NULL, which PostgreSQL refuses ("domain nonempty_text does not allow
/// null values"), so no undo of such a table could run.
#[tokio::test]
async fn a_not_null_domain_column_does_not_stop_undo() {
    let db = TestDb::new().await;
    let api = fake_api().await;
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

    let undone = undo_sweep(&settings, report.sweep_id)
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
/// A join on `t.key::text = c.key`, an expression no index covers, leaves only a sequential
/// scan of the whole table per batch. The control below EXPLAINs that join shape on the same
/// table and connection and finds no Index Cond, so this test tells the two apart.
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

        // Control: the key::text join shape cannot use the index, whatever the planner settings.
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
            "the control (the key::text join) unexpectedly uses an index:\n{old_plan}"
        );
    }
}
