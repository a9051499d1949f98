//! A real Prometheus server scrapes a running daemon on loopback and loads the shipped alert
//! rules; every metric name the dashboard and the rules use is one the daemon exports.
//!
//! The test command (scripts/test.sh) installs Prometheus and sets
//! SANDBOX_RECONCILER_REQUIRE_TOOLS, which turns a missing tool into a failure; elsewhere the
//! test says it was skipped.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::daemon::*;
use crate::support::*;

fn tool(name: &str) -> Option<String> {
    let found = std::process::Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found && std::env::var_os("SANDBOX_RECONCILER_REQUIRE_TOOLS").is_some() {
        panic!("{name} is required (Debian package prometheus) but not installed");
    }
    if !found {
        eprintln!("skipped: {name} is not installed (scripts/test.sh installs it)");
    }
    found.then(|| name.to_string())
}

/// Metric base names an exposition declares with `# TYPE`.
fn exported_names(exposition: &str) -> Vec<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

async fn get_json(port: u16, path: &str) -> Option<serde_json::Value> {
    let (status, body) = http(port, "GET", path).await?;
    (status == 200)
        .then(|| serde_json::from_str(&body).ok())
        .flatten()
}

#[tokio::test]
async fn prometheus_scrapes_the_daemon_and_loads_the_rules() {
    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    let db = TestDb::new().await;
    let api = FakeApiServer::start().await;
    api.register_sandbox_version("v1alpha1");
    api.add_pod("agents", "pod-live", MANAGED);
    db.insert("live", "running", "pod-live", minutes(60)).await;
    db.insert("orphan", "suspended", "pod-gone", minutes(60))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = InProcessDaemon::start(&db, &api).await;
    let scrape = daemon
        .wait_metrics(30, "a successful sweep", |m| {
            metric(m, "sandbox_reconciler_sweeps_total{result=\"success\"}").unwrap_or(0.0) >= 1.0
        })
        .await;

    // Every metric the dashboard and the alert rules reference is exported.
    let exported = exported_names(&scrape);
    let rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yaml");
    let dashboard =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/sandbox-reconciler.json");
    let mut referenced = Vec::new();
    for file in [&rules, &dashboard] {
        let text = std::fs::read_to_string(file).unwrap();
        for token in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if token.starts_with("sandbox_reconciler_") {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| token.strip_suffix(s))
                    .unwrap_or(token);
                referenced.push(base.to_string());
            }
        }
    }
    referenced.sort();
    referenced.dedup();
    assert!(
        referenced.len() >= 10,
        "found too few references: {referenced:?}"
    );
    let missing: Vec<_> = referenced
        .iter()
        .filter(|r| !exported.contains(r))
        .collect();
    assert!(
        missing.is_empty(),
        "referenced but not exported: {missing:?}"
    );
    if let Ok(list) = std::env::var("SANDBOX_RECONCILER_METRIC_NAMES") {
        // The list scripts/check-deploy.sh extracted with its own parser.
        let names = std::fs::read_to_string(list).unwrap();
        for name in names.lines().map(str::trim).filter(|n| !n.is_empty()) {
            assert!(exported.iter().any(|e| e == name), "{name} is not exported");
        }
    }

    // A real Prometheus scrapes the daemon and evaluates the shipped rules.
    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: sandbox-reconciler\n    static_configs:\n      - targets: ['127.0.0.1:{daemon}']\n",
            rules = rules.display(),
            daemon = daemon.port
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let mut server = tokio::process::Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    let value = loop {
        let answer = get_json(
            port,
            "/api/v1/query?query=sandbox_reconciler_sessions%7Bstate%3D%22running%22%7D",
        )
        .await;
        let value = answer.as_ref().and_then(|a| {
            a["data"]["result"][0]["value"][1]
                .as_str()
                .map(str::to_string)
        });
        if let Some(v) = value {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never returned the metric; log:\n{}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(value, "1");
    let rules = get_json(port, "/api/v1/rules")
        .await
        .expect("rules API answers");
    let names: Vec<String> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .filter_map(|r| r["name"].as_str().map(str::to_string))
        .collect();
    for alert in [
        "SandboxReconcilerSweepsStale",
        "SandboxReconcilerSweepsFailing",
        "SandboxReconcilerGuardRefused",
        "SandboxReconcilerOrphansPersisting",
        "SandboxReconcilerUntrackedObjectsGrowing",
    ] {
        assert!(
            names.iter().any(|n| n == alert),
            "{alert} not loaded: {names:?}"
        );
    }
    // The target is up and the daemon healthy, so the staleness alert is not firing.
    let up = get_json(port, "/api/v1/query?query=up").await.unwrap();
    assert_eq!(up["data"]["result"][0]["value"][1], "1");
    server.kill().await.ok();
}
