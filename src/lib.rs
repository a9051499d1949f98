//! sandbox-reconciler keeps an agent platform's session database honest about its
//! Kubernetes cluster: it finds `suspended` session rows whose Pod or Sandbox no longer
//! exists and downgrades them to `gone`, safely, with an audit record for each.
//!
//! The module map is docs/DESIGN.md, "Shape" (one line per module). In short: `cluster` and
//! `store` do the I/O, `snapshot` holds the values they exchange, `plan` decides, `sweep` runs
//! one sweep in the safe order, `report` prints it.

pub mod backends;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod explain;
pub mod history;
pub mod http;
pub mod label;
pub mod metrics;
pub mod permissions;
pub mod plan;
pub mod progress;
pub mod selector;
pub mod snapshot;
pub mod sql;
pub mod store;
pub mod sweep;
pub mod undo;

/// The sweep's report and its summaries, where they have always been found.
pub use sweep::report;

/// The git commit this binary was built from ("unknown" outside a git checkout; a build can
/// set `SANDBOX_RECONCILER_REVISION` instead, e.g. in a container build).
pub const REVISION: &str = env!("SANDBOX_RECONCILER_REVISION");
