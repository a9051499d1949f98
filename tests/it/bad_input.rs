//! Bad input never crashes the daemon or leaks a secret: hostile HTTP clients, wrong
//! configuration, and the database password.

use std::time::{Duration, Instant};

use crate::support::daemon::*;
use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn world() -> (TestDb, FakeApiServer) {
    let (db, api) = seeded(1, 0).await;
    db.insert("orphan", "suspended", "pod-gone", minutes(60))
        .await;
    (db, api)
}

#[tokio::test]
async fn slow_and_oversized_http_clients_are_bounded_and_do_not_affect_sweeps() {
    let (db, api) = world().await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &db, &api, &[]).await;
    let ok =
        |m: &str| metric(m, "sandbox_reconciler_sweeps_total{result=\"success\"}").unwrap_or(0.0);
    d.wait_metrics(30, "first sweep", |m| ok(m) >= 1.0).await;

    // Slow clients: headers that never finish. The server drops them after its header
    // deadline and keeps serving everyone else meanwhile.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", d.port))
            .await
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(s);
    }
    let started = Instant::now();
    let (status, _) = http(d.port, "GET", "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a scrape is not held up by slow clients"
    );
    let mut first = slow.remove(0);
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), first.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "a client that never finishes its headers is disconnected"
    );

    // Oversized headers are refused, not buffered without bound.
    let mut big = tokio::net::TcpStream::connect(("127.0.0.1", d.port))
        .await
        .unwrap();
    let header = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let _ = big.write_all(header.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), big.read_to_end(&mut buf)).await;
    let answer = String::from_utf8_lossy(&buf);
    assert!(
        !answer.starts_with("HTTP/1.1 200"),
        "an oversized request is not served: {answer:.80}"
    );

    // Sweeps went on throughout.
    let before = ok(&d.metrics().await);
    d.wait_metrics(20, "sweeps continue", |m| ok(m) >= before + 2.0)
        .await;
    assert_eq!(db.state("orphan").await, "gone");
}

const PASSWORD: &str = "Sup3r-S3cret-Passw0rd";

#[tokio::test]
async fn the_database_password_never_appears_in_output_logs_or_metrics() {
    let (db, api) = world().await;
    let dir = tempfile::tempdir().unwrap();
    let config = db.write_config(dir.path(), "");
    let cfg = config.to_str().unwrap();
    // Trust auth ignores the password, so this URL works; a closed port makes errors.
    let good = database_url().replace("postgres@", &format!("postgres:{PASSWORD}@"));
    let closed = format!(
        "postgres://postgres:{PASSWORD}@127.0.0.1:{}/test",
        free_port()
    );
    let bad_url = format!("postgres://postgres:{PASSWORD}@127.0.0.1:notaport/test");
    // Every other place a PostgreSQL URL carries a secret: the `password` parameter, libpq's
    // `sslpassword` (which sqlx does not know, and used to log with its value), and both
    // with a client key path (`sslkey`, a path, not a secret).
    let with = |url: &str, params: &str| {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}{params}")
    };
    let password_param = with(&database_url(), &format!("password={PASSWORD}"));
    let closed_param = with(
        &format!("postgres://postgres@127.0.0.1:{}/test", free_port()),
        &format!("password={PASSWORD}&sslmode=disable"),
    );
    let sslpassword = with(
        &database_url(),
        &format!("sslkey=/nonexistent/client.key&sslpassword={PASSWORD}"),
    );
    let mut outputs = Vec::new();
    let mut statuses = Vec::new();
    for (args, url) in [
        (vec!["--once", "--config", cfg], &good),
        (vec!["--once", "--config", cfg], &closed),
        (vec!["--once", "--output", "json", "--config", cfg], &closed),
        (vec!["--once", "--config", cfg], &bad_url),
        (vec!["--config", cfg, "check"], &closed),
        (vec!["--config", cfg, "check"], &good),
        (vec!["--config", cfg, "undo", "--session", "x"], &closed),
        (vec!["--once", "--config", cfg], &password_param),
        (vec!["--once", "--config", cfg], &closed_param),
        (vec!["--config", cfg, "check"], &closed_param),
        (vec!["--once", "--config", cfg], &sslpassword),
        (vec!["--config", cfg, "check"], &sslpassword),
    ] {
        let out = run_binary(
            dir.path(),
            Some(&api),
            &args,
            &[("DATABASE_URL", url), ("RUST_LOG", "debug")],
        )
        .await;
        outputs.push(format!(
            "{args:?}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
        statuses.push(out.status.code());
    }
    for text in &outputs {
        assert!(!text.contains(PASSWORD), "password leaked:\n{text}");
    }
    // The `password` parameter works (trust auth): the sweep ran and downgraded the orphan.
    assert_eq!(statuses[7], Some(0), "{}", outputs[7]);
    assert!(
        outputs[8].contains("cannot connect to PostgreSQL"),
        "{}",
        outputs[8]
    );
    // sqlx does not know `sslpassword`: refused as a configuration error naming the key and
    // the parameter (not its value), before connecting (`--once` exits 2; `check` fails its
    // database line).
    assert_eq!(statuses[10], Some(2), "{}", outputs[10]);
    assert_ne!(statuses[11], Some(0), "{}", outputs[11]);
    for i in [10, 11] {
        assert!(outputs[i].contains("database.url"), "{}", outputs[i]);
        assert!(outputs[i].contains("sslpassword"), "{}", outputs[i]);
    }
    assert!(
        outputs[1].contains("cannot connect to PostgreSQL"),
        "{}",
        outputs[1]
    );

    // The daemon's logs and metrics.
    let d = Daemon::start(
        dir.path(),
        &db,
        &api,
        &[("DATABASE_URL", &closed), ("RUST_LOG", "debug")],
    )
    .await;
    let failed =
        |m: &str| metric(m, "sandbox_reconciler_sweeps_total{result=\"failed\"}").unwrap_or(0.0);
    let m = d
        .wait_metrics(30, "failed sweeps", |m| failed(m) >= 2.0)
        .await;
    assert!(!m.contains(PASSWORD));
    let (_, health) = http(d.port, "GET", "/healthz").await.unwrap();
    assert!(!health.contains(PASSWORD));
    let log = std::fs::read_to_string(dir.path().join(format!("daemon-{}.log", d.port))).unwrap();
    assert!(log.contains("cannot connect"), "{log}");
    assert!(!log.contains(PASSWORD), "password leaked in daemon log");
}

#[tokio::test]
async fn configuration_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        ("[sweep]\nbatch_size = \"many\"\n", "sweep.batch_size"),
        ("[sweep]\nbatch_size = 0\n", "sweep.batch_size"),
        (
            "[sweep]\nschedule = \"every five minutes\"\n",
            "sweep.schedule",
        ),
        (
            "[sessions]\ntable = \"sessions; drop table x\"\n",
            "sessions.table",
        ),
        (
            "[sessions]\nclear_columns = [\"state\"]\n",
            "sessions.clear_columns[0]",
        ),
        (
            "[sessions]\nscope_column = \"cluster\"\n",
            "sessions.scope_column",
        ),
        (
            "[sessions]\nother_states = [\"gone\"]\n",
            "sessions.other_states",
        ),
        ("[cluster]\nnamespaces = []\n", "cluster.namespaces"),
        (
            "[cluster]\nnamespaces = [\"Not_A_Namespace\"]\n",
            "cluster.namespaces",
        ),
        (
            "[backends.pod]\nlabel_selector = \"a in (b\"\n",
            "backends.pod.label_selector",
        ),
        ("[backends.pod]\nenabled = false\n", "backends"),
        (
            "[guard]\nmax_live_missing_ratio = 1.5\n",
            "guard.max_live_missing_ratio",
        ),
        ("[server]\nlisten = \"nowhere\"\n", "server.listen"),
        ("[bogus]\nkey = 1\n", "bogus"),
        ("not toml at all [", "TOML"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = run_binary(
            dir.path(),
            None,
            &["--once", "--config", path.to_str().unwrap()],
            &[],
        )
        .await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(
            err.contains(key),
            "{text}: expected the message to name {key}: {err}"
        );
    }
}
