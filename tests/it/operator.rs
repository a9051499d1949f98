//! The command line, logs and long runs the way an operator meets them: every command line
//! the README shows, run verbatim; logs without escape codes off a terminal; progress only on
//! one; `GET /last-sweep`; `--version` with the commit; the declared minimum Rust version.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::support::daemon::*;
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_sandbox-reconciler");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `sandbox-reconciler …` line of the README's `sh` code blocks.
fn readme_command_lines() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut lines = Vec::new();
    let mut in_sh = false;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_sh = line.trim() == "```sh";
            continue;
        }
        if in_sh && line.starts_with("sandbox-reconciler ") {
            lines.push(line.split(" #").next().unwrap().trim().to_string());
        }
    }
    lines
}

/// A world the README's commands can run against: the centaur table in a private schema,
/// the fake API server with namespace "agents", one orphan.
async fn world() -> (TestDb, FakeApiServer, tempfile::TempDir) {
    let (db, api) = seeded(2, 1).await;
    // The README's offline audit reads the demo's cluster dump: a live session of that cluster
    // shows the dump looks in the right place.
    let dump: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("examples/demo/cluster-snapshot.json")).unwrap(),
    )
    .unwrap();
    let pod = dump["items"][0]["metadata"]["name"].as_str().unwrap();
    db.insert("demo-live", "running", pod, minutes(60)).await;
    (db, api, tempfile::tempdir().unwrap())
}

/// Runs `line` with `sh` from the repository root, the binary first on PATH, pointed at the
/// test database and the fake API server; kills it after `wait` (the daemon never exits).
async fn run_line(
    line: &str,
    db: &TestDb,
    api: &FakeApiServer,
    dir: &Path,
    wait: Duration,
) -> (Option<i32>, String, String) {
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(line)
        .current_dir(repo())
        .env("PATH", path)
        .env("HOME", dir)
        .env("KUBECONFIG", &kubeconfig)
        .env("DATABASE_URL", database_url())
        .env("SANDBOX_RECONCILER__SESSIONS__TABLE", db.table())
        .env("SANDBOX_RECONCILER__AUDIT__TABLE", db.audit_table())
        .env("SANDBOX_RECONCILER__CLUSTER__NAMESPACES", "agents")
        .env(
            "SANDBOX_RECONCILER__BACKENDS__AGENT_SANDBOX__OBJECT_NAME_PREFIX",
            "sb-",
        )
        .env("SANDBOX_RECONCILER__SERVER__LISTEN", "127.0.0.1:0")
        .env_remove("SANDBOX_RECONCILER_CONFIG")
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    match tokio::time::timeout(wait, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        Err(_) => (None, String::new(), String::new()),
    }
}

/// Every command line the README shows is accepted as written (global options before and
/// after the subcommand, e.g. `check --config FILE`) and does what it says.
#[tokio::test]
async fn every_command_line_in_the_readme_runs_as_written() {
    let lines = readme_command_lines();
    assert!(
        lines.len() >= 8,
        "README.md shows too few command lines: {lines:?}"
    );
    let (db, api, dir) = world().await;
    for line in &lines {
        let daemon = !line.contains("--once")
            && !line.contains("--cluster-snapshot")
            && !line.contains("--version")
            && !line.contains(" check")
            && !line.contains(" permissions")
            && !line.contains(" undo")
            && !line.contains(" explain")
            && !line.contains(" history");
        let wait = if daemon {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(60)
        };
        let (code, stdout, stderr) = run_line(line, &db, &api, dir.path(), wait).await;
        assert!(
            !stderr.contains("unexpected argument") && !stderr.contains("Usage:"),
            "{line}: rejected by the parser: {stderr}"
        );
        if daemon {
            assert_eq!(code, None, "{line}: the daemon exited: {stdout}{stderr}");
        } else {
            assert_eq!(code, Some(0), "{line}: {stdout}{stderr}");
        }
    }
}

/// Logs on a pipe or in a file carry no ANSI escape codes, text logs as JSON ones.
#[tokio::test]
async fn logs_off_a_terminal_have_no_escape_codes() {
    let (db, api, dir) = world().await;
    let config = db.write_config(dir.path(), "");
    for format in ["text", "json"] {
        let out = run_binary(
            dir.path(),
            Some(&api),
            &[
                "--once",
                "--dry-run",
                "--log-format",
                format,
                "--config",
                config.to_str().unwrap(),
            ],
            &[],
        )
        .await;
        assert_eq!(out.status.code(), Some(0));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("INFO") || stderr.contains("\"level\""),
            "{stderr}"
        );
        assert!(
            !stderr.contains('\u{1b}'),
            "{format} logs carry escape codes: {stderr:?}"
        );
    }
}

/// Runs the binary under a pseudo-terminal (`script`), so standard error is a terminal.
async fn on_a_terminal(
    args: &str,
    env: &[(&str, &str)],
    dir: &Path,
    api: &FakeApiServer,
) -> String {
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let mut cmd = tokio::process::Command::new("script");
    cmd.args(["-qec", &format!("{BIN} {args}"), "/dev/null"])
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", dir)
        .env("TERM", "xterm")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("finished")
        .expect("script ran");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// On a terminal a one-off run shows progress on standard error and colours its logs;
/// `NO_COLOR` turns colour off; `--output json` draws no progress.
#[tokio::test]
async fn on_a_terminal_progress_and_colour_follow_the_conventions() {
    let (db, api, dir) = world().await;
    let config = db.write_config(dir.path(), "");
    let args = format!("--once --dry-run --config {}", config.display());
    let shown = on_a_terminal(&args, &[], dir.path(), &api).await;
    assert!(shown.contains("rows read"), "{shown}");
    assert!(shown.contains("pod listed"), "{shown}");
    assert!(
        shown.contains('\u{1b}'),
        "no colour on a terminal: {shown:?}"
    );
    let plain = on_a_terminal(&args, &[("NO_COLOR", "1")], dir.path(), &api).await;
    let log_lines: Vec<&str> = plain.lines().filter(|l| l.contains("INFO")).collect();
    assert!(!log_lines.is_empty(), "{plain}");
    for line in log_lines {
        assert!(!line.contains("\u{1b}[2m"), "NO_COLOR ignored: {line:?}");
    }
    let json = on_a_terminal(&format!("{args} --output json"), &[], dir.path(), &api).await;
    assert!(!json.contains("rows read"), "{json}");
    // Off a terminal: no progress either.
    let out = run_binary(
        dir.path(),
        Some(&api),
        &["--once", "--dry-run", "--config", config.to_str().unwrap()],
        &[],
    )
    .await;
    assert!(!String::from_utf8_lossy(&out.stderr).contains("rows read"));
}

/// The daemon serves the last sweep's summary at `GET /last-sweep`: the same document
/// as `--once --output json`, changes capped with the cap stated, no credentials.
#[tokio::test]
async fn the_daemon_serves_the_last_sweep() {
    let (db, api) = seeded(2, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let d = InProcessDaemon::start(&db, &api).await;
    d.wait_metrics(30, "a successful sweep", |m| {
        metric(m, "sandbox_reconciler_sweeps_total{result=\"success\"}").unwrap_or(0.0) >= 1.0
    })
    .await;
    let (status, body) = http(d.port, "GET", "/last-sweep").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(doc["sweep_id"].is_string());
    assert_eq!(doc["result"], "success");
    assert_eq!(doc["changes_cap"], 100);
    assert!(doc["changes_total"].as_u64().unwrap() <= 3);
    assert!(doc["guard"]["verdict"].is_string(), "{doc}");
    assert!(!body.contains("postgres://"), "{body}");
    // The command that shows what the sweep wrote, runnable as given.
    let sweep_id = doc["sweep_id"].as_str().unwrap();
    let history = doc["history"].as_str().unwrap();
    assert_eq!(
        history,
        format!("sandbox-reconciler history --sweep {sweep_id}")
    );
    let config = db.write_config(dir.path(), "");
    let mut args: Vec<&str> = history.split(' ').skip(1).collect();
    args.extend(["--output", "json", "--config", config.to_str().unwrap()]);
    let out = run_binary(dir.path(), None, &args, &[]).await;
    assert_eq!(out.status.code(), Some(0));
    let records: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        records["records"].as_array().unwrap().len() as u64,
        doc["changes_total"].as_u64().unwrap(),
        "{records}"
    );
    d.stop(15).await.expect("a clean shutdown");
}

/// `--version` names the commit the binary was built from, as `build_info` does.
#[tokio::test]
async fn version_names_the_commit() {
    let out = std::process::Command::new(BIN)
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!(
            "sandbox-reconciler {} (",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    let revision = text
        .trim()
        .rsplit('(')
        .next()
        .unwrap()
        .trim_end_matches(')');
    assert_eq!(revision, sandbox_reconciler::REVISION);
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo())
        .output();
    if let Some(git) = git.ok().filter(|g| g.status.success()) {
        let head = String::from_utf8_lossy(&git.stdout).trim().to_string();
        // The binary was built from this checkout (HEAD may have moved since by a commit,
        // so compare only when the build saw a git revision at all).
        assert!(
            revision == "unknown" || revision.len() == head.len(),
            "{revision} vs {head}"
        );
    }
}

/// The declared `rust-version` is at least every dependency's, so an older toolchain
/// gets cargo's own clear message instead of a dependency's compile error.
#[test]
fn rust_version_is_the_real_minimum() {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        // Only this platform's dependencies: the others are never downloaded.
        .args(["--filter-platform", host_triple().as_str()])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let parse = |v: &str| -> Vec<u64> {
        let mut parts: Vec<u64> = v.split('.').map(|p| p.parse().unwrap_or(0)).collect();
        parts.resize(3, 0);
        parts
    };
    let mut ours = None;
    let mut highest: (Vec<u64>, String) = (vec![0], String::new());
    for p in metadata["packages"].as_array().unwrap() {
        let Some(v) = p["rust_version"].as_str() else {
            continue;
        };
        if p["name"] == "sandbox-reconciler" {
            ours = Some(parse(v));
        } else if parse(v) > highest.0 {
            highest = (parse(v), p["name"].as_str().unwrap_or("?").to_string());
        }
    }
    let ours = ours.expect("Cargo.toml declares rust-version");
    assert!(
        ours >= highest.0,
        "rust-version {ours:?} is below {}'s {:?}",
        highest.1,
        highest.0
    );
}

/// The host's target triple, from `rustc -vV`.
fn host_triple() -> String {
    let out = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .unwrap_or("x86_64-unknown-linux-gnu")
        .to_string()
}
