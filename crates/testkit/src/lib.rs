//! The test harness of sandbox-reconciler, as a crate of its own.
//!
//! It does not depend on the reconciler: it stands in for the world around it (a Kubernetes
//! API server, the agent platform writing its session table) and watches what the real
//! binary does to that world, over HTTP, SQL and process exits. The reconciler's integration
//! tests (`tests/it/`), the benchmark (`examples/bench/`) and the soak runner
//! (`examples/soak.rs`) share it.
//!
//! - [`fake_api`]: a fake Kubernetes API server on loopback that the real `kube::Client`
//!   talks to, with faults injected per request;
//! - [`pg`]: the PostgreSQL server of the tests and the centaur-shaped session table;
//! - [`net`]: free ports and a raw HTTP client for the reconciler's `/metrics`, `/healthz`;
//! - [`exposition`]: reading values out of a Prometheus text exposition;
//! - [`soak`]: the soak simulator (application churn and faults against daemons of the real
//!   binary) and its oracle.

pub mod exposition;
pub mod fake_api;
pub mod net;
pub mod pg;
pub mod soak;
