//! The fake Kubernetes API server of the tests (`testkit::fake_api`), in a child process (this
//! same executable with `--serve-fake-api`) so that its memory and CPU are not counted as the
//! reconciler's, and the parent's handle on it.
//!
//! The child answers one-line commands on stdin: `count` (requests so far), `counts` (the same
//! split into list / get / watch / other), `clear`, `rss`, `watches` (open watch streams), `rv`
//! (the store's revision), and `churn on` / `churn off`: while churn is on, an object outside
//! the benchmark's namespace changes every `--churn-ms`, as other workloads' writes move a real
//! cluster's revision all the time. Those events reach none of the reconciler's watches, so a
//! watch cache only learns that the revision moved from a bookmark: the cost a daemon sweep
//! pays to prove its cache fresh (rule 2(c)).

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde_json::json;
use testkit::fake_api::{FakeApiServer, Fault, FaultAction, Kind};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::layout::{Layout, HARNESSES};
use crate::measure::status_kb;
use crate::Args;

/// Child process: populate the fake API server, print `ready <url>`, then answer `count`,
/// `clear` and `rss` on stdin until EOF.
pub(crate) async fn serve_fake_api(args: Args) -> Result<()> {
    let layout = Layout::new(&args, &args.scenarios)?;
    let api = Arc::new(FakeApiServer::start().await);
    api.set_bookmark_interval(Duration::from_millis(args.bookmark_interval_ms.max(1)));
    let ns = args.namespace.as_str();
    let created = "2026-01-01T00:00:00Z";
    let managed_pod = json!([
        {"manager": "centaur", "operation": "Update", "apiVersion": "v1", "time": created,
         "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:centaur.ai/harness": {}},
            "f:labels": {".": {}, "f:app": {}, "f:centaur.ai/managed": {}, "f:centaur.ai/sandbox-id": {}}},
            "f:spec": {"f:containers": {"k:{\"name\":\"sandbox\"}": {".": {}, "f:image": {}, "f:imagePullPolicy": {}, "f:name": {},
                "f:resources": {".": {}, "f:limits": {".": {}, "f:cpu": {}, "f:memory": {}}}}},
                "f:restartPolicy": {}, "f:terminationGracePeriodSeconds": {}}}},
        {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": created,
         "fieldsType": "FieldsV1", "subresource": "status", "fieldsV1": {"f:status": {
            "f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}}},
            "f:containerStatuses": {}, "f:hostIP": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {".": {}, "k:{\"ip\":\"10.0.0.1\"}": {".": {}, "f:ip": {}}}, "f:startTime": {}}}}
    ]);
    let managed_sandbox = json!([
        {"manager": "centaur", "operation": "Update", "apiVersion": "agents.x-k8s.io/v1alpha1", "time": created,
         "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}},
            "f:spec": {".": {}, "f:podTemplate": {".": {}, "f:spec": {".": {}, "f:containers": {}}}, "f:replicas": {}}}},
        {"manager": "agent-sandbox-controller", "operation": "Update", "apiVersion": "agents.x-k8s.io/v1alpha1", "time": created,
         "fieldsType": "FieldsV1", "subresource": "status", "fieldsV1": {"f:status": {".": {}, "f:conditions": {}, "f:replicas": {}, "f:selector": {}}}}
    ]);
    for j in 0..layout.pods {
        let name = layout.object_name(j as u64);
        let mut meta = json!({
            "labels": {"app": "centaur-sandbox", "centaur.ai/managed": "true", "centaur.ai/sandbox-id": name},
        });
        if !args.lean_objects {
            meta["annotations"] = json!({"centaur.ai/harness": HARNESSES[j % 3]});
            meta["managedFields"] = managed_pod.clone();
        }
        let pod = json!({
            "metadata": meta,
            "spec": {"containers": [{"name": "sandbox", "image": "ghcr.io/example/centaur-sandbox:2026.01",
                       "imagePullPolicy": "IfNotPresent",
                       "resources": {"limits": {"cpu": "2", "memory": "4Gi"}}}],
                     "restartPolicy": "Never", "terminationGracePeriodSeconds": 30},
            "status": {"phase": "Running", "hostIP": "10.1.0.4", "podIP": "10.0.0.1",
                       "startTime": created}
        });
        api.add_object(Kind::Pod, ns, &name, pod);
    }
    for t in 0..layout.sandboxes {
        let name = layout.object_name((layout.pods + t) as u64);
        let replicas = i64::from(t >= layout.paused_sandboxes);
        let ready = if replicas == 1 { "True" } else { "False" };
        let mut meta = json!({"labels": {"app": "centaur-sandbox"}});
        if !args.lean_objects {
            meta["managedFields"] = managed_sandbox.clone();
        }
        let sandbox = json!({
            "apiVersion": "agents.x-k8s.io/v1alpha1",
            "kind": "Sandbox",
            "metadata": meta,
            "spec": {"replicas": replicas, "podTemplate": {"spec": {"containers": [
                {"name": "sandbox", "image": "ghcr.io/example/centaur-sandbox:2026.01",
                 "resources": {"limits": {"cpu": "2", "memory": "4Gi"}}}]}}},
            "status": {"replicas": replicas, "selector": format!("agents.x-k8s.io/sandbox-name={name}"),
                       "conditions": [{"type": "Ready", "status": ready,
                                       "lastTransitionTime": created}]}
        });
        api.add_object(Kind::Sandbox, ns, &name, sandbox);
    }
    if args.api_latency_ms > 0 {
        api.inject(Fault::always(FaultAction::Hang(Duration::from_millis(
            args.api_latency_ms,
        ))));
    }
    let mut out = tokio::io::stdout();
    out.write_all(format!("ready {}\n", api.url()).as_bytes())
        .await?;
    out.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut churn: Option<tokio::task::JoinHandle<()>> = None;
    while let Some(line) = lines.next_line().await? {
        let answer = match line.trim() {
            "count" => api.request_count().to_string(),
            "counts" => {
                let c = RequestCounts::of(&api);
                format!("{} {} {} {}", c.list, c.get, c.watch, c.other)
            }
            "clear" => {
                api.clear_requests();
                "ok".to_string()
            }
            "watches" => api.open_watches().to_string(),
            "rv" => api.resource_version().to_string(),
            "churn on" => {
                if churn.is_none() && args.churn_ms > 0 {
                    let api = api.clone();
                    let every = Duration::from_millis(args.churn_ms);
                    churn = Some(tokio::spawn(async move {
                        let mut n = 0u64;
                        loop {
                            tokio::time::sleep(every).await;
                            n += 1;
                            api.add_object(
                                Kind::Pod,
                                CHURN_NAMESPACE,
                                "churn",
                                json!({"metadata": {"labels": {"app": "elsewhere"}},
                                       "spec": {"containers": [{"name": "c", "image": "busybox"}]},
                                       "status": {"phase": "Running", "message": n.to_string()}}),
                            );
                        }
                    }));
                }
                "ok".to_string()
            }
            "churn off" => {
                if let Some(task) = churn.take() {
                    task.abort();
                }
                "ok".to_string()
            }
            "rss" => format!(
                "{} {}",
                status_kb("VmRSS").unwrap_or(0),
                status_kb("VmHWM").unwrap_or(0)
            ),
            other => format!("unknown command {other:?}"),
        };
        out.write_all(format!("{answer}\n").as_bytes()).await?;
        out.flush().await?;
    }
    Ok(())
}

/// Namespace of the churning object (never one the reconciler lists or watches).
const CHURN_NAMESPACE: &str = "bench-elsewhere";

/// Requests the fake server received, by what they were. Watches are recorded once, when
/// they start.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct RequestCounts {
    pub(crate) list: u64,
    pub(crate) get: u64,
    pub(crate) watch: u64,
    pub(crate) other: u64,
}

impl RequestCounts {
    fn of(api: &FakeApiServer) -> RequestCounts {
        let mut c = RequestCounts::default();
        for r in api.requests() {
            let watch = r
                .query_param("watch")
                .is_some_and(|v| v == "true" || v == "1");
            let last = r.path.rsplit('/').next().unwrap_or_default();
            let segments = r.path.trim_matches('/').split('/').count();
            if watch {
                c.watch += 1;
            } else if matches!(last, "pods" | "sandboxes") || r.path == "/api/v1/namespaces" {
                c.list += 1;
            } else if r.path.starts_with("/api/v1/")
                || (r.path.starts_with("/apis/") && segments > 3)
            {
                c.get += 1;
            } else {
                c.other += 1;
            }
        }
        c
    }

    /// Every request but the watches.
    pub(crate) fn api(&self) -> u64 {
        self.list + self.get + self.other
    }
}

/// The parent's handle on the child.
pub(crate) struct FakeCluster {
    pub(crate) child: tokio::process::Child,
    pub(crate) stdin: tokio::process::ChildStdin,
    pub(crate) stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    pub(crate) url: String,
    pub(crate) pid: u32,
}

impl FakeCluster {
    pub(crate) async fn start(args: &Args) -> Result<FakeCluster> {
        let exe = std::env::current_exe()?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("--serve-fake-api")
            .args(["--rows", &args.rows.to_string()])
            .args(["--pods", &args.pods.to_string()])
            .args(["--sandboxes", &args.sandboxes.to_string()])
            .args(["--paused-sandbox-pct", &args.paused_sandbox_pct.to_string()])
            .args(["--orphans", &args.orphans.to_string()])
            .args(["--steady-orphans", &args.steady_orphans.to_string()])
            .args(["--naive-orphans", &args.naive_orphans.to_string()])
            .args(["--suspended-pct", &args.suspended_pct.to_string()])
            .args(["--live-pct", &args.live_pct.to_string()])
            .args(["--other-pct", &args.other_pct.to_string()])
            .args(["--namespace", &args.namespace])
            .args(["--api-latency-ms", &args.api_latency_ms.to_string()])
            .args(["--shape", args.shape.name()])
            .args([
                "--bookmark-interval-ms",
                &args.bookmark_interval_ms.to_string(),
            ])
            .args(["--churn-ms", &args.churn_ms.to_string()])
            .args([
                "--scenarios",
                &args
                    .scenarios
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(","),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if args.lean_objects {
            cmd.arg("--lean-objects");
        }
        let mut child = cmd
            .spawn()
            .context("starting the fake API server process")?;
        let pid = child.id().unwrap_or(0);
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut stdout = BufReader::new(stdout).lines();
        let ready = stdout
            .next_line()
            .await?
            .ok_or_else(|| anyhow!("the fake API server process exited before it was ready"))?;
        let url = ready
            .strip_prefix("ready ")
            .ok_or_else(|| anyhow!("unexpected line from the fake API server: {ready}"))?
            .to_string();
        Ok(FakeCluster {
            child,
            stdin,
            stdout,
            url,
            pid,
        })
    }

    pub(crate) async fn ask(&mut self, command: &str) -> Result<String> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        self.stdout
            .next_line()
            .await?
            .ok_or_else(|| anyhow!("the fake API server process exited"))
    }

    pub(crate) async fn counts(&mut self) -> Result<RequestCounts> {
        let answer = self.ask("counts").await?;
        let v: Vec<u64> = answer
            .split(' ')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("unexpected answer to counts: {answer}"))?;
        match v[..] {
            [list, get, watch, other] => Ok(RequestCounts {
                list,
                get,
                watch,
                other,
            }),
            _ => Err(anyhow!("unexpected answer to counts: {answer}")),
        }
    }

    pub(crate) async fn clear(&mut self) -> Result<()> {
        self.ask("clear").await.map(|_| ())
    }

    pub(crate) async fn open_watches(&mut self) -> Result<u64> {
        Ok(self.ask("watches").await?.parse()?)
    }

    pub(crate) async fn churn(&mut self, on: bool) -> Result<()> {
        self.ask(if on { "churn on" } else { "churn off" })
            .await
            .map(|_| ())
    }

    pub(crate) async fn rss_mib(&mut self) -> Result<f64> {
        let answer = self.ask("rss").await?;
        let kb: u64 = answer.split(' ').next().unwrap_or("0").parse()?;
        Ok(kb as f64 / 1024.0)
    }

    /// A client configured as the reconciler's own (`cluster::client::connect`): kube's retry
    /// layer off (the reconciler retries by its own policy), its read and connect timeouts.
    pub(crate) fn client(&self, request_timeout: Duration) -> Result<kube::Client> {
        let mut config = kube::Config::new(self.url.parse()?);
        config.default_retry = false;
        config.read_timeout = Some(request_timeout);
        config.connect_timeout = Some(request_timeout.min(Duration::from_secs(10)));
        Ok(kube::Client::try_from(config)?)
    }

    pub(crate) async fn stop(mut self) {
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = self.child.kill().await;
    }
}
